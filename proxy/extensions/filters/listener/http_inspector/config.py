"""Factory for ``envoy.filters.listener.http_inspector`` (the HttpInspector message)."""

from __future__ import annotations

from typing import Any

from envoy.extensions.filters.listener.http_inspector.v3.http_inspector_pb2 import HttpInspector

from proxy.config.context import FactoryContext
from proxy.extensions.filters.listener.http_inspector.http_inspector import HttpInspectorConfig
from proxy.registry import listener_filters


@listener_filters.register("envoy.filters.listener.http_inspector", HttpInspector)
def create_http_inspector(msg: Any, ctx: FactoryContext, path: str) -> HttpInspectorConfig:
    return HttpInspectorConfig()
