"""Factory for ``envoy.filters.http.router``."""

from __future__ import annotations

from typing import Any

from envoy.extensions.filters.http.router.v3.router_pb2 import Router

from proxy.config.context import FactoryContext
from proxy.registry import http_filters
from proxy.router.router import RouterConfig


@http_filters.register("envoy.filters.http.router", Router)
def create_router(msg: Any, ctx: FactoryContext, path: str) -> RouterConfig:
    # dynamic_stats (default true) is accepted: per-cluster response-code stats are always on.
    return RouterConfig(suppress_envoy_headers=msg.suppress_envoy_headers)
