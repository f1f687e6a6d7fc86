"""What a worker's connections share: its snapshot, cluster manager, stats and drain state."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.server.drain_manager import DrainManager
from proxy.server.timer_wheel import TimerWheel
from proxy.stats import Store

if TYPE_CHECKING:
    from proxy.config.snapshot import Snapshot
    from proxy.upstream.cluster_manager import ClusterManager


@dataclass
class WorkerContext:
    """One per worker process; every connection the worker accepts gets it."""

    cluster_manager: ClusterManager
    snapshot: Snapshot | None = None
    index: int = 0
    stats: Store = field(default_factory=Store)
    drain: DrainManager = field(default_factory=DrainManager)
    rng: random.Random = field(default_factory=random.Random)
    # Connections waiting idle for their next request (objects with ``on_drain()``): a
    # drain closes them, having nothing in flight to finish.
    idle_connections: set[Any] = field(default_factory=set)
    timers: TimerWheel = field(default_factory=TimerWheel)
    # Unsolicited events for the epoch's main process (a control event line); None when
    # the worker runs without one (in-process tests).
    post_event: Callable[[dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        self.drain.on_drain(self._close_idle)

    def _close_idle(self) -> None:
        for conn in list(self.idle_connections):
            conn.on_drain()

    def immediate_health_check_fail(self, cluster: Any, host: Any) -> None:
        """An upstream response carried ``x-envoy-immediate-health-check-fail``: with active
        health checking, the host fails at once (Envoy's ``setUnhealthy(
        ImmediateHealthCheckFail)``, a PASSIVE failure in the main process's checker, which
        tells every worker). This worker stops using it now; without active health
        checking the header means nothing."""
        if cluster is None or not cluster.config.health_checks:
            return
        cluster.apply_health([(host.address, host.port, False)])
        if self.post_event is not None:
            self.post_event({"event": "host_unhealthy", "cluster": cluster.name,
                             "address": host.address, "port": host.port})
