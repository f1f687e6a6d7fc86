"""envoy.filters.http.health_check: the filter in a real HCM with real sockets, and its config.

The proxy runs in-process (listener, cluster manager, connections in one nursery); clients
and the h11 upstream are real sockets on 127.0.0.1, as in tests/proxy/http.
"""

from __future__ import annotations

import contextlib
import socket
import textwrap
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h11
import pytest
import trio
import yaml

from proxy.access_log import file_sink
from proxy.config.bootstrap import load_bootstrap, parse_bootstrap_dict
from proxy.config.errors import ConfigError
from proxy.config.snapshot import build_snapshot
from proxy.extensions.filters.http.health_check.health_check import (
    HealthCheckCache,
    HealthCheckConfig,
)
from proxy.listener.active_tcp_listener import ActiveTcpListener
from proxy.server.worker_context import WorkerContext
from proxy.stats import Store
from proxy.upstream.cluster_manager import ClusterManager

FAIL = "x-envoy-immediate-health-check-fail"
CHECKED = "x-envoy-upstream-healthchecked-cluster"


# -- a real upstream: h11 in a thread per connection ------------------------------------
class Upstream:
    """Answers 200 ``ok``; ``/status/N`` answers N; ``/degraded`` adds ``x-envoy-degraded``.
    ``paths`` records every request target it got."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.paths: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c: socket.socket) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req = None
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        data = c.recv(65536)
                        if not data and conn.their_state is h11.IDLE:
                            return
                        conn.receive_data(data)
                        continue
                    if isinstance(ev, h11.Request):
                        req = ev
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    elif isinstance(ev, h11.ConnectionClosed):
                        return
                assert req is not None
                path = req.target.decode()
                self.paths.append(path)
                status = int(path.rsplit("/", 1)[1]) if path.startswith("/status/") else 200
                headers = [("content-length", "3")]
                if path.startswith("/degraded"):
                    headers.append(("x-envoy-degraded", "true"))
                out = conn.send(h11.Response(status_code=status, headers=headers))
                out += conn.send(h11.Data(data=b"ok\n")) + conn.send(h11.EndOfMessage())
                c.sendall(out)
                conn.start_next_cycle()
        except (OSError, h11.ProtocolError):
            pass
        finally:
            c.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    u = Upstream()
    yield u
    u.close()


# -- config ------------------------------------------------------------------------------
def config(hc: str, *, port: int, access_log: Path | None = None, clusters: str = "") -> str:
    """A bootstrap whose one listener runs the health check filter ``hc`` (its typed_config
    body, YAML) before the router; every route goes to ``backend`` on ``port``."""
    log = ""
    if access_log is not None:
        # Two sinks: everything, and everything but health checks.
        log = f"""
access_log:
- name: envoy.access_loggers.file
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
    path: {access_log}
    log_format:
      text_format_source:
        inline_string: "ALL %REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%\\n"
- name: envoy.access_loggers.file
  filter: {{not_health_check_filter: {{}}}}
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
    path: {access_log}
    log_format:
      text_format_source:
        inline_string: "NOTHC %REQ(:PATH)% %RESPONSE_CODE%\\n"
"""
    hcm = f"""
"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
stat_prefix: ingress_http
route_config:
  virtual_hosts:
  - name: all
    domains: ["*"]
    routes:
    - match: {{prefix: "/"}}
      route: {{cluster: backend}}
http_filters:
- name: envoy.filters.http.health_check
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck
{textwrap.indent(textwrap.dedent(hc).strip(), "    ")}
- name: envoy.filters.http.router
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
{log}"""
    return f"""
node: {{id: edge-1, cluster: edge}}
static_resources:
  listeners:
  - name: ingress
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
{textwrap.indent(hcm.strip(), "          ")}
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
{textwrap.indent(textwrap.dedent(clusters).strip(), "  ")}
"""


HC_PATH = """
pass_through_mode: false
headers:
- name: ":path"
  string_match: {exact: /healthz}
"""


# -- the proxy, in-process ---------------------------------------------------------------
@dataclass
class Proxy:
    port: int
    worker: WorkerContext

    def counter(self, name: str) -> int:
        c = self.worker.stats.counters.get(name)
        return 0 if c is None else c.value


@contextlib.asynccontextmanager
async def run_proxy(yaml_text: str) -> AsyncIterator[Proxy]:
    snapshot = build_snapshot(parse_bootstrap_dict(yaml.safe_load(yaml_text)))
    stats = Store()
    worker = WorkerContext(
        cluster_manager=ClusterManager(snapshot.clusters, stats), snapshot=snapshot, stats=stats
    )
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.timers.run)
        await nursery.start(worker.cluster_manager.run)
        listener = ActiveTcpListener(snapshot.listeners[0], sock, worker)
        nursery.start_soon(listener.accept_loop, nursery)
        yield Proxy(sock.getsockname()[1], worker)
        nursery.cancel_scope.cancel()
    sock.close()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


async def request(port: int, path: str, *, method: str = "GET", body: bytes = b"",
                  headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """One request on a fresh connection, the response read to its end."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    hs = [("host", "example.com"), ("content-length", str(len(body))), *headers]
    out = conn.send(h11.Request(method=method, target=path, headers=hs))
    out += conn.send(h11.Data(data=body)) if body else b""
    await stream.send_all(out + conn.send(h11.EndOfMessage()))
    resp: h11.Response | None = None
    got = b""
    with trio.fail_after(10):
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(ev, h11.Response):
                resp = ev
            elif isinstance(ev, h11.Data):
                got += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
    await stream.aclose()
    assert resp is not None
    return Response(resp.status_code, {k.decode(): v.decode() for k, v in resp.headers}, got)


async def eventually(check: Callable[[], bool]) -> None:
    """Stats are counted as the stream ends, just after the client has its response."""
    for _ in range(200):
        if check():
            return
        await trio.sleep(0.01)
    raise AssertionError("condition not reached in 2 s")


def failed(p: Proxy, value: bool) -> None:
    """What the worker's control channel does for admin /healthcheck/fail and /ok."""
    p.worker.drain.set_health_check_failed(value)


# -- non pass-through --------------------------------------------------------------------
async def test_answers_health_checks_itself_with_200_and_never_forwards_them(
    upstream: Upstream, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    async with run_proxy(config(HC_PATH, port=upstream.port, access_log=log)) as p:
        r = await request(p.port, "/healthz")
        assert r.status == 200 and r.body == b""
        assert r.headers["content-length"] == "0" and "content-type" not in r.headers
        assert r.headers[CHECKED] == "edge"  # the bootstrap's node.cluster
        assert FAIL not in r.headers and "connection" not in r.headers
        assert upstream.paths == []
        # Anything else goes upstream untouched: the query string is part of :path.
        for path in ("/other", "/healthz?x=1", "/healthz/"):
            r = await request(p.port, path)
            assert r.status == 200 and r.body == b"ok\n", path
            assert CHECKED not in r.headers and FAIL not in r.headers
        assert upstream.paths == ["/other", "/healthz?x=1", "/healthz/"]
        # Health checks are kept out of the traffic numbers, as Envoy's chargeStats does.
        await eventually(lambda: p.counter("http.ingress_http.downstream_rq_completed") == 3)
        assert p.counter("http.ingress_http.downstream_rq_total") == 4
        assert p.counter("http.ingress_http.downstream_rq_2xx") == 3
        assert p.counter("http.ingress_http.health_check.request_total") == 1
        assert p.counter("http.ingress_http.health_check.ok") == 1
    await trio.sleep(0.1)
    file_sink.flush_all(2.0)
    lines = log.read_text().splitlines()
    assert "ALL /healthz 200 - health_check_ok" in lines
    assert [ln for ln in lines if ln.startswith("NOTHC")] == [
        "NOTHC /other 200", "NOTHC /healthz?x=1 200", "NOTHC /healthz/ 200"]


async def test_health_check_failed_answers_503_and_closes_every_connection(
    upstream: Upstream,
) -> None:
    async with run_proxy(config(HC_PATH, port=upstream.port)) as p:
        failed(p, True)
        r = await request(p.port, "/healthz")
        assert r.status == 503 and r.body == b""
        assert r.headers[FAIL] == "true" and r.headers[CHECKED] == "edge"
        assert r.headers["connection"] == "close"  # drain_close() while failed
        # Normal traffic still flows, but tells an Envoy in front to stop and goes away.
        r = await request(p.port, "/other")
        assert r.status == 200 and r.body == b"ok\n"
        assert r.headers[FAIL] == "true" and r.headers["connection"] == "close"
        assert CHECKED not in r.headers
        assert upstream.paths == ["/other"]
        await eventually(lambda: p.counter("http.ingress_http.health_check.failed") == 1)
        assert p.counter("http.ingress_http.downstream_cx_drain_close") == 2
        assert not p.worker.drain.draining  # failing health checks is not a drain
        failed(p, False)
        r = await request(p.port, "/healthz")
        assert r.status == 200 and FAIL not in r.headers and "connection" not in r.headers


async def test_a_health_check_with_a_body_is_answered_once_the_body_is_read(
    upstream: Upstream,
) -> None:
    async with run_proxy(config(HC_PATH, port=upstream.port)) as p:
        r = await request(p.port, "/healthz", method="POST", body=b"x" * 100_000)
        assert r.status == 200 and r.body == b""
        failed(p, True)
        r = await request(p.port, "/healthz", method="POST", body=b"hello")
        assert r.status == 503
        assert upstream.paths == []


async def test_an_empty_header_list_makes_every_request_a_health_check(
    upstream: Upstream,
) -> None:
    async with run_proxy(config("pass_through_mode: false", port=upstream.port)) as p:
        r = await request(p.port, "/anything")
        assert r.status == 200 and r.body == b"" and r.headers[CHECKED] == "edge"
        assert upstream.paths == []


# -- pass-through ------------------------------------------------------------------------
HC_PASS = """
pass_through_mode: true
headers:
- name: x-lb-probe
  present_match: true
"""


async def test_pass_through_forwards_health_checks_unless_failed(upstream: Upstream) -> None:
    probe = (("x-lb-probe", "1"),)
    async with run_proxy(config(HC_PASS, port=upstream.port)) as p:
        r = await request(p.port, "/status/200", headers=probe)
        assert r.status == 200 and r.body == b"ok\n" and r.headers[CHECKED] == "edge"
        r = await request(p.port, "/status/503", headers=probe)
        assert r.status == 503 and r.body == b"ok\n"  # the upstream's verdict, as it said it
        assert upstream.paths == ["/status/200", "/status/503"]
        failed(p, True)
        r = await request(p.port, "/status/200", headers=probe)
        assert r.status == 503 and r.body == b"" and r.headers[FAIL] == "true"
        assert r.headers["connection"] == "close"
        assert upstream.paths == ["/status/200", "/status/503"]
        r = await request(p.port, "/status/200")  # not a probe: forwarded
        assert r.status == 200 and r.headers[FAIL] == "true"
        assert upstream.paths[-1] == "/status/200"


async def test_pass_through_cache_time_answers_from_the_last_upstream_verdict(
    upstream: Upstream,
) -> None:
    probe = (("x-lb-probe", "1"),)
    async with run_proxy(config(HC_PASS + "cache_time: 3600s\n", port=upstream.port)) as p:
        r = await request(p.port, "/degraded/503", headers=probe)
        assert r.status == 200 and r.headers["x-envoy-degraded"] == "true"
        # Within the same cache period, the verdict is replayed without asking upstream.
        r = await request(p.port, "/status/503", headers=probe)
        assert r.status == 200 and r.body == b"" and r.headers["x-envoy-degraded"] == ""
        assert upstream.paths == ["/degraded/503"]
        await eventually(
            lambda: p.counter("http.ingress_http.health_check.cached_response") == 1)
        assert p.counter("http.ingress_http.health_check.degraded") == 1


def test_cache_holds_a_verdict_until_the_next_period_tick() -> None:
    now = [100.0]
    cache = HealthCheckCache(10.0, clock=lambda: now[0])
    assert not cache.use_cached_response()
    now[0] = 108.0
    cache.set_cached_response(503, False)
    assert cache.use_cached_response() and cache.status == 503
    now[0] = 110.0  # Envoy's clear timer fires every 10 s from config load
    assert not cache.use_cached_response()
    cache.set_cached_response(200, True)
    now[0] = 119.9
    assert cache.use_cached_response() and cache.degraded


# -- cluster_min_healthy_percentages -----------------------------------------------------
async def test_cluster_min_healthy_percentages(upstream: Upstream, tmp_path: Path) -> None:
    empty = """
    - name: empty
      type: STATIC
      connect_timeout: 1s
      load_assignment: {cluster_name: empty}
    """
    cases = [
        ("{backend: {value: 100}}", 200, "health_check_ok_cluster_healthy"),
        ("{backend: {value: 100}, empty: {value: 0}}", 200, "health_check_ok_cluster_healthy"),
        ("{empty: {value: 1}}", 503, "health_check_failed_cluster_empty"),
        ("{nowhere: {value: 1}}", 503, "health_check_failed_no_cluster_found"),
    ]
    log = tmp_path / "access.log"
    for percentages, status, _details in cases:
        hc = f"pass_through_mode: false\ncluster_min_healthy_percentages: {percentages}\n"
        async with run_proxy(config(hc, port=upstream.port, clusters=empty, access_log=log)) as p:
            r = await request(p.port, "/")
            assert r.status == status, percentages
    hc = "pass_through_mode: false\ncluster_min_healthy_percentages: {backend: {value: 50.9}}\n"
    async with run_proxy(config(hc, port=upstream.port)) as p:
        cluster = p.worker.cluster_manager.get("backend")
        assert cluster is not None
        cluster.hosts[0].healthy = False
        cluster.refresh_health()
        r = await request(p.port, "/")
        assert r.status == 503
        await eventually(
            lambda: p.counter("http.ingress_http.health_check.failed_cluster_unhealthy") == 1)
    assert upstream.paths == []
    await trio.sleep(0.1)
    file_sink.flush_all(2.0)
    flags_details = [ln.split(" ", 4)[3:] for ln in log.read_text().splitlines()
                     if ln.startswith("ALL")]
    assert flags_details == [["-", d] if s == 200 else ["LH", d] for _, s, d in cases]


# -- config ------------------------------------------------------------------------------
def _filter_config(yaml_text: str) -> HealthCheckConfig:
    """The compiled health check filter of a bootstrap read by the real loader."""
    snapshot = build_snapshot(load_bootstrap(None, yaml_text))
    hcm = snapshot.listeners[0].filter_chains.chains[0].filters[-1]
    first = hcm.filter_factories[0]
    assert isinstance(first, HealthCheckConfig)
    return first


def test_config_loads_through_the_bootstrap_loader() -> None:
    hc = HC_PASS + "cache_time: 2.5s\n"
    cfg = _filter_config(config(hc, port=1))
    assert cfg.pass_through_mode is True
    assert cfg.cache is not None and cfg.local_cluster_name == "edge"
    assert [m.name for m in cfg.headers] == ["x-lb-probe"]
    cfg = _filter_config(config(
        "pass_through_mode: false\ncluster_min_healthy_percentages: {b: {value: 75.5}, a: {}}\n",
        port=1))
    assert cfg.cluster_min_healthy_percentages == (("a", 0), ("b", 75))


TC = ("static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
      ".http_filters[0].typed_config")


@pytest.mark.parametrize(("hc", "path", "message"), [
    ("headers: [{name: x, exact_match: a}]", f"{TC}.pass_through_mode", "required"),
    ("pass_through_mode: false\nheaders: [{name: x, range_match: {start: 1, end: 2}}]",
     f"{TC}.headers[0].range_match", "not supported"),
    ("pass_through_mode: false\ncache_time: 1s", f"{TC}.cache_time", "pass_through_mode"),
    ("pass_through_mode: true\ncluster_min_healthy_percentages: {backend: {value: 50}}",
     f"{TC}.cluster_min_healthy_percentages", "no effect"),
    ("pass_through_mode: false\ncluster_min_healthy_percentages: {backend: {value: 150}}",
     f'{TC}.cluster_min_healthy_percentages["backend"].value', "range"),
])
def test_config_refusals_name_the_field(hc: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        build_snapshot(load_bootstrap(None, config(hc, port=1)))
    assert exc.value.path == path
    assert message in exc.value.message
