"""Factory for ``envoy.filters.http.grpc_stats`` (Envoy's ``GrpcStatsFilterConfigFactory``)."""

from __future__ import annotations

from typing import Any

from envoy.extensions.filters.http.grpc_stats.v3.config_pb2 import FilterConfig

from proxy.config.context import FactoryContext
from proxy.config.errors import not_supported
from proxy.extensions.filters.http.grpc_stats.grpc_stats import GrpcStatsConfig
from proxy.registry import http_filters

# Envoy's runtime guard for the deprecated default (neither allowlist nor
# stats_for_all_methods set): false in current Envoy, so per-method stats are opt-in.
ALL_METHODS_BY_DEFAULT = (
    "envoy.deprecated_features.grpc_stats_filter_enable_stats_for_all_methods_by_default")


@http_filters.register("envoy.filters.http.grpc_stats", FilterConfig)
def create_grpc_stats(msg: Any, ctx: FactoryContext, path: str) -> GrpcStatsConfig:
    if msg.emit_filter_state:
        # Filter state has no reader in trioxy (no %FILTER_STATE% operator yet).
        raise not_supported(f"{path}.emit_filter_state", "emit_filter_state")
    which = msg.WhichOneof("per_method_stat_specifier")
    allowlist: dict[str, frozenset[str]] | None = None
    if which == "individual_method_stats_allowlist":
        allowlist = {}
        for svc in msg.individual_method_stats_allowlist.services:
            allowlist[svc.name] = allowlist.get(svc.name, frozenset()) | frozenset(
                svc.method_names)
        all_methods = False
    elif which == "stats_for_all_methods":
        all_methods = msg.stats_for_all_methods.value
    else:
        all_methods = (ctx.runtime.get_bool(ALL_METHODS_BY_DEFAULT, False)
                       if ctx.runtime is not None else False)
    return GrpcStatsConfig(
        stats_for_all_methods=all_methods,
        allowlist=allowlist,
        enable_upstream_stats=msg.enable_upstream_stats,
        replace_dots_in_grpc_service_name=msg.replace_dots_in_grpc_service_name,
    )
