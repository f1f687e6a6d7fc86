"""The control channel between an epoch's main process and each of its workers.

The main process starts a worker with two pipes: the worker's stdin and stdout. Over stdin
it first sends the serialized bootstrap (``<length>\\n<bytes>``), then a second frame (JSON:
state the worker needs before it accepts, e.g. host health), then JSON lines, one per
command: ``{"seq": 7, "op": "flush"}``. Over stdout the worker answers ``READY`` once it
accepts, then one JSON line per command: ``{"seq": 7, "ok": <result>}`` or
``{"seq": 7, "error": "..."}``. A worker may also send event lines of its own, unasked
(``{"event": "host_unhealthy", ...}``: ``WorkerChannel(on_event=...)`` gets them). This is how the admin API reaches state that only workers
hold (per-host counters, the health-check-failed flag, a fresh stats flush) without any
shared lock: each worker answers from its own loop.

A worker that does not answer within the caller's timeout is skipped, never waited on:
admin must answer even while a worker is wedged or restarting.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger("trioxy.control")

MAX_LINE = 16 * 1024 * 1024  # a /clusters answer of a very large cluster still fits


def frame_bootstrap(data: bytes) -> bytes:
    return b"%d\n" % len(data) + data


def read_bootstrap(fd: int = 0) -> bytes:
    """Read the framed bootstrap from ``fd`` without reading past it: what follows is the
    command stream, read later by trio from the same fd."""

    def read_exact(n: int) -> bytes:
        chunks = []
        while n:
            chunk = os.read(fd, n)
            if not chunk:
                raise EOFError("the main process closed the control pipe")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    header = b""
    while not header.endswith(b"\n"):
        header += read_exact(1)
        if len(header) > 20:
            raise ValueError("bad bootstrap frame header")
    return read_exact(int(header))


class _LineReader:
    """Newline-delimited lines from a trio receive stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def lines(self) -> Any:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 1]
                yield line
                continue
            if len(self.buf) > MAX_LINE:
                raise ValueError("control line too long")
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return
            self.buf += chunk


class WorkerChannel:
    """The main process's end of one worker's control channel."""

    def __init__(self, send: trio.abc.SendStream, receive: trio.abc.ReceiveStream,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._send = send
        self._on_event = on_event
        self._receive = receive
        self._send_lock = trio.Lock()
        self._seq = 0
        self._pending: dict[int, tuple[trio.Event, list[Any]]] = {}
        self.ready = trio.Event()
        self.closed = False

    async def send_bootstrap(self, data: bytes) -> None:
        async with self._send_lock:
            await self._send.send_all(frame_bootstrap(data))

    async def read_loop(self) -> None:
        """Dispatch the worker's lines until it closes stdout (it exited)."""
        try:
            async for line in _LineReader(self._receive).lines():
                if line == b"READY":
                    self.ready.set()
                    continue
                try:
                    msg = json.loads(line)
                    if isinstance(msg, dict) and "event" in msg:  # unsolicited
                        self._event(msg)
                        continue
                    waiter = self._pending.pop(int(msg["seq"]), None)
                except (ValueError, KeyError, TypeError):
                    log.warning("worker sent a line that is not a control answer: %r", line[:200])
                    continue
                if waiter is not None:
                    waiter[1].append(msg)
                    waiter[0].set()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ValueError):
            pass
        finally:
            self.closed = True
            for event, _ in self._pending.values():
                event.set()
            self._pending.clear()

    def _event(self, msg: dict[str, Any]) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(msg)
        except Exception:  # a bad event must not end the channel
            log.exception("worker event %r failed", msg.get("event"))

    async def call(self, op: str, wait_s: float = 2.0, **args: Any) -> Any:
        """Run ``op`` in the worker; its result, or raise ``ControlError``."""
        if self.closed or not self.ready.is_set():
            raise ControlError("worker is not running")
        self._seq += 1
        seq = self._seq
        event = trio.Event()
        box: list[Any] = []
        self._pending[seq] = (event, box)
        line = json.dumps({"seq": seq, "op": op, **args}, separators=(",", ":")) + "\n"
        try:
            with trio.move_on_after(wait_s) as scope:
                async with self._send_lock:
                    await self._send.send_all(line.encode())
                await event.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ControlError("worker is not running") from None
        finally:
            self._pending.pop(seq, None)
        if scope.cancelled_caught:
            raise ControlError(f"worker did not answer {op!r} within {wait_s:g} s")
        if not box:
            raise ControlError("worker exited")
        msg = box[0]
        if "error" in msg:
            raise ControlError(str(msg["error"]))
        return msg.get("ok")


class ControlError(Exception):
    pass


Handler = Callable[[dict[str, Any]], Awaitable[Any] | Any]


class LineSender:
    """The worker's stdout, shared by ``READY`` and the command answers."""

    def __init__(self, stream: trio.abc.SendStream) -> None:
        self.stream = stream
        self.lock = trio.Lock()

    async def send_all(self, data: bytes) -> None:
        async with self.lock:
            await self.stream.send_all(data)


async def send_events(events: trio.abc.ReceiveChannel[dict[str, Any]],
                      send: LineSender) -> None:
    """The worker's end of event lines: each event on the answer pipe, in order."""
    async for event in events:
        data = json.dumps(event, separators=(",", ":"), default=_json_default) + "\n"
        await send.send_all(data.encode())


async def serve_commands(
    receive: trio.abc.ReceiveStream, send: LineSender, handlers: dict[str, Handler]
) -> None:
    """The worker's end: run each command in order, answer each one. Returns at EOF."""
    async for line in _LineReader(receive).lines():
        try:
            msg = json.loads(line)
            seq = int(msg["seq"])
        except (ValueError, KeyError, TypeError):
            log.warning("bad control line from the main process: %r", line[:200])
            continue
        handler = handlers.get(msg.get("op"))
        try:
            if handler is None:
                raise ValueError(f"unknown control op {msg.get('op')!r}")
            result = handler(msg)
            if isinstance(result, Awaitable):
                result = await result
            answer: dict[str, Any] = {"seq": seq, "ok": result}
        except Exception as exc:  # an answer, not a dead worker
            answer = {"seq": seq, "error": f"{type(exc).__name__}: {exc}"}
        data = json.dumps(answer, separators=(",", ":"), default=_json_default) + "\n"
        await send.send_all(data.encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"cannot encode {type(o).__name__}")
