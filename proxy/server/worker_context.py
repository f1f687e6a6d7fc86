"""What a worker's connections share: its snapshot, cluster manager, stats and drain state."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.server.drain_manager import DrainManager
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
    # Cancel scopes of connections waiting idle for their next request: a drain closes them
    # at once (a keep-alive connection with no request in flight has nothing to finish).
    idle_waits: set[Any] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.drain.on_drain(self._close_idle)

    def _close_idle(self) -> None:
        for scope in list(self.idle_waits):
            scope.cancel()
