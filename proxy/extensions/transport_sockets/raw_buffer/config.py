"""``envoy.transport_sockets.raw_buffer``: plaintext, the default (the factory returns None)."""

from __future__ import annotations

from typing import Any

from envoy.extensions.transport_sockets.raw_buffer.v3.raw_buffer_pb2 import RawBuffer

from proxy.registry import downstream_transport_sockets, upstream_transport_sockets


@downstream_transport_sockets.register("envoy.transport_sockets.raw_buffer", RawBuffer)
@upstream_transport_sockets.register("envoy.transport_sockets.raw_buffer", RawBuffer)
def create_raw_buffer(msg: Any, ctx: Any, path: str) -> None:
    return None
