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
class AdminConfig:
    """``bootstrap.admin``: where the admin API listens and how its requests are logged."""

    address: tuple[str, int]
    access_logs: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    bootstrap: Any
    listeners: tuple[ListenerConfig, ...]
    clusters: Mapping[str, ClusterConfig]
    runtime: Runtime
    admin: AdminConfig | None = None
    # ``bind_to_port: false`` listeners: no socket, reached only by a use_original_dst
    # hand-off (proxy.listener.active_tcp_socket). ``listeners`` are the bound ones.
    unbound_listeners: tuple[ListenerConfig, ...] = ()


def build_admin(admin: Any, runtime: Runtime) -> AdminConfig | None:
    """None without ``admin.address`` (as Envoy: no admin listener then)."""
    from proxy.access_log.access_log import AccessLog, build_access_logs
    from proxy.access_log.formatter import DEFAULT_FORMAT, compile_format
    from proxy.listener.listener_config import bind_address

    if not admin.HasField("address"):
        if admin.access_log or admin.access_log_path:
            name = "access_log" if admin.access_log else "access_log_path"
            raise ConfigError(f"admin.{name}", "an admin access log needs admin.address")
        return None
    address = bind_address(admin.address, "admin.address")
    logs = list(build_access_logs(admin.access_log, FactoryContext(runtime=runtime),
                                  "admin.access_log"))
    if admin.access_log_path:
        # Deprecated in Envoy but still honoured: Envoy's default format into that file.
        logs.append(AccessLog("admin", admin.access_log_path,
                              compile_format(DEFAULT_FORMAT + "\n", "admin.access_log_path")))
    return AdminConfig(address, tuple(logs))


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
    ctx = FactoryContext(
        cluster_names=frozenset(clusters), runtime=runtime,
        local_cluster_name=bootstrap.node.cluster,
    )
    listeners: list[ListenerConfig] = []
    unbound: list[ListenerConfig] = []
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
        (listeners if lc.bind_to_port else unbound).append(lc)
    admin = build_admin(bootstrap.admin, runtime) if bootstrap.HasField("admin") else None
    if admin is not None and admin.address in addresses and admin.address[1] != 0:
        raise ConfigError("admin.address", f"a listener already uses {admin.address[0]}:"
                                           f"{admin.address[1]}")
    return Snapshot(bootstrap=bootstrap, listeners=tuple(listeners), clusters=clusters,
                    runtime=runtime, admin=admin, unbound_listeners=tuple(unbound))
