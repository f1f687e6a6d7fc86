"""Active health checking with real processes: trioxy's main process checks, workers route.

Upstreams are small threaded Python servers on 127.0.0.1 whose health answer can be flipped
(``ok``, ``fail`` = 503, ``hang`` = no answer, ``close`` = TCP check closes) while they count
the data-path requests they serve, so "traffic stops going to an unhealthy host" is measured
at the upstream.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import free_port

BASE = 62310  # --base-id range of this module: BASE .. BASE+9


class FlipUpstream:
    """HTTP/1.1 on one port: ``/health`` answers per ``self.health``; anything else 200
    (counted in ``self.served``). A connection whose first bytes are ``PING`` is a TCP
    health check: ``PONG`` per ``self.tcp`` (``ok``), or closed (``close``)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.health = "ok"
        self.tcp = "ok"
        self.served = 0
        self.immediate_fail = False  # x-envoy-immediate-health-check-fail on responses
        self.health_checks = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
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
                while b"\r\n\r\n" not in buf and not buf.startswith(b"PING"):
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                if buf.startswith(b"PING"):
                    buf = buf[4:]
                    with self.lock:
                        self.health_checks += 1
                    if self.tcp != "ok":
                        return
                    c.sendall(b"PONG")
                    continue
                head, _, buf = buf.partition(b"\r\n\r\n")
                path = head.split(b"\r\n", 1)[0].split(b" ")[1]
                if path == b"/health":
                    with self.lock:
                        self.health_checks += 1
                    mode = self.health
                    if mode == "hang":
                        time.sleep(3)
                        return
                    status = b"200 OK" if mode == "ok" else b"503 Service Unavailable"
                    c.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
                    continue
                with self.lock:
                    self.served += 1
                body = b"%d\n" % self.port
                extra = (b"x-envoy-immediate-health-check-fail: true\r\n"
                         if self.immediate_fail else b"")
                c.sendall(b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s"
                          % (extra, len(body), body))
        except OSError:
            pass
        finally:
            c.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def ups() -> Iterator[list[FlipUpstream]]:
    made = [FlipUpstream() for _ in range(3)]
    yield made
    for u in made:
        u.close()


def config(listen: int, admin: int, log: Path, hosts: list[int], health_check: str,
           runtime: str = "", cluster_extra: str = "") -> str:
    endpoints = "".join(f"""
              - endpoint:
                  address:
                    socket_address: {{address: 127.0.0.1, port_value: {p}}}""" for p in hosts)
    return f"""
admin:
  address:
    socket_address: {{address: 127.0.0.1, port_value: {admin}}}
{runtime}
static_resources:
  listeners:
  - name: http
    address:
      socket_address: {{address: 127.0.0.1, port_value: {listen}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {log}
              log_format:
                text_format: "%RESPONSE_CODE% %RESPONSE_FLAGS% %UPSTREAM_HOST%\\n"
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: backend}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    connect_timeout: 1s
{cluster_extra}
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:{endpoints}
    health_checks:
    - timeout: 0.5s
      interval: 0.2s
      no_traffic_interval: 0.2s
      unhealthy_threshold: 2
      healthy_threshold: 2
{health_check}
"""


HTTP_CHECK = """\
      http_health_check:
        path: /health
        expected_statuses: [{start: 200, end: 300}]"""
TCP_CHECK = """\
      tcp_health_check:
        send: {text: "50494e47"}
        receive: [{text: "504f4e47"}]"""


def admin_get(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def health_flags(admin: int) -> dict[int, str]:
    out = {}
    for line in admin_get(admin, "/clusters").splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == "backend" and parts[2] == "health_flags":
            out[int(parts[1].rsplit(":", 1)[1])] = parts[3]
    return out


def counter(admin: int, name: str) -> int:
    doc = json.loads(admin_get(admin, f"/stats?format=json&filter=^{name}$"))
    values = [s["value"] for s in doc["stats"] if s.get("name") == name]
    return int(values[0]) if values else 0


def wait_until(cond: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or cond}")


def get(port: int, n: int) -> list[int]:
    statuses = []
    for _ in range(n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/x")
            r = conn.getresponse()
            r.read()
            statuses.append(r.status)
        finally:
            conn.close()
    return statuses


def start(start_trioxy, yaml: str, listen: int, base: int, concurrency: int = 2):  # type: ignore[no-untyped-def]
    return start_trioxy(yaml, wait_port=listen, concurrency=concurrency,
                        extra=["--base-id", str(base)])


def test_http_check_takes_a_host_out_and_back(start_trioxy, ups, tmp_path: Path) -> None:
    a, b = ups[0], ups[1]
    listen, admin = free_port(), free_port()
    t = start(start_trioxy, config(listen, admin, tmp_path / "access.log", [a.port, b.port],
                                   HTTP_CHECK), listen, BASE)
    assert health_flags(admin) == {a.port: "healthy", b.port: "healthy"}
    assert get(listen, 20) == [200] * 20
    assert a.served > 0 and b.served > 0
    # A stops answering its health checks: two timeouts (unhealthy_threshold) take it out.
    a.health = "hang"
    wait_until(lambda: health_flags(admin)[a.port] == "/failed_active_hc", what="A failed")
    assert health_flags(admin)[b.port] == "healthy"
    served_a, served_b = a.served, b.served
    assert get(listen, 20) == [200] * 20
    assert a.served == served_a and b.served == served_b + 20
    wait_until(lambda: counter(admin, "cluster.backend.health_check.healthy") == 1,
               what="healthy gauge 1")
    assert counter(admin, "cluster.backend.health_check.network_failure") >= 2
    assert counter(admin, "cluster.backend.membership_healthy") == 2  # 1 per worker, summed
    # Back after healthy_threshold passing checks.
    a.health = "ok"
    wait_until(lambda: health_flags(admin)[a.port] == "healthy", what="A healthy again")
    served_a = a.served
    assert get(listen, 20) == [200] * 20
    assert a.served > served_a
    assert counter(admin, "cluster.backend.health_check.attempt") > 0
    assert counter(admin, "cluster.backend.health_check.success") > 0
    # An unexpected status is an immediate failure.
    before = counter(admin, "cluster.backend.health_check.failure")
    b.health = "fail"
    wait_until(lambda: health_flags(admin)[b.port] == "/failed_active_hc", what="B failed")
    assert counter(admin, "cluster.backend.health_check.network_failure") >= 2
    assert counter(admin, "cluster.backend.health_check.failure") > before
    assert "is now unhealthy" in t.log


def test_a_worker_restarted_later_gets_the_current_health(start_trioxy, ups,
                                                          tmp_path: Path) -> None:
    import os
    import signal

    a, b = ups[0], ups[1]
    a.health = "fail"  # failed from the first check on
    listen, admin = free_port(), free_port()
    t = start(start_trioxy, config(listen, admin, tmp_path / "access.log", [a.port, b.port],
                                   HTTP_CHECK), listen, BASE + 1, concurrency=1)
    assert health_flags(admin) == {a.port: "/failed_active_hc", b.port: "healthy"}
    assert get(listen, 10) == [200] * 10 and a.served == 0
    old = t.worker_pids()
    os.kill(old[0], signal.SIGKILL)
    wait_until(lambda: bool(t.worker_pids()) and t.worker_pids() != old and
               health_flags(admin).get(b.port) == "healthy", what="worker replaced")
    assert health_flags(admin)[a.port] == "/failed_active_hc"
    assert get(listen, 10) == [200] * 10 and a.served == 0


def test_tcp_check_send_receive(start_trioxy, ups, tmp_path: Path) -> None:
    a, b = ups[0], ups[1]
    listen, admin = free_port(), free_port()
    start(start_trioxy, config(listen, admin, tmp_path / "access.log", [a.port, b.port],
                               TCP_CHECK), listen, BASE + 2, concurrency=1)
    assert health_flags(admin) == {a.port: "healthy", b.port: "healthy"}
    a.tcp = "close"
    wait_until(lambda: health_flags(admin)[a.port] == "/failed_active_hc", what="A failed")
    served = a.served
    assert get(listen, 10) == [200] * 10 and a.served == served
    a.tcp = "ok"
    wait_until(lambda: health_flags(admin)[a.port] == "healthy", what="A back")


def test_panic_below_threshold_routes_to_all(start_trioxy, ups, tmp_path: Path) -> None:
    ups[0].health = ups[1].health = "fail"  # 1 healthy of 3: 33 % < 50 %
    listen, admin = free_port(), free_port()
    start(start_trioxy, config(listen, admin, tmp_path / "access.log",
                               [u.port for u in ups], HTTP_CHECK), listen, BASE + 3,
          concurrency=1)
    flags = health_flags(admin)
    assert sorted(flags.values()) == ["/failed_active_hc", "/failed_active_hc", "healthy"]
    assert get(listen, 30) == [200] * 30
    assert all(u.served > 0 for u in ups)  # panic: every host, healthy or not
    assert counter(admin, "cluster.backend.lb_healthy_panic") >= 30


def test_no_healthy_host_is_503_uh(start_trioxy, ups, tmp_path: Path) -> None:
    a, b = ups[0], ups[1]
    listen, admin = free_port(), free_port()
    log = tmp_path / "access.log"
    runtime = """layered_runtime:
  layers:
  - name: static
    static_layer:
      upstream: {healthy_panic_threshold: 0}"""
    start(start_trioxy, config(listen, admin, log, [a.port, b.port], HTTP_CHECK, runtime),
          listen, BASE + 4, concurrency=1)
    assert get(listen, 4) == [200] * 4
    a.health = b.health = "fail"
    wait_until(lambda: set(health_flags(admin).values()) == {"/failed_active_hc"},
               what="all failed")
    served = a.served + b.served
    assert get(listen, 5) == [503] * 5
    assert a.served + b.served == served
    wait_until(lambda: log.exists() and log.read_text().count("503 UH -") == 5,
               what="UH in the access log")
    assert counter(admin, "cluster.backend.upstream_cx_none_healthy") + counter(
        admin, "http.ingress.downstream_rq_5xx") >= 5


def test_grpc_check(start_trioxy, tmp_path: Path) -> None:
    grpc = pytest.importorskip("grpc")
    health = pytest.importorskip("grpc_health.v1.health")
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    health_pb2_grpc = pytest.importorskip("grpc_health.v1.health_pb2_grpc")
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    gport = server.add_insecure_port("127.0.0.1:0")
    servicer.set("pkg.Echo", health_pb2.HealthCheckResponse.SERVING)
    server.start()
    try:
        listen, admin = free_port(), free_port()
        check = """\
      grpc_health_check:
        service_name: pkg.Echo"""
        h2 = "    http2_protocol_options: {}"
        start(start_trioxy, config(listen, admin, tmp_path / "access.log", [gport], check,
                                   cluster_extra=h2), listen, BASE + 5, concurrency=1)
        assert health_flags(admin) == {gport: "healthy"}
        servicer.set("pkg.Echo", health_pb2.HealthCheckResponse.NOT_SERVING)
        wait_until(lambda: health_flags(admin)[gport] == "/failed_active_hc", what="failed")
        servicer.set("pkg.Echo", health_pb2.HealthCheckResponse.SERVING)
        wait_until(lambda: health_flags(admin)[gport] == "healthy", what="healthy again")
        assert counter(admin, "cluster.backend.health_check.failure") >= 1
    finally:
        server.stop(0)


def test_immediate_health_check_fail_header_is_a_passive_failure(start_trioxy, ups,
                                                                  tmp_path: Path) -> None:
    """A response with x-envoy-immediate-health-check-fail fails its host at once (a PASSIVE
    failure in the main process's checker), in every worker, until checks pass again."""
    a, b = ups[0], ups[1]
    listen, admin = free_port(), free_port()
    # Slow checks: after the first round, nothing but the header can take A out.
    yaml = config(listen, admin, tmp_path / "access.log", [a.port, b.port], HTTP_CHECK).replace(
        "interval: 0.2s\n      no_traffic_interval: 0.2s",
        "interval: 60s\n      no_traffic_interval: 60s")
    start(start_trioxy, yaml, listen, BASE + 6)
    assert health_flags(admin) == {a.port: "healthy", b.port: "healthy"}
    a.immediate_fail = True
    for _ in range(50):  # until a request reaches A (round robin: the first few)
        assert get(listen, 1) == [200]
        if a.served:
            break
    assert a.served == 1
    wait_until(lambda: counter(admin, "cluster.backend.membership_healthy") == 2,
               what="A out of the balancer in both workers")
    assert health_flags(admin) == {a.port: "/failed_active_hc", b.port: "healthy"}
    assert counter(admin, "cluster.backend.health_check.passive_failure") == 1
    assert counter(admin, "cluster.backend.health_check.healthy") == 1
    assert get(listen, 20) == [200] * 20
    assert a.served == 1  # every worker left A out
