"""What a worker's connections share: its snapshot, cluster manager, stats and drain state."""

from __future__ import annotations

import random
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

    def __post_init__(self) -> None:
        self.drain.on_drain(self._close_idle)

    def _close_idle(self) -> None:
        for conn in list(self.idle_connections):
            conn.on_drain()
