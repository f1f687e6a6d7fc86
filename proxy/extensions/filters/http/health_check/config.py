"""Factory for ``envoy.filters.http.health_check`` (Envoy's ``HealthCheckFilterConfig``)."""

from __future__ import annotations

from typing import Any

from envoy.extensions.filters.http.health_check.v3.health_check_pb2 import HealthCheck

from proxy.common.matchers import compile_header_matchers
from proxy.config.context import FactoryContext
from proxy.config.errors import ConfigError
from proxy.extensions.filters.http.health_check.health_check import (
    HealthCheckCache,
    HealthCheckConfig,
)
from proxy.registry import http_filters


@http_filters.register("envoy.filters.http.health_check", HealthCheck)
def create_health_check(msg: Any, ctx: FactoryContext, path: str) -> HealthCheckConfig:
    if not msg.HasField("pass_through_mode"):
        raise ConfigError(f"{path}.pass_through_mode", "value is required")
    pass_through_mode = msg.pass_through_mode.value
    headers = compile_header_matchers(msg.headers, f"{path}.headers")

    cache: HealthCheckCache | None = None
    if msg.HasField("cache_time"):
        d = msg.cache_time
        if d.seconds < 0 or d.nanos < 0:
            raise ConfigError(f"{path}.cache_time", "must not be negative")
        # Envoy reads it in whole milliseconds: below 1 ms there is no cache.
        cache_ms = d.seconds * 1000 + d.nanos // 1_000_000
        if cache_ms and not pass_through_mode:
            raise ConfigError(
                f"{path}.cache_time", "cache_time must not be set when pass_through_mode is false"
            )
        if cache_ms:
            cache = HealthCheckCache(cache_ms / 1000)

    percentages: list[tuple[str, int]] = []
    if msg.cluster_min_healthy_percentages:
        if pass_through_mode:
            # Envoy accepts the pair and ignores the percentages; a setting that silently
            # does nothing is refused here, as every ignored field is.
            raise ConfigError(
                f"{path}.cluster_min_healthy_percentages",
                "cluster_min_healthy_percentages has no effect with pass_through_mode: true"
                " (Envoy ignores it there); remove it or turn pass_through_mode off",
            )
        for name in sorted(msg.cluster_min_healthy_percentages):  # Envoy's std::map order
            value = msg.cluster_min_healthy_percentages[name].value
            if not 0.0 <= value <= 100.0:
                raise ConfigError(
                    f'{path}.cluster_min_healthy_percentages["{name}"].value',
                    "value must be inside range [0, 100]",
                )
            # Envoy compares whole percents: the fraction is truncated.
            percentages.append((name, int(value)))

    return HealthCheckConfig(
        pass_through_mode=pass_through_mode,
        headers=headers,
        cache=cache,
        cluster_min_healthy_percentages=tuple(percentages),
        local_cluster_name=ctx.local_cluster_name,
    )
