"""The immutable runtime view of a validated bootstrap (the RCU'd config of DESIGN §4).

``build_snapshot`` is pure: it compiles every listener, route table, cluster and filter,
and opens, binds and resolves nothing, so ``--mode validate`` runs exactly what serving runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.config.context import FactoryContext
from proxy.config.errors import ConfigError
from proxy.config.runtime import Runtime
from proxy.listener.listener_config import ListenerConfig
from proxy.upstream.cluster_config import ClusterConfig


@dataclass(frozen=True)
class Snapshot:
    bootstrap: Any
    listeners: tuple[ListenerConfig, ...]
    clusters: Mapping[str, ClusterConfig]
    runtime: Runtime


def build_snapshot(bootstrap: Any) -> Snapshot:
    import proxy.extensions  # noqa: F401  (fills the registries)

    runtime = Runtime.from_proto(bootstrap.layered_runtime, "layered_runtime")
    sr = bootstrap.static_resources
    clusters: dict[str, ClusterConfig] = {}
    for i, c in enumerate(sr.clusters):
        path = f"static_resources.clusters[{i}]"
        cfg = ClusterConfig.from_proto(c, FactoryContext(runtime=runtime), path)
        if cfg.name in clusters:
            raise ConfigError(f"{path}.name", f"duplicate cluster name {cfg.name!r}")
        clusters[cfg.name] = cfg
    ctx = FactoryContext(cluster_names=frozenset(clusters), runtime=runtime)
    listeners: list[ListenerConfig] = []
    names: set[str] = set()
    addresses: set[tuple[str, int]] = set()
    for i, lp in enumerate(sr.listeners):
        path = f"static_resources.listeners[{i}]"
        lc = ListenerConfig.from_proto(lp, ctx, path)
        if lc.name in names:
            raise ConfigError(f"{path}.name", f"duplicate listener name {lc.name!r}")
        if lc.address in addresses and lc.address[1] != 0:
            raise ConfigError(
                f"{path}.address", f"another listener already uses {lc.address_string}"
            )
        names.add(lc.name)
        addresses.add(lc.address)
        listeners.append(lc)
    return Snapshot(bootstrap=bootstrap, listeners=tuple(listeners), clusters=clusters, runtime=runtime)
