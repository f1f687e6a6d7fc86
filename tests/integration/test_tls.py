"""TLS transport sockets against real peers: curl, openssl s_client and an nginx TLS upstream.

Every peer is on 127.0.0.1; certificates are made per test module (tls_certs.make_pki).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import NGINX, free_port, http_get, wait_for_port
from tls_certs import SPIFFE_CLIENT, Pki, make_pki

CURL = shutil.which("curl")
OPENSSL = shutil.which("openssl")
BASE = os.getpid() % 50000 + 20000  # this file's --base-id range (one per test, by offset)

DS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
US = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")
TCP = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
LOG_FORMAT = (
    "%RESPONSE_CODE% %RESPONSE_FLAGS% tls=%DOWNSTREAM_TLS_VERSION% sni=%REQUESTED_SERVER_NAME%"
    " peer_uri=%DOWNSTREAM_PEER_URI_SAN% up_tls=%UPSTREAM_TLS_VERSION%"
    " up_peer_dns=%UPSTREAM_PEER_DNS_SAN% reason=%UPSTREAM_TRANSPORT_FAILURE_REASON%\n"
)

pytestmark = pytest.mark.skipif(not (CURL and OPENSSL), reason="curl and openssl are needed")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(Path(tmp_path_factory.mktemp("pki")))


# ----------------------------------------------------------------------------- configs
def cert_files(pair: Any) -> dict[str, Any]:
    return {"certificate_chain": {"filename": str(pair.cert)},
            "private_key": {"filename": str(pair.key)}}


def downstream_tls(pki: Pki, **extra: Any) -> dict[str, Any]:
    common = {"tls_certificates": [cert_files(pki.server)]}
    common.update(extra.pop("common", {}))
    return {"name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": DS, "common_tls_context": common, **extra}}


def upstream_tls(**fields: Any) -> dict[str, Any]:
    return {"name": "envoy.transport_sockets.tls", "typed_config": {"@type": US, **fields}}


def hcm(log_path: Path, cluster: str = "backend") -> dict[str, Any]:
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": HCM, "stat_prefix": "ingress",
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(log_path), "log_format": {"text_format": LOG_FORMAT}}}],
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/direct"},
             "direct_response": {"status": 200, "body": {"inline_string": "direct\n"}}},
            {"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }}


def tcp_proxy(log_path: Path, cluster: str = "backend") -> dict[str, Any]:
    return {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": TCP, "stat_prefix": "tcp", "cluster": cluster,
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(log_path), "log_format": {"text_format": LOG_FORMAT}}}]}}


def bootstrap(port: int, admin_port: int, filter_: dict[str, Any], upstream_port: int, *,
              listener_tls: dict[str, Any] | None = None,
              cluster_tls: dict[str, Any] | None = None,
              chain_extra: dict[str, Any] | None = None) -> str:
    chain: dict[str, Any] = {"filters": [filter_]}
    if listener_tls is not None:
        chain["transport_socket"] = listener_tls
    chain.update(chain_extra or {})
    cluster: dict[str, Any] = {
        "name": "backend", "type": "STATIC", "connect_timeout": "2s",
        "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": upstream_port}}}}]}]},
    }
    if cluster_tls is not None:
        cluster["transport_socket"] = cluster_tls
    return json.dumps({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{"name": "front", "address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}}, "filter_chains": [chain]}],
            "clusters": [cluster],
        },
    })


def start(start_trioxy: Any, cfg: str, port: int, offset: int) -> Any:
    return start_trioxy(cfg, wait_port=port, extra=["--base-id", str(BASE + offset)])


def stats(admin_port: int, pattern: str) -> dict[str, int]:
    status, _, body = http_get(admin_port, f"/stats?filter={pattern}")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        name, _, value = line.partition(": ")
        if value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


def wait_log(path: Path, lines: int, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            got = path.read_text().splitlines()
            if len(got) >= lines:
                return got
        time.sleep(0.05)
    raise AssertionError(f"{path}: fewer than {lines} lines: "
                         f"{path.read_text() if path.exists() else '(none)'}")


def curl(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CURL, "-sS", "--max-time", "10", *args], capture_output=True,
                          text=True, errors="replace", timeout=timeout)


def s_client(port: int, *args: str, request: str | None = None,
             timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """``openssl s_client``; with ``request``, send it and read the answer until EOF."""
    argv = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", *args]
    if request is not None:
        argv.append("-ign_eof")
    return subprocess.run(argv, input=request or "", capture_output=True, text=True,
                          errors="replace", timeout=timeout)


# ----------------------------------------------------------------------------- nginx, TLS
@pytest.fixture
def nginx_tls(tmp_path: Path, pki: Pki) -> Iterator[int]:
    """nginx over TLS with the server certificate: ``/info`` answers what the handshake saw."""
    if not os.path.exists(NGINX):
        pytest.skip("nginx is not installed (scripts/test installs it)")
    port = free_port()
    prefix = tmp_path / "nginx-tls"
    (prefix / "logs").mkdir(parents=True)
    (prefix / "html").mkdir()
    (prefix / "html" / "index.html").write_text("x" * 99 + "\n")
    conf = prefix / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""
        daemon off;
        master_process off;
        worker_processes 1;
        user root;
        error_log stderr warn;
        pid {prefix}/nginx.pid;
        events {{ worker_connections 1024; }}
        http {{
          access_log off;
          client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
          fastcgi_temp_path {prefix}/fcgi; uwsgi_temp_path {prefix}/uwsgi;
          scgi_temp_path {prefix}/scgi;
          server {{
            listen 127.0.0.1:{port} ssl;
            ssl_certificate {pki.server.cert};
            ssl_certificate_key {pki.server.key};
            ssl_protocols TLSv1.2 TLSv1.3;
            ssl_client_certificate {pki.ca.cert};
            ssl_verify_client optional;
            root {prefix}/html;
            location = /info {{
              default_type text/plain;
              return 200 "sni=$ssl_server_name proto=$ssl_protocol verify=$ssl_client_verify xfp=$http_x_forwarded_proto\\n";
            }}
          }}
        }}
    """))
    proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc=proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


# ----------------------------------------------------------------------------- downstream
def test_curl_https_through_trioxy(start_trioxy: Any, nginx_upstream: int, pki: Pki,
                                   tmp_path: Path) -> None:
    port, aport = free_port(), free_port()
    log = tmp_path / "access.log"
    start(start_trioxy, bootstrap(port, aport, hcm(log), nginx_upstream,
                                  listener_tls=downstream_tls(pki, common={
                                      "alpn_protocols": ["http/1.1"]})), port, 0)
    r = curl("--cacert", str(pki.ca.cert), f"https://localhost:{port}/echo-headers", "-v")
    assert r.returncode == 0, r.stderr
    assert "proto=https" in r.stdout  # x-forwarded-proto on a TLS connection
    assert "ALPN: server accepted http/1.1" in r.stderr
    # Keep-alive over TLS: two requests on one connection.
    r = curl("--cacert", str(pki.ca.cert), f"https://localhost:{port}/",
             f"https://localhost:{port}/direct")
    assert r.returncode == 0 and r.stdout == "x" * 99 + "\ndirect\n", r.stderr
    # Curl refuses a server it cannot verify: the chain really is ours.
    r = curl("--cacert", str(pki.other_ca.cert), f"https://localhost:{port}/")
    assert r.returncode != 0
    # A 4 MiB body back through TLS, intact.
    r = subprocess.run([CURL, "-sS", "--cacert", str(pki.ca.cert), f"https://localhost:{port}/big",
                        "-o", str(tmp_path / "big")], capture_output=True, timeout=30)
    assert r.returncode == 0
    assert (tmp_path / "big").stat().st_size == 4 * 1024 * 1024
    lines = wait_log(log, 4)
    assert lines[0].startswith("200 - tls=TLSv1.3 sni=localhost peer_uri=- up_tls=-")
    s = stats(aport, "ssl")
    prefix = f"listener.127.0.0.1_{port}.ssl."
    assert s[prefix + "handshake"] == 3  # keep-alive: 4 requests on 3 connections
    assert s[prefix + "versions.TLSv1.3"] == 3
    assert s.get(prefix + "connection_error", 0) == 1  # the client that refused our chain


def test_s_client_alpn_sni_and_plaintext_refused(start_trioxy: Any, pki: Pki,
                                                 tmp_path: Path) -> None:
    port, aport = free_port(), free_port()
    log = tmp_path / "access.log"
    start(start_trioxy, bootstrap(port, aport, hcm(log), 9,
                                  listener_tls=downstream_tls(pki, common={
                                      "alpn_protocols": ["h2", "http/1.1"]})), port, 1)
    req = "GET /direct HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    r = s_client(port, "-alpn", "http/1.1,h2", "-servername", "api.example.com",
                 "-CAfile", str(pki.ca.cert), request=req)
    assert "ALPN protocol: h2" in r.stdout  # the server's preference order wins
    r = s_client(port, "-alpn", "http/1.1", "-servername", "api.example.com",
                 "-CAfile", str(pki.ca.cert), request=req)
    assert "ALPN protocol: http/1.1" in r.stdout
    assert "Verify return code: 0 (ok)" in r.stdout
    assert "HTTP/1.1 200 OK" in r.stdout and "direct" in r.stdout
    r = s_client(port, "-alpn", "spdy/3", request=req)
    assert "No ALPN negotiated" in r.stdout and "HTTP/1.1 200 OK" in r.stdout
    # TLS 1.2 only, as a client that cannot do 1.3; and TLS 1.1 refused.
    r = s_client(port, "-tls1_2", request=req)
    assert "Protocol  : TLSv1.2" in r.stdout or "TLSv1.2" in r.stdout
    r = s_client(port, "-tls1_1")
    assert "Cipher is (NONE)" in r.stdout or r.returncode != 0
    lines = wait_log(log, 3)
    assert "sni=api.example.com" in lines[0]
    # Plaintext HTTP on the TLS port: the handshake fails, nothing is served.
    status_line = subprocess.run(
        [CURL, "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/direct"],
        capture_output=True, text=True, timeout=20)
    assert status_line.returncode != 0
    s = stats(aport, "ssl")
    assert s[f"listener.127.0.0.1_{port}.ssl.connection_error"] >= 2  # TLS 1.1, plaintext


def test_mtls_spiffe_and_refusals(start_trioxy: Any, pki: Pki, tmp_path: Path) -> None:
    port, aport = free_port(), free_port()
    log = tmp_path / "access.log"
    tls = downstream_tls(pki, require_client_certificate=True, common={"validation_context": {
        "trusted_ca": {"filename": str(pki.ca.cert)},
        "match_typed_subject_alt_names": [
            {"san_type": "URI", "matcher": {"safe_regex": {
                "regex": r"spiffe://example\.org/ns/default/sa/(client|admin)"}}}],
    }})
    start(start_trioxy, bootstrap(port, aport, hcm(log), 9, listener_tls=tls), port, 2)
    url = f"https://localhost:{port}/direct"
    ok = curl("--cacert", str(pki.ca.cert), "--cert", str(pki.client.cert),
              "--key", str(pki.client.key), url)
    assert ok.returncode == 0 and ok.stdout == "direct\n", ok.stderr
    assert f"peer_uri={SPIFFE_CLIENT}" in wait_log(log, 1)[0]
    req = "GET /direct HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    # No client certificate: TLS 1.3 clients learn it from the server's alert.
    r = s_client(port, "-CAfile", str(pki.ca.cert), request=req)
    assert "HTTP/1.1 200" not in r.stdout
    assert "certificate required" in (r.stdout + r.stderr)
    # TLS 1.2: the handshake itself fails.
    r = s_client(port, "-tls1_2", "-CAfile", str(pki.ca.cert), request=req)
    assert "HTTP/1.1 200" not in r.stdout and r.returncode != 0
    # A certificate from another CA.
    r = s_client(port, "-cert", str(pki.rogue_client.cert), "-key", str(pki.rogue_client.key),
                 request=req)
    assert "HTTP/1.1 200" not in r.stdout
    # The right CA, the wrong SPIFFE id: refused after the handshake (closed, no answer).
    r = s_client(port, "-cert", str(pki.other_client.cert), "-key", str(pki.other_client.key),
                 request=req)
    assert "HTTP/1.1 200" not in r.stdout
    bad = curl("--cacert", str(pki.ca.cert), "--cert", str(pki.other_client.cert),
               "--key", str(pki.other_client.key), url)
    assert bad.returncode != 0
    # Still serving the good client afterwards.
    ok = curl("--cacert", str(pki.ca.cert), "--cert", str(pki.client.cert),
              "--key", str(pki.client.key), url)
    assert ok.returncode == 0
    s = stats(aport, "ssl")
    prefix = f"listener.127.0.0.1_{port}.ssl."
    assert s[prefix + "fail_verify_no_cert"] == 2
    assert s[prefix + "fail_verify_error"] == 1
    assert s[prefix + "fail_verify_san"] == 2
    assert s[prefix + "handshake"] == 2
    assert len(wait_log(log, 2)) == 2  # refused connections never reach the HCM


def test_handshake_timeout_closes_only_that_connection(start_trioxy: Any, pki: Pki,
                                                       tmp_path: Path) -> None:
    import socket

    port, aport = free_port(), free_port()
    log = tmp_path / "access.log"
    start(start_trioxy, bootstrap(port, aport, hcm(log), 9, listener_tls=downstream_tls(pki),
                                  chain_extra={"transport_socket_connect_timeout": "0.5s"}),
          port, 3)
    silent = socket.create_connection(("127.0.0.1", port))
    silent.settimeout(5)
    t0 = time.monotonic()
    r = curl("--cacert", str(pki.ca.cert), f"https://localhost:{port}/direct")
    assert r.returncode == 0 and r.stdout == "direct\n"
    assert silent.recv(10) == b""  # closed by the proxy after 0.5 s
    assert 0.3 < time.monotonic() - t0 < 4
    silent.close()
    s = stats(aport, "transport_socket_connect_timeout")
    assert s[f"listener.127.0.0.1_{port}.downstream_cx_transport_socket_connect_timeout"] == 1


# ----------------------------------------------------------------------------- upstream
def test_upstream_tls_to_nginx_sni_mtls_and_verification(start_trioxy: Any, nginx_tls: int,
                                                         pki: Pki, tmp_path: Path) -> None:
    port, aport = free_port(), free_port()
    log = tmp_path / "access.log"
    tls = upstream_tls(sni="api.example.com", common_tls_context={
        "tls_certificates": [cert_files(pki.client)],
        "validation_context": {
            "trusted_ca": {"filename": str(pki.ca.cert)},
            "match_typed_subject_alt_names": [
                {"san_type": "DNS", "matcher": {"exact": "api.example.com"}}]},  # *.example.com
    })
    start(start_trioxy, bootstrap(port, aport, hcm(log), nginx_tls, cluster_tls=tls), port, 4)
    status, _, body = http_get(port, "/info")
    assert status == 200
    # nginx saw our SNI, TLS 1.2 (Envoy's upstream default maximum) and a verified client cert.
    assert body == b"sni=api.example.com proto=TLSv1.2 verify=SUCCESS xfp=http\n"
    status, _, body = http_get(port, "/")
    assert status == 200 and body == b"x" * 99 + b"\n"
    line = wait_log(log, 1)[0]
    assert "up_tls=TLSv1.2 up_peer_dns=localhost,*.example.com" in line
    s = stats(aport, "cluster.backend.ssl")
    assert s["cluster.backend.ssl.handshake"] >= 1
    assert s["cluster.backend.ssl.versions.TLSv1.2"] >= 1


def test_upstream_wrong_ca_is_503_uf_with_the_reason(start_trioxy: Any, nginx_tls: int,
                                                     pki: Pki, tmp_path: Path) -> None:
    port, aport = free_port(), free_port()
    log = tmp_path / "access.log"
    tls = upstream_tls(common_tls_context={"validation_context": {
        "trusted_ca": {"filename": str(pki.other_ca.cert)}}})
    start(start_trioxy, bootstrap(port, aport, hcm(log), nginx_tls, cluster_tls=tls), port, 5)
    status, _, body = http_get(port, "/info")
    assert status == 503
    line = wait_log(log, 1)[0]
    assert line.startswith("503 UF ")
    reason = line.split("reason=", 1)[1]
    assert reason.startswith("TLS_error:|SSL_routines:CERTIFICATE_VERIFY_FAILED:")
    assert reason.endswith(":TLS_error_end")
    assert body.startswith(b"upstream connect error")
    s = stats(aport, "cluster.backend")
    assert s["cluster.backend.upstream_cx_connect_fail"] == 1
    assert s["cluster.backend.ssl.fail_verify_error"] == 1


def test_upstream_without_validation_context_does_not_verify(start_trioxy: Any, nginx_tls: int,
                                                             pki: Pki, tmp_path: Path) -> None:
    """Envoy's documented default: no trusted_ca, no verification (nginx's cert is from a CA
    the proxy does not know), and no SNI unless configured."""
    port, aport = free_port(), free_port()
    start(start_trioxy, bootstrap(port, aport, hcm(tmp_path / "a.log"), nginx_tls,
                                  cluster_tls=upstream_tls()), port, 6)
    status, _, body = http_get(port, "/info")
    assert status == 200
    assert body.startswith(b"sni= proto=TLSv1.2 verify=NONE")


def test_tcp_proxy_over_upstream_tls_and_tls_both_sides(start_trioxy: Any, nginx_tls: int,
                                                        pki: Pki, tmp_path: Path) -> None:
    import socket

    port, aport = free_port(), free_port()
    log = tmp_path / "access.log"
    tls = upstream_tls(sni="localhost", common_tls_context={
        "tls_params": {"tls_maximum_protocol_version": "TLSv1_3"},
        "validation_context": {"trusted_ca": {"filename": str(pki.ca.cert)}}})
    start(start_trioxy, bootstrap(port, aport, tcp_proxy(log), nginx_tls, cluster_tls=tls,
                                  listener_tls=downstream_tls(pki)), port, 7)
    # TLS in (curl), TLS out (to nginx): a tcp_proxy between two TLS sessions.
    r = curl("--cacert", str(pki.ca.cert), f"https://localhost:{port}/info")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "sni=localhost proto=TLSv1.3 verify=NONE xfp=\n"
    line = wait_log(log, 1)[0]
    assert "tls=TLSv1.3" in line and "up_tls=TLSv1.3" in line
    # Half-close through both TLS layers: the request ends with our EOF, the answer follows.
    with socket.create_connection(("127.0.0.1", port)) as raw:
        import ssl

        ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"GET /info HTTP/1.0\r\nHost: x\r\n\r\n")
            got = b""
            while chunk := s.recv(65536):
                got += chunk
    assert got.startswith(b"HTTP/1.1 200 OK") and got.endswith(b"verify=NONE xfp=\n")


def test_tcp_proxy_plaintext_in_tls_out(start_trioxy: Any, nginx_tls: int, pki: Pki,
                                        tmp_path: Path) -> None:
    import socket

    port, aport = free_port(), free_port()
    log = tmp_path / "access.log"
    start(start_trioxy, bootstrap(port, aport, tcp_proxy(log), nginx_tls,
                                  cluster_tls=upstream_tls(sni="localhost")), port, 8)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 200 OK") and b"sni=localhost proto=TLSv1.2" in got
    assert "tls=- sni=- peer_uri=- up_tls=TLSv1.2" in wait_log(log, 1)[0]


def test_days_until_first_cert_expiring_gauge(start_trioxy: Any, pki: Pki,
                                              tmp_path: Path) -> None:
    port, aport = free_port(), free_port()
    start(start_trioxy, bootstrap(port, aport, hcm(tmp_path / "a.log"), 9,
                                  listener_tls=downstream_tls(pki)), port, 9)
    s = stats(aport, "days_until_first_cert_expiring")
    days = s["server.days_until_first_cert_expiring"]
    expected = int((pki.server.not_after.timestamp() - time.time()) // 86400)
    assert days in (expected, expected - 1)


def test_validate_mode_names_the_field(pki: Pki, tmp_path: Path) -> None:
    import sys

    from harness import ROOT

    cfg = tmp_path / "bad.json"
    cfg.write_text(bootstrap(free_port(), free_port(), hcm(tmp_path / "a.log"), 9,
                             listener_tls=downstream_tls(pki, common={"tls_params": {
                                 "cipher_suites": ["ECDHE-RSA-AES128-GCM-SHA256", "BOGUS"]}})))
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "--mode", "validate", "-c", str(cfg)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 1
    assert re.search(r"static_resources\.listeners\[0\]\.filter_chains\[0\]\.transport_socket"
                     r"\.typed_config\.common_tls_context\.tls_params\.cipher_suites\[1\]: "
                     r"unknown cipher suite 'BOGUS'", r.stderr), r.stderr


def test_tls_inspector_picks_tls_and_plaintext_chains(start_trioxy: Any, pki: Pki,
                                                      tmp_path: Path) -> None:
    """server_names / application_protocols / transport_protocol (from tls_inspector) choose
    the chain, whose own TLS context then terminates the connection."""
    import proxy.extensions  # noqa: F401
    from proxy.registry import listener_filters

    if "envoy.filters.listener.tls_inspector" not in listener_filters.names():
        pytest.skip("tls_inspector is not registered")
    port, aport = free_port(), free_port()

    def chain(body: str, match: dict[str, Any], tls: bool = True) -> dict[str, Any]:
        c: dict[str, Any] = {"filter_chain_match": match, "filters": [{
            "name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": HCM, "stat_prefix": "x",
                "route_config": {"virtual_hosts": [{"name": "a", "domains": ["*"], "routes": [
                    {"match": {"prefix": "/"}, "direct_response": {
                        "status": 200, "body": {"inline_string": body}}}]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3."
                             "Router"}}]}}]}
        if tls:
            c["transport_socket"] = downstream_tls(pki, common={
                "alpn_protocols": ["h2", "http/1.1"]})
        return c

    cfg = json.dumps({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": aport}}},
        "static_resources": {"listeners": [{
            "name": "l", "address": {"socket_address": {"address": "127.0.0.1",
                                                        "port_value": port}},
            "listener_filters": [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector."
                         "v3.TlsInspector"}}],
            "filter_chains": [
                chain("api\n", {"server_names": ["api.example.com"]}),
                chain("h2\n", {"transport_protocol": "tls", "application_protocols": ["h2"]}),
                chain("tls\n", {"transport_protocol": "tls"}),
                chain("plain\n", {"transport_protocol": "raw_buffer"}, tls=False),
            ]}]}})
    start(start_trioxy, cfg, port, 10)
    ca = ("--cacert", str(pki.ca.cert))
    r = curl(*ca, "--resolve", f"api.example.com:{port}:127.0.0.1",
             f"https://api.example.com:{port}/")
    assert r.stdout == "api\n", r.stderr
    assert curl(*ca, "--http1.1", f"https://localhost:{port}/").stdout == "tls\n"
    r = curl(*ca, "--http2", f"https://localhost:{port}/", "-w", "%{http_version}")
    assert r.stdout == "h2\n2", r.stderr  # ALPN h2: the chain, then HTTP/2 over our TLS
    assert curl(f"http://127.0.0.1:{port}/").stdout == "plain\n"
