"""What the admin handlers need from the epoch's main process (``Instance`` provides it).

Handlers depend on this protocol, not on ``Instance``, so they can be driven in tests by a
plain object and the main process stays the only place that owns processes and sockets.
"""

from __future__ import annotations

from typing import Any, Protocol


class AdminContext(Protocol):
    options: Any  # proxy.server.options.Options
    snapshot: Any  # proxy.config.snapshot.Snapshot
    loaded_at: float  # wall clock: when this epoch loaded its config
    health_check_failed: bool

    def server_state(self) -> str:
        """LIVE, DRAINING, PRE_INITIALIZING or INITIALIZING (Envoy's ServerInfo.State)."""
        ...

    def uptime_current_s(self) -> float: ...

    def uptime_all_s(self) -> float: ...

    def processes(self) -> list[tuple[str, int]]:
        """(role, pid) of this epoch's live processes: ("main", pid), ("worker 0", pid)..."""
        ...

    def listener_addresses(self) -> list[tuple[str, str, bool]]:
        """(name, "ip:port" as bound, stopped) of each listener."""
        ...

    async def current_stats(self) -> Any:
        """Every process's stats summed (``shm.stats_block.Stats``), freshly flushed."""
        ...

    def histogram_interval(self) -> Any:
        """The histogram deltas of the last stats interval (a ``Stats``), or None."""
        ...

    async def reset_counters(self) -> None: ...

    async def worker_call(self, op: str, wait_s: float = 2.0, **args: Any) -> dict[int, Any]:
        """Run a control op in every live worker: worker index -> answer (absent: no answer)."""
        ...

    async def set_health_check_failed(self, failed: bool) -> None: ...

    async def drain_listeners(self, *, graceful: bool, inbound_only: bool,
                              skip_exit: bool) -> None: ...

    def quit(self) -> None:
        """/quitquitquit: drain and exit as on SIGTERM."""
        ...

    async def set_log_level(self, level: str, logger: str | None) -> None: ...
