"""Socket reads and writes for the request path, with trio's readiness waits underneath.

trio's ``SocketStream.receive_some`` / ``send_all`` wrap every syscall in two scheduler
checkpoints, a conflict detector and a context manager; on a proxied request that is
four syscalls, and the wrapping cost about as much CPU as our whole HTTP handling
(py-spy, scripts/bench). Here a syscall that succeeds at once returns at once; only
``EAGAIN`` waits, with ``trio.lowlevel.wait_readable``/``wait_writable``, which are
checkpoints. So that a connection whose data is always ready cannot starve the others
(or miss a cancellation), every ``_BUDGET``-th immediate success yields anyway.

Errors keep trio's vocabulary: the peer going away is ``trio.BrokenResourceError``, a
socket we closed ourselves is ``trio.ClosedResourceError``.
"""

from __future__ import annotations

import socket

import trio

_BUDGET = 32
_count = [0]

wait_readable = trio.lowlevel.wait_readable
wait_writable = trio.lowlevel.wait_writable
checkpoint = trio.lowlevel.checkpoint


def _error(sock: socket.socket, exc: OSError) -> Exception:
    if sock.fileno() == -1:
        return trio.ClosedResourceError("socket was closed")
    return trio.BrokenResourceError(str(exc))


async def receive_some(sock: socket.socket, max_bytes: int = 65536, wait_first: bool = False) -> bytes:
    """Bytes from ``sock`` (``b""`` at EOF), waiting only when there are none yet.

    ``wait_first`` skips the first attempt when the caller knows nothing can be there yet
    (a response just asked for, a keep-alive client just answered): it saves a syscall
    that would fail with EAGAIN.
    """
    if wait_first:
        await wait_readable(sock)
    while True:
        try:
            data = sock.recv(max_bytes)
        except BlockingIOError:
            await wait_readable(sock)
            continue
        except OSError as exc:
            raise _error(sock, exc) from exc
        _count[0] += 1
        if _count[0] >= _BUDGET:
            _count[0] = 0
            await checkpoint()
        return data


async def send_all(sock: socket.socket, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data``, waiting for buffer space only when the kernel has none."""
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    except OSError as exc:
        raise _error(sock, exc) from exc
    if sent == len(data):
        _count[0] += 1
        if _count[0] >= _BUDGET:
            _count[0] = 0
            await checkpoint()
        return
    view = memoryview(data)[sent:]
    while view:
        await wait_writable(sock)
        try:
            sent = sock.send(view)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise _error(sock, exc) from exc
        view = view[sent:]
