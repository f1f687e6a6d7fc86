"""Per-worker timers for the request path: idle and route timeouts without cancel scopes.

A trio ``CancelScope`` with a deadline costs about 7 µs to enter, arm and leave; the HTTP
path needs two per request (the keep-alive idle wait, the route timeout), which was a
tenth of trioxy's CPU per proxied request. Almost every such timer is cancelled long
before it fires, so they live here instead: timers are grouped in buckets of
``resolution`` seconds, scheduling and cancelling are a set add and discard, and one task
per worker sleeps until the earliest bucket is due and runs its callbacks.

A callback must not block: it sets a flag and wakes whoever waits (typically with
``trio.lowlevel.notify_closing`` on the socket that task waits on, then the waiting task
sees ``trio.ClosedResourceError``, reads the flag and handles the timeout).

Times are ``trio.current_time()`` values.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

import trio

DEFAULT_RESOLUTION_S = 0.01


class Timer:
    __slots__ = ("tick", "callback", "wheel")

    def __init__(self, tick: int, callback: Callable[[], None], wheel: TimerWheel) -> None:
        self.tick = tick
        self.callback = callback
        self.wheel = wheel

    def cancel(self) -> None:
        self.wheel._cancel(self)


class TimerWheel:
    def __init__(self, resolution: float = DEFAULT_RESOLUTION_S) -> None:
        self.resolution = resolution
        self._buckets: dict[int, set[Timer]] = {}
        self._heap: list[int] = []  # bucket ticks, lazily pruned of emptied buckets
        self._sleep: trio.CancelScope | None = None
        self._sleep_tick: float = math.inf

    def schedule(self, when: float, callback: Callable[[], None]) -> Timer:
        tick = math.ceil(when / self.resolution)
        timer = Timer(tick, callback, self)
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = set()
            heapq.heappush(self._heap, tick)
            if tick < self._sleep_tick and self._sleep is not None:
                self._sleep_tick = tick
                self._sleep.deadline = tick * self.resolution
        bucket.add(timer)
        return timer

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.schedule(trio.current_time() + delay, callback)

    def _cancel(self, timer: Timer) -> None:
        bucket = self._buckets.get(timer.tick)
        if bucket is not None:
            bucket.discard(timer)
            if not bucket:
                del self._buckets[timer.tick]

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def _due(self, now_tick: int) -> list[Timer]:
        due: list[Timer] = []
        heap = self._heap
        while heap and heap[0] <= now_tick:
            tick = heapq.heappop(heap)
            bucket = self._buckets.pop(tick, None)
            if bucket:
                due.extend(bucket)
        return due

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        res = self.resolution
        while True:
            heap = self._heap
            while heap and heap[0] not in self._buckets:
                heapq.heappop(heap)  # an emptied bucket
            self._sleep_tick = heap[0] if heap else math.inf
            with trio.CancelScope(deadline=self._sleep_tick * res) as scope:
                self._sleep = scope
                await trio.sleep_forever()
            self._sleep = None
            # (the epsilon: waking at tick * res must find that tick due despite rounding)
            for timer in self._due(math.floor(trio.current_time() / res + 1e-6)):
                try:
                    timer.callback()
                except Exception:  # a timer's bug must not stop every other timer
                    import logging

                    logging.getLogger("trioxy.timers").exception("timer callback failed")
