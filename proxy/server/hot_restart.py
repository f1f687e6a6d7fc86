"""Hot-restart RPC between epochs (Envoy's HotRestartImpl), child-initiated and versioned.

Every epoch's main process listens on an AF_UNIX SOCK_SEQPACKET socket in the abstract
namespace, ``@trioxy.<base-id>.hot-restart.<epoch>``. Epoch N+1 connects to epoch N's:

1. ``get_listen_sockets`` (before the child binds anything): the parent answers with one
   ``listen_sockets`` message per batch of at most ``FDS_PER_MESSAGE`` listening sockets,
   matched by (protocol, address), the fds attached with SCM_RIGHTS; the last batch says
   ``done``. A truncated control message (MSG_CTRUNC) is an error, never a silent loss.
   Handing over the very same sockets keeps every connection queued in the kernel, whatever
   the new ``--concurrency`` is.
2. ``drain_listeners`` once the child's workers accept: the parent's workers stop
   accepting and drain (``--drain-time-s``, ``--drain-strategy``).
3. ``terminate`` after ``--parent-shutdown-time-s``: the parent exits whatever is open.

Every message carries ``version`` (``HOT_RESTART_VERSION``). A parent that sees another
version answers ``version_mismatch`` and the child exits with
``ExitCode.HOT_RESTART_VERSION_MISMATCH``: the agent reports it and the parent keeps serving
(the documented fallback: an incompatible binary needs a full restart, not a hot one).
The parent never waits on the child: it answers each message as it comes and nothing else.
"""

from __future__ import annotations

import array
import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from shm.segment import LAYOUT_VERSION

log = logging.getLogger("trioxy.hot_restart")

# Bump when the messages change incompatibly; the shared-memory layout has its own number
# (shm.segment.LAYOUT_VERSION) and both are part of the version epochs compare.
PROTOCOL_VERSION = 1
HOT_RESTART_VERSION = f"trioxy.hot_restart.{PROTOCOL_VERSION}.shm.{LAYOUT_VERSION}"
FDS_PER_MESSAGE = 32
MAX_MESSAGE = 65536
CONNECT_TIMEOUT_S = 5.0


class HotRestartError(Exception):
    pass


class VersionMismatch(HotRestartError):
    pass


STORE = "store"  # the agent's socket store answers under this name instead of an epoch


def rpc_address(base_id: int, epoch: int | str) -> str:
    return f"\0trioxy.{base_id}.hot-restart.{epoch}"


def _encode(msg: dict[str, Any]) -> bytes:
    return json.dumps({"version": HOT_RESTART_VERSION, **msg}).encode()


def _fds_cmsg(fds: list[int]) -> list[tuple[int, int, bytes]]:
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def _parse_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    return list(fds)


def _decode(data: bytes, flags: int) -> dict[str, Any]:
    if flags & socket.MSG_CTRUNC:
        raise HotRestartError("control message truncated (MSG_CTRUNC): file descriptors lost")
    if flags & socket.MSG_TRUNC:
        raise HotRestartError("hot-restart message truncated")
    if not data:
        raise HotRestartError("the other epoch closed the hot-restart connection")
    msg = json.loads(data)
    if msg.get("version") != HOT_RESTART_VERSION:
        raise VersionMismatch(
            f"hot-restart version {msg.get('version')!r}, this binary speaks {HOT_RESTART_VERSION!r}"
        )
    return msg  # type: ignore[no-any-return]


# -- the child's side (blocking: runs before trio starts, and for two short sends after) ---
class ParentConnection:
    """The child epoch's connection to its parent, or None when there is no parent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def connect(cls, base_id: int, parent_epoch: int | str) -> ParentConnection | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(rpc_address(base_id, parent_epoch))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None  # no parent (it exited, or this is a relaunch after a crash)
        except OSError as exc:
            sock.close()
            raise HotRestartError(f"cannot reach epoch {parent_epoch}: {exc}") from None
        return cls(sock)

    def _request(self, msg: dict[str, Any]) -> None:
        self.sock.send(_encode(msg))

    def _reply(self) -> tuple[dict[str, Any], list[int]]:
        data, ancdata, flags, _ = self.sock.recvmsg(
            MAX_MESSAGE, socket.CMSG_SPACE(FDS_PER_MESSAGE * 4)
        )
        fds = _parse_fds(ancdata)
        try:
            msg = _decode(data, flags)
        except BaseException:
            for fd in fds:
                socket.close(fd)
            raise
        if msg.get("type") == "version_mismatch":
            raise VersionMismatch(msg.get("reason", "version mismatch"))
        return msg, fds

    def get_listen_sockets(self, addresses: list[str] | None) -> dict[str, socket.socket]:
        """The parent's listening sockets for these keys (those it has); None: all of them."""
        self._request({"type": "get_listen_sockets", "addresses": addresses})
        out: dict[str, socket.socket] = {}
        while True:
            msg, fds = self._reply()
            if msg.get("type") != "listen_sockets":
                raise HotRestartError(f"unexpected reply {msg.get('type')!r}")
            names = msg.get("addresses", [])
            if len(names) != len(fds):
                for fd in fds:
                    socket.close(fd)
                raise HotRestartError("listen_sockets: addresses and fds do not match")
            for name, fd in zip(names, fds, strict=True):
                out[name] = socket.socket(fileno=fd)
            if msg.get("done"):
                return out

    def drain_listeners(self) -> None:
        self._request({"type": "drain_listeners"})

    def terminate(self) -> None:
        try:
            self._request({"type": "terminate"})
        except OSError:
            pass  # it is gone already: what terminate wanted

    def close(self) -> None:
        self.sock.close()


# -- the parent's side (inside trio) -------------------------------------------------------
@dataclass
class ParentHandlers:
    listen_sockets: Callable[[], dict[str, socket.socket]]
    drain: Callable[[], None]
    terminate: Callable[[], None]


async def serve_children(
    base_id: int,
    epoch: int | str,
    handlers: ParentHandlers,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer child epochs until cancelled. Binding fails if the name is taken."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        await sock.bind(rpc_address(base_id, epoch))
    except OSError as exc:
        sock.close()
        raise HotRestartError(
            f"hot-restart address for --base-id {base_id} epoch {epoch} is taken ({exc}): "
            f"another trioxy runs with --base-id {base_id}; give this one another --base-id"
        ) from None
    sock.listen(4)
    task_status.started()
    with sock:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await sock.accept()
                nursery.start_soon(_serve_child, conn, handlers)


async def _serve_child(conn: trio.socket.SocketType, handlers: ParentHandlers) -> None:
    with conn:
        while True:
            try:
                data, ancdata, flags, _ = await conn.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4))
            except OSError:
                return
            if not data:
                return  # the child closed (it exited or finished)
            for fd in _parse_fds(ancdata):
                socket.close(fd)  # children send none; never leak one
            try:
                msg = _decode(data, flags)
            except VersionMismatch as exc:
                log.error("hot restart refused: %s", exc)
                await conn.send(_encode({"type": "version_mismatch", "reason": str(exc)}))
                return
            except (HotRestartError, ValueError) as exc:
                log.error("hot restart: bad message from the child epoch: %s", exc)
                return
            kind = msg.get("type")
            if kind == "get_listen_sockets":
                await _send_sockets(conn, msg.get("addresses"), handlers.listen_sockets())
            elif kind == "drain_listeners":
                log.info("hot restart: the child epoch serves; draining listeners")
                handlers.drain()
            elif kind == "terminate":
                log.info("hot restart: terminated by the child epoch (parent shutdown time)")
                handlers.terminate()
                return
            else:
                log.error("hot restart: unknown message %r", kind)


async def _send_sockets(
    conn: trio.socket.SocketType, wanted: list[str] | None, have: dict[str, socket.socket]
) -> None:
    if wanted is None:
        wanted = list(have)
    matched = [(name, have[name]) for name in wanted if name in have]
    batches = [matched[i : i + FDS_PER_MESSAGE] for i in range(0, len(matched), FDS_PER_MESSAGE)]
    if not batches:
        batches = [[]]
    for i, batch in enumerate(batches):
        payload = _encode({
            "type": "listen_sockets",
            "addresses": [name for name, _ in batch],
            "done": i == len(batches) - 1,
        })
        await conn.sendmsg([payload], _fds_cmsg([s.fileno() for _, s in batch]))
    log.info("hot restart: handed over %d listening socket(s)", len(matched))
