"""connect_upstream on real loopback sockets: success, refused, and connect timeouts."""

from __future__ import annotations

import contextlib
import functools
import select
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from proxy.stats import Store
from proxy.upstream.cluster_config import ClusterConfig, EndpointSpec
from proxy.upstream.cluster_manager import ClusterManager
from proxy.upstream.connect import (
    CONNECTION_FAILURE,
    CONNECTION_TIMEOUT,
    UpstreamConnectError,
    connect_upstream,
)
from proxy.upstream.host import Host


async def echo_server(nursery: trio.Nursery, host: str = "127.0.0.1") -> int:
    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, host=host), echo, 0)
    return int(listeners[0].socket.getsockname()[1])


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


async def test_connects_with_nodelay_and_carries_bytes() -> None:
    async with trio.open_nursery() as nursery:
        port = await echo_server(nursery)
        stream = await connect_upstream(Host("127.0.0.1", port), 1.0)
        async with stream:
            assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert stream.socket.getpeername() == ("127.0.0.1", port)
            await stream.send_all(b"ping")
            assert await stream.receive_some(4) == b"ping"
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
async def test_connects_over_ipv6() -> None:
    async with trio.open_nursery() as nursery:
        port = await echo_server(nursery, "::1")
        host = Host("::1", port)
        assert host.address_string == f"[::1]:{port}"
        async with await connect_upstream(host, 1.0) as stream:
            await stream.send_all(b"six")
            assert await stream.receive_some(3) == b"six"
        nursery.cancel_scope.cancel()


async def test_refused_is_a_connection_failure_with_the_os_reason() -> None:
    with pytest.raises(UpstreamConnectError) as info:
        await connect_upstream(Host("127.0.0.1", closed_port()), 1.0)
    assert info.value.reason == CONNECTION_FAILURE
    assert str(info.value) == "delayed connect error: Connection refused"
    assert info.value.details == str(info.value)


@contextlib.contextmanager
def full_backlog_listener() -> Iterator[tuple[str, int]]:
    """A listener that never accepts, its backlog filled so that a further SYN goes unanswered.

    Skips the test where the kernel answers anyway (the trick is a kernel behaviour).
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    addr = listener.getsockname()
    fillers: list[socket.socket] = []
    try:
        for _ in range(64):
            s = socket.socket()
            s.setblocking(False)
            fillers.append(s)
            with contextlib.suppress(BlockingIOError):
                s.connect(addr)
            _, writable, _ = select.select([], [s], [], 0.05)
            if not writable:  # this one hangs in SYN_SENT: the queue is full
                break
        else:
            pytest.skip("could not fill the listen backlog on this kernel")
        yield addr
    finally:
        for s in fillers:
            s.close()
        listener.close()


async def test_timeout_against_a_full_backlog() -> None:
    with full_backlog_listener() as (ip, port):
        t0 = trio.current_time()
        with pytest.raises(UpstreamConnectError) as info:
            await connect_upstream(Host(ip, port), 0.2)
        assert 0.15 < trio.current_time() - t0 < 2.0
    assert info.value.reason == CONNECTION_TIMEOUT
    assert f"{ip}:{port}" in str(info.value) and "0.2 s" in str(info.value)


async def test_timeout_when_connect_never_completes(monkeypatch: pytest.MonkeyPatch,
                                                    autojump_clock: Any) -> None:
    """The same, deterministic: only the connect primitive is replaced; virtual time."""
    closed: list[bool] = []
    sock_type = type(trio.socket.socket())
    real_close = sock_type.close

    async def never(self: Any, address: Any) -> None:
        await trio.sleep_forever()

    def close(self: Any) -> None:
        closed.append(True)
        real_close(self)

    monkeypatch.setattr(sock_type, "connect", never)
    monkeypatch.setattr(sock_type, "close", close)
    t0 = trio.current_time()
    with pytest.raises(UpstreamConnectError) as info:
        await connect_upstream(Host("127.0.0.1", 9), 5.0)
    assert trio.current_time() - t0 == pytest.approx(5.0)
    assert info.value.reason == CONNECTION_TIMEOUT
    assert closed  # the half-open socket is not leaked


async def test_cancelled_connect_closes_the_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[bool] = []
    sock_type = type(trio.socket.socket())
    real_close = sock_type.close

    async def never(self: Any, address: Any) -> None:
        await trio.sleep_forever()

    def close(self: Any) -> None:
        closed.append(True)
        real_close(self)

    monkeypatch.setattr(sock_type, "connect", never)
    monkeypatch.setattr(sock_type, "close", close)
    with trio.move_on_after(0.01):
        await connect_upstream(Host("127.0.0.1", 9), 5.0)
    assert closed


async def test_cluster_pick_then_connect() -> None:
    """The data path's sequence: cluster manager -> host -> connect_upstream."""
    async with trio.open_nursery() as nursery:
        port = await echo_server(nursery)
        config = ClusterConfig(name="echo", connect_timeout=1.0,
                               endpoints=(EndpointSpec("127.0.0.1", port),))
        cm = ClusterManager({"echo": config}, Store())
        await nursery.start(cm.run)
        cluster = cm.get("echo")
        assert cluster is not None
        host = cluster.choose_host()
        assert host is not None
        async with await connect_upstream(host, cluster.config.connect_timeout) as stream:
            await stream.send_all(b"x")
            assert await stream.receive_some(1) == b"x"
        nursery.cancel_scope.cancel()
