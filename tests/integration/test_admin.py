"""The admin API as operators use it: real epochs, real HTTP clients, real upstreams."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from envoy.admin.v3 import clusters_pb2, config_dump_pb2, server_info_pb2
from google.protobuf import json_format
from harness import ROOT, PyUpstream, free_port, http_get, wait_for_port
from prometheus_client.parser import text_string_to_metric_families


def config(port: int, admin_port: int, upstream_port: int, *, extra_admin: str = "",
           second_port: int | None = None) -> str:
    second = ""
    if second_port is not None:
        second = f"""
  - name: egress
    traffic_direction: OUTBOUND
    address: {{socket_address: {{address: 127.0.0.1, port_value: {second_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: egress_tcp
          cluster: upstream
"""
    return f"""
static_resources:
  listeners:
  - name: ingress
    traffic_direction: INBOUND
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: upstream}}
          http_filters:
          - name: envoy.filters.http.health_check
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck
              pass_through_mode: false
              headers:
              - name: ":path"
                string_match: {{exact: /healthz}}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
{second}
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream_port}}}}}}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
{extra_admin}
"""


def admin(port: int, path: str, method: str = "GET", body: bytes | None = None,
          timeout: float = 10.0) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
    finally:
        conn.close()


def stat(port: int, name: str) -> int:
    status, _, body = admin(port, f"/stats?filter=^{re.escape(name)}$")
    assert status == 200, body
    m = re.search(rf"^{re.escape(name)}: (\d+)$", body, re.M)
    return int(m.group(1)) if m else 0


@pytest.fixture
def base_id():
    """A base id of its own: a fresh stats segment, whatever earlier tests counted."""
    from shm.segment import Segment

    base = os.getpid() % 50000 + 10000
    yield base
    Segment.unlink(base)


@pytest.fixture
def up():
    u = PyUpstream()
    yield u
    u.close()


def test_stats_clusters_config_dump_and_friends(start_trioxy, up, base_id: int,
                                                tmp_path: Path) -> None:
    port, aport = free_port(), free_port()
    alog = tmp_path / "admin_access.log"
    t = start_trioxy(config(port, aport, up.port, extra_admin=f"  access_log_path: {alog}"),
                     wait_port=port, concurrency=2, extra=["--base-id", str(base_id)])
    wait_for_port(aport, proc=t.proc)
    before = stat(aport, "http.ingress.downstream_rq_total")
    before_2xx = stat(aport, "cluster.upstream.upstream_rq_200")
    n = 25
    for _ in range(n):
        assert http_get(port, "/ok")[0] == 200
    # N requests: the summed counters rise by exactly N, across both workers.
    assert stat(aport, "http.ingress.downstream_rq_total") - before == n
    assert stat(aport, "cluster.upstream.upstream_rq_200") - before_2xx == n

    # An upstream that closes mid-request: 503 UC, counted per response flag, and the
    # upstream connection is destroyed remotely with a request in flight.
    uc_before = stat(aport, "http.ingress.response_flag.UC")
    remote_before = stat(aport, "cluster.upstream.upstream_cx_destroy_remote_with_active_rq")
    assert http_get(port, "/close-after")[0] == 503
    assert stat(aport, "http.ingress.response_flag.UC") - uc_before == 1
    assert stat(aport, "cluster.upstream.upstream_cx_destroy_remote_with_active_rq") \
        - remote_before == 1

    # /stats text: Envoy's lines; histograms with quantiles.
    status, _, text = admin(aport, "/stats")
    assert status == 200
    assert re.search(r"^server\.hot_restart_epoch: 0$", text, re.M)
    assert re.search(r"^server\.state: 0$", text, re.M)  # LIVE
    assert re.search(r"^http\.ingress\.downstream_rq_time: P0\(", text, re.M), text[-2000:]
    assert re.search(r"^cluster\.upstream\.upstream_rq_time: P0\(", text, re.M)
    # ?format=json, ?filter, ?usedonly
    status, headers, body = admin(aport, "/stats?format=json&filter=downstream_rq_2xx")
    assert status == 200 and headers["content-type"].startswith("application/json")
    doc = json.loads(body)
    names = {s["name"] for s in doc["stats"] if "name" in s}
    assert "http.ingress.downstream_rq_2xx" in names
    assert all("downstream_rq_2xx" in x for x in names)
    _, _, used = admin(aport, "/stats?usedonly")
    assert "http.ingress.downstream_rq_2xx" in used
    assert "http.ingress.downstream_rq_4xx:" not in used  # never written
    assert admin(aport, "/stats?filter=(")[0] == 400
    assert admin(aport, "/stats?format=xml")[0] == 400

    # /stats/prometheus: valid exposition, Envoy's names and tags.
    status, headers, prom = admin(aport, "/stats/prometheus")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(prom))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families for s in f.samples}
    assert samples[("envoy_cluster_upstream_rq_total",
                    (("envoy_cluster_name", "upstream"),))] >= n
    # (prometheus_client names every counter sample *_total; Envoy's family is
    # envoy_cluster_upstream_rq{envoy_response_code="200"})
    assert samples[("envoy_cluster_upstream_rq_total", (("envoy_cluster_name", "upstream"),
                                                  ("envoy_response_code", "200")))] >= n
    assert samples[("envoy_http_response_flag_total", (
        ("envoy_http_conn_manager_prefix", "ingress"), ("envoy_response_flag", "UC")))] >= 1
    [hist] = [f for f in families if f.name == "envoy_http_downstream_rq_time"]
    assert hist.type == "histogram"
    counts = [s for s in hist.samples if s.name.endswith("_count")]
    assert counts and counts[0].value >= n

    # /clusters: per-host counters of this epoch, text and Envoy's JSON.
    status, _, text = admin(aport, "/clusters")
    host = f"upstream::127.0.0.1:{up.port}::"
    assert f"{host}rq_total::{n + 1}\n" in text
    assert f"{host}rq_success::{n}\n" in text
    assert f"{host}rq_error::1\n" in text
    assert f"{host}health_flags::healthy\n" in text
    status, _, body = admin(aport, "/clusters?format=json")
    clusters = json_format.Parse(body, clusters_pb2.Clusters())
    [cs] = clusters.cluster_statuses
    assert cs.name == "upstream"
    assert {s.name: s.value for s in cs.host_statuses[0].stats}["rq_total"] == n + 1

    # /listeners
    assert admin(aport, "/listeners")[2] == f"ingress::127.0.0.1:{port}\n"
    doc = json.loads(admin(aport, "/listeners?format=json")[2])
    assert doc["listener_statuses"][0]["local_address"]["socket_address"]["port_value"] == port

    # /config_dump parses back into the real proto (loading the config imports the
    # typed_config message types the dump refers to).
    from proxy.config.bootstrap import load_bootstrap

    load_bootstrap(str(t.config_path), None)
    status, _, body = admin(aport, "/config_dump")
    dump = json_format.Parse(body, config_dump_pb2.ConfigDump())
    types = [c.type_url.rsplit(".", 1)[-1] for c in dump.configs]
    assert types[0] == "BootstrapConfigDump" and "ClustersConfigDump" in types
    doc = json.loads(admin(aport, "/config_dump?resource=static_clusters")[2])
    assert [c["cluster"]["name"] for c in doc["configs"]] == ["upstream"]
    assert admin(aport, "/config_dump?resource=no_such_field")[0] == 404
    assert admin(aport, "/config_dump?mask=no_such_path")[0] == 400

    # /server_info, /ready, /hot_restart_version, /memory, /runtime
    info = json_format.Parse(admin(aport, "/server_info")[2], server_info_pb2.ServerInfo(),
                             ignore_unknown_fields=False)
    assert info.state == server_info_pb2.ServerInfo.LIVE
    assert info.command_line_options.concurrency == 2
    assert admin(aport, "/ready")[:3:2] == (200, "LIVE\n")
    hrv = subprocess.run([sys.executable, "-m", "proxy.cli", "--hot-restart-version"],
                         capture_output=True, text=True, cwd=ROOT).stdout
    assert admin(aport, "/hot_restart_version")[2] == hrv
    mem = json.loads(admin(aport, "/memory")[2])
    assert sorted(p["role"] for p in mem["processes"]) == ["main", "worker 0", "worker 1"]
    assert int(mem["allocated"]) == sum(int(p["rss"]) for p in mem["processes"])
    assert json.loads(admin(aport, "/runtime")[2]) == {"layers": [], "entries": {}}
    assert admin(aport, "/runtime_modify?x=1", "POST")[0] == 503

    # Help, unknown paths, methods, parameters.
    status, _, body = admin(aport, "/help")
    assert status == 200 and "/stats/prometheus" in body and "/quitquitquit" in body
    status, _, body = admin(aport, "/no/such/thing")
    assert status == 404 and "/server_info" in body
    assert admin(aport, "/healthcheck/fail")[0] == 405  # GET: state changes need POST
    assert admin(aport, "/reset_counters")[0] == 405
    status, _, body = admin(aport, "/clusters?frmat=json")
    assert status == 400 and "frmat" in body

    # /logging: view, change all, change one, bad level.
    assert "active loggers:" in admin(aport, "/logging")[2]
    assert admin(aport, "/logging?level=debug")[0] == 405
    assert admin(aport, "/logging?level=debug", "POST")[0] == 200
    assert "  root: debug" in admin(aport, "/logging")[2]
    assert admin(aport, "/logging?level=info", "POST")[0] == 200
    assert admin(aport, "/logging?level=loud", "POST")[0] == 400

    # /reset_counters zeroes every counter, every process's.
    assert admin(aport, "/reset_counters", "POST")[0] == 200
    assert stat(aport, "http.ingress.downstream_rq_total") == 0
    assert http_get(port, "/ok")[0] == 200
    assert stat(aport, "http.ingress.downstream_rq_total") == 1

    # Admin requests are access-logged (access_log_path: Envoy's default format).
    deadline = time.monotonic() + 5
    while "GET /server_info" not in (alog.read_text() if alog.exists() else ""):
        assert time.monotonic() < deadline, "no admin access log line"
        time.sleep(0.05)


def test_admin_bad_input_never_stalls_it(start_trioxy, up) -> None:
    port, aport = free_port(), free_port()
    t = start_trioxy(config(port, aport, up.port), wait_port=port)
    wait_for_port(aport, proc=t.proc)
    # A client that sends half a request and stalls holds one connection, not the admin.
    slow = socket.create_connection(("127.0.0.1", aport))
    slow.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    assert admin(aport, "/ready")[0] == 200
    assert time.monotonic() - started < 2
    # Garbage: 400, and the admin goes on.
    with socket.create_connection(("127.0.0.1", aport)) as s:
        s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    # A huge body: 413 before it is read.
    with socket.create_connection(("127.0.0.1", aport)) as s:
        s.sendall(b"POST /healthcheck/ok HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 413")
    assert admin(aport, "/ready")[0] == 200
    # Only the configured address answers: 127.0.0.2 is loopback too, but not bound.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", aport), timeout=2).close()
    slow.close()


def test_healthcheck_fail_drains_and_ready_flips(start_trioxy, up) -> None:
    port, aport = free_port(), free_port()
    t = start_trioxy(config(port, aport, up.port), wait_port=port, concurrency=2)
    wait_for_port(aport, proc=t.proc)
    status, headers, _ = http_get(port, "/ok")
    assert status == 200 and headers.get("connection") != "close"
    assert http_get(port, "/healthz")[0] == 200
    assert admin(aport, "/healthcheck/fail", "POST")[0] == 200
    assert admin(aport, "/ready")[:3:2] == (503, "DRAINING\n")
    # The health_check filter fails the load balancer's checks, in every worker.
    for _ in range(4):
        status, headers, _ = http_get(port, "/healthz")
        assert status == 503 and headers["x-envoy-immediate-health-check-fail"] == "true"
    # Every worker closes connections after each response (Envoy's drain_close).
    for _ in range(6):
        status, headers, _ = http_get(port, "/ok")
        assert status == 200 and headers.get("connection") == "close"
    assert admin(aport, "/healthcheck/ok", "POST")[0] == 200
    assert admin(aport, "/ready")[:3:2] == (200, "LIVE\n")
    assert http_get(port, "/healthz")[0] == 200
    for _ in range(6):
        assert http_get(port, "/ok")[1].get("connection") != "close"


def test_ready_is_503_while_the_epoch_drains(start_trioxy, up) -> None:
    port, aport = free_port(), free_port()
    t = start_trioxy(config(port, aport, up.port), wait_port=port, drain_time_s=3.0)
    wait_for_port(aport, proc=t.proc)
    assert admin(aport, "/ready")[0] == 200
    # A slow request keeps the draining epoch alive meanwhile.
    slow: dict[str, object] = {}
    th = threading.Thread(target=lambda: slow.update(r=http_get(port, "/slow?ms=2000")))
    th.start()
    time.sleep(0.3)
    t.signal(signal.SIGTERM)
    deadline = time.monotonic() + 2
    while True:
        status, _, body = admin(aport, "/ready")
        if status == 503:
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    assert body == "DRAINING\n"
    info = json.loads(admin(aport, "/server_info")[2])
    assert info["state"] == "DRAINING"
    th.join(10)
    assert slow["r"][0] == 200  # type: ignore[index]


def test_drain_listeners(start_trioxy, up) -> None:
    port, aport, eport = free_port(), free_port(), free_port()
    t = start_trioxy(config(port, aport, up.port, second_port=eport), wait_port=port,
                     concurrency=2)
    wait_for_port(aport, proc=t.proc)
    # inboundonly: the INBOUND listener stops at once (refused, not left queued); the
    # OUTBOUND one goes on.
    assert admin(aport, "/drain_listeners?inboundonly", "POST")[0] == 200
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    socket.create_connection(("127.0.0.1", eport), timeout=2).close()
    assert admin(aport, "/ready")[0] == 200  # stopping listeners is not draining
    assert admin(aport, "/drain_listeners?skip_exit", "POST")[0] == 400
    assert admin(aport, "/drain_listeners", "POST")[0] == 200
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", eport), timeout=2).close()
    assert admin(aport, "/ready")[0] == 200  # admin itself goes on


def test_drain_listeners_graceful(start_trioxy, up) -> None:
    port, aport = free_port(), free_port()
    t = start_trioxy(config(port, aport, up.port), wait_port=port, drain_time_s=1.5)
    wait_for_port(aport, proc=t.proc)
    assert admin(aport, "/drain_listeners?graceful", "POST")[0] == 200
    assert admin(aport, "/ready")[0] == 503
    # During the drain period the listener still accepts, and responses close.
    status, headers, _ = http_get(port, "/ok")
    assert status == 200
    deadline = time.monotonic() + 5
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline, "listener not stopped after the drain period"
        time.sleep(0.1)
    assert t.proc.poll() is None  # drained listeners, not an exit


def test_quitquitquit_exits_the_epoch(start_trioxy, up) -> None:
    port, aport = free_port(), free_port()
    t = start_trioxy(config(port, aport, up.port), wait_port=port)
    wait_for_port(aport, proc=t.proc)
    assert admin(aport, "/quitquitquit", "POST")[:3:2] == (200, "OK\n")
    assert t.proc.wait(10) == 3  # ExitCode.ADMIN_QUIT: the agent stops too


def test_admin_under_the_agent_across_hot_restarts(tmp_path: Path, up) -> None:
    """The admin socket is handed over like every listener: an admin poller never sees a
    refused connection across SIGHUPs, the epoch number moves, counters never go back,
    and /quitquitquit stops the whole service."""
    from test_hot_restart import BASE, Agent

    port, aport = free_port(), free_port()
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(config(port, aport, up.port))
    agent = Agent(cfg, tmp_path / "agent.log", "--base-id", str(int(BASE) + 7))
    errors: list[str] = []
    epochs: list[int] = []
    totals: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                status, _, body = admin(aport, "/stats?filter=^(server.hot_restart_epoch|"
                                               "http.ingress.downstream_rq_total)$")
                vals = dict(line.split(": ") for line in body.splitlines())
                epochs.append(int(vals["server.hot_restart_epoch"]))
                totals.append(int(vals.get("http.ingress.downstream_rq_total", 0)))
                http_get(port, "/ok")
            except (OSError, http.client.HTTPException, KeyError, ValueError) as exc:
                errors.append(repr(exc))
            time.sleep(0.02)

    try:
        wait_for_port(port, proc=agent.proc)
        agent.wait_log("epoch 0 serves")
        wait_for_port(aport, proc=agent.proc)
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        for n in (1, 2, 3):
            time.sleep(0.8)
            agent.proc.send_signal(signal.SIGHUP)
            agent.wait_log(f"epoch {n} serves", timeout=20)
        time.sleep(1.0)
        stop.set()
        poller.join(10)
        assert errors == [], errors[:5]
        assert epochs[-1] == 3 and epochs == sorted(epochs)
        assert totals == sorted(totals) and totals[-1] > 10
        assert admin(aport, "/quitquitquit", "POST")[0] == 200
        assert agent.proc.wait(20) == 0
        assert "admin /quitquitquit" in agent.log
    finally:
        stop.set()
        agent.stop()
