"""Circuit breakers, retries, timeouts and outlier detection through the real HTTP path.

The proxy runs in-process (tests/proxy/http/test_conn_manager.py's harness); upstreams are
threads on 127.0.0.1 told per request path to fail, stall, close or answer; every case
checks the status, Envoy's stats and the access log's %RESPONSE_FLAGS%.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).parents[1] / "http"))
from h2_helpers import H2_CLUSTER, H2Upstream  # noqa: E402
from test_conn_manager import Client, cluster, config, eventually, run_proxy  # noqa: E402

from proxy.access_log import file_sink  # noqa: E402


class Scripted:
    """HTTP/1.1 upstream. Paths: /ok; /status/N; /flaky/K/... (the first K requests to that
    path get 503, then 200 with the request body echoed); /slowfirst/K/MS (the first K
    requests sleep MS ms); /slow/MS; /close (no answer)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.seen: Counter[str] = Counter()
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                length = 0
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    if k.strip().lower() == "content-length":
                        length = int(v)
                while len(buf) < length:
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                body, buf = buf[:length], buf[length:]
                with self.lock:
                    self.seen[path] += 1
                    n = self.seen[path]
                    self.bodies.append(body)
                status, out = 200, b"ok"
                parts = path.split("/")
                if path.startswith("/status/"):
                    status = int(parts[2])
                elif path.startswith("/flaky/"):
                    status, out = (503, b"no") if n <= int(parts[2]) else (200, body or b"ok")
                elif path.startswith("/slowfirst/"):
                    if n <= int(parts[2]):
                        time.sleep(int(parts[3]) / 1000)
                elif path.startswith("/slow/"):
                    time.sleep(int(parts[2]) / 1000)
                elif path.startswith("/close"):
                    return
                c.sendall(b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n\r\n%s" % (status, len(out), out))
        except OSError:
            pass
        finally:
            c.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def up() -> Iterator[Scripted]:
    u = Scripted()
    yield u
    u.close()


@pytest.fixture
def up2() -> Iterator[Scripted]:
    u = Scripted()
    yield u
    u.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def route(extra: str = "", vhost: str = "") -> str:
    del vhost
    return f"""
- match: {{prefix: "/"}}
  route:
    cluster: backend
{extra}
"""


def flags_of(log: Path) -> list[str]:
    file_sink.flush_all(2.0)
    return [line.split(" ")[1] for line in log.read_text().splitlines()]


def _log_lines(log: Path) -> int:
    file_sink.flush_all(2.0)
    return len(log.read_text().splitlines()) if log.exists() else 0


async def wait_log(log: Path, n: int) -> list[str]:
    for _ in range(200):
        if _log_lines(log) >= n:
            break
        await trio.sleep(0.01)
    return flags_of(log)


async def ejection_length(host: object) -> float:
    """Seconds until ``host`` is back from its current ejection."""
    t0 = trio.current_time()
    for _ in range(500):
        if not host.ejected:  # type: ignore[attr-defined]
            break
        await trio.sleep(0.01)
    return trio.current_time() - t0


async def get(port: int, path: str, **kw: object) -> tuple[int, dict[str, str], bytes]:
    c = await Client.connect(port)
    try:
        r = await c.request("GET" if "body" not in kw else "POST", path, **kw)  # type: ignore[arg-type]
        return r.status, r.headers, r.body
    finally:
        await c.aclose()


# ----------------------------------------------------------------------------- breakers
BREAKERS = """
circuit_breakers:
  thresholds:
  - {max_connections: 1, max_pending_requests: 1, track_remaining: true}
"""


async def test_pending_overflow_is_uo_at_exactly_the_limits(up: Scripted, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    cfg = config(routes=route(), clusters=cluster("backend", up.port, extra=BREAKERS),
                 access_log=log)
    async with run_proxy(cfg) as p:
        assert (await get(p.port, "/ok"))[0] == 200  # warm: one pooled connection
        results: list[tuple[int, dict[str, str], bytes]] = []

        async def one(path: str) -> None:
            results.append(await get(p.port, path))

        async with trio.open_nursery() as n:
            n.start_soon(one, "/slow/400")
            await trio.sleep(0.1)  # the first holds the one connection
            assert p.worker.stats.gauges["cluster.backend.circuit_breakers.default.cx_open"].value == 1
            for _ in range(4):
                n.start_soon(one, "/slow/10")
        statuses = sorted(s for s, _, _ in results)
        assert statuses == [200, 200, 503, 503, 503]  # 1 active + 1 pending, 3 refused
        for s, h, body in results:
            if s == 503:
                assert h["x-envoy-overloaded"] == "true"
                assert b"overflow" in body
        c = p.worker.stats.counters
        assert c["cluster.backend.upstream_rq_pending_overflow"].value == 3
        assert c["cluster.backend.upstream_cx_overflow"].value >= 1
        assert c["cluster.backend.upstream_cx_total"].value == 1
        g = p.worker.stats.gauges
        await eventually(lambda: g["cluster.backend.circuit_breakers.default.cx_open"].value == 1)
        assert g["cluster.backend.circuit_breakers.default.remaining_pending"].value == 1
        assert g["cluster.backend.upstream_rq_pending_active"].value == 0
    flags = await wait_log(log, 6)
    assert sorted(flags) == ["-", "-", "-", "UO", "UO", "UO"]


async def test_max_requests_overflow(up: Scripted) -> None:
    cb = "\ncircuit_breakers: {thresholds: [{max_requests: 2}]}"
    async with run_proxy(config(routes=route(), clusters=cluster("backend", up.port, extra=cb))) as p:
        results: list[int] = []

        async def one() -> None:
            results.append((await get(p.port, "/slow/300"))[0])

        async with trio.open_nursery() as n:
            for _ in range(4):
                n.start_soon(one)
        assert sorted(results) == [200, 200, 503, 503]
        assert p.worker.stats.counters["cluster.backend.upstream_rq_pending_overflow"].value == 2


async def test_default_breakers_hold_without_config(up: Scripted) -> None:
    async with run_proxy(config(routes=route(), clusters=cluster("backend", up.port))) as p:
        assert (await get(p.port, "/ok"))[0] == 200
        res = p.worker.cluster_manager.get("backend").resources[0]
        assert (res.connections.max, res.pending_requests.max, res.requests.max,
                res.retries.max) == (1024, 1024, 1024, 3)
        await eventually(lambda: res.requests.count == 0 and res.connections.count == 1)


# ----------------------------------------------------------------------------- retries
RETRY = """
    retry_policy:
      retry_on: 5xx
      num_retries: 3
      retry_back_off: {base_interval: 0.005s}
"""
ATTEMPTS = "include_attempt_count_in_response: true\n"


def vhost_config(routes: str, clusters: str, log: Path | None = None) -> str:
    text = config(routes=routes, clusters=clusters, access_log=log)
    return text.replace("domains: [\"*\"]", "domains: [\"*\"]\n              " + ATTEMPTS.strip()
                        + "\n              include_request_attempt_count: true")


async def test_retries_succeed_on_a_flaky_host(up: Scripted, tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    async with run_proxy(vhost_config(route(RETRY), cluster("backend", up.port), log)) as p:
        status, headers, _ = await get(p.port, "/flaky/2/x")
        assert status == 200
        assert headers["x-envoy-attempt-count"] == "3"
        assert up.seen["/flaky/2/x"] == 3
        c = p.worker.stats.counters
        await eventually(lambda: c["cluster.backend.upstream_rq_retry_success"].value == 1)
        assert c["cluster.backend.upstream_rq_retry"].value == 2
        assert c["cluster.backend.upstream_rq_retry_backoff_exponential"].value == 2
        assert c["cluster.backend.upstream_rq_503"].value == 2
        res = p.worker.cluster_manager.get("backend").resources[0]
        assert res.retries.count == 0
    assert await wait_log(log, 1) == ["-"]


async def test_retries_exhausted_end_in_urx(up: Scripted, tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    async with run_proxy(config(routes=route(RETRY), clusters=cluster("backend", up.port),
                                access_log=log)) as p:
        status, _, body = await get(p.port, "/status/503")
        assert status == 503
        assert up.seen["/status/503"] == 4
        c = p.worker.stats.counters
        await eventually(lambda: c["cluster.backend.upstream_rq_retry_limit_exceeded"].value == 1)
        assert c["cluster.backend.upstream_rq_retry"].value == 3
    assert await wait_log(log, 1) == ["URX"]


async def test_request_body_is_replayed(up: Scripted) -> None:
    async with run_proxy(config(routes=route(RETRY), clusters=cluster("backend", up.port))) as p:
        status, _, body = await get(p.port, "/flaky/1/post", body=b"payload" * 100)
        assert status == 200 and body == b"payload" * 100
        assert up.bodies.count(b"payload" * 100) == 2


async def test_body_over_the_buffer_limit_is_not_retried(up: Scripted) -> None:
    routes = route(RETRY) + "  per_request_buffer_limit_bytes: 10\n"
    async with run_proxy(config(routes=routes, clusters=cluster("backend", up.port))) as p:
        status, _, _ = await get(p.port, "/flaky/1/big", body=b"x" * 100)
        assert status == 503
        assert up.seen["/flaky/1/big"] == 1
        c = p.worker.stats.counters
        assert c["cluster.backend.retry_or_shadow_abandoned"].value == 1
        assert c["cluster.backend.upstream_rq_retry"].value == 0


async def test_retry_headers_without_a_policy(up: Scripted) -> None:
    async with run_proxy(config(routes=route(), clusters=cluster("backend", up.port))) as p:
        status, _, _ = await get(p.port, "/flaky/1/h", headers=[
            ("x-envoy-retry-on", "gateway-error"), ("x-envoy-max-retries", "1")])
        assert status == 200 and up.seen["/flaky/1/h"] == 2
        status, _, _ = await get(p.port, "/flaky/1/none")
        assert status == 503  # no policy, no header: no retry


async def test_retry_overflow_sets_uo(up: Scripted, tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    cb = "\ncircuit_breakers: {thresholds: [{max_retries: 0}]}"
    async with run_proxy(config(routes=route(RETRY), access_log=log,
                                clusters=cluster("backend", up.port, extra=cb))) as p:
        assert (await get(p.port, "/status/503"))[0] == 503
        assert up.seen["/status/503"] == 1
        c = p.worker.stats.counters
        assert c["cluster.backend.upstream_rq_retry_overflow"].value == 1
    assert await wait_log(log, 1) == ["UO"]


CONNECT_RETRY = """
    retry_policy:
      retry_on: connect-failure
      num_retries: 2
      retry_back_off: {base_interval: 0.005s}
      retry_host_predicate:
      - name: envoy.retry_host_predicates.previous_hosts
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate
      host_selection_retry_max_attempts: 5
"""


async def test_connect_failures_retry_on_another_host(up: Scripted) -> None:
    bad = closed_port()
    async with run_proxy(config(routes=route(CONNECT_RETRY),
                                clusters=cluster("backend", bad, up.port))) as p:
        for _ in range(6):
            assert (await get(p.port, "/ok"))[0] == 200
        assert up.seen["/ok"] == 6


async def test_connect_failures_exhausted_are_uf_urx(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    async with run_proxy(config(routes=route(CONNECT_RETRY), access_log=log,
                                clusters=cluster("backend", closed_port()))) as p:
        status, _, body = await get(p.port, "/ok")
        assert status == 503 and b"connection failure" in body
        assert p.worker.stats.counters["cluster.backend.upstream_rq_retry"].value == 2
    assert await wait_log(log, 1) == ["UF,URX"]


# ----------------------------------------------------------------------------- timeouts
async def test_route_timeout_is_504_ut(up: Scripted, tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    async with run_proxy(config(routes=route("    timeout: 0.2s"), access_log=log,
                                clusters=cluster("backend", up.port))) as p:
        t0 = trio.current_time()
        status, _, body = await get(p.port, "/slow/2000")
        assert status == 504 and body == b"upstream request timeout"
        assert trio.current_time() - t0 < 1.5
        assert p.worker.stats.counters["cluster.backend.upstream_rq_timeout"].value == 1
    assert await wait_log(log, 1) == ["UT"]


async def test_per_try_timeout_retries(up: Scripted) -> None:
    policy = """
    retry_policy:
      retry_on: 5xx
      num_retries: 1
      per_try_timeout: 0.2s
      retry_back_off: {base_interval: 0.005s}
"""
    async with run_proxy(config(routes=route(policy), clusters=cluster("backend", up.port))) as p:
        status, _, _ = await get(p.port, "/slowfirst/1/1500")
        assert status == 200
        c = p.worker.stats.counters
        assert c["cluster.backend.upstream_rq_per_try_timeout"].value == 1
        assert c["cluster.backend.upstream_rq_retry"].value == 1


async def test_per_try_timeout_without_retry_is_504(up: Scripted, tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    policy = "    retry_policy: {per_try_timeout: 0.2s}\n    timeout: 5s"
    async with run_proxy(config(routes=route(policy), access_log=log,
                                clusters=cluster("backend", up.port))) as p:
        t0 = trio.current_time()
        status, _, _ = await get(p.port, "/slow/1500")
        assert status == 504 and trio.current_time() - t0 < 1.2
    assert await wait_log(log, 1) == ["UT"]


async def test_rq_timeout_header(up: Scripted) -> None:
    async with run_proxy(config(routes=route(), clusters=cluster("backend", up.port))) as p:
        status, _, _ = await get(p.port, "/slow/1500",
                                 headers=[("x-envoy-upstream-rq-timeout-ms", "200")])
        assert status == 504


async def test_idle_pooled_connections_close_on_a_timer(up: Scripted) -> None:
    extra = "\ncommon_http_protocol_options: {idle_timeout: 0.2s}"
    async with run_proxy(config(routes=route(), clusters=cluster("backend", up.port, extra=extra))) as p:
        assert (await get(p.port, "/ok"))[0] == 200
        g = p.worker.stats.gauges
        c = p.worker.stats.counters
        assert g["cluster.backend.upstream_cx_active"].value == 1
        await eventually(lambda: c["cluster.backend.upstream_cx_idle_timeout"].value == 1)
        assert g["cluster.backend.upstream_cx_active"].value == 0


async def test_max_connection_duration(up: Scripted) -> None:
    extra = "\ncommon_http_protocol_options: {max_connection_duration: 0.2s}"
    async with run_proxy(config(routes=route(), clusters=cluster("backend", up.port, extra=extra))) as p:
        assert (await get(p.port, "/ok"))[0] == 200
        c = p.worker.stats.counters
        await eventually(
            lambda: c["cluster.backend.upstream_cx_max_duration_reached"].value == 1)


# ----------------------------------------------------------------------------- outliers
OUTLIER = """
outlier_detection:
  consecutive_5xx: 3
  interval: 0.05s
  base_ejection_time: 0.3s
  max_ejection_percent: {pct}
"""


async def test_ejection_after_consecutive_5xx_and_growing_durations(up: Scripted,
                                                                    up2: Scripted) -> None:
    clusters = cluster("backend", up.port, up2.port, extra=OUTLIER.format(pct=50))
    async with run_proxy(config(routes=route(), clusters=clusters)) as p:
        cl = p.worker.cluster_manager.get("backend")
        bad = next(h for h in cl.hosts if h.port == up.port)
        # /status/500 fails on both hosts; only the first host's path counts, so send to
        # the bad host's path until it is ejected: round robin alternates the two hosts.
        for _ in range(6):
            await get(p.port, "/status/500")
        ejected = [h for h in cl.hosts if h.ejected]
        assert len(ejected) == 1  # 2 hosts at 50 %: one at most
        c = p.worker.stats.counters
        assert c["cluster.backend.outlier_detection.ejections_enforced_consecutive_5xx"].value == 1
        assert p.worker.stats.gauges["cluster.backend.outlier_detection.ejections_active"].value == 1
        host = ejected[0]
        # While ejected, every request goes to the other host.
        other = next(h for h in cl.hosts if h is not host)
        before = other.rq_total
        for _ in range(4):
            await get(p.port, "/ok")
        assert other.rq_total - before == 4
        first = await ejection_length(host)
        # Eject the same host again at once: twice as long.
        while not host.ejected:
            await get(p.port, "/status/500")
        second = await ejection_length(host)
        assert 0.25 <= first <= 0.5
        assert 0.55 <= second <= 0.8
        assert host.outlier.num_ejections == 2
        del bad


async def test_max_ejection_percent_holds_with_three_failing_hosts() -> None:
    ports = [closed_port() for _ in range(3)]
    clusters = cluster("backend", *ports, extra=OUTLIER.format(pct=50))
    async with run_proxy(config(routes=route(), clusters=clusters)) as p:
        cl = p.worker.cluster_manager.get("backend")
        for _ in range(20):
            await get(p.port, "/ok")
            assert sum(h.ejected for h in cl.hosts) <= 1
        assert sum(h.ejected for h in cl.hosts) == 1
        assert p.worker.stats.counters[
            "cluster.backend.outlier_detection.ejections_overflow"].value >= 1


async def test_panic_routes_to_ejected_hosts_and_threshold_zero_is_uh(
        up: Scripted, up2: Scripted, tmp_path: Path) -> None:
    od = """
outlier_detection: {consecutive_5xx: 1, interval: 10s, base_ejection_time: 30s,
                    max_ejection_percent: 100}
"""
    async with run_proxy(config(routes=route(), clusters=cluster(
            "backend", up.port, up2.port, extra=od))) as p:
        cl = p.worker.cluster_manager.get("backend")
        await get(p.port, "/status/500")
        await get(p.port, "/status/500")
        assert all(h.ejected for h in cl.hosts)
        # Panic (0 % healthy < 50 %): balanced over all hosts anyway.
        assert (await get(p.port, "/ok"))[0] == 200
        assert p.worker.stats.counters["cluster.backend.lb_healthy_panic"].value >= 1
        assert p.worker.stats.gauges["cluster.backend.membership_healthy"].value == 0
    log = tmp_path / "a.log"
    od0 = od + "common_lb_config: {healthy_panic_threshold: {value: 0}}\n"
    async with run_proxy(config(routes=route(), access_log=log, clusters=cluster(
            "backend", up.port, extra=od0))) as p:
        await get(p.port, "/status/500")
        status, _, _ = await get(p.port, "/ok")
        assert status == 503
    assert (await wait_log(log, 2))[1] == "UH"


# ----------------------------------------------------------------------------- HTTP/2
@pytest.fixture
def h2up() -> Iterator[H2Upstream]:
    u = H2Upstream()
    yield u
    u.close()


async def test_http2_resets_are_retried_then_urx(h2up: H2Upstream, tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    policy = """
    retry_policy:
      retry_on: reset
      num_retries: 2
      retry_back_off: {base_interval: 0.005s}
"""
    async with run_proxy(config(routes=route(policy), access_log=log,
                                clusters=cluster("backend", h2up.port, extra=H2_CLUSTER))) as p:
        status, _, _ = await get(p.port, "/reset")
        assert status == 503
        assert sum(1 for r in h2up.requests if r[":path"] == "/reset") == 3
        assert p.worker.stats.counters["cluster.backend.upstream_rq_retry"].value == 2
        assert (await get(p.port, "/echo", body=b"abc"))[2] == b"abc"
    assert (await wait_log(log, 2))[0] == "UR,URX"


async def test_http2_max_requests_overflow(h2up: H2Upstream) -> None:
    extra = H2_CLUSTER + "circuit_breakers: {thresholds: [{max_requests: 1}]}"
    async with run_proxy(config(routes=route(), clusters=cluster("backend", h2up.port,
                                                                 extra=extra))) as p:
        results: list[tuple[int, dict[str, str], bytes]] = []

        async def one() -> None:
            results.append(await get(p.port, "/slow?ms=300"))

        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(one)
        assert sorted(s for s, _, _ in results) == [200, 503, 503]
        assert all(h.get("x-envoy-overloaded") == "true" for s, h, _ in results if s == 503)


async def test_connect_timeout_is_uf_with_the_reason(tmp_path: Path) -> None:
    # A listener whose accept queue is full drops SYNs: connecting hangs until the timeout.
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(s)
    log = tmp_path / "a.log"
    fmt_cluster = cluster("backend", port).replace("connect_timeout: 1s", "connect_timeout: 0.2s")
    try:
        async with run_proxy(config(routes=route(), clusters=fmt_cluster, access_log=log)) as p:
            status, _, body = await get(p.port, "/ok")
            assert status == 503
            assert body.endswith(b"reset reason: connection timeout")
            assert p.worker.stats.counters[
                "cluster.backend.upstream_cx_connect_timeout"].value == 1
    finally:
        for s in fillers:
            s.close()
        full.close()
    assert await wait_log(log, 1) == ["UF"]
