"""Bidirectional byte relay between a downstream connection and an upstream socket.

Theory of operation
-------------------
1. Two pumps run side by side, one per direction. A pump reads until its source sends EOF,
   then shuts down the write side of its destination (``send_eof``) and ends: the other
   direction keeps flowing (TCP half-close, as Envoy's tcp_proxy with half-close enabled).
   The relay ends normally once both pumps have ended.
2. An error on either socket (RST, EPIPE, a closed socket) ends the relay at once: the other
   pump is cancelled and the result names the side that failed. The caller closes both.
3. Engines (measured; FIELD-NOTES and ``scripts``/tests print figures):
   - ``splice``: ``os.splice`` socket → pipe → socket, both non-blocking, waiting with
     ``trio.lowlevel.wait_readable`` / ``wait_writable``. Bytes never enter Python.
   - ``recv_into``: one reused buffer per pump, ``sock.recv_into`` + ``sock.send``.
   - ``stream``: ``SocketStream.receive_some`` / ``send_all`` (allocates per read).
   ``DEFAULT_ENGINE`` is the fastest that this platform has; a pump falls back to
   ``recv_into`` when splice is refused for its sockets (EINVAL: not a TCP socket).
   Measured (tests/proxy/tcp_proxy ``TRIOXY_BENCH_MIB=256``, 2-core VM, 3 runs, MB/s):
   splice 2,200-2,700, recv_into 1,890-2,150, stream 1,720-2,080; splice also used the
   least CPU. 64 KiB pipes (the kernel default) halved splice throughput: PIPE_SIZE.
4. Bytes that listener filters peeked at live in the ``Connection``; the downstream pump
   always reads its first chunk through ``Connection.receive_some`` (which replays them) and
   only then switches engine, so nothing is reordered or lost.
5. Splice pipes come from a per-process pool and go back to it whenever a pump would wait
   for its source with the pipe empty: an idle connection holds no pipe. Ten thousand idle
   connections would otherwise hold 40,000 descriptors and the pipe memory the kernel caps
   per user (``fs.pipe-user-pages-soft``).
6. Every pump checkpoints once per chunk so a busy relay never starves the worker's other
   connections, and cancellation (idle timeout, drain) is always prompt.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from proxy.network.connection import Connection

ENGINES = ("splice", "recv_into", "stream")
HAVE_SPLICE = hasattr(os, "splice") and hasattr(os, "SPLICE_F_MOVE")
DEFAULT_ENGINE = "splice" if HAVE_SPLICE else "recv_into"

# Upper bound on one read. The connection's buffer limit lowers it; a pipe holds at most
# PIPE_SIZE bytes (64 KiB is the kernel default; larger pipes count against
# fs.pipe-user-pages-soft for every pipe in flight).
MAX_CHUNK = 256 * 1024
PIPE_SIZE = 256 * 1024
_POOL_MAX_FREE = 64

_SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if HAVE_SPLICE else 0
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux
# Errors that mean "splice cannot move data between these descriptors": use recv_into.
_SPLICE_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


class RelayEnd(enum.Enum):
    """How a relay ended."""

    CLOSED = "closed"  # both directions reached EOF (half-closes completed)
    DOWNSTREAM_RESET = "downstream_reset"  # a read or write on the downstream socket failed
    UPSTREAM_RESET = "upstream_reset"


class _PipePool:
    """Non-blocking pipes for splice, reused across pumps (rule 5). Single-threaded (trio)."""

    def __init__(self, pipe_size: int) -> None:
        self.pipe_size = pipe_size
        self._free: list[tuple[int, int]] = []

    def acquire(self) -> tuple[int, int]:
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, self.pipe_size)
        except OSError:
            pass  # EPERM past the per-user pipe budget: the default 64 KiB still works
        return r, w

    def release(self, pipe: tuple[int, int]) -> None:
        """Give back an EMPTY pipe; one that may hold bytes must be ``discard``ed."""
        if len(self._free) < _POOL_MAX_FREE:
            self._free.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe: tuple[int, int]) -> None:
        for fd in pipe:
            try:
                os.close(fd)
            except OSError:
                pass


pipe_pool = _PipePool(PIPE_SIZE)


_IO_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class _SourceFailed(Exception):
    pass


class _DestinationFailed(Exception):
    pass


class _SpliceUnsupported(Exception):
    pass


async def relay(
    downstream: Connection,
    upstream: trio.SocketStream,
    *,
    on_downstream_bytes: Callable[[int], None],
    on_upstream_bytes: Callable[[int], None],
    chunk_size: int | None = None,
    engine: str = DEFAULT_ENGINE,
) -> RelayEnd:
    """Move bytes both ways until both sides sent EOF or one side failed.

    ``on_downstream_bytes(n)`` is called after ``n`` bytes read from downstream were written
    upstream; ``on_upstream_bytes(n)`` for the other direction. Neither socket is closed
    here.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown relay engine {engine!r}")
    if engine == "splice" and not HAVE_SPLICE:
        engine = "recv_into"
    limit = downstream.buffer_limit if downstream.buffer_limit > 0 else MAX_CHUNK
    chunk = max(1, min(chunk_size or MAX_CHUNK, limit))
    down_stream = downstream.stream
    if engine != "stream" and not (isinstance(down_stream, trio.SocketStream)
                                   and isinstance(upstream, trio.SocketStream)):
        engine = "stream"  # e.g. a TLS stream (either side): only its own API sees plaintext
    pump_fn = _PUMPS[engine]
    end: list[RelayEnd] = []

    async def pump(
        src: trio.SocketStream,
        dst: trio.SocketStream,
        send_eof: Callable[[], Awaitable[None]],
        on_bytes: Callable[[int], None],
        src_end: RelayEnd,
        dst_end: RelayEnd,
        prime: Connection | None,
    ) -> None:
        try:
            if prime is not None:  # rule 4: replay what listener filters peeked at
                try:
                    first = await prime.receive_some(chunk)
                except _IO_ERRORS as exc:
                    raise _SourceFailed from exc
                if not first:
                    await _eof(send_eof)
                    return
                await _send_all(dst, first)
                on_bytes(len(first))
            await pump_fn(src, dst, chunk, on_bytes)
            await _eof(send_eof)
        except _SourceFailed:
            end.append(src_end)
            nursery.cancel_scope.cancel()
        except _DestinationFailed:
            end.append(dst_end)
            nursery.cancel_scope.cancel()

    down, up = RelayEnd.DOWNSTREAM_RESET, RelayEnd.UPSTREAM_RESET
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            pump, down_stream, upstream, upstream.send_eof, on_downstream_bytes, down, up,
            downstream,
        )
        nursery.start_soon(
            pump, upstream, down_stream, downstream.send_eof, on_upstream_bytes, up, down, None
        )
    return end[0] if end else RelayEnd.CLOSED


async def _eof(send_eof: Callable[[], Awaitable[None]]) -> None:
    try:
        await send_eof()
    except _IO_ERRORS as exc:
        raise _DestinationFailed from exc


async def _send_all(dst: trio.SocketStream, data: bytes | memoryview) -> None:
    try:
        await dst.send_all(data)
    except _IO_ERRORS as exc:
        raise _DestinationFailed from exc


# ------------------------------------------------------------------------------------------
# Engines. Each moves bytes from src to dst until src's EOF and returns; it raises
# _SourceFailed / _DestinationFailed on errors.
# ------------------------------------------------------------------------------------------

PumpFn = Callable[
    [trio.SocketStream, trio.SocketStream, int, Callable[[int], None]], Awaitable[None]
]


async def _pump_stream(
    src: trio.SocketStream, dst: trio.SocketStream, chunk: int, on_bytes: Callable[[int], None]
) -> None:
    while True:
        try:
            data = await src.receive_some(chunk)
        except _IO_ERRORS as exc:
            raise _SourceFailed from exc
        if not data:
            return
        await _send_all(dst, data)
        on_bytes(len(data))


async def _pump_recv_into(
    src: trio.SocketStream, dst: trio.SocketStream, chunk: int, on_bytes: Callable[[int], None]
) -> None:
    buf = bytearray(chunk)
    view = memoryview(buf)
    src_sock, dst_sock = src.socket, dst.socket
    while True:
        try:
            n = await src_sock.recv_into(buf, chunk)
        except OSError as exc:
            raise _SourceFailed from exc
        if n == 0:
            return
        sent = 0
        try:
            while sent < n:
                sent += await dst_sock.send(view[sent:n])
        except OSError as exc:
            raise _DestinationFailed from exc
        on_bytes(n)


async def _pump_splice(
    src: trio.SocketStream, dst: trio.SocketStream, chunk: int, on_bytes: Callable[[int], None]
) -> None:
    try:
        await _splice_loop(src, dst, chunk, on_bytes)
    except _SpliceUnsupported:
        await _pump_recv_into(src, dst, chunk, on_bytes)


async def _splice_loop(
    src: trio.SocketStream, dst: trio.SocketStream, chunk: int, on_bytes: Callable[[int], None]
) -> None:
    src_sock, dst_sock = src.socket, dst.socket
    src_fd, dst_fd = src_sock.fileno(), dst_sock.fileno()
    splice = os.splice
    flags = _SPLICE_FLAGS
    chunk = min(chunk, pipe_pool.pipe_size)
    pipe: tuple[int, int] | None = None
    moved_any = False
    try:
        while True:
            if pipe is None:
                pipe = pipe_pool.acquire()
            pipe_r, pipe_w = pipe
            # Source → pipe. The pipe is empty here, so EAGAIN means "no data yet".
            try:
                n = splice(src_fd, pipe_w, chunk, flags=flags)
            except BlockingIOError:
                pipe_pool.release(pipe)  # empty: an idle pump holds no pipe (rule 5)
                pipe = None
                await trio.lowlevel.wait_readable(src_sock)
                continue
            except OSError as exc:
                if not moved_any and exc.errno in _SPLICE_UNSUPPORTED:
                    raise _SpliceUnsupported from exc
                raise _SourceFailed from exc
            if n == 0:
                return
            moved_any = True
            # Pipe → destination, all of it, before reading more.
            left = n
            while left:
                try:
                    left -= splice(pipe_r, dst_fd, left, flags=flags)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(dst_sock)
                except OSError as exc:
                    raise _DestinationFailed from exc
            on_bytes(n)
            await trio.lowlevel.checkpoint()  # rule 6
    except BaseException:
        if pipe is not None:
            _PipePool.discard(pipe)  # may still hold bytes: never reuse it
            pipe = None
        raise
    finally:
        if pipe is not None:
            pipe_pool.release(pipe)


_PUMPS: dict[str, PumpFn] = {
    "splice": _pump_splice,
    "recv_into": _pump_recv_into,
    "stream": _pump_stream,
}
