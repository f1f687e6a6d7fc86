"""Upstream ``auto_config`` (ALPN chooses HTTP/2 or HTTP/1.1) against real nginx TLS peers:
one that offers h2 (``listen ... ssl http2``) and one that speaks only HTTP/1.1."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import NGINX, free_port, http_get, wait_for_port
from tls_certs import Pki, make_pki

BASE_ID = 20517  # this file's --base-id (one per test, by offset): grep before reusing
US = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
HPO_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HPO = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(Path(tmp_path_factory.mktemp("pki")))


def nginx(tmp_path: Path, pki: Pki, http2: bool) -> Iterator[tuple[int, Path]]:
    """nginx over TLS; ``/proto`` answers the request's protocol, which the access log
    (``$server_protocol``) records too."""
    if not os.path.exists(NGINX):
        pytest.skip("nginx is not installed (scripts/test installs it)")
    port = free_port()
    prefix = tmp_path / ("nginx-h2" if http2 else "nginx-h1")
    (prefix / "logs").mkdir(parents=True)
    (prefix / "html").mkdir()
    (prefix / "html" / "index.html").write_text("x" * 99 + "\n")
    log = prefix / "logs" / "access.log"
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
          log_format proto '$server_protocol $request_uri $ssl_alpn_protocol';
          access_log {log} proto;
          client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
          fastcgi_temp_path {prefix}/fcgi; uwsgi_temp_path {prefix}/uwsgi;
          scgi_temp_path {prefix}/scgi;
          server {{
            listen 127.0.0.1:{port} ssl{" http2" if http2 else ""};
            ssl_certificate {pki.server.cert};
            ssl_certificate_key {pki.server.key};
            ssl_protocols TLSv1.2 TLSv1.3;
            root {prefix}/html;
            location = /proto {{
              default_type text/plain;
              return 200 "$server_protocol\\n";
            }}
          }}
        }}
    """))
    proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc=proc)
        yield port, log
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def nginx_h2(tmp_path: Path, pki: Pki) -> Iterator[tuple[int, Path]]:
    yield from nginx(tmp_path, pki, http2=True)


@pytest.fixture
def nginx_h1(tmp_path: Path, pki: Pki) -> Iterator[tuple[int, Path]]:
    yield from nginx(tmp_path, pki, http2=False)


def bootstrap(port: int, admin_port: int, upstream_port: int, *, tls: bool = True,
              alpn: list[str] | None = None) -> str:
    cluster: dict[str, Any] = {
        "name": "backend", "type": "STATIC", "connect_timeout": "2s",
        "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": upstream_port}}}}]}]},
        "typed_extension_protocol_options": {HPO_KEY: {"@type": HPO, "auto_config": {
            "http2_protocol_options": {"max_concurrent_streams": 50}}}},
    }
    if tls:
        common: dict[str, Any] = {"alpn_protocols": alpn} if alpn else {}
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": US, "common_tls_context": common}}
    return json.dumps({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{"name": "front", "address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}}, "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager", "typed_config": {
                        "@type": HCM, "stat_prefix": "ingress",
                        "route_config": {"virtual_hosts": [{
                            "name": "all", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"},
                                        "route": {"cluster": "backend"}}]}]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http."
                                     "router.v3.Router"}}]}}]}]}],
            "clusters": [cluster],
        },
    })


def stats(admin_port: int, pattern: str) -> dict[str, int]:
    status, _, body = http_get(admin_port, f"/stats?filter={pattern}")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        name, _, value = line.partition(": ")
        if value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


def nginx_log(path: Path, lines: int) -> list[str]:
    deadline = time.monotonic() + 10
    got: list[str] = []
    while time.monotonic() < deadline:
        got = path.read_text().splitlines() if path.exists() else []
        if len(got) >= lines:
            return got
        time.sleep(0.05)
    raise AssertionError(f"nginx logged {got}")


def test_h2_negotiated_with_an_h2_upstream(start_trioxy: Any, nginx_h2: tuple[int, Path]) -> None:
    up, log = nginx_h2
    port, aport = free_port(), free_port()
    start_trioxy(bootstrap(port, aport, up), wait_port=port,
                 extra=["--base-id", str(BASE_ID)])
    for _ in range(3):
        status, _, body = http_get(port, "/proto")
        assert (status, body) == (200, b"HTTP/2.0\n")
    status, _, body = http_get(port, "/")
    assert (status, body) == (200, b"x" * 99 + b"\n")
    assert nginx_log(log, 4) == ["HTTP/2.0 /proto h2"] * 3 + ["HTTP/2.0 / h2"]
    s = stats(aport, "cluster.backend.upstream_cx_")
    assert s["cluster.backend.upstream_cx_http2_total"] == 1  # one multiplexed connection
    assert s.get("cluster.backend.upstream_cx_http1_total", 0) == 0
    assert s["cluster.backend.upstream_cx_total"] == 1


def test_http1_when_the_upstream_does_not_offer_h2(start_trioxy: Any,
                                                   nginx_h1: tuple[int, Path]) -> None:
    up, log = nginx_h1
    port, aport = free_port(), free_port()
    start_trioxy(bootstrap(port, aport, up), wait_port=port,
                 extra=["--base-id", str(BASE_ID + 1)])
    for _ in range(3):
        status, _, body = http_get(port, "/proto")
        assert (status, body) == (200, b"HTTP/1.1\n")
    # The first connection (opened to learn the protocol) carried the first request.
    assert nginx_log(log, 3) == ["HTTP/1.1 /proto http/1.1"] * 3
    s = stats(aport, "cluster.backend.upstream_cx_")
    assert s["cluster.backend.upstream_cx_http1_total"] == 1  # kept alive, reused
    assert s.get("cluster.backend.upstream_cx_http2_total", 0) == 0
    assert s["cluster.backend.upstream_cx_total"] == 1


def test_context_alpn_list_wins(start_trioxy: Any, nginx_h2: tuple[int, Path]) -> None:
    """Envoy offers h2,http/1.1 only as a fallback: a context's own alpn_protocols are used."""
    up, log = nginx_h2
    port, aport = free_port(), free_port()
    start_trioxy(bootstrap(port, aport, up, alpn=["http/1.1"]), wait_port=port,
                 extra=["--base-id", str(BASE_ID + 2)])
    status, _, body = http_get(port, "/proto")
    assert (status, body) == (200, b"HTTP/1.1\n")
    assert nginx_log(log, 1) == ["HTTP/1.1 /proto http/1.1"]


def test_plaintext_auto_config_is_refused(tmp_path: Path) -> None:
    """As Envoy ("ALPN configured for cluster ... which has a non-ALPN transport socket")."""
    import sys

    from harness import ROOT

    cfg = tmp_path / "c.json"
    cfg.write_text(bootstrap(free_port(), free_port(), free_port(), tls=False))
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "--mode", "validate", "-c", str(cfg)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 1
    assert ('static_resources.clusters[0].typed_extension_protocol_options'
            f'["{HPO_KEY}"].auto_config: auto_config needs a TLS transport_socket') in r.stderr
