"""HTTP/2 through a real trioxy epoch with real peers: curl, h2load, nginx (h1 and h2c),
slow readers on either side (bounded memory), and GOAWAY on drain."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.events
import h2.settings
import psutil
import pytest
from harness import NGINX, free_port, wait_for_port

from proxy.http.codec.h2 import _H2Connection

BASE_OFFSET = 42000
CURL = shutil.which("curl")
H2LOAD = shutil.which("h2load")


def base_id(n: int) -> str:
    return str(os.getpid() % 7000 + BASE_OFFSET + n)


def config(port: int, h1_port: int, h2_port: int, hcm_extra: str = "") -> str:
    return f"""
static_resources:
  listeners:
  - name: ingress
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress{hcm_extra}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/h2/"}}
                route: {{cluster: h2c, prefix_rewrite: "/"}}
              - match: {{prefix: "/"}}
                route: {{cluster: h1, timeout: 60s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: h1
    connect_timeout: 1s
    load_assignment:
      cluster_name: h1
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {h1_port}}}}}}}
  - name: h2c
    connect_timeout: 1s
    http2_protocol_options: {{}}
    load_assignment:
      cluster_name: h2c
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {h2_port}}}}}}}
"""


@pytest.fixture
def nginx_pair(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """nginx on two ports: HTTP/1.1 and prior-knowledge h2c (``listen ... http2``)."""
    if not os.path.exists(NGINX):
        pytest.skip("nginx is not installed")
    h1, h2c = free_port(), free_port()
    prefix = tmp_path / "nginx"
    (prefix / "logs").mkdir(parents=True)
    (prefix / "html").mkdir()
    (prefix / "html" / "index.html").write_text("x" * 99 + "\n")
    (prefix / "html" / "big").write_bytes(os.urandom(4 * 1024 * 1024))
    server = """
    root {p}/html;
    location = /post {{ client_max_body_size 64m; return 200 "posted\\n"; }}"""
    (prefix / "nginx.conf").write_text(f"""
daemon off; master_process off; worker_processes 1; user root;
error_log stderr warn; pid {prefix}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
  keepalive_requests 100000; http2_max_requests 100000;
  server {{ listen 127.0.0.1:{h1}; {server.format(p=prefix)} }}
  server {{ listen 127.0.0.1:{h2c} http2; {server.format(p=prefix)} }}
}}
""")
    proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                            stderr=subprocess.PIPE)
    try:
        wait_for_port(h1, proc=proc)
        wait_for_port(h2c, proc=proc)
        yield h1, h2c
    finally:
        proc.terminate()
        proc.wait(10)


class SlowH1Upstream:
    """HTTP/1.1: /sink reads the request body slowly (64 KiB per 10 ms) and answers its
    length; /source sends N bytes (``?n=``); /slow?ms= answers after a delay."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c: socket.socket) -> None:
        import h11

        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req = None
                received = 0
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        if req is not None and req.target.startswith(b"/sink"):
                            time.sleep(0.01)
                        data = c.recv(65536)
                        if not data:
                            return
                        conn.receive_data(data)
                        continue
                    if isinstance(ev, h11.Request):
                        req = ev
                    elif isinstance(ev, h11.Data):
                        received += len(ev.data)
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    elif isinstance(ev, h11.ConnectionClosed):
                        return
                assert req is not None
                target = req.target.decode()
                body = b"ok"
                if target.startswith("/sink"):
                    body = str(received).encode()
                elif target.startswith("/source"):
                    body = b"s" * int(target.split("n=")[1])
                elif target.startswith("/slow"):
                    time.sleep(int(target.split("ms=")[1]) / 1000)
                c.sendall(conn.send(h11.Response(status_code=200, headers=[
                    ("content-length", str(len(body)))])) + conn.send(h11.Data(data=body))
                    + conn.send(h11.EndOfMessage()))
                conn.start_next_cycle()
        except (OSError, h11.ProtocolError):
            pass
        finally:
            c.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def slow_upstream() -> Iterator[SlowH1Upstream]:
    u = SlowH1Upstream()
    yield u
    u.close()


class BlockingH2:
    """A blocking h2c client (h2 with a graceful GOAWAY) for the process-level tests."""

    def __init__(self, port: int, window: int = 65535) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.conn = _H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.conn.initiate_connection()
        self.flush()
        self.status: dict[int, int] = {}
        self.body: dict[int, int] = {}
        self.ended: set[int] = set()
        self.reset: dict[int, int] = {}
        self.goaway: int | None = None
        self.closed = False
        self.auto_ack = True

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path: str, method: str = "GET", end_stream: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(":method", method), (":path", path),
                                     (":authority", "t"), (":scheme", "http")],
                               end_stream=end_stream)
        self.flush()
        return sid

    def receive(self) -> list[object]:
        data = self.sock.recv(65536)
        if not data:
            self.closed = True
            return []
        events = self.conn.receive_data(data)
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived):
                self.status[ev.stream_id] = int(dict(ev.headers)[b":status"])
            elif isinstance(ev, h2.events.DataReceived):
                self.body[ev.stream_id] = self.body.get(ev.stream_id, 0) + len(ev.data)
                if self.auto_ack:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                self.ended.add(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                self.reset[ev.stream_id] = int(ev.error_code)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev.last_stream_id
        self.flush()
        return events

    def upload(self, sid: int, total: int) -> None:
        chunk = b"u" * 16384
        sent = 0
        while sent < total:
            window = min(self.conn.local_flow_control_window(sid), total - sent)
            if window <= 0:
                self.receive()
                if sid in self.reset or sid in self.ended:
                    return
                continue
            n = min(window, len(chunk))
            self.conn.send_data(sid, chunk[:n])
            sent += n
            self.flush()
        self.conn.end_stream(sid)
        self.flush()

    def wait(self, sid: int) -> None:
        while sid not in self.ended and sid not in self.reset and not self.closed:
            self.receive()

    def close(self) -> None:
        self.sock.close()


def worker_rss(t) -> int:  # noqa: ANN001
    return sum(psutil.Process(pid).memory_info().rss for pid in t.worker_pids())


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_h2c_to_h1_and_h2c_upstreams(start_trioxy, nginx_pair) -> None:  # noqa: ANN001
    h1, h2c = nginx_pair
    port = free_port()
    start_trioxy(config(port, h1, h2c), wait_port=port, extra=["--base-id", base_id(1)])
    for path in ("/", "/h2/"):
        out = subprocess.run([CURL, "-s", "--http2-prior-knowledge", "-o", "-", "-w",
                              "\\n%{http_version} %{http_code}", f"http://127.0.0.1:{port}{path}"],
                             capture_output=True, timeout=20, check=True).stdout
        assert out.endswith(b"\n2 200") and out.startswith(b"x" * 99)
    # either client protocol to either upstream protocol, 4 MiB through
    for proto in ("--http1.1", "--http2-prior-knowledge"):
        for path in ("/big", "/h2/big"):
            r = subprocess.run([CURL, "-s", proto, f"http://127.0.0.1:{port}{path}"],
                               capture_output=True, timeout=20, check=True)
            assert len(r.stdout) == 4 * 1024 * 1024


@pytest.mark.skipif(H2LOAD is None, reason="h2load is not installed (nghttp2-client)")
@pytest.mark.parametrize("path", ["/", "/h2/"])
def test_h2load_no_errors(start_trioxy, nginx_pair, path: str) -> None:  # noqa: ANN001
    h1, h2c = nginx_pair
    port = free_port()
    start_trioxy(config(port, h1, h2c), wait_port=port,
                 extra=["--base-id", base_id(2 if path == "/" else 3)])
    out = subprocess.run([H2LOAD, "-n", "2000", "-c", "10", "-m", "10",
                          f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "2000 succeeded, 0 failed, 0 errored, 0 timeout" in out, out
    assert "status codes: 2000 2xx" in out, out


def test_large_upload_to_slow_reader_is_bounded(start_trioxy, slow_upstream) -> None:  # noqa: ANN001
    port = free_port()
    t = start_trioxy(config(port, slow_upstream.port, slow_upstream.port), wait_port=port,
                     extra=["--base-id", base_id(4)])
    c = BlockingH2(port)
    rss0 = worker_rss(t)
    peak = [rss0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], worker_rss(t))
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    total = 20 * 1024 * 1024
    sid = c.request("/sink", "POST", end_stream=False)
    c.upload(sid, total)
    c.wait(sid)
    stop.set()
    assert c.status[sid] == 200
    growth = peak[0] - rss0
    # the body is 20 MiB; the proxy holds at most the windows it advertised (1 MiB stream,
    # 4 MiB connection) plus buffers: far below the body
    print(f"worker RSS growth {growth / 2**20:.1f} MiB")
    assert growth < 10 * 1024 * 1024, f"worker RSS grew {growth / 2**20:.1f} MiB"
    c.close()


@pytest.mark.parametrize("path", ["/source?n=20971520"])
def test_large_download_to_slow_reader_is_bounded(start_trioxy, slow_upstream,
                                                  path: str) -> None:  # noqa: ANN001
    port = free_port()
    t = start_trioxy(config(port, slow_upstream.port, slow_upstream.port), wait_port=port,
                     extra=["--base-id", base_id(5)])
    c = BlockingH2(port)
    c.auto_ack = False
    rss0 = worker_rss(t)
    peak = rss0
    sid = c.request(path)
    got = 0
    while sid not in c.ended:
        for ev in c.receive():
            if isinstance(ev, h2.events.DataReceived):
                c.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
        c.flush()
        if c.body.get(sid, 0) - got > 1 << 20:
            got = c.body[sid]
            peak = max(peak, worker_rss(t))
            time.sleep(0.05)  # a slow reader: ~20 MB/s at most
        assert not c.closed
    assert c.body[sid] == 20 * 1024 * 1024
    growth = peak - rss0
    print(f"worker RSS growth {growth / 2**20:.1f} MiB")
    assert growth < 10 * 1024 * 1024, f"worker RSS grew {growth / 2**20:.1f} MiB"
    c.close()


def test_sigterm_drain_sends_goaway_in_flight_stream_completes(start_trioxy,
                                                              slow_upstream) -> None:  # noqa: ANN001
    port = free_port()
    t = start_trioxy(config(port, slow_upstream.port, slow_upstream.port), wait_port=port,
                     extra=["--base-id", base_id(6)], drain_time_s=5)
    c = BlockingH2(port)
    sid = c.request("/slow?ms=1000")
    time.sleep(0.3)
    t.signal(signal.SIGTERM)
    while c.goaway is None and not c.closed:
        c.receive()
    assert c.goaway == sid
    late = c.request("/")  # crossed the GOAWAY: refused, never processed
    c.wait(sid)
    c.wait(late)
    assert c.status.get(sid) == 200 and sid in c.ended
    assert c.reset.get(late) == 7  # REFUSED_STREAM
    while not c.closed:
        c.receive()  # then the connection closes
    c.close()
    assert t.proc.wait(15) == 0


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_tls_alpn_h2_and_http11(start_trioxy, nginx_pair, tmp_path: Path) -> None:  # noqa: ANN001
    """ALPN picks the codec (AUTO): h2 for a client that offers it, HTTP/1.1 otherwise."""
    from tls_certs import make_pki

    pki = make_pki(tmp_path / "pki")
    h1, h2c = nginx_pair
    port = free_port()
    tls = f"""
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
        common_tls_context:
          alpn_protocols: [h2, http/1.1]
          tls_certificates:
          - certificate_chain: {{filename: {pki.server.cert}}}
            private_key: {{filename: {pki.server.key}}}
"""
    chain = "    -" + tls.replace("\n    ", "\n      ") + "      filters:"
    cfg = config(port, h1, h2c).replace("    filter_chains:\n    - filters:",
                                        "    filter_chains:\n" + chain, 1)
    start_trioxy(cfg, wait_port=port, extra=["--base-id", base_id(7)])
    for flag, want in (("--http2", "2"), ("--http1.1", "1.1")):
        for path in ("/", "/h2/"):
            r = subprocess.run([CURL, "-s", flag, "--cacert", str(pki.ca.cert), "-o", "/dev/null",
                                "-w", "%{http_version} %{http_code}",
                                f"https://localhost:{port}{path}"],
                               capture_output=True, text=True, timeout=20)
            assert r.stdout == f"{want} 200", (flag, path, r.stdout, r.stderr)
