"""One epoch as a user runs it: real processes, real sockets, real clients, real signals."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from harness import ROOT, free_port, http_get, wait_for_port

CURL = shutil.which("curl")


def hcm_config(listen: int, cluster_port: int, *, extra_route: str = "", access_log: str = "",
               cluster_extra: str = "", timeout: str = "") -> str:
    return f"""
static_resources:
  listeners:
  - name: ingress
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http
          use_remote_address: true
{access_log}
          route_config:
            name: local_route
            virtual_hosts:
            - name: backend
              domains: ["*"]
              routes:
{extra_route}
              - match: {{prefix: "/"}}
                route: {{cluster: backend{timeout}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
{cluster_extra}
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {cluster_port}}}}}}}
"""


def file_access_log(path: Path, fmt: str | None = None) -> str:
    log_format = (
        f"""
              log_format:
                text_format_source:
                  inline_string: "{fmt}"
""" if fmt else ""
    )
    return f"""          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {path}{log_format}"""


def trioxy_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "proxy.cli", *args]


# --------------------------------------------------------------------------- validate mode
def test_validate_accepts_the_examples() -> None:
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        r = subprocess.run(trioxy_cmd("--mode", "validate", "-c", str(example)),
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 0, f"{example.name}: {r.stderr}"
        assert "OK" in r.stdout


def test_validate_refuses_unsupported_field_naming_its_path(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(hcm_config(10, 11).replace(
        "stat_prefix: ingress_http", "stat_prefix: ingress_http\n          codec_type: HTTP3"))
    r = subprocess.run(trioxy_cmd("--mode", "validate", "-c", str(cfg)),
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 1
    assert ("static_resources.listeners[0].filter_chains[0].filters[0].typed_config.codec_type"
            in r.stderr)
    assert "HTTP3" in r.stderr
    assert "Traceback" not in r.stderr


def test_validate_refuses_bad_port_and_binds_nothing(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(hcm_config(port, 70000))
    r = subprocess.run(trioxy_cmd("--mode", "validate", "-c", str(cfg)),
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 1, r.stdout
    assert "port_value" in r.stderr and "Traceback" not in r.stderr
    # A good config in validate mode binds nothing either.
    cfg.write_text(hcm_config(port, 8080))
    r = subprocess.run(trioxy_cmd("--mode", "validate", "-c", str(cfg)),
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_serve_with_bad_config_exits_1_without_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("static_resources: {listeners: [{name: x, adress: {}}]}\n")
    r = subprocess.run(trioxy_cmd("-c", str(cfg)), capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 1
    assert "adress" in r.stderr and "Traceback" not in r.stderr


def test_port_in_use_is_a_boot_error(tmp_path: Path, start_trioxy) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t = start_trioxy(hcm_config(port, 1))
        assert t.proc.wait(30) == 2
        assert "cannot bind" in t.log


# --------------------------------------------------------------------------- serving
def test_default_config_serves_the_welcome_page(tmp_path: Path) -> None:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 10000))
    except OSError:
        pytest.skip("127.0.0.1:10000 is busy on this machine")
    proc = subprocess.Popen(trioxy_cmd("--concurrency", "1", "--drain-time-s", "0",
                                       "--parent-shutdown-time-s", "1"),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(10000, proc=proc)
        status, _, body = http_get(10000, "/")
        assert status == 200
        assert b"trioxy works" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_curl_through_two_workers_to_nginx(start_trioxy, nginx_upstream: int, tmp_path: Path) -> None:
    if CURL is None:
        pytest.skip("curl is not installed (scripts/test installs it)")
    port = free_port()
    alog = tmp_path / "access.log"
    start_trioxy(hcm_config(port, nginx_upstream, access_log=file_access_log(alog)),
                 wait_port=port, concurrency=2)
    r = subprocess.run([CURL, "-s", "-i", f"http://127.0.0.1:{port}/"], capture_output=True,
                       timeout=20)
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"x" * 99 + b"\n"
    assert b"x-envoy-upstream-service-time" in head.lower()
    # The upstream sees Envoy's forwarding headers.
    status, _, body = http_get(port, "/echo-headers")
    assert status == 200
    assert b"xff=127.0.0.1" in body and b"proto=http" in body
    assert b"xrid=" in body and b"xrid= " not in body
    # Many sequential requests over one keep-alive connection, through both workers' pools.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(200):
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200 and len(resp.read()) == 100
    conn.close()
    # A 4 MiB body streams through intact.
    status, _, big = http_get(port, "/big")
    assert status == 200 and len(big) == 4 * 1024 * 1024
    # Access log lines arrive through the flush thread, in Envoy's default format.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and alog.exists() is False:
        time.sleep(0.1)
    while time.monotonic() < deadline and alog.read_text().count("\n") < 203:
        time.sleep(0.1)
    lines = alog.read_text().splitlines()
    assert len(lines) >= 203
    assert any('"GET /echo-headers HTTP/1.1" 200 - ' in line for line in lines)


def test_failures_carry_envoy_status_and_flags(start_trioxy, py_upstream, tmp_path: Path) -> None:
    port = free_port()
    alog = tmp_path / "access.log"
    dead = free_port()
    routes = """
              - match: {prefix: "/dead"}
                route: {cluster: dead}
              - match: {prefix: "/slow"}
                route: {cluster: backend, timeout: 0.3s}"""
    cfg = hcm_config(port, py_upstream.port, extra_route=routes,
                     access_log=file_access_log(alog, "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS%\\n"))
    cfg += f"""
  - name: dead
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: dead
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {dead}}}}}}}
"""
    start_trioxy(cfg, wait_port=port)
    assert http_get(port, "/ok")[0] == 200
    assert http_get(port, "/dead")[0] == 503  # UF
    assert http_get(port, "/close-after")[0] == 503  # UC
    assert http_get(port, "/garbage")[0] == 502  # UPE
    assert http_get(port, "/slow?ms=2000")[0] == 504  # UT
    # The worker survived all of that and still serves.
    assert http_get(port, "/ok")[0] == 200
    deadline = time.monotonic() + 5
    want = {"/dead 503 UF", "/close-after 503 UC", "/garbage 502 UPE", "/slow?ms=2000 504 UT"}
    while time.monotonic() < deadline:
        got = set(alog.read_text().splitlines()) if alog.exists() else set()
        if want <= got:
            break
        time.sleep(0.1)
    assert want <= got, got


def test_malformed_request_gets_400_and_neighbours_are_unaffected(start_trioxy, py_upstream) -> None:
    port = free_port()
    start_trioxy(hcm_config(port, py_upstream.port), wait_port=port)
    neighbour = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    neighbour.request("GET", "/ok")
    assert neighbour.getresponse().read() == b"ok\n"
    for bad in (
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n",
        b"NOT HTTP\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", port), 5) as s:
            s.sendall(bad)
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        assert data.startswith(b"HTTP/1.1 400"), (bad, data[:80])
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 431")
    neighbour.request("GET", "/ok")
    assert neighbour.getresponse().read() == b"ok\n"
    neighbour.close()


def test_killed_worker_is_replaced_and_listener_keeps_its_queue(start_trioxy, py_upstream) -> None:
    port = free_port()
    t = start_trioxy(hcm_config(port, py_upstream.port), wait_port=port, concurrency=2)
    pids = t.worker_pids()
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    # Requests keep succeeding: the other worker and then the replacement accept them.
    ok = 0
    for _ in range(50):
        if http_get(port, "/ok")[0] == 200:
            ok += 1
    assert ok == 50
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = t.worker_pids()
        if len(now) == 2 and pids[0] not in now:
            break
        time.sleep(0.1)
    assert len(t.worker_pids()) == 2 and pids[0] not in t.worker_pids()
    assert "restarting" in t.log


def test_sigterm_lets_in_flight_requests_finish(start_trioxy, py_upstream) -> None:
    port = free_port()
    t = start_trioxy(hcm_config(port, py_upstream.port), wait_port=port, drain_time_s=5)
    result: dict[str, object] = {}

    def slow() -> None:
        result["r"] = http_get(port, "/slow?ms=800")

    th = threading.Thread(target=slow)
    th.start()
    time.sleep(0.3)
    t.signal(signal.SIGTERM)
    th.join(10)
    assert result["r"][0] == 200  # type: ignore[index]
    assert t.proc.wait(10) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), 1).close()


def test_sigusr1_reopens_access_log_after_rotation(start_trioxy, py_upstream, tmp_path: Path) -> None:
    port = free_port()
    alog = tmp_path / "access.log"
    t = start_trioxy(hcm_config(port, py_upstream.port,
                                access_log=file_access_log(alog, "%REQ(:PATH)%\\n")),
                     wait_port=port)
    http_get(port, "/ok?before")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (alog.exists() and "before" in alog.read_text()):
        time.sleep(0.1)
    rotated = tmp_path / "access.log.1"
    alog.rename(rotated)
    t.signal(signal.SIGUSR1)
    time.sleep(0.5)
    http_get(port, "/ok?after")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (alog.exists() and "after" in alog.read_text()):
        time.sleep(0.1)
    assert "/ok?after" in alog.read_text()
    assert "/ok?before" in rotated.read_text() and "after" not in rotated.read_text()


def test_tcp_proxy_relays_both_ways(start_trioxy, tmp_path: Path) -> None:
    echo = socket.socket()
    echo.bind(("127.0.0.1", 0))
    echo.listen()
    echo_port = echo.getsockname()[1]

    def serve() -> None:
        # Every connection, the start-up probe's included, gets its bytes back reversed.
        while True:
            try:
                c, _ = echo.accept()
            except OSError:
                return
            with c:
                data = b""
                while chunk := c.recv(65536):
                    data += chunk
                c.sendall(data[::-1])

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    port = free_port()
    start_trioxy(f"""
static_resources:
  listeners:
  - name: tcp
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: echo
  clusters:
  - name: echo
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: echo
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {echo_port}}}}}}}
""", wait_port=port)
    payload = os.urandom(2 * 1024 * 1024)
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)  # half-close: the reply still comes back
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got == payload[::-1]
    echo.close()


def test_envoy_front_proxy_example_runs_unchanged_but_for_ports(start_trioxy, tmp_path: Path) -> None:
    """examples/front-proxy.yaml is Envoy's sandbox config: STRICT_DNS to localhost."""
    from harness import PyUpstream

    ups = [PyUpstream(), PyUpstream()]
    try:
        port = free_port()
        text = (ROOT / "examples/front-proxy.yaml").read_text()
        text = text.replace("port_value: 8080", f"port_value: {port}")
        text = text.replace("port_value: 8081", f"port_value: {ups[0].port}")
        text = text.replace("port_value: 8082", f"port_value: {ups[1].port}")
        text = text.replace("port_value: 8001", f"port_value: {free_port()}")
        start_trioxy(text, wait_port=port)
        for i, up in enumerate(ups, 1):
            status, _, body = http_get(port, f"/service/{i}/ok")
            assert status == 200 and body == b"ok\n"
            assert up.accepts >= 1
        assert http_get(port, "/elsewhere")[0] == 404
    finally:
        for u in ups:
            u.close()
