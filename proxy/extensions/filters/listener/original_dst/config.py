"""Factory for ``envoy.filters.listener.original_dst`` (the OriginalDst message)."""

from __future__ import annotations

from typing import Any

from envoy.extensions.filters.listener.original_dst.v3.original_dst_pb2 import OriginalDst

from proxy.config.context import FactoryContext
from proxy.extensions.filters.listener.original_dst.original_dst import OriginalDstConfig
from proxy.registry import listener_filters


@listener_filters.register("envoy.filters.listener.original_dst", OriginalDst)
def create_original_dst(msg: Any, ctx: FactoryContext, path: str) -> OriginalDstConfig:
    return OriginalDstConfig()
