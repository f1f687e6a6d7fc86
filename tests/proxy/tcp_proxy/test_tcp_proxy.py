"""tcp_proxy: config validation, and the filter on real loopback sockets under trio."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import random
import socket
import sys
import time
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2 import TcpProxy
from google.protobuf import json_format

from proxy.config.context import FactoryContext
from proxy.config.errors import ConfigError
from proxy.network.connection import Connection
from proxy.registry import network_filters
from proxy.server.worker_context import WorkerContext
from proxy.stats import Store
from proxy.stream_info import StreamInfo, flags_to_short_string
from proxy.tcp_proxy import relay
from proxy.tcp_proxy.tcp_proxy import DEFAULT_IDLE_TIMEOUT_S, TcpProxyConfig

# ------------------------------------------------------------------------------------------
# The upstream side: the real cluster manager and connect() when they exist, else the
# smallest stand-ins that keep their contracts (docs/INTERNALS.md, Upstream).
# ------------------------------------------------------------------------------------------

try:
    from envoy.config.cluster.v3.cluster_pb2 import Cluster

    from proxy.upstream.cluster_config import ClusterConfig
    from proxy.upstream.cluster_manager import ClusterManager

    REAL_CLUSTER_MANAGER = True
except ImportError:
    REAL_CLUSTER_MANAGER = False

try:
    import proxy.upstream.connect  # noqa: F401
except ImportError:
    _connect = types.ModuleType("proxy.upstream.connect")

    class UpstreamConnectError(Exception):
        def __init__(self, reason: str) -> None:
            super().__init__(reason)
            self.reason = reason

    async def connect_upstream(host: Any, connect_timeout: float) -> trio.SocketStream:
        try:
            with trio.fail_after(connect_timeout):
                return await trio.open_tcp_stream(host.address, host.port)
        except trio.TooSlowError:
            raise UpstreamConnectError("connection_timeout") from None
        except OSError:
            raise UpstreamConnectError("connection_failure") from None

    _connect.UpstreamConnectError = UpstreamConnectError  # type: ignore[attr-defined]
    _connect.connect_upstream = connect_upstream  # type: ignore[attr-defined]
    sys.modules["proxy.upstream.connect"] = _connect


class _StandInHost:
    def __init__(self, address: str, port: int) -> None:
        self.address, self.port = address, port
        self.address_string = f"{address}:{port}"
        self.cx_active = 0
        self.rq_active = 0
        self.healthy = True


class _StandInCluster:
    def __init__(self, name: str, endpoints: list[tuple[str, int]], store: Store) -> None:
        self.name = name
        self.config = types.SimpleNamespace(name=name, connect_timeout=1.0)
        self.stats = store.scope(f"cluster.{name}.")
        self.pools: dict[Any, Any] = {}
        self.hosts = [_StandInHost(a, p) for a, p in endpoints]
        self.original_dst = False
        self._next = 0

    def choose_host(self, ctx: Any) -> _StandInHost | None:
        if not self.hosts:
            return None
        host = self.hosts[self._next % len(self.hosts)]
        self._next += 1
        return host


class _StandInClusterManager:
    def __init__(self, clusters: dict[str, list[tuple[str, int]]], store: Store) -> None:
        self._clusters = {n: _StandInCluster(n, eps, store) for n, eps in clusters.items()}

    def get(self, name: str) -> _StandInCluster | None:
        return self._clusters.get(name)


async def make_worker(
    nursery: trio.Nursery, clusters: dict[str, list[tuple[str, int]]], seed: int = 1
) -> WorkerContext:
    store = Store()
    if REAL_CLUSTER_MANAGER:
        configs = {}
        for i, (name, eps) in enumerate(clusters.items()):
            proto = json_format.ParseDict(
                {
                    "name": name,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": name,
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {"endpoint": {"address": {"socket_address": {
                                        "address": a, "port_value": p}}}}
                                    for a, p in eps
                                ]
                            }
                        ],
                    },
                },
                Cluster(),
            )
            configs[name] = ClusterConfig.from_proto(
                proto, FactoryContext(), f"static_resources.clusters[{i}]"
            )
        cm: Any = ClusterManager(configs, store)
        await nursery.start(cm.run)
    else:
        cm = _StandInClusterManager(clusters, store)
    return WorkerContext(cluster_manager=cm, stats=store, rng=random.Random(seed))


# ------------------------------------------------------------------------------------------
# Harness: upstream servers, the proxy listener, access log recorder
# ------------------------------------------------------------------------------------------

Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def serve_upstream(nursery: trio.Nursery, handler: Handler) -> int:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, host="127.0.0.1"), handler, 0)
    return int(listeners[0].socket.getsockname()[1])


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while data := await stream.receive_some(1 << 16):
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


class Recorder:
    """An access log: keeps what it was given."""

    def __init__(self) -> None:
        self.entries: list[StreamInfo] = []
        self.logged = trio.Event()
        self._changed = trio.Event()

    def log(self, info: StreamInfo) -> None:
        self.entries.append(info)
        self.logged.set()
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, n: int) -> None:
        while len(self.entries) < n:
            await self._changed.wait()


def config_from(d: dict[str, Any], clusters: frozenset[str] = frozenset()) -> TcpProxyConfig:
    msg = json_format.ParseDict(d, TcpProxy())
    ext = network_filters.lookup("envoy.filters.network.tcp_proxy", "", "f")
    return ext.factory(msg, FactoryContext(cluster_names=clusters), "tp")


async def start_proxy(
    nursery: trio.Nursery,
    config: TcpProxyConfig,
    worker: WorkerContext,
    *,
    prebuffer: bytes = b"",
    buffer_limit: int = 1 << 20,
) -> int:
    lst = trio.socket.socket()
    await lst.bind(("127.0.0.1", 0))
    lst.listen(64)

    async def serve(raw: trio.socket.SocketType) -> None:
        conn = Connection(trio.SocketStream(raw), buffer_limit=buffer_limit)
        if prebuffer:
            conn.unread(prebuffer)
        await config.serve_connection(conn, worker)

    async def accept_loop() -> None:
        with lst:
            while True:
                raw, _ = await lst.accept()
                nursery.start_soon(serve, raw)

    nursery.start_soon(accept_loop)
    return int(lst.getsockname()[1])


async def receive_all(stream: trio.SocketStream) -> bytes:
    chunks = []
    while data := await stream.receive_some(1 << 16):
        chunks.append(data)
    return b"".join(chunks)


import proxy.extensions.filters.network.tcp_proxy  # noqa: E402,F401  (registers the factory)

# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------


def test_factory_is_registered_under_envoy_name_and_type() -> None:
    type_url = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
    assert network_filters.lookup("", type_url, "p").name == "envoy.filters.network.tcp_proxy"


def test_defaults() -> None:
    cfg = config_from({"stat_prefix": "tcp", "cluster": "a"})
    assert cfg.idle_timeout == DEFAULT_IDLE_TIMEOUT_S == 3600
    assert cfg.max_connect_attempts == 1
    assert cfg.max_downstream_connection_duration is None
    assert cfg.access_logs == ()
    assert config_from({"stat_prefix": "t", "cluster": "a", "idle_timeout": "0s"}).idle_timeout is None
    assert config_from({"stat_prefix": "t", "cluster": "a", "idle_timeout": "1.5s"}).idle_timeout == 1.5


@pytest.mark.parametrize(
    ("d", "path", "words"),
    [
        ({"cluster": "a"}, "tp.stat_prefix", "empty"),
        ({"stat_prefix": "t"}, "tp", "cluster or weighted_clusters"),
        ({"stat_prefix": "t", "cluster": "nope"}, "tp.cluster", "unknown cluster 'nope'"),
        ({"stat_prefix": "t", "weighted_clusters": {"clusters": []}}, "tp.weighted_clusters.clusters", "at least one"),
        ({"stat_prefix": "t", "weighted_clusters": {"clusters": [{"name": "a", "weight": 1}, {"name": "b", "weight": 0}]}},
         "tp.weighted_clusters.clusters[1].weight", "at least 1"),
        ({"stat_prefix": "t", "weighted_clusters": {"clusters": [{"name": "x", "weight": 1}]}},
         "tp.weighted_clusters.clusters[0].name", "unknown cluster 'x'"),
        ({"stat_prefix": "t", "cluster": "a", "max_connect_attempts": 0}, "tp.max_connect_attempts", "at least 1"),
        ({"stat_prefix": "t", "cluster": "a", "hash_policy": [{"source_ip": {}}]}, "tp.hash_policy", "not supported"),
        ({"stat_prefix": "t", "cluster": "a", "tunneling_config": {"hostname": "h"}}, "tp.tunneling_config", "not supported"),
        ({"stat_prefix": "t", "weighted_clusters": {"clusters": [{"name": "a", "weight": 1, "metadata_match": {}}]}},
         "tp.weighted_clusters.clusters[0].metadata_match", "not supported"),
    ],
)
def test_config_errors_name_the_field(d: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from(d, frozenset({"a", "b"}))
    assert info.value.path == path
    assert words in info.value.message


def test_unknown_cluster_is_allowed_when_no_cluster_names_are_known() -> None:
    assert config_from({"stat_prefix": "t", "cluster": "later"}).cluster == "later"


def test_weighted_pick_follows_weights() -> None:
    cfg = config_from(
        {"stat_prefix": "t", "weighted_clusters": {"clusters": [
            {"name": "a", "weight": 1}, {"name": "b", "weight": 3}]}}
    )
    rng = random.Random(5)
    picks = [cfg.pick_cluster(rng) for _ in range(4000)]
    assert 800 < picks.count("a") < 1200  # 1000 expected; ~6 sigma either side


# ------------------------------------------------------------------------------------------
# Relay on real sockets
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", relay.ENGINES)
async def test_echo_10mb_intact_and_counted(engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = os.urandom(10 * 1024 * 1024)
    spliced = 0
    if engine == "splice":
        real_splice = os.splice

        def counting_splice(*args: Any, **kwargs: Any) -> int:
            nonlocal spliced
            n = real_splice(*args, **kwargs)
            spliced += n
            return n

        monkeypatch.setattr(os, "splice", counting_splice)
    log = Recorder()
    async with trio.open_nursery() as nursery:
        up = await serve_upstream(nursery, echo)
        worker = await make_worker(nursery, {"echo": [("127.0.0.1", up)]})
        cfg = dataclasses.replace(
            config_from({"stat_prefix": "ingress", "cluster": "echo"}),
            access_logs=(log,),
            relay_engine=engine,
        )
        port = await start_proxy(nursery, cfg, worker)
        client = await trio.open_tcp_stream("127.0.0.1", port)

        async def send() -> None:
            await client.send_all(payload)
            await client.send_eof()

        with trio.fail_after(20):
            nursery.start_soon(send)
            got = await receive_all(client)
            await client.aclose()
            await log.logged.wait()
        nursery.cancel_scope.cancel()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    if engine == "splice":  # the kernel moved (nearly) everything: in and out of the pipes
        assert spliced >= 2 * (2 * len(payload) - 2 * (1 << 20))
    info = log.entries[0]
    assert (info.bytes_received, info.bytes_sent) == (len(payload), len(payload))
    assert info.upstream_cluster == "echo"
    assert info.upstream_host == f"127.0.0.1:{up}"
    assert flags_to_short_string(info.response_flags) == "-"
    assert info.duration is not None and info.duration > 0
    c = worker.stats.counters
    assert c["tcp.ingress.downstream_cx_total"].value == 1
    assert c["tcp.ingress.downstream_cx_rx_bytes_total"].value == len(payload)
    assert c["tcp.ingress.downstream_cx_tx_bytes_total"].value == len(payload)
    assert c["cluster.echo.upstream_cx_total"].value == 1
    assert worker.stats.gauges["cluster.echo.upstream_cx_active"].value == 0


async def test_half_close_reply_after_client_eof() -> None:
    seen_eof = trio.Event()

    async def reply_after_eof(stream: trio.SocketStream) -> None:
        async with stream:
            data = await receive_all(stream)  # returns at the client's FIN
            seen_eof.set()
            await stream.send_all(b"got %d bytes" % len(data))

    log = Recorder()
    async with trio.open_nursery() as nursery:
        up = await serve_upstream(nursery, reply_after_eof)
        worker = await make_worker(nursery, {"u": [("127.0.0.1", up)]})
        cfg = dataclasses.replace(
            config_from({"stat_prefix": "hc", "cluster": "u"}), access_logs=(log,)
        )
        port = await start_proxy(nursery, cfg, worker)
        with trio.fail_after(5):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            await client.send_all(b"x" * 1000)
            await client.send_eof()
            await seen_eof.wait()
            assert await receive_all(client) == b"got 1000 bytes"
            await client.aclose()
            await log.logged.wait()
        nursery.cancel_scope.cancel()
    assert log.entries[0].bytes_received == 1000
    assert log.entries[0].bytes_sent == len(b"got 1000 bytes")


async def test_server_first_protocol_and_prebuffered_bytes() -> None:
    """The upstream speaks first; bytes a listener filter peeked at reach it first."""

    async def banner_then_echo(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"220 ready\r\n")
            await stream.send_all(await receive_all(stream))

    async with trio.open_nursery() as nursery:
        up = await serve_upstream(nursery, banner_then_echo)
        worker = await make_worker(nursery, {"u": [("127.0.0.1", up)]})
        cfg = config_from({"stat_prefix": "pb", "cluster": "u"})
        port = await start_proxy(nursery, cfg, worker, prebuffer=b"PEEKED ")
        with trio.fail_after(5):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            assert await client.receive_some(100) == b"220 ready\r\n"
            await client.send_all(b"rest")
            await client.send_eof()
            assert await receive_all(client) == b"PEEKED rest"
            await client.aclose()
        nursery.cancel_scope.cancel()


async def test_idle_timeout_closes_both_sides() -> None:
    upstream_saw_eof = trio.Event()

    async def silent(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await receive_all(stream)
            except trio.BrokenResourceError:
                pass
            upstream_saw_eof.set()

    log = Recorder()
    async with trio.open_nursery() as nursery:
        up = await serve_upstream(nursery, silent)
        worker = await make_worker(nursery, {"u": [("127.0.0.1", up)]})
        cfg = dataclasses.replace(
            config_from({"stat_prefix": "idle", "cluster": "u", "idle_timeout": "0.3s"}),
            access_logs=(log,),
        )
        port = await start_proxy(nursery, cfg, worker)
        client = await trio.open_tcp_stream("127.0.0.1", port)
        await client.send_all(b"ping")
        start = time.monotonic()
        with trio.fail_after(3):
            assert await receive_all(client) == b""
            await upstream_saw_eof.wait()
            await log.logged.wait()
        elapsed = time.monotonic() - start
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert 0.25 < elapsed < 2.0
    assert worker.stats.counters["tcp.idle.idle_timeout"].value == 1
    assert log.entries[0].connection_termination_details == "tcp_session_idle_timeout"


async def test_activity_keeps_idle_timer_from_firing() -> None:
    async with trio.open_nursery() as nursery:
        up = await serve_upstream(nursery, echo)
        worker = await make_worker(nursery, {"u": [("127.0.0.1", up)]})
        cfg = config_from({"stat_prefix": "busy", "cluster": "u", "idle_timeout": "0.3s"})
        port = await start_proxy(nursery, cfg, worker)
        client = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            for _ in range(6):  # 0.9 s in all, never 0.3 s quiet
                await client.send_all(b"tick")
                assert await client.receive_some(10) == b"tick"
                await trio.sleep(0.15)
            await client.aclose()
        nursery.cancel_scope.cancel()
    assert worker.stats.counters["tcp.busy.idle_timeout"].value == 0


async def test_refused_upstream_closes_downstream_with_uf() -> None:
    log = Recorder()
    dead = closed_port()
    async with trio.open_nursery() as nursery:
        worker = await make_worker(nursery, {"dead": [("127.0.0.1", dead)]})
        cfg = dataclasses.replace(
            config_from({"stat_prefix": "rf", "cluster": "dead"}), access_logs=(log,)
        )
        port = await start_proxy(nursery, cfg, worker)
        client = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(2):
            try:
                assert await receive_all(client) == b""
            except trio.BrokenResourceError:
                pass  # a reset is a close too
            await log.logged.wait()
        await client.aclose()
        nursery.cancel_scope.cancel()
    info = log.entries[0]
    # Envoy logs a refused upstream with max_connect_attempts 1 as "UF,URX".
    assert flags_to_short_string(info.response_flags) == "UF,URX"
    assert info.connection_termination_details == "tcp_initializion_failure:0"
    assert info.upstream_host == f"127.0.0.1:{dead}"
    assert info.upstream_transport_failure_reason == "connection_failure"
    c = worker.stats.counters
    assert c["cluster.dead.upstream_cx_connect_fail"].value == 1
    assert c["cluster.dead.upstream_cx_connect_attempts_exceeded"].value == 1


async def test_connect_retry_reaches_a_live_host() -> None:
    log = Recorder()
    async with trio.open_nursery() as nursery:
        up = await serve_upstream(nursery, echo)
        worker = await make_worker(
            nursery, {"mixed": [("127.0.0.1", closed_port()), ("127.0.0.1", up)]}
        )
        cfg = dataclasses.replace(
            config_from({"stat_prefix": "re", "cluster": "mixed", "max_connect_attempts": 3}),
            access_logs=(log,),
        )
        port = await start_proxy(nursery, cfg, worker)
        with trio.fail_after(5):
            for _ in range(2):  # whichever host round robin starts with
                client = await trio.open_tcp_stream("127.0.0.1", port)
                await client.send_all(b"hi")
                await client.send_eof()
                assert await receive_all(client) == b"hi"
                await client.aclose()
            await log.wait_for(2)
        nursery.cancel_scope.cancel()
    retried = [i for i in log.entries if i.attempt_count == 2]
    assert retried, [i.attempt_count for i in log.entries]
    assert all(i.upstream_host == f"127.0.0.1:{up}" for i in log.entries)
    assert flags_to_short_string(retried[0].response_flags) == "UF"


async def test_unknown_cluster_at_runtime_is_nc() -> None:
    log = Recorder()
    async with trio.open_nursery() as nursery:
        worker = await make_worker(nursery, {})
        cfg = dataclasses.replace(
            config_from({"stat_prefix": "nc", "cluster": "gone"}), access_logs=(log,)
        )
        port = await start_proxy(nursery, cfg, worker)
        client = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(2):
            assert await receive_all(client) == b""
            await log.logged.wait()
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert flags_to_short_string(log.entries[0].response_flags) == "NC"
    assert log.entries[0].connection_termination_details == "tcp_initializion_failure:3"
    assert worker.stats.counters["tcp.nc.downstream_cx_no_route"].value == 1


async def test_upstream_reset_closes_downstream() -> None:
    async def reset_after_first_bytes(stream: trio.SocketStream) -> None:
        await stream.receive_some(10)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        await stream.aclose()

    log = Recorder()
    async with trio.open_nursery() as nursery:
        up = await serve_upstream(nursery, reset_after_first_bytes)
        worker = await make_worker(nursery, {"u": [("127.0.0.1", up)]})
        cfg = dataclasses.replace(
            config_from({"stat_prefix": "rst", "cluster": "u"}), access_logs=(log,)
        )
        port = await start_proxy(nursery, cfg, worker)
        client = await trio.open_tcp_stream("127.0.0.1", port)
        await client.send_all(b"hello")
        with trio.fail_after(2):
            try:
                assert await receive_all(client) == b""
            except trio.BrokenResourceError:
                pass
            await log.logged.wait()
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert worker.stats.gauges["cluster.u.upstream_cx_active"].value == 0


async def test_weighted_clusters_split_connections() -> None:
    def named(name: bytes) -> Handler:
        async def handler(stream: trio.SocketStream) -> None:
            async with stream:
                await stream.send_all(name)

        return handler

    log = Recorder()
    async with trio.open_nursery() as nursery:
        a = await serve_upstream(nursery, named(b"a"))
        b = await serve_upstream(nursery, named(b"b"))
        worker = await make_worker(nursery, {"a": [("127.0.0.1", a)], "b": [("127.0.0.1", b)]})
        cfg = dataclasses.replace(
            config_from({"stat_prefix": "w", "weighted_clusters": {"clusters": [
                {"name": "a", "weight": 1}, {"name": "b", "weight": 3}]}}),
            access_logs=(log,),
        )
        port = await start_proxy(nursery, cfg, worker)
        replies = []
        with trio.fail_after(10):
            for _ in range(40):
                client = await trio.open_tcp_stream("127.0.0.1", port)
                replies.append(await receive_all(client))
                await client.aclose()
            await log.wait_for(40)
        nursery.cancel_scope.cancel()
    assert 3 <= replies.count(b"a") <= 18 and replies.count(b"a") + replies.count(b"b") == 40
    by_conn = {i.connection_id: i.upstream_cluster for i in log.entries}
    assert sorted(by_conn.values()) == sorted(r.decode() for r in replies)


async def test_max_downstream_connection_duration() -> None:
    log = Recorder()
    async with trio.open_nursery() as nursery:
        up = await serve_upstream(nursery, echo)
        worker = await make_worker(nursery, {"u": [("127.0.0.1", up)]})
        cfg = dataclasses.replace(
            config_from({"stat_prefix": "d", "cluster": "u",
                         "max_downstream_connection_duration": "0.2s"}),
            access_logs=(log,),
        )
        port = await start_proxy(nursery, cfg, worker)
        client = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(3):
            assert await receive_all(client) == b""
            await log.logged.wait()
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert flags_to_short_string(log.entries[0].response_flags) == "DT"
    assert log.entries[0].connection_termination_details == "max_connection_duration_reached"


# ------------------------------------------------------------------------------------------
# Throughput (prints MB/s; no timing assertion). TRIOXY_BENCH_MIB=256 to run.
# ------------------------------------------------------------------------------------------

_SOURCE = r"""
import socket, sys
port, size = int(sys.argv[1]), int(sys.argv[2])
c = socket.create_connection(("127.0.0.1", port))
chunk = memoryview(bytearray(1 << 20)); left = size
while left:
    n = min(left, len(chunk)); c.sendall(chunk[:n]); left -= n
c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
"""


@pytest.mark.skipif(not os.environ.get("TRIOXY_BENCH_MIB"), reason="set TRIOXY_BENCH_MIB")
@pytest.mark.parametrize("engine", ["splice", "recv_into", "stream"])
async def test_relay_throughput(engine: str) -> None:
    size = int(os.environ["TRIOXY_BENCH_MIB"]) << 20
    received = 0
    done = trio.Event()

    async def sink(stream: trio.SocketStream) -> None:
        nonlocal received
        async with stream:
            sock = stream.socket
            buf = bytearray(1 << 20)
            while n := await sock.recv_into(buf):
                received += n
            done.set()

    async with trio.open_nursery() as nursery:
        up = await serve_upstream(nursery, sink)
        worker = await make_worker(nursery, {"u": [("127.0.0.1", up)]})
        cfg = dataclasses.replace(config_from({"stat_prefix": "b", "cluster": "u"}),
                                  relay_engine=engine)
        port = await start_proxy(nursery, cfg, worker)
        cpu0, t0 = time.process_time(), time.perf_counter()
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", _SOURCE, str(port), str(size)]
        )
        await done.wait()
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        await proc.wait()
        nursery.cancel_scope.cancel()
    assert received == size
    print(f"\n{engine:9s} {size >> 20} MiB: {size / wall / 1e6:7.0f} MB/s, "
          f"proxy+sink CPU {cpu:.2f} s")


def _file_log(path: Path) -> list[dict[str, Any]]:
    return [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": str(path),
        "log_format": {"text_format_source": {
            "inline_string": "%RESPONSE_FLAGS% %UPSTREAM_CLUSTER% %CONNECTION_TERMINATION_DETAILS%\n"}}}}]


@pytest.mark.parametrize(("settings", "want"), [
    ({"cluster": "u", "max_downstream_connection_duration": "0.2s"},
     "DT u max_connection_duration_reached"),
    ({"cluster": "gone"}, "NC - tcp_initializion_failure:3"),
])
async def test_dt_and_nc_in_a_file_access_log(tmp_path: Path, settings: dict[str, Any],
                                              want: str) -> None:
    """DT and NC as a file access log writes them (%RESPONSE_FLAGS%)."""
    from proxy.access_log import file_sink

    log = tmp_path / "tcp.log"
    async with trio.open_nursery() as nursery:
        up = await serve_upstream(nursery, echo)
        worker = await make_worker(nursery, {"u": [("127.0.0.1", up)]})
        cfg = config_from({"stat_prefix": "d", **settings, "access_log": _file_log(log)})
        port = await start_proxy(nursery, cfg, worker)
        client = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(3):
            assert await receive_all(client) == b""
            for _ in range(150):
                file_sink.flush_all(2.0)
                if log.exists() and log.read_text():
                    break
                await trio.sleep(0.02)
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert log.read_text().splitlines() == [want]
