"""Active health checking, the trio shell: scheduling on virtual time, real checks on loopback."""

from __future__ import annotations

import random
from typing import Any

import trio
import trio.testing

from proxy.stats import Store
from proxy.upstream.cluster_config import ClusterConfig, EndpointSpec
from proxy.upstream.health_check_manager import ClusterHealthChecker, HealthCheckManager, Probe
from proxy.upstream.health_checker import (
    CheckResult,
    FailureType,
    HealthCheckConfig,
    HttpCheck,
    TcpCheck,
)
from proxy.upstream.host import Host


def hc_config(check: Any = None, **kw: Any) -> HealthCheckConfig:
    base: dict[str, Any] = dict(
        check=check or TcpCheck(), timeout=1.0, interval=10.0, unhealthy_threshold=2,
        healthy_threshold=2, unhealthy_interval=10.0, unhealthy_edge_interval=10.0,
        healthy_edge_interval=10.0, no_traffic_interval=10.0, no_traffic_healthy_interval=10.0)
    base.update(kw)
    return HealthCheckConfig(**base)


def cluster(*ports: int, hc: HealthCheckConfig | None = None, name: str = "backend",
            address: str = "127.0.0.1") -> ClusterConfig:
    return ClusterConfig(name=name, endpoints=tuple(EndpointSpec(address, p) for p in ports),
                         connect_timeout=1.0, health_checks=(hc or hc_config(),))


class Scripted(Probe):
    """A probe that answers from a per-port script (the last answer repeats)."""

    scripts: dict[int, list[Any]] = {}

    def __init__(self, checker: ClusterHealthChecker, host: Host) -> None:
        super().__init__(checker, host)
        self.calls: list[float] = []

    async def check(self) -> CheckResult:
        script = self.scripts[self.host.port]
        self.calls.append(trio.current_time())
        answer = script.pop(0) if len(script) > 1 else script[0]
        if answer == "hang":
            await trio.sleep_forever()
        return answer  # type: ignore[no-any-return]


OK = CheckResult.ok()
NET = CheckResult.failed(FailureType.NETWORK)
ACTIVE = CheckResult.failed(FailureType.ACTIVE)


async def test_warming_then_changes_on_virtual_time(autojump_clock: Any) -> None:
    Scripted.scripts = {1: [OK, OK, NET, NET, OK, OK, OK], 2: [ACTIVE, OK, OK]}
    changes: list[tuple[float, str, int, bool]] = []
    store = Store()
    checker = ClusterHealthChecker(
        cluster(1, 2), store, lambda c, a, p, h: changes.append((trio.current_time(), c, p, h)),
        random.Random(0), probe_factory=Scripted)
    start = trio.current_time()
    async with trio.open_nursery() as n:
        await n.start(checker.run)
        # Warming: each host had its first check, at once.
        assert trio.current_time() - start < 0.01
        assert sorted(checker.health()) == [["127.0.0.1", 1, True], ["127.0.0.1", 2, False]]
        await trio.sleep(65)
        n.cancel_scope.cancel()
    rel = [(round(t - start), c, p, h) for t, c, p, h in changes]
    # port 1: ok@0 (healthy), ok@10, net@20, net@30 (unhealthy), ok@40, ok@50 (healthy)
    # port 2: fails@0, ok@10 (pending), ok@20 (healthy)
    assert rel == [(0, "backend", 1, True), (20, "backend", 2, True), (30, "backend", 1, False),
                   (50, "backend", 1, True)]
    assert store.counters["cluster.backend.health_check.attempt"].value == 14
    assert store.gauges["cluster.backend.health_check.healthy"].value == 2


async def test_timeout_is_a_network_timeout(autojump_clock: Any) -> None:
    Scripted.scripts = {1: [OK, "hang"]}
    changes: list[tuple[float, bool]] = []
    store = Store()
    checker = ClusterHealthChecker(
        cluster(1, hc=hc_config(timeout=2.0)), store,
        lambda c, a, p, h: changes.append((trio.current_time(), h)), random.Random(0),
        probe_factory=Scripted)
    start = trio.current_time()
    async with trio.open_nursery() as n:
        await n.start(checker.run)
        await trio.sleep(40)
        n.cancel_scope.cancel()
    # ok@0; hang@10 -> timeout@12 (1 of 2), hang@22 -> timeout@24: unhealthy.
    assert [(round(t - start), h) for t, h in changes] == [(0, True), (24, False)]
    assert store.counters["cluster.backend.health_check.network_failure"].value >= 2


async def test_warming_waits_at_most_the_timeout(autojump_clock: Any) -> None:
    Scripted.scripts = {1: ["hang"]}
    checker = ClusterHealthChecker(cluster(1, hc=hc_config(timeout=3.0)), Store(),
                                   lambda *a: None, probe_factory=Scripted)
    start = trio.current_time()
    async with trio.open_nursery() as n:
        await n.start(checker.run)
        assert 2.9 < trio.current_time() - start < 3.1
        n.cancel_scope.cancel()
    assert checker.health() == [["127.0.0.1", 1, False]]


async def test_manager_snapshot_and_traffic_latch(autojump_clock: Any) -> None:
    Scripted.scripts = {1: [OK], 2: [ACTIVE]}
    plain = ClusterConfig(name="plain")
    store = Store()
    mgr = HealthCheckManager({"a": cluster(1, name="a"), "b": cluster(2, name="b"),
                              "plain": plain}, store, lambda *a: None, random.Random(0))
    for c in mgr.checkers.values():
        c._probe_factory = Scripted
    assert set(mgr.checkers) == {"a", "b"} and mgr
    assert not mgr.checkers["a"].policy.traffic_seen()
    mgr.note_traffic({"cluster.a.upstream_cx_total": 3, "cluster.b.upstream_cx_total": 0})
    assert mgr.traffic == {"a": True, "b": False}
    async with trio.open_nursery() as n:
        await n.start(mgr.run)
        assert mgr.snapshot() == {"a": [["127.0.0.1", 1, True]], "b": [["127.0.0.1", 2, False]]}
        n.cancel_scope.cancel()
    assert not HealthCheckManager({"plain": plain}, Store(), lambda *a: None)


async def test_passive_failure_takes_a_host_out_at_once(autojump_clock: Any) -> None:
    Scripted.scripts = {1: [OK], 2: [OK]}
    changes: list[tuple[float, int, bool]] = []
    store = Store()
    mgr = HealthCheckManager({"backend": cluster(1, 2)}, store,
                             lambda c, a, p, h: changes.append((trio.current_time(), p, h)),
                             random.Random(0))
    mgr.checkers["backend"]._probe_factory = Scripted
    start = trio.current_time()
    async with trio.open_nursery() as n:
        await n.start(mgr.run)
        await trio.sleep(15)  # checks at 0 and 10
        # x-envoy-immediate-health-check-fail, as a worker reports it.
        assert mgr.set_unhealthy("backend", "127.0.0.1", 1)
        assert not mgr.set_unhealthy("backend", "127.0.0.1", 9)
        assert not mgr.set_unhealthy("nope", "127.0.0.1", 1)
        assert mgr.set_unhealthy("backend", "127.0.0.1", 1)  # already out: no new change
        assert mgr.snapshot() == {"backend": [["127.0.0.1", 1, False], ["127.0.0.1", 2, True]]}
        await trio.sleep(20)  # its timer did not move: checks at 20, 30 (healthy_threshold 2)
        n.cancel_scope.cancel()
    rel = [(round(t - start), p, h) for t, p, h in changes]
    assert sorted(rel) == [(0, 1, True), (0, 2, True), (15, 1, False), (30, 1, True)]
    assert store.counters["cluster.backend.health_check.passive_failure"].value == 2
    assert store.counters["cluster.backend.health_check.failure"].value == 2


async def test_passing_checks_of_healthy_hosts_may_uneject(autojump_clock: Any) -> None:
    from proxy.upstream.outlier_detection import OutlierDetectionConfig

    Scripted.scripts = {1: [OK], 2: [ACTIVE]}
    passed: list[tuple[str, str, int]] = []
    base = cluster(1, 2)
    configs = {
        "od": ClusterConfig(name="od", endpoints=base.endpoints, health_checks=base.health_checks,
                            outlier_detection=OutlierDetectionConfig()),
        "off": ClusterConfig(name="off", endpoints=base.endpoints,
                             health_checks=base.health_checks,
                             outlier_detection=OutlierDetectionConfig(
                                 successful_active_health_check_uneject_host=False)),
        "none": ClusterConfig(name="none", endpoints=base.endpoints,
                              health_checks=base.health_checks)}
    mgr = HealthCheckManager(configs, Store(), lambda *a: None, random.Random(0),
                             on_success=lambda *a: passed.append(a))
    for c in mgr.checkers.values():
        c._probe_factory = Scripted
    async with trio.open_nursery() as n:
        await n.start(mgr.run)
        await trio.sleep(25)  # checks at 0, 10, 20
        n.cancel_scope.cancel()
    # Only outlier-detecting clusters that un-eject, only the host that passes, every check.
    assert passed == [("od", "127.0.0.1", 1)] * 3


# ----------------------------------------------------------------------------- real sockets
async def serve(handler: Any, nursery: trio.Nursery) -> int:
    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    return int(listeners[0].socket.getsockname()[1])


async def run_checks(cfg: ClusterConfig, rounds: int) -> tuple[list[CheckResult], Any]:
    checker = ClusterHealthChecker(cfg, Store(), lambda *a: None)
    member = next(iter(checker.members.values()))
    probe = checker._probe_factory(checker, member.host)
    results = [await checker.check_once(probe, member.session) for _ in range(rounds)]
    await probe.aclose()
    return results, checker


async def test_http1_check_reuses_its_connection() -> None:
    connections = 0
    requests: list[bytes] = []
    status = [b"200 OK", b"503 Service Unavailable"]

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        buf = b""
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
            while b"\r\n\r\n" in buf:
                head, buf = buf.split(b"\r\n\r\n", 1)
                requests.append(head)
                s = status.pop(0) if status else b"200 OK"
                await stream.send_all(b"HTTP/1.1 " + s + b"\r\ncontent-length: 2\r\n\r\nok")

    async with trio.open_nursery() as n:
        port = await serve(handler, n)
        cfg = cluster(port, hc=hc_config(HttpCheck(path="/healthz", host="")))
        results, _ = await run_checks(cfg, 3)
        n.cancel_scope.cancel()
    assert [r.success for r in results] == [True, False, True]
    assert results[1].failure is FailureType.ACTIVE and not results[1].retriable
    assert connections == 1
    first = requests[0].decode().lower()
    assert first.startswith("get /healthz http/1.1") and "host: backend" in first
    assert "user-agent: envoy/hc" in first


async def test_http1_check_without_reuse_and_connection_close() -> None:
    connections = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")

    async with trio.open_nursery() as n:
        port = await serve(handler, n)
        results, _ = await run_checks(
            cluster(port, hc=hc_config(HttpCheck(path="/", host=""))), 2)
        n.cancel_scope.cancel()
    assert all(r.success for r in results) and connections == 2


async def test_refused_connection_is_a_network_failure() -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    results, checker = await run_checks(cluster(port, hc=hc_config(HttpCheck(path="/", host=""))), 1)
    assert not results[0].success and results[0].failure is FailureType.NETWORK
    assert checker.stats.attempt.value == 1


async def test_tcp_send_receive_and_connect_only() -> None:
    async def echo_pong(stream: trio.SocketStream) -> None:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            if b"PING" in data:
                await stream.send_all(b"+PO")
                await stream.send_all(b"NG\r\n")

    async with trio.open_nursery() as n:
        port = await serve(echo_pong, n)
        good = hc_config(TcpCheck(send=b"PING", receive=(b"PONG",)))
        results, _ = await run_checks(cluster(port, hc=good), 2)
        assert all(r.success for r in results)
        only = await run_checks(cluster(port, hc=hc_config(TcpCheck())), 1)
        assert only[0][0].success
        bad = hc_config(TcpCheck(send=b"PING", receive=(b"NOPE",)), timeout=0.3)
        results, _ = await run_checks(cluster(port, hc=bad), 1)
        assert results[0].failure is FailureType.NETWORK_TIMEOUT
        n.cancel_scope.cancel()


async def test_http2_check_over_one_connection() -> None:
    import h2.config
    import h2.connection
    import h2.events

    connections = 0
    paths: list[str] = []

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        await stream.send_all(conn.data_to_send())
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    headers = dict(ev.headers)
                    paths.append(headers[b":path"].decode())
                    status = b"200" if len(paths) != 2 else b"500"
                    conn.send_headers(ev.stream_id, [(b":status", status)], end_stream=False)
                    conn.send_data(ev.stream_id, b"alive", end_stream=True)
            await stream.send_all(conn.data_to_send())

    async with trio.open_nursery() as n:
        port = await serve(handler, n)
        check = HttpCheck(path="/h2", host="", http2=True, receive=(b"alive",))
        results, _ = await run_checks(cluster(port, hc=hc_config(check)), 3)
        n.cancel_scope.cancel()
    assert [r.success for r in results] == [True, False, True]
    assert paths == ["/h2"] * 3 and connections == 1
