"""The worker's timer wheel: timers fire once, in order, near their time; cancelled ones never."""

from __future__ import annotations

import trio

from proxy.server.timer_wheel import TimerWheel


async def test_timers_fire_in_order_and_cancelled_ones_do_not() -> None:
    wheel = TimerWheel(resolution=0.01)
    fired: list[tuple[str, float]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(wheel.run)
        now = trio.current_time()
        wheel.schedule(now + 0.20, lambda: fired.append(("late", trio.current_time() - now)))
        wheel.schedule(now + 0.05, lambda: fired.append(("early", trio.current_time() - now)))
        gone = wheel.schedule(now + 0.10, lambda: fired.append(("cancelled", 0.0)))
        gone.cancel()
        await trio.sleep(0.3)
        nursery.cancel_scope.cancel()
    assert [name for name, _ in fired] == ["early", "late"]
    assert 0.05 <= fired[0][1] < 0.15
    assert 0.20 <= fired[1][1] < 0.30
    assert len(wheel) == 0


async def test_an_earlier_timer_wakes_a_wheel_sleeping_on_a_later_one() -> None:
    wheel = TimerWheel(resolution=0.01)
    fired = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(wheel.run)
        wheel.call_later(3600, lambda: None)  # the wheel now sleeps for an hour
        await trio.sleep(0.02)
        wheel.call_later(0.05, fired.set)
        with trio.fail_after(1):
            await fired.wait()
        nursery.cancel_scope.cancel()


async def test_a_failing_callback_does_not_stop_the_others() -> None:
    wheel = TimerWheel(resolution=0.01)
    fired = trio.Event()

    def boom() -> None:
        raise RuntimeError("bug")

    async with trio.open_nursery() as nursery:
        await nursery.start(wheel.run)
        wheel.call_later(0.01, boom)
        wheel.call_later(0.02, fired.set)
        with trio.fail_after(1):
            await fired.wait()
        nursery.cancel_scope.cancel()


async def test_many_timers_cost_nothing_once_cancelled() -> None:
    wheel = TimerWheel(resolution=0.01)
    timers = [wheel.call_later(15 + i * 1e-4, lambda: None) for i in range(10_000)]
    assert len(wheel) == 10_000
    for t in timers:
        t.cancel()
    assert len(wheel) == 0 and not wheel._buckets
