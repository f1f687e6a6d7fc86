"""The main process <-> worker control channel, over real pipes."""

from __future__ import annotations

import os

import pytest
import trio

from proxy.server.worker_control import (
    ControlError,
    LineSender,
    WorkerChannel,
    frame_bootstrap,
    read_bootstrap,
    serve_commands,
)


def test_bootstrap_frame_is_read_without_reading_past_it() -> None:
    r, w = os.pipe()
    try:
        os.write(w, frame_bootstrap(b"\x00config\nbytes") + b'{"seq":1}\n')
        assert read_bootstrap(r) == b"\x00config\nbytes"
        assert os.read(r, 100) == b'{"seq":1}\n'  # the command stream is untouched
    finally:
        os.close(r)
        os.close(w)


def test_bootstrap_from_a_closed_pipe_is_an_error() -> None:
    r, w = os.pipe()
    os.write(w, b"10\nabc")
    os.close(w)
    with pytest.raises(EOFError):
        read_bootstrap(r)
    os.close(r)


async def test_calls_answers_errors_and_timeouts() -> None:
    to_worker_r, to_worker_w = os.pipe()
    to_main_r, to_main_w = os.pipe()
    main_send = trio.lowlevel.FdStream(to_worker_w)
    main_recv = trio.lowlevel.FdStream(to_main_r)
    worker_recv = trio.lowlevel.FdStream(to_worker_r)
    worker_send = trio.lowlevel.FdStream(to_main_w)
    hang = trio.Event()

    async def slow(msg: dict) -> str:
        await hang.wait()
        return "late"

    def fail(msg: dict) -> None:
        raise ValueError("nope")

    handlers = {"add": lambda m: m["a"] + m["b"], "fail": fail, "slow": slow}
    ch = WorkerChannel(main_send, main_recv)
    async with trio.open_nursery() as n:
        n.start_soon(ch.read_loop)
        with pytest.raises(ControlError, match="not running"):
            await ch.call("add", a=1, b=2)  # before READY
        sender = LineSender(worker_send)
        n.start_soon(serve_commands, worker_recv, sender, handlers)
        await sender.send_all(b"READY\n")
        await ch.ready.wait()
        assert await ch.call("add", a=1, b=2) == 3
        # Concurrent calls each get their own answer.
        results: dict[int, int] = {}

        async def one(i: int) -> None:
            results[i] = await ch.call("add", a=i, b=i)

        async with trio.open_nursery() as many:
            for i in range(20):
                many.start_soon(one, i)
        assert results == {i: 2 * i for i in range(20)}
        with pytest.raises(ControlError, match="ValueError: nope"):
            await ch.call("fail")
        with pytest.raises(ControlError, match="unknown control op"):
            await ch.call("nosuch")
        with pytest.raises(ControlError, match="did not answer"):
            await ch.call("slow", wait_s=0.2)
        hang.set()
        # The late answer of the timed-out call is dropped; the next call still works.
        assert await ch.call("add", a=2, b=3) == 5
        # The worker goes away: calls fail at once instead of hanging.
        await worker_send.aclose()
        await trio.sleep(0.1)
        with pytest.raises(ControlError):
            await ch.call("add", a=1, b=1)
        n.cancel_scope.cancel()
    for s in (main_send, main_recv, worker_recv):
        await s.aclose()
