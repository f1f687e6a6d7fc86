from __future__ import annotations

import random

from proxy.server.drain_manager import DrainManager, DrainStrategy


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_not_draining_never_closes() -> None:
    assert not DrainManager().drain_close()


def test_immediate_closes_every_response() -> None:
    dm = DrainManager()
    dm.start_drain_sequence(600, DrainStrategy.IMMEDIATE)
    assert all(dm.drain_close() for _ in range(100))


def test_gradual_probability_rises_linearly_over_drain_time() -> None:
    clock = Clock()
    dm = DrainManager(clock=clock, rng=random.Random(7))
    dm.start_drain_sequence(10, DrainStrategy.GRADUAL)
    clock.t += 2.5  # a quarter of the way
    share = sum(dm.drain_close() for _ in range(4000)) / 4000
    assert 0.2 < share < 0.3
    clock.t += 7.5
    assert all(dm.drain_close() for _ in range(100))


def test_on_drain_callbacks_fire_once_and_late_subscribers_fire_at_once() -> None:
    dm = DrainManager()
    seen: list[str] = []
    dm.on_drain(lambda: seen.append("early"))
    dm.start_drain_sequence(1)
    dm.start_drain_sequence(1)
    dm.on_drain(lambda: seen.append("late"))
    assert seen == ["early", "late"]


def test_health_check_failed_closes_every_response_without_draining() -> None:
    # Envoy's DrainManagerImpl::drainClose: true while health-check failed (DEFAULT drain type).
    dm = DrainManager(rng=random.Random(7))
    seen: list[str] = []
    dm.on_drain(lambda: seen.append("drain"))
    dm.set_health_check_failed(True)
    assert dm.health_check_failed and all(dm.drain_close() for _ in range(100))
    assert not dm.draining and seen == []  # idle connections are not closed
    dm.set_health_check_failed(False)
    assert not dm.drain_close()
    # A gradual drain that has just begun says "not yet"; failing health checks overrides it.
    dm.start_drain_sequence(600)
    dm.set_health_check_failed(True)
    assert all(dm.drain_close() for _ in range(100))
