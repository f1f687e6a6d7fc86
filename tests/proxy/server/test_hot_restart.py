"""The hot-restart RPC between a parent (in trio) and a child (blocking), over real sockets."""

from __future__ import annotations

import json
import random
import socket

import pytest
import trio

from proxy.server import hot_restart
from proxy.server.hot_restart import (
    HotRestartError,
    ParentConnection,
    ParentHandlers,
    VersionMismatch,
    serve_children,
)


def _base_id() -> int:
    return random.randrange(10_000, 1_000_000)  # abstract names are host-wide: never collide


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    return s


async def test_sockets_handed_over_keep_their_queued_connections() -> None:
    base = _base_id()
    listeners = {f"tcp://127.0.0.1:{i}": _listener() for i in range(40)}  # > one fd batch
    queued_on = next(iter(listeners.values()))
    clients = [socket.create_connection(queued_on.getsockname()) for _ in range(50)]
    drained = trio.Event()
    handlers = ParentHandlers(lambda: listeners, drained.set, lambda: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_children, base, 0, handlers)

        def child() -> dict[str, socket.socket]:
            parent = ParentConnection.connect(base, 0)
            assert parent is not None
            got = parent.get_listen_sockets([*listeners, "tcp://127.0.0.1:1"])
            parent.drain_listeners()
            parent.close()
            return got

        got = await trio.to_thread.run_sync(child)
        with trio.fail_after(5):
            await drained.wait()
        nursery.cancel_scope.cancel()
    assert sorted(got) == sorted(listeners)  # the unknown address is simply not there
    # The parent closes its copies (as an exiting epoch does): the queue is intact.
    first = got[next(iter(listeners))]
    for s in listeners.values():
        s.close()
    first.settimeout(2)
    accepted = [first.accept()[0] for _ in clients]
    assert len(accepted) == 50
    for s in [*accepted, *clients, *got.values()]:
        s.close()


async def test_no_parent_means_bind_fresh() -> None:
    assert await trio.to_thread.run_sync(ParentConnection.connect, _base_id(), 0) is None


async def test_version_mismatch_is_refused_cleanly() -> None:
    """An older binary's child gets a version_mismatch answer, and nothing else happens."""
    base = _base_id()
    drained = trio.Event()
    handlers = ParentHandlers(lambda: {"tcp://127.0.0.1:80": _listener()}, drained.set,
                              lambda: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_children, base, 0, handlers)

        def old_child() -> dict:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.settimeout(5)
                s.connect(hot_restart.rpc_address(base, 0))
                s.send(json.dumps({"version": "trioxy.hot_restart.0", "type": "drain_listeners"})
                       .encode())
                data, anc, _, _ = s.recvmsg(65536, socket.CMSG_SPACE(4))
                assert anc == []
                return json.loads(data)

        reply = await trio.to_thread.run_sync(old_child)
        assert reply["type"] == "version_mismatch"
        assert not drained.is_set()
        nursery.cancel_scope.cancel()


def test_child_refuses_a_parent_speaking_another_version() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        b.send(json.dumps({"version": "trioxy.hot_restart.99", "type": "listen_sockets",
                           "addresses": [], "done": True}).encode())
        with pytest.raises(VersionMismatch, match="99"):
            ParentConnection(a).get_listen_sockets(["tcp://127.0.0.1:80"])


async def test_a_second_instance_on_the_same_base_id_is_named() -> None:
    base = _base_id()
    handlers = ParentHandlers(lambda: {}, lambda: None, lambda: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_children, base, 0, handlers)
        with pytest.raises(HotRestartError, match=f"--base-id {base}"):
            await serve_children(base, 0, handlers)
        nursery.cancel_scope.cancel()


async def test_terminate_reaches_the_parent() -> None:
    base = _base_id()
    terminated = trio.Event()
    handlers = ParentHandlers(lambda: {}, lambda: None, terminated.set)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_children, base, 3, handlers)

        def child() -> None:
            parent = ParentConnection.connect(base, 3)
            assert parent is not None
            parent.terminate()
            parent.close()

        await trio.to_thread.run_sync(child)
        with trio.fail_after(5):
            await terminated.wait()
        nursery.cancel_scope.cancel()
