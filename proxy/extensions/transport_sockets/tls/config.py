"""Factories for ``envoy.transport_sockets.tls`` (DownstreamTlsContext, UpstreamTlsContext)."""

from __future__ import annotations

from typing import Any

from envoy.extensions.transport_sockets.tls.v3.tls_pb2 import (
    DownstreamTlsContext,
    UpstreamTlsContext,
)

from proxy.registry import downstream_transport_sockets, upstream_transport_sockets
from proxy.tls.context import TlsContext, client_context_from_proto, server_context_from_proto


@downstream_transport_sockets.register("envoy.transport_sockets.tls", DownstreamTlsContext)
def create_downstream_tls(msg: Any, ctx: Any, path: str) -> TlsContext:
    return server_context_from_proto(msg, path)


@upstream_transport_sockets.register("envoy.transport_sockets.tls", UpstreamTlsContext)
def create_upstream_tls(msg: Any, ctx: Any, path: str) -> TlsContext:
    return client_context_from_proto(msg, path)
