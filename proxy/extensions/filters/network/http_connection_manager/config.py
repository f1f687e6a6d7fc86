"""Factory for ``envoy.filters.network.http_connection_manager``."""

from __future__ import annotations

from typing import Any

from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
    HttpConnectionManager,
)

from proxy.config.context import FactoryContext
from proxy.http.conn_manager_config import HttpConnectionManagerConfig
from proxy.registry import network_filters


@network_filters.register("envoy.filters.network.http_connection_manager", HttpConnectionManager)
def create_http_connection_manager(
    msg: Any, ctx: FactoryContext, path: str
) -> HttpConnectionManagerConfig:
    return HttpConnectionManagerConfig.from_proto(msg, ctx, path)
