"""Envoy's drain manager: once draining starts, how likely a response is to close its connection.

``--drain-strategy gradual``: the probability that ``drain_close()`` says yes rises linearly
from 0 to 1 over ``--drain-time-s``, so clients move away gradually instead of all at once.
``immediate``: every response closes as soon as draining starts. Sans-IO: time and randomness
are injected.

The server's "health check failed" state (admin ``/healthcheck/fail``) lives here too, because
its one effect outside the health_check HTTP filter is this: while it is set every response
closes its connection, as Envoy's ``DrainManagerImpl::drainClose`` does for DEFAULT drain type
listeners (trioxy has no other drain type). It does not start a drain: idle keep-alive
connections are left alone and nothing is counted down.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable


class DrainStrategy(enum.Enum):
    GRADUAL = "gradual"
    IMMEDIATE = "immediate"


class DrainManager:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self.draining = False
        self._drain_start = 0.0
        self._drain_time_s = 0.0
        self._strategy = DrainStrategy.GRADUAL
        self._listeners: list[Callable[[], None]] = []
        # Set by the worker's control channel (admin /healthcheck/fail and /healthcheck/ok).
        self.health_check_failed = False

    def set_health_check_failed(self, failed: bool) -> None:
        """Enter (True) or leave (False) the server's "health check failed" state."""
        self.health_check_failed = failed

    def start_drain_sequence(
        self, drain_time_s: float, strategy: DrainStrategy = DrainStrategy.GRADUAL
    ) -> None:
        if self.draining:
            return
        self.draining = True
        self._drain_start = self._clock()
        self._drain_time_s = max(0.0, drain_time_s)
        self._strategy = strategy
        for cb in self._listeners:
            cb()

    def on_drain(self, cb: Callable[[], None]) -> None:
        """Call ``cb`` when draining starts (idle keep-alive connections close themselves)."""
        self._listeners.append(cb)
        if self.draining:
            cb()

    def drain_close(self) -> bool:
        """Should the response being sent now close its connection?"""
        if self.health_check_failed:
            # Load balancers that probe us are being told to go away: move the clients
            # still connected to other hosts at once, with no gradual ramp (as Envoy).
            return True
        if not self.draining:
            return False
        if self._strategy is DrainStrategy.IMMEDIATE or self._drain_time_s == 0:
            return True
        elapsed = self._clock() - self._drain_start
        if elapsed >= self._drain_time_s:
            return True
        return self._rng.random() < elapsed / self._drain_time_s
