"""Circuit breakers, retries, timeouts and outlier detection in a real epoch (issue #6).

One trioxy epoch (main process + 1 worker) in front of a Python upstream that fails,
stalls or answers per path; the access log's %RESPONSE_FLAGS% and admin /stats are read
the way an operator reads them.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness import free_port, http_get, wait_for_port

BASE_ID = os.getpid() % 5000 + 56000  # unique per test process, below 65536


class FlakyUpstream:
    """/flaky/K/... 503 for the first K requests of a path, then 200; /slow/MS; /status/N."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.seen: Counter[str] = Counter()
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
                path = head.split(b" ")[1].decode()
                with self.lock:
                    self.seen[path] += 1
                    n = self.seen[path]
                parts = path.split("/")
                status = 200
                if path.startswith("/flaky/") and n <= int(parts[2]):
                    status = 503
                elif "/slow/" in path:
                    time.sleep(int(parts[-1]) / 1000)
                elif path.startswith("/status/"):
                    status = int(parts[2])
                c.sendall(b"HTTP/1.1 %d X\r\ncontent-length: 2\r\n\r\nok" % status)
        except OSError:
            pass
        finally:
            c.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def flaky() -> Iterator[FlakyUpstream]:
    u = FlakyUpstream()
    yield u
    u.close()


def config(http_port: int, tcp_port: int, admin_port: int, up: int, log: Path) -> str:
    endpoint = f"{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {up}}}}}}}}}"
    return f"""
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
static_resources:
  listeners:
  - name: http
    address: {{socket_address: {{address: 127.0.0.1, port_value: {http_port}}}}}
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
                text_format_source:
                  inline_string: "%RESPONSE_CODE% %RESPONSE_FLAGS% %REQ(:PATH)%\\n"
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/flaky"}}
                route:
                  cluster: retried
                  retry_policy:
                    retry_on: 5xx
                    num_retries: 2
                    retry_back_off: {{base_interval: 0.01s}}
              - match: {{prefix: "/stall"}}
                route: {{cluster: retried, timeout: 0.3s}}
              - match: {{prefix: "/"}}
                route: {{cluster: limited}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  - name: tcp
    address: {{socket_address: {{address: 127.0.0.1, port_value: {tcp_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: tcp_limited
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {log}
              log_format:
                text_format_source:
                  inline_string: "tcp %RESPONSE_FLAGS%\\n"
  clusters:
  - name: limited
    connect_timeout: 1s
    circuit_breakers:
      thresholds: [{{max_connections: 1, max_pending_requests: 1}}]
    load_assignment: {{cluster_name: limited, endpoints: [{{lb_endpoints: [{endpoint}]}}]}}
  - name: retried
    connect_timeout: 1s
    outlier_detection: {{consecutive_5xx: 100}}
    load_assignment: {{cluster_name: retried, endpoints: [{{lb_endpoints: [{endpoint}]}}]}}
  - name: tcp_limited
    connect_timeout: 1s
    circuit_breakers:
      thresholds: [{{max_connections: 1}}]
    load_assignment: {{cluster_name: tcp_limited, endpoints: [{{lb_endpoints: [{endpoint}]}}]}}
"""


def stats(admin_port: int) -> dict[str, int]:
    _, _, body = http_get(admin_port, "/stats")
    out: dict[str, int] = {}
    for line in body.decode().splitlines():
        name, _, value = line.partition(": ")
        if value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


def log_lines(log: Path, n: int) -> list[str]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= n:
            return lines
        time.sleep(0.1)
    return log.read_text().splitlines() if log.exists() else []


def test_breakers_retries_timeouts_flags(start_trioxy, flaky: FlakyUpstream,
                                         tmp_path: Path) -> None:
    http_port, tcp_port, admin_port = free_port(), free_port(), free_port()
    log = tmp_path / "access.log"
    t = start_trioxy(config(http_port, tcp_port, admin_port, flaky.port, log),
                     wait_port=http_port, extra=["--base-id", str(BASE_ID)])
    wait_for_port(admin_port)
    # Circuit breakers: 1 connection + 1 pending; a held request, then 4 at once.
    assert http_get(http_port, "/warm")[0] == 200
    with ThreadPoolExecutor(5) as pool:
        first = pool.submit(http_get, http_port, "/slow/600")
        time.sleep(0.2)
        rest = [pool.submit(http_get, http_port, "/slow/10") for _ in range(4)]
        results = [first.result()] + [f.result() for f in rest]
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 200, 503, 503, 503], statuses
    assert all(r[1].get("x-envoy-overloaded") == "true" for r in results if r[0] == 503)
    # Retries: two 503s then 200; five 503s exhaust num_retries 2 (URX).
    assert http_get(http_port, "/flaky/2/a")[0] == 200
    assert http_get(http_port, "/flaky/5/b")[0] == 503
    assert flaky.seen["/flaky/5/b"] == 3
    # Route timeout on a stalled upstream.
    assert http_get(http_port, "/stall/slow/3000")[0] == 504
    # tcp_proxy honours max_connections: a second connection is closed at once (UO).
    held = socket.create_connection(("127.0.0.1", tcp_port))
    held.sendall(b"GET /slow/10 HTTP/1.1\r\nhost: x\r\n\r\n")
    assert held.recv(100).startswith(b"HTTP/1.1 200")
    second = socket.create_connection(("127.0.0.1", tcp_port))
    second.settimeout(5)
    assert second.recv(100) == b""
    second.close()
    held.close()
    lines = log_lines(log, 12)
    flags = Counter(line.split(" ")[1] for line in lines if not line.startswith("tcp"))
    assert flags["UO"] == 3, lines
    assert "503 URX /flaky/5/b" in lines
    assert "200 - /flaky/2/a" in lines
    assert "504 UT /stall/slow/3000" in lines
    assert "tcp UO" in lines and "tcp -" in lines
    s = stats(admin_port)
    assert s["cluster.limited.upstream_rq_pending_overflow"] == 3
    assert s["cluster.retried.upstream_rq_retry"] == 4
    assert s["cluster.retried.upstream_rq_retry_success"] == 1
    assert s["cluster.retried.upstream_rq_retry_limit_exceeded"] == 1
    assert s["cluster.retried.upstream_rq_timeout"] == 1
    assert s["cluster.tcp_limited.upstream_cx_overflow"] == 1
    assert s["cluster.retried.outlier_detection.ejections_active"] == 0
    assert "cluster.limited.circuit_breakers.default.cx_open" in s
    assert t.proc.poll() is None
