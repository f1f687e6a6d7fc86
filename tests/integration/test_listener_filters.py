"""Listener filters with real peers on 127.0.0.1: openssl s_client (TLS passthrough by SNI),
curl (http_inspector chain selection), HAProxy send-proxy / send-proxy-v2 and a raw PROXY
sender (the access log and x-forwarded-for see the real client), and an ORIGINAL_DST cluster
steered by ``x-envoy-original-dst-host``.

The network-namespace tests of ``original_dst`` / ``use_original_dst`` are in
``test_original_dst.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import free_port, nginx_upstream, start_trioxy, wait_for_port  # noqa: F401

OPENSSL = shutil.which("openssl")
CURL = shutil.which("curl")
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy")
                                      else None)

TLS_INSPECTOR = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
HTTP_INSPECTOR = ("type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3."
                  "HttpInspector")
PROXY_PROTOCOL = ("type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3."
                  "ProxyProtocol")
TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


def base_id(k: int) -> list[str]:
    return ["--base-id", str(os.getpid() % 50000 + 30000 + k)]


def tcp_proxy(cluster: str, prefix: str, match: dict | None = None, log: Path | None = None,
              fmt: str = "") -> str:
    access = ""
    if log is not None:
        access = f"""
            access_log:
            - name: envoy.access_loggers.file
              typed_config: {{"@type": {FILE_LOG}, path: {log}, log_format: {{text_format: {json.dumps(fmt)}}}}}"""
    m = f"\n      filter_chain_match: {json.dumps(match)}" if match else ""
    return f"""
    - name: {prefix}{m}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
            "@type": {TCP_PROXY}
            stat_prefix: {prefix}
            cluster: {cluster}{access}"""


def direct(body: str, prefix: str, match: dict | None = None) -> str:
    m = f"\n      filter_chain_match: {json.dumps(match)}" if match else ""
    return f"""
    - name: {prefix}{m}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM}
          stat_prefix: {prefix}
          route_config:
            virtual_hosts:
            - name: vh
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                direct_response: {{status: 200, body: {{inline_string: {json.dumps(body)}}}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": {ROUTER}}}"""


def static_cluster(name: str, port: int) -> str:
    return f"""
  - name: {name}
    connect_timeout: 2s
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]"""


def admin_stats(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats?format=json", timeout=5) as r:
        data = json.load(r)
    return {s["name"]: s["value"] for s in data["stats"] if "value" in s}


def wait_for_stat(port: int, name: str, at_least: int = 1, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    value = 0
    while time.monotonic() < deadline:
        value = admin_stats(port).get(name, 0)
        if value >= at_least:
            return value
        time.sleep(0.1)
    return value


def wait_for_lines(path: Path, n: int, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        if path.exists():
            lines = path.read_text().splitlines()
            if len(lines) >= n:
                return lines
        time.sleep(0.05)
    return lines


# ----------------------------------------------------------------------------- peers
class Greeter:
    """A plaintext upstream: greets with its name, records the first bytes it gets."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.received: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c: socket.socket) -> None:
        with c:
            try:
                c.sendall(f"hello from {self.name}\n".encode())
                c.settimeout(2)
                data = b""
                while len(data) < 24 and (chunk := c.recv(100)):
                    data += chunk
                self.received.append(data)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


class TlsBackend:
    """A TLS server with its own certificate for ``name``: says hello and closes."""

    def __init__(self, name: str, certdir: Path) -> None:
        self.name = name
        cert, key = certdir / f"{name}.crt", certdir / f"{name}.key"
        subprocess.run([OPENSSL or "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", f"/CN={name}", "-addext",
                        f"subjectAltName=DNS:{name}"], check=True, capture_output=True)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.set_alpn_protocols(["h2", "http/1.1"])
        self.sni: list[str | None] = []
        self.ctx.sni_callback = lambda sslobj, sni, ctx: self.sni.append(sni)  # type: ignore[assignment]
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c: socket.socket) -> None:
        try:
            c.settimeout(5)
            with self.ctx.wrap_socket(c, server_side=True) as tls:
                tls.sendall(f"hello from {self.name} alpn={tls.selected_alpn_protocol()}\n"
                            .encode())
                tls.unwrap()
        except (OSError, ssl.SSLError):
            c.close()

    def close(self) -> None:
        self.sock.close()


def s_client(port: int, servername: str | None, alpn: str | None = None) -> str:
    argv = [OPENSSL or "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-ign_eof",
            "-brief"]
    if servername:
        argv += ["-servername", servername]
    else:
        argv += ["-noservername"]
    if alpn:
        argv += ["-alpn", alpn]
    r = subprocess.run(argv, input=b"", capture_output=True, timeout=15)
    return (r.stdout + r.stderr).decode(errors="replace")


@pytest.fixture
def certdir(tmp_path: Path) -> Path:
    d = tmp_path / "certs"
    d.mkdir()
    return d


# ----------------------------------------------------------------------------- tls_inspector
@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
def test_tls_passthrough_by_sni(start_trioxy, tmp_path: Path, certdir: Path) -> None:  # noqa: F811
    a, b = TlsBackend("a.example", certdir), TlsBackend("svc.b.example", certdir)
    plain = Greeter("plaintext")
    port, admin = free_port(), free_port()
    log = tmp_path / "tls.log"
    fmt = "%REQUESTED_SERVER_NAME% %UPSTREAM_CLUSTER% %UPSTREAM_HOST%\n"
    try:
        start_trioxy(f"""
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: tls_passthrough
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{"@type": {TLS_INSPECTOR}}}
    filter_chains:{tcp_proxy("tls_a", "a", {"server_names": ["a.example"]}, log, fmt)}{
            tcp_proxy("tls_b", "b", {"server_names": ["*.b.example"]}, log, fmt)}{
            tcp_proxy("plain", "plain", {"transport_protocol": "raw_buffer"}, log, fmt)}
  clusters:{static_cluster("tls_a", a.port)}{static_cluster("tls_b", b.port)}{
            static_cluster("plain", plain.port)}
""", wait_port=port, extra=base_id(1))
        out = s_client(port, "a.example", "h2")
        assert "hello from a.example alpn=h2" in out, out
        assert "CN = a.example" in out or "CN=a.example" in out, out  # a's own certificate
        out = s_client(port, "svc.b.example")
        assert "hello from svc.b.example" in out, out
        assert "CN = svc.b.example" in out or "CN=svc.b.example" in out, out
        # No chain for that name: closed before any handshake.
        out = s_client(port, "other.example")
        assert "hello from" not in out
        # Plaintext: tls_not_found, the raw_buffer chain.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"PING\r\n")
            assert c.recv(100) == b"hello from plaintext\n"
        assert a.sni == ["a.example"] and b.sni == ["svc.b.example"]
        lines = wait_for_lines(log, 3)
        assert sorted(lines) == sorted([f"a.example tls_a 127.0.0.1:{a.port}",
                                        f"svc.b.example tls_b 127.0.0.1:{b.port}",
                                        f"- plain 127.0.0.1:{plain.port}"]), lines
        stats = admin_stats(admin)
        assert stats["tls_inspector.tls_found"] == 3
        assert stats["tls_inspector.sni_found"] == 3
        assert stats["tls_inspector.alpn_found"] >= 1
        assert stats["tls_inspector.tls_not_found"] == 1
        assert stats[f"listener.127.0.0.1_{port}.no_filter_chain_match"] == 1
    finally:
        a.close()
        b.close()
        plain.close()


# ----------------------------------------------------------------------------- http_inspector
@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_http_inspector_picks_the_chain(start_trioxy) -> None:  # noqa: F811
    h2c, other = Greeter("h2c-upstream"), Greeter("not-http")
    port, admin = free_port(), free_port()
    chains = (direct("chain=http/1.1\n", "h11", {"application_protocols": ["http/1.1"]})
              + direct("chain=http/1.0\n", "h10", {"application_protocols": ["http/1.0"]})
              + tcp_proxy("h2c", "h2c", {"application_protocols": ["h2c"]}))
    try:
        start_trioxy(f"""
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: sniff
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{"@type": {TLS_INSPECTOR}}}
    - name: envoy.filters.listener.http_inspector
      typed_config: {{"@type": {HTTP_INSPECTOR}}}
    filter_chains:{chains}
    default_filter_chain:
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{"@type": {TCP_PROXY}, stat_prefix: other, cluster: other}}
  clusters:{static_cluster("h2c", h2c.port)}{static_cluster("other", other.port)}
""", wait_port=port, extra=base_id(2))
        url = f"http://127.0.0.1:{port}/"
        r = subprocess.run([CURL or "curl", "-s", url], capture_output=True, timeout=10)
        assert r.stdout == b"chain=http/1.1\n"
        r = subprocess.run([CURL or "curl", "-s", "--http1.0", url], capture_output=True,
                           timeout=10)
        assert r.stdout == b"chain=http/1.0\n"
        subprocess.run([CURL or "curl", "-s", "--max-time", "3", "--http2-prior-knowledge", url],
                       capture_output=True, timeout=10)
        deadline = time.monotonic() + 5
        while not h2c.received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert h2c.received and h2c.received[0].startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            assert c.recv(100) == b"hello from not-http\n"
        stats = admin_stats(admin)
        assert stats["http_inspector.http11_found"] == 1
        assert stats["http_inspector.http10_found"] == 1
        assert stats["http_inspector.http2_found"] == 1
        assert stats["http_inspector.http_not_found"] == 1
        assert stats["tls_inspector.tls_not_found"] == 4
    finally:
        h2c.close()
        other.close()


# ----------------------------------------------------------------------------- proxy_protocol
def pp_listener(port: int, admin: int, log: Path, nginx: int, **pp: object) -> str:
    extra = "".join(f", {k}: {json.dumps(v)}" for k, v in pp.items())
    fmt = ("%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_DIRECT_REMOTE_ADDRESS% "
           "%DOWNSTREAM_LOCAL_ADDRESS% %RESPONSE_CODE%\n")
    return f"""
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: behind_haproxy
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    listener_filters:
    - name: envoy.filters.listener.proxy_protocol
      typed_config: {{"@type": {PROXY_PROTOCOL}{extra}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM}
          stat_prefix: pp
          use_remote_address: true
          access_log:
          - name: envoy.access_loggers.file
            typed_config: {{"@type": {FILE_LOG}, path: {log}, log_format: {{text_format: {json.dumps(fmt)}}}}}
          route_config:
            virtual_hosts:
            - name: vh
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: nginx}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": {ROUTER}}}
  clusters:{static_cluster("nginx", nginx)}
"""


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator:
    if HAPROXY is None:
        pytest.skip("haproxy is not installed")
    procs: list[subprocess.Popen] = []

    def start(target: int) -> tuple[int, int]:
        v1, v2 = free_port(), free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(f"""
defaults
  mode tcp
  timeout connect 2s
  timeout client 10s
  timeout server 10s
frontend v1
  bind 127.0.0.1:{v1}
  default_backend b1
backend b1
  server s1 127.0.0.1:{target} send-proxy
frontend v2
  bind 127.0.0.1:{v2}
  default_backend b2
backend b2
  server s2 127.0.0.1:{target} send-proxy-v2
""")
        proc = subprocess.Popen([HAPROXY or "haproxy", "-f", str(cfg), "-db"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        wait_for_port(v1, proc=proc)
        wait_for_port(v2, proc=proc)
        return v1, v2

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_haproxy_send_proxy_v1_and_v2(start_trioxy, haproxy, nginx_upstream, tmp_path: Path  # noqa: F811
                                      ) -> None:
    port, admin = free_port(), free_port()
    log = tmp_path / "pp.log"
    start_trioxy(pp_listener(port, admin, log, nginx_upstream), wait_port=port,
                 extra=base_id(3))
    v1, v2 = haproxy(port)
    for front in (v1, v2):
        # The client comes from 127.0.0.5; HAProxy connects to trioxy from 127.0.0.1.
        r = subprocess.run([CURL or "curl", "-s", "--interface", "127.0.0.5",
                            f"http://127.0.0.1:{front}/echo-headers"],
                           capture_output=True, timeout=10)
        assert b"xff=127.0.0.5 " in r.stdout, r.stdout
    lines = wait_for_lines(log, 2)
    assert len(lines) == 2, lines
    for line, front in zip(lines, (v1, v2), strict=True):
        remote, direct_remote, local, code = line.split()
        assert remote.startswith("127.0.0.5:") and direct_remote.startswith("127.0.0.1:")
        assert local == f"127.0.0.1:{front}"  # the address HAProxy was connected to
        assert code == "200"
    stats = admin_stats(admin)
    # At least: the readiness probes of HAProxy's ports make it connect (and send) too.
    assert stats["proxy_proto.versions.v1.found"] >= 1
    assert stats["proxy_proto.versions.v2.found"] >= 1
    assert stats["downstream_cx_proxy_proto_error"] == 0


def v2_header(src: tuple[str, int], dst: tuple[str, int], command: int = 1,
              tlvs: bytes = b"") -> bytes:
    fam = socket.AF_INET6 if ":" in src[0] else socket.AF_INET
    addr = b""
    if command == 1:
        addr = (socket.inet_pton(fam, src[0]) + socket.inet_pton(fam, dst[0])
                + struct.pack("!HH", src[1], dst[1]))
    family = 0x21 if fam == socket.AF_INET6 else 0x11
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20 | command, family if command else 0])
            + struct.pack("!H", len(addr + tlvs)) + addr + tlvs)


def raw_request(port: int, prefix: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(prefix + b"GET /echo-headers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        out = b""
        try:
            while chunk := c.recv(4096):
                out += chunk
        except ConnectionResetError:
            pass
        return out


def test_raw_proxy_protocol_sender(start_trioxy, nginx_upstream, tmp_path: Path) -> None:  # noqa: F811
    port, admin = free_port(), free_port()
    log = tmp_path / "pp.log"
    start_trioxy(pp_listener(port, admin, log, nginx_upstream), wait_port=port,
                 extra=base_id(4))
    tlvs = b"\x02\x00\x0bexample.com" + b"\x04\x00\x00"  # AUTHORITY, NOOP
    out = raw_request(port, v2_header(("2001:db8::7", 4242), ("2001:db8::1", 443), tlvs=tlvs))
    assert b"200 OK" in out and b"xff=2001:db8::7 " in out
    out = raw_request(port, b"PROXY TCP4 198.51.100.9 127.0.0.1 5555 80\r\n")
    assert b"xff=198.51.100.9 " in out
    out = raw_request(port, v2_header(("0", 0), ("0", 0), command=0))  # LOCAL: a health check
    assert b"xff=127.0.0.1 " in out
    out = raw_request(port, b"PROXY UNKNOWN\r\n")
    assert b"xff=127.0.0.1 " in out
    # Malformed: closed without an answer, counted.
    assert raw_request(port, b"PROXY TCP4 999.1.1.1 127.0.0.1 1 2\r\n") == b""
    assert raw_request(port, b"") == b""  # plain HTTP where a header is required
    lines = wait_for_lines(log, 4)
    assert [ln.split()[0] for ln in lines] == [
        "[2001:db8::7]:4242", "198.51.100.9:5555", lines[2].split()[1], lines[3].split()[1]]
    assert lines[0].split()[2] == "[2001:db8::1]:443"
    stats = admin_stats(admin)
    assert stats["proxy_proto.versions.v2.found"] == 2
    assert stats["proxy_proto.versions.v1.found"] == 2
    assert stats["proxy_proto.versions.v1.error"] == 1
    assert stats["proxy_proto.not_found_disallowed"] == 1
    assert stats["downstream_cx_proxy_proto_error"] == 2


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_allow_requests_without_proxy_protocol(start_trioxy, nginx_upstream,  # noqa: F811
                                               tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    log = tmp_path / "pp.log"
    start_trioxy(pp_listener(port, admin, log, nginx_upstream, stat_prefix="edge",
                             allow_requests_without_proxy_protocol=True),
                 wait_port=port, extra=base_id(5))
    url = f"http://127.0.0.1:{port}/echo-headers"
    r = subprocess.run([CURL or "curl", "-s", url], capture_output=True, timeout=10)
    assert b"xff=127.0.0.1 " in r.stdout
    r = subprocess.run([CURL or "curl", "-s", "--haproxy-protocol", "--interface", "127.0.0.6",
                        url], capture_output=True, timeout=10)
    assert b"xff=127.0.0.6 " in r.stdout
    stats = admin_stats(admin)
    assert stats["proxy_proto.edge.not_found_allowed"] == 1
    assert stats["proxy_proto.edge.versions.v1.found"] == 1


# ----------------------------------------------------------------------------- ORIGINAL_DST
@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_original_dst_cluster_by_http_header(start_trioxy, nginx_upstream) -> None:  # noqa: F811
    port, admin = free_port(), free_port()
    start_trioxy(f"""
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: egress
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM}
          stat_prefix: egress
          route_config:
            virtual_hosts:
            - name: vh
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: passthrough}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": {ROUTER}}}
  clusters:
  - name: passthrough
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s
    cleanup_interval: 1s
    original_dst_lb_config: {{use_http_header: true}}
    # No idle pooled connection keeps the host (the pool closes idle ones only lazily).
    common_http_protocol_options: {{max_requests_per_connection: 1}}
""", wait_port=port, extra=base_id(6))
    url = f"http://127.0.0.1:{port}/echo-headers"
    r = subprocess.run([CURL or "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                        f"x-envoy-original-dst-host: 127.0.0.1:{nginx_upstream}", url],
                       capture_output=True, timeout=10)
    assert r.stdout == b"200"
    # No header and no restored destination: no host (503 UH); a bad header counts.
    r = subprocess.run([CURL or "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url],
                       capture_output=True, timeout=10)
    assert r.stdout == b"503"
    r = subprocess.run([CURL or "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                        "x-envoy-original-dst-host: nginx:80", url], capture_output=True,
                       timeout=10)
    assert r.stdout == b"503"
    stats = admin_stats(admin)
    assert stats["cluster.passthrough.original_dst_host_invalid"] == 1
    assert stats["cluster.passthrough.upstream_cx_none_healthy"] == 2
    assert stats["cluster.passthrough.membership_total"] == 1
    # Unused for a cleanup_interval: the host goes.
    assert wait_for_stat(admin, "cluster.passthrough.membership_change", 2, timeout=10) >= 2
    assert admin_stats(admin)["cluster.passthrough.membership_total"] == 0


@pytest.mark.skipif(OPENSSL is None or CURL is None, reason="needs openssl and curl")
def test_tls_inspector_picks_termination_passthrough_or_plaintext(start_trioxy,  # noqa: F811
                                                                  certdir: Path) -> None:
    """One port: SNI term.example is terminated here, pass.example goes through untouched,
    plaintext HTTP gets its own chain. MSG_PEEK leaves the ClientHello for the handshake."""
    passthrough = TlsBackend("pass.example", certdir)
    TlsBackend("term.example", certdir).close()  # only its certificate and key
    port = free_port()
    tls_socket = f"""
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            tls_certificates:
            - certificate_chain: {{filename: {certdir / "term.example.crt"}}}
              private_key: {{filename: {certdir / "term.example.key"}}}"""
    terminated = direct("terminated\n", "term", {"server_names": ["term.example"]})
    terminated = terminated.replace("\n      filters:", tls_socket + "\n      filters:", 1)
    chains = (terminated + tcp_proxy("pass", "pass", {"server_names": ["pass.example"]})
              + direct("plaintext\n", "plain", {"transport_protocol": "raw_buffer"}))
    try:
        start_trioxy(f"""
static_resources:
  listeners:
  - name: edge
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{"@type": {TLS_INSPECTOR}}}
    filter_chains:{chains}
  clusters:{static_cluster("pass", passthrough.port)}
""", wait_port=port, extra=base_id(7))
        r = subprocess.run([CURL or "curl", "-s", "--cacert", str(certdir / "term.example.crt"),
                            "--resolve", f"term.example:{port}:127.0.0.1",
                            f"https://term.example:{port}/"], capture_output=True, timeout=10)
        assert r.stdout == b"terminated\n", r
        out = s_client(port, "pass.example")
        assert "hello from pass.example" in out and "pass.example" in out
        r = subprocess.run([CURL or "curl", "-s", f"http://127.0.0.1:{port}/"],
                           capture_output=True, timeout=10)
        assert r.stdout == b"plaintext\n"
    finally:
        passthrough.close()
