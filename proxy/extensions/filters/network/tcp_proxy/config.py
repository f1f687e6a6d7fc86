"""Factory for ``envoy.filters.network.tcp_proxy`` (the TcpProxy message)."""

from __future__ import annotations

from typing import Any

from envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2 import TcpProxy

from proxy.config.context import FactoryContext
from proxy.registry import network_filters
from proxy.tcp_proxy.tcp_proxy import TcpProxyConfig


@network_filters.register("envoy.filters.network.tcp_proxy", TcpProxy)
def create_tcp_proxy(msg: Any, ctx: FactoryContext, path: str) -> TcpProxyConfig:
    return TcpProxyConfig.from_proto(msg, ctx, path)
