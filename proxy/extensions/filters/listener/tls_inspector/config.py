"""Factory for ``envoy.filters.listener.tls_inspector`` (the TlsInspector message)."""

from __future__ import annotations

from typing import Any

from envoy.extensions.filters.listener.tls_inspector.v3.tls_inspector_pb2 import TlsInspector

from proxy.config.context import FactoryContext
from proxy.extensions.filters.listener.tls_inspector.tls_inspector import TlsInspectorConfig
from proxy.registry import listener_filters


@listener_filters.register("envoy.filters.listener.tls_inspector", TlsInspector)
def create_tls_inspector(msg: Any, ctx: FactoryContext, path: str) -> TlsInspectorConfig:
    return TlsInspectorConfig.from_proto(msg, path)
