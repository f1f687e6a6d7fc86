"""Factory for ``envoy.filters.listener.proxy_protocol`` (the ProxyProtocol message)."""

from __future__ import annotations

from typing import Any

from envoy.extensions.filters.listener.proxy_protocol.v3.proxy_protocol_pb2 import ProxyProtocol

from proxy.config.context import FactoryContext
from proxy.extensions.filters.listener.proxy_protocol.proxy_protocol import ProxyProtocolConfig
from proxy.registry import listener_filters


@listener_filters.register("envoy.filters.listener.proxy_protocol", ProxyProtocol)
def create_proxy_protocol(msg: Any, ctx: FactoryContext, path: str) -> ProxyProtocolConfig:
    return ProxyProtocolConfig.from_proto(msg, path)
