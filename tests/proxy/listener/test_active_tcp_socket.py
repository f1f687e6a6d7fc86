"""The listener-filter shell on real loopback sockets: peeking, timeouts, hand-off.

A worker's listeners run in-process (``ActiveTcpListener.accept_loop``) from an Envoy config,
so timeouts, the PROXY-protocol hand-off to a ``bind_to_port: false`` listener and the
ORIGINAL_DST cluster are exercised without a network namespace (PROXY headers restore the
local address just as ``SO_ORIGINAL_DST`` does).
"""

from __future__ import annotations

import functools
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
import yaml

from proxy.config.bootstrap import load_bootstrap
from proxy.config.snapshot import build_snapshot
from proxy.listener.active_tcp_listener import ActiveTcpListener
from proxy.listener.active_tcp_socket import (
    PeekBuffer,
    attach_connection_handler,
    original_destination,
)
from proxy.server.worker_context import WorkerContext
from proxy.stats import Store
from proxy.upstream.cluster_manager import ClusterManager

TLS = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
PP = "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol"
TCP = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


# ----------------------------------------------------------------------------- PeekBuffer
async def tcp_pair() -> tuple[socket.socket, trio.SocketStream]:
    """(server side as a non-blocking stdlib socket, client stream)."""
    lst = trio.socket.socket()
    await lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    client = await trio.open_tcp_stream("127.0.0.1", lst.getsockname()[1])
    server, _ = await lst.accept()
    lst.close()
    return server._sock, client  # type: ignore[attr-defined]


async def test_peek_waits_for_more_without_spinning() -> None:
    server, client = await tcp_pair()
    buf = PeekBuffer(server)
    await client.send_all(b"ab")
    assert await buf.peek_more(100) and buf.data == b"ab"

    async def later() -> None:
        await trio.sleep(0.3)
        await client.send_all(b"cd")

    cpu = time.process_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(later)
        assert await buf.peek_more(100)
    assert buf.data == b"abcd"
    assert time.process_time() - cpu < 0.15  # SO_RCVLOWAT: it slept, it did not poll
    assert server.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 3
    buf.reset()
    assert server.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    assert server.recv(10) == b"abcd"  # peeked, never consumed
    server.close()
    await client.aclose()


async def test_peek_sees_fin_behind_queued_bytes() -> None:
    server, client = await tcp_pair()
    buf = PeekBuffer(server)
    await client.send_all(b"\x16\x03\x01")
    assert await buf.peek_more(100)
    await client.send_eof()
    with trio.fail_after(2):
        assert not await buf.peek_more(100)
    server.close()
    await client.aclose()


async def test_peek_sees_fin_with_nothing_queued_and_drain_consumes() -> None:
    server, client = await tcp_pair()
    buf = PeekBuffer(server)
    await client.send_all(b"PROXY x\r\nrest")
    assert await buf.peek_more(100)
    assert buf.drain(9) and buf.data == b"rest"
    assert server.recv(100, socket.MSG_PEEK) == b"rest"
    await client.send_eof()
    server.recv(100)
    buf.data = b""
    with trio.fail_after(2):
        assert not await buf.peek_more(100)
    server.close()
    await client.aclose()


async def test_original_destination_of_a_plain_connection() -> None:
    server, client = await tcp_pair()
    local = server.getsockname()
    assert original_destination(server, local) in (None, local)  # not redirected
    server.close()
    await client.aclose()


# ----------------------------------------------------------------------------- a worker
def bootstrap(listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> Any:
    return build_snapshot(load_bootstrap(None, yaml.safe_dump(
        {"static_resources": {"listeners": listeners, "clusters": clusters}})))


def tcp_chain(cluster: str, prefix: str = "t", **match: Any) -> dict[str, Any]:
    chain: dict[str, Any] = {"filters": [{"name": "envoy.filters.network.tcp_proxy",
                                          "typed_config": {"@type": TCP, "stat_prefix": prefix,
                                                           "cluster": cluster}}]}
    if match:
        chain["filter_chain_match"] = match
    return chain


def static_cluster(name: str, port: int) -> dict[str, Any]:
    return {"name": name, "connect_timeout": "1s", "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


async def start_worker(nursery: trio.Nursery, snap: Any) -> tuple[WorkerContext, list[int]]:
    store = Store()
    worker = WorkerContext(cluster_manager=ClusterManager(snap.clusters, store), snapshot=snap,
                           stats=store)
    await nursery.start(worker.timers.run)
    await nursery.start(worker.cluster_manager.run)
    listeners, ports = [], []
    for lc in snap.listeners:
        sock = trio.socket.socket()
        await sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        listeners.append(ActiveTcpListener(lc, sock, worker))
        ports.append(sock.getsockname()[1])
    attach_connection_handler(listeners, snap.unbound_listeners, worker)
    for al in listeners:
        nursery.start_soon(al.accept_loop, nursery)
    return worker, ports


async def serve_upstream(nursery: trio.Nursery,
                         handler: Callable[[trio.SocketStream], Awaitable[None]]) -> int:
    lst = await nursery.start(functools.partial(trio.serve_tcp, host="127.0.0.1"), handler, 0)
    return int(lst[0].socket.getsockname()[1])


def greeter(name: bytes) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A server-first upstream: greets, then echoes what it gets after its name."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await stream.send_all(name + b"\n")
                while data := await stream.receive_some(1024):
                    await stream.send_all(name + b":" + data)
            except trio.BrokenResourceError:
                pass

    return handle


async def read_all(stream: trio.SocketStream, limit: float = 3.0) -> bytes:
    """Everything until the proxy closes (a reset too: it closes with bytes unread)."""
    out = b""
    with trio.fail_after(limit):
        try:
            while data := await stream.receive_some(4096):
                out += data
        except trio.BrokenResourceError:
            pass
    return out


def value(worker: WorkerContext, name: str) -> int:
    st = worker.stats
    return st.counters[name].value if name in st.counters else st.gauges[name].value


async def test_listener_filters_timeout_closes(nursery: trio.Nursery) -> None:
    up = await serve_upstream(nursery, greeter(b"up"))
    snap = bootstrap([{"name": "l", "stat_prefix": "l",
                       "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
                       "listener_filters": [{"name": "t", "typed_config": {"@type": TLS}}],
                       "listener_filters_timeout": "0.2s",
                       "filter_chains": [tcp_chain("up")]}], [static_cluster("up", up)])
    worker, (port,) = await start_worker(nursery, snap)
    client = await trio.open_tcp_stream("127.0.0.1", port)
    start = trio.current_time()
    assert await read_all(client) == b""  # closed without a byte
    assert 0.15 < trio.current_time() - start < 2
    assert value(worker, "listener.l.downstream_pre_cx_timeout") == 1
    assert value(worker, "listener.l.downstream_pre_cx_active") == 0
    assert value(worker, "listener.l.downstream_cx_total") == 0


async def test_continue_on_timeout_serves_server_first_protocols(nursery: trio.Nursery) -> None:
    up = await serve_upstream(nursery, greeter(b"220 smtp"))
    snap = bootstrap([{"name": "l", "stat_prefix": "l",
                       "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
                       "listener_filters": [{"name": "t", "typed_config": {"@type": TLS}}],
                       "listener_filters_timeout": "0.2s",
                       "continue_on_listener_filters_timeout": True,
                       "filter_chains": [tcp_chain("up")]}], [static_cluster("up", up)])
    worker, (port,) = await start_worker(nursery, snap)
    client = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(3):
        assert await client.receive_some(100) == b"220 smtp\n"
    await client.send_all(b"EHLO\n")
    with trio.fail_after(3):
        assert await client.receive_some(100) == b"220 smtp:EHLO\n"
    await client.aclose()
    assert value(worker, "listener.l.downstream_pre_cx_timeout") == 1
    assert value(worker, "tls_inspector.tls_found") == 0


async def test_peer_closing_during_inspection(nursery: trio.Nursery) -> None:
    snap = bootstrap([{"name": "l", "stat_prefix": "l",
                       "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
                       "listener_filters": [{"name": "t", "typed_config": {"@type": TLS}}],
                       "filter_chains": [tcp_chain("up")]}], [static_cluster("up", 9)])
    worker, (port,) = await start_worker(nursery, snap)
    client = await trio.open_tcp_stream("127.0.0.1", port)
    await client.send_all(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello
    await client.send_eof()
    assert await read_all(client, 2.0) == b""  # well before the 15 s timeout
    await trio.sleep(0.05)
    assert value(worker, "listener.l.downstream_listener_filter_remote_close") == 1
    assert value(worker, "listener.l.downstream_pre_cx_active") == 0


def pp_v1(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    return f"PROXY TCP4 {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode()


async def test_proxy_protocol_then_hand_off_and_original_dst(nursery: trio.Nursery) -> None:
    """Hand-off by restored destination (use_original_dst), then an ORIGINAL_DST cluster."""
    own = await serve_upstream(nursery, greeter(b"own"))
    real = await serve_upstream(nursery, greeter(b"real"))
    virtual = await serve_upstream(nursery, greeter(b"virtual"))
    snap = bootstrap(
        [{"name": "outbound", "stat_prefix": "outbound", "use_original_dst": True,
          "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
          "listener_filters": [{"name": "pp", "typed_config": {"@type": PP}}],
          "filter_chains": [tcp_chain("own", "own", destination_port=7),
                            tcp_chain("passthrough", "passthrough")]},
         {"name": "virtual_8080", "stat_prefix": "v8080", "bind_to_port": False,
          "address": {"socket_address": {"address": "10.255.0.3", "port_value": 8080}},
          "filter_chains": [tcp_chain("virtual", "virtual")]},
         {"name": "wildcard_8081", "stat_prefix": "w8081", "bind_to_port": False,
          "address": {"socket_address": {"address": "0.0.0.0", "port_value": 8081}},
          "listener_filters": [{"name": "t", "typed_config": {"@type": TLS}}],
          "filter_chains": [tcp_chain("virtual", "wildcard")]}],
        [static_cluster("own", own), static_cluster("virtual", virtual),
         {"name": "passthrough", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
          "connect_timeout": "1s"}])
    worker, (port,) = await start_worker(nursery, snap)

    async def exchange(header: bytes) -> bytes:
        client = await trio.open_tcp_stream("127.0.0.1", port)
        await client.send_all(header + b"hi\n")
        await client.send_eof()
        return await read_all(client)

    # Exact address of a bind_to_port: false listener: handed off.
    assert await exchange(pp_v1(("192.0.2.1", 1000), ("10.255.0.3", 8080))) == \
        b"virtual\nvirtual:hi\n"
    # 0.0.0.0 of that port: handed off, and that listener runs its own filters on the bytes
    # after the (consumed) PROXY header.
    assert await exchange(pp_v1(("192.0.2.1", 1000), ("10.255.0.77", 8081))) == \
        b"virtual\nvirtual:hi\n"
    assert value(worker, "tls_inspector.tls_not_found") == 1
    # No listener there: this listener's chains; the passthrough connects to the destination.
    assert await exchange(pp_v1(("192.0.2.1", 1000), ("127.0.0.1", real))) == b"real\nreal:hi\n"
    # Not restored (same address) or a chain of its own (destination_port 7).
    assert await exchange(pp_v1(("192.0.2.1", 1000), ("127.0.0.1", 7))) == b"own\nown:hi\n"
    assert value(worker, "tcp.virtual.downstream_cx_total") == 1
    assert value(worker, "tcp.wildcard.downstream_cx_total") == 1
    assert value(worker, "tcp.passthrough.downstream_cx_total") == 1
    assert value(worker, "listener.outbound.downstream_cx_total") == 2
    assert value(worker, "listener.v8080.downstream_cx_total") == 1
    cluster = worker.cluster_manager.get("passthrough")
    assert cluster is not None and [h.address_string for h in cluster.hosts] == [
        f"127.0.0.1:{real}"]
    # The relay is over: the host goes after a cleanup_interval without a pick.
    cluster._lb.cleanup()
    assert len(cluster.hosts) == 1
    cluster._lb.cleanup()
    assert cluster.hosts == []


async def test_original_dst_without_a_restored_destination_is_uh(nursery: trio.Nursery) -> None:
    snap = bootstrap([{"name": "l", "stat_prefix": "l",
                       "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
                       "listener_filters": [{"name": "pp", "typed_config": {
                           "@type": PP, "allow_requests_without_proxy_protocol": True}}],
                       "filter_chains": [tcp_chain("passthrough", "pt")]}],
                     [{"name": "passthrough", "type": "ORIGINAL_DST",
                       "lb_policy": "CLUSTER_PROVIDED"}])
    worker, (port,) = await start_worker(nursery, snap)
    client = await trio.open_tcp_stream("127.0.0.1", port)
    await client.send_all(b"hello")  # no header, allowed: the socket's own address stays
    assert await read_all(client) == b""
    assert value(worker, "cluster.passthrough.upstream_cx_none_healthy") == 1
    assert value(worker, "proxy_proto.not_found_allowed") == 1


async def test_v2_header_with_ipv6_and_tlvs_in_pieces(nursery: trio.Nursery) -> None:
    real = await serve_upstream(nursery, greeter(b"real"))
    snap = bootstrap([{"name": "l", "stat_prefix": "l",
                       "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
                       "listener_filters": [{"name": "pp", "typed_config": {"@type": PP}}],
                       "filter_chains": [tcp_chain("up")]}], [static_cluster("up", real)])
    worker, (port,) = await start_worker(nursery, snap)
    addr = (socket.inet_pton(socket.AF_INET6, "2001:db8::1")
            + socket.inet_pton(socket.AF_INET6, "2001:db8::2") + struct.pack("!HH", 1, 2))
    tlvs = b"\x02" + struct.pack("!H", 600) + b"a" * 600
    header = (b"\r\n\r\n\x00\r\nQUIT\n\x21\x21" + struct.pack("!H", len(addr + tlvs))
              + addr + tlvs)
    client = await trio.open_tcp_stream("127.0.0.1", port)
    for i in range(0, len(header), 100):
        await client.send_all(header[i:i + 100])
        await trio.sleep(0.01)
    await client.send_all(b"x")
    await client.send_eof()
    assert await read_all(client) == b"real\nreal:x"
    assert value(worker, "proxy_proto.versions.v2.found") == 1
