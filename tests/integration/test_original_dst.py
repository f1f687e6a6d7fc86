"""Istio's VirtualOutbound (15001) / VirtualInbound (15006) shapes inside a network namespace.

The test creates a namespace, gives its loopback some addresses and adds iptables REDIRECT
rules that send TCP from 10.77.0.100 (an "application" going out) to 15001 and from
10.77.0.101 (a peer coming in) to 15006, as istio-iptables does by owner uid. trioxy, a real
destination server and the clients all run inside the namespace (``ip netns exec``). It
proves:

* ``original_dst`` restores the destination (``SO_ORIGINAL_DST``), and the ORIGINAL_DST
  PassthroughCluster connects the application to its real destination;
* ``use_original_dst: true`` hands a redirected connection to the listener of its original
  address: an exact ``bind_to_port: false`` listener, else ``0.0.0.0`` of that port, which
  runs its own listener filters (``http_inspector``);
* the inbound listener matches filter chains on the restored ``destination_port`` and
  reaches the local service through InboundPassthroughClusterIpv4 (ORIGINAL_DST);
* a connection made straight to 15001 is not restored: Istio's blackhole chain.

Skipped with the reason when not root or when ``ip`` / ``iptables`` (or the kernel's nat
table) are missing. The namespace is always deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IP = shutil.which("ip")
IPTABLES = shutil.which("iptables")
CURL = shutil.which("curl")

OUT_APP, IN_PEER = "10.77.0.100", "10.77.0.101"
REAL, VIRTUAL = "10.77.0.2", "10.77.0.3"
OUT_APP6, REAL6 = "fd00:77::100", "fd00:77::2"
ADMIN = 15000

PEER = textwrap.dedent('''
    import socket, sys, threading

    def handle(c, name):
        with c:
            try:
                c.sendall(b"hello from " + name + b"\\n")
                while data := c.recv(4096):
                    c.sendall(name + b":" + data)
            except OSError:
                pass

    if sys.argv[1] == "serve":
        ip, port, name = sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
        s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port))
        s.listen(16)
        print("ready", flush=True)
        while True:
            c, _ = s.accept()
            threading.Thread(target=handle, args=(c, name), daemon=True).start()
    else:
        src, ip, port = sys.argv[2], sys.argv[3], int(sys.argv[4])
        c = socket.create_connection((ip, port), timeout=5, source_address=(src, 0))
        c.sendall(b"ping\\n")
        c.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while data := c.recv(4096):
                out += data
        except OSError:
            pass
        sys.stdout.write(out.decode(errors="replace"))
''')

TCP = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
ORIGINAL_DST = ("type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3."
                "OriginalDst")
HTTP_INSPECTOR = ("type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3."
                  "HttpInspector")
FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


def tcp_chain(name: str, cluster: str, prefix: str, match: dict | None = None,
              log: Path | None = None) -> str:
    m = f"\n      filter_chain_match: {json.dumps(match)}" if match else ""
    access = ""
    if log is not None:
        fmt = json.dumps("%DOWNSTREAM_LOCAL_ADDRESS% %UPSTREAM_HOST% %UPSTREAM_CLUSTER%\n")
        access = f"""
            access_log:
            - name: envoy.access_loggers.file
              typed_config: {{"@type": {FILE_LOG}, path: {log}, log_format: {{text_format: {fmt}}}}}"""
    return f"""
    - name: {name}{m}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
            "@type": {TCP}
            stat_prefix: {prefix}
            cluster: {cluster}{access}"""


def http_chain(name: str, body: str, match: dict | None = None) -> str:
    m = f"\n      filter_chain_match: {json.dumps(match)}" if match else ""
    return f"""
    - name: {name}{m}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM}
          stat_prefix: {name}
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


def istio_config(log: Path) -> str:
    passthrough = """
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s"""
    return f"""
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {ADMIN}}}}}
static_resources:
  listeners:
  - name: virtualOutbound
    address: {{socket_address: {{address: 0.0.0.0, port_value: 15001}}}}
    use_original_dst: true
    traffic_direction: OUTBOUND
    filter_chains:{tcp_chain("virtualOutbound-blackhole", "BlackHoleCluster", "BlackHoleCluster",
                             {"destination_port": 15001})}{
        tcp_chain("virtualOutbound-catchall-tcp", "PassthroughCluster", "PassthroughCluster",
                  log=log)}
  - name: {VIRTUAL}_8080
    address: {{socket_address: {{address: {VIRTUAL}, port_value: 8080}}}}
    bind_to_port: false
    traffic_direction: OUTBOUND
    filter_chains:{http_chain("outbound_8080", "outbound " + VIRTUAL + ":8080")}
  - name: 0.0.0.0_8081
    address: {{socket_address: {{address: 0.0.0.0, port_value: 8081}}}}
    bind_to_port: false
    traffic_direction: OUTBOUND
    listener_filters:
    - name: envoy.filters.listener.http_inspector
      typed_config: {{"@type": {HTTP_INSPECTOR}}}
    filter_chains:{http_chain("outbound_8081", "outbound 0.0.0.0:8081",
                              {"application_protocols": ["http/1.1"]})}
  - name: virtualInbound
    address: {{socket_address: {{address: 0.0.0.0, port_value: 15006}}}}
    traffic_direction: INBOUND
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {{"@type": {ORIGINAL_DST}}}
    filter_chains:{tcp_chain("virtualInbound-blackhole", "BlackHoleCluster", "inbound_blackhole",
                             {"destination_port": 15006})}{
        tcp_chain("inbound|9000||", "InboundPassthroughClusterIpv4", "inbound_9000",
                  {"destination_port": 9000})}
  clusters:
  - name: PassthroughCluster{passthrough}
  - name: InboundPassthroughClusterIpv4{passthrough}
  - name: BlackHoleCluster
    connect_timeout: 1s
"""


class NetNs:
    def __init__(self, name: str, tmp: Path) -> None:
        self.name = name
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.ipv6 = ""  # why IPv6 REDIRECT is unavailable; "" when it works

    def argv(self, *argv: str) -> list[str]:
        return [IP or "ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, timeout: float = 15) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*argv), capture_output=True, timeout=timeout)

    def spawn(self, *argv: str, log: Path | None = None) -> subprocess.Popen:
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
        p = subprocess.Popen(self.argv(*argv), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs.append(p)
        return p

    def wait_port(self, ip: str, port: int, timeout: float = 20.0) -> None:
        probe = f"import socket; socket.create_connection(({ip!r}, {port}), 0.5).close()"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.run(sys.executable, "-c", probe).returncode == 0:
                return
            time.sleep(0.2)
        raise TimeoutError(f"nothing on {ip}:{port} in {self.name}")

    def connect(self, src: str, ip: str, port: int) -> str:
        r = self.run(sys.executable, str(self.tmp / "peer.py"), "connect", src, ip, str(port))
        return r.stdout.decode(errors="replace")

    def curl(self, src: str, url: str) -> str:
        r = self.run(CURL or "curl", "-s", "--max-time", "5", "--interface", src, url)
        return r.stdout.decode(errors="replace")

    def stats(self) -> dict[str, int]:
        r = self.run(CURL or "curl", "-s", f"http://127.0.0.1:{ADMIN}/stats?format=json")
        return {s["name"]: s["value"] for s in json.loads(r.stdout)["stats"] if "value" in s}


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[NetNs]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces and iptables need root")
    if IP is None or IPTABLES is None or CURL is None:
        pytest.skip("needs ip (iproute2), iptables and curl (scripts/test installs them)")
    name = f"trioxy-od-{os.getpid()}"
    r = subprocess.run([IP, "netns", "add", name], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"ip netns add failed: {r.stderr.decode().strip()}")
    ns = NetNs(name, tmp_path)
    try:
        setup = [["ip", "link", "set", "lo", "up"]]
        setup += [["ip", "addr", "add", f"{a}/32", "dev", "lo"]
                  for a in (REAL, VIRTUAL, OUT_APP, IN_PEER)]
        for argv in setup:
            r = ns.run(*argv)
            assert r.returncode == 0, r.stderr
        for src, port in ((OUT_APP, 15001), (IN_PEER, 15006)):
            r = ns.run(IPTABLES, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-s", src,
                       "-j", "REDIRECT", "--to-ports", str(port))
            if r.returncode != 0:
                pytest.skip(f"iptables REDIRECT unavailable: {r.stderr.decode().strip()}")
        r = ns.run(IP, "addr", "add", f"{REAL6}/128", "dev", "lo", "nodad")
        if r.returncode == 0:
            ns.run(IP, "addr", "add", f"{OUT_APP6}/128", "dev", "lo", "nodad")
            r = ns.run(shutil.which("ip6tables") or "ip6tables", "-t", "nat", "-A", "OUTPUT",
                       "-p", "tcp", "-s", OUT_APP6, "-j", "REDIRECT", "--to-ports", "15001")
        ns.ipv6 = "" if r.returncode == 0 else (r.stderr.decode().strip() or "ip6tables failed")
        (tmp_path / "peer.py").write_text(PEER)
        yield ns
    finally:
        for p in reversed(ns.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        subprocess.run([IP, "netns", "del", name], capture_output=True)


def test_virtual_outbound_and_inbound(netns: NetNs, tmp_path: Path) -> None:
    real = netns.spawn(sys.executable, str(tmp_path / "peer.py"), "serve", REAL, "9000",
                       "real-9000")
    netns.wait_port(REAL, 9000)
    assert real.poll() is None
    log = tmp_path / "passthrough.log"
    cfg = tmp_path / "istio.yaml"
    cfg.write_text(istio_config(log))
    base_id = str(os.getpid() % 50000 + 30000 + 10)
    trioxy_log = tmp_path / "trioxy.log"
    trioxy = netns.spawn(sys.executable, "-m", "proxy.cli", "-c", str(cfg), "--concurrency", "1",
                         "--base-id", base_id, "--drain-time-s", "1",
                         "--parent-shutdown-time-s", "2", log=trioxy_log)
    try:
        netns.wait_port("127.0.0.1", 15001)
        netns.wait_port("127.0.0.1", ADMIN)

        # VirtualOutbound: iptables sent the app to 15001; original_dst restored 10.77.0.2:9000;
        # no listener has that address, so the catch-all chain and PassthroughCluster.
        out = netns.connect(OUT_APP, REAL, 9000)
        assert out == "hello from real-9000\nreal-9000:ping\n", (out, trioxy_log.read_text())
        deadline = time.monotonic() + 5
        while not (log.exists() and log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert log.read_text().split() == [f"{REAL}:9000", f"{REAL}:9000", "PassthroughCluster"]

        # use_original_dst: handed to the bind_to_port: false listener of 10.77.0.3:8080 ...
        assert netns.curl(OUT_APP, f"http://{VIRTUAL}:8080/") == f"outbound {VIRTUAL}:8080"
        # ... or of 0.0.0.0:8081, which runs its own http_inspector first.
        assert netns.curl(OUT_APP, f"http://{REAL}:8081/") == "outbound 0.0.0.0:8081"

        # VirtualInbound: a peer's connection to 10.77.0.2:9000 came in through 15006; the chain
        # matched the restored destination_port, InboundPassthroughClusterIpv4 delivered it.
        out = netns.connect(IN_PEER, REAL, 9000)
        assert out == "hello from real-9000\nreal-9000:ping\n", out

        # Straight to 15001: nothing restored, so no hand-off: Istio's blackhole chain.
        assert netns.connect("127.0.0.1", "127.0.0.1", 15001) == ""

        stats = netns.stats()
        assert stats["tcp.PassthroughCluster.downstream_cx_total"] == 1
        assert stats["tcp.inbound_9000.downstream_cx_total"] == 1
        blackholed = stats["tcp.BlackHoleCluster.downstream_cx_total"]
        assert blackholed == 2  # that one and wait_port's probe
        assert stats["http.outbound_8080.downstream_rq_total"] == 1
        assert stats["http.outbound_8081.downstream_rq_total"] == 1
        assert stats["http_inspector.http11_found"] == 1
        assert stats["cluster.PassthroughCluster.membership_total"] == 1
        assert stats["cluster.InboundPassthroughClusterIpv4.upstream_cx_total"] == 1
        # Handed-off connections count on the listener that served them.
        assert stats["listener.0.0.0.0_15001.downstream_cx_total"] == 1 + blackholed
        assert stats["listener.10.77.0.3_8080.downstream_cx_total"] == 1
    finally:
        trioxy.send_signal(signal.SIGTERM)
        trioxy.wait(15)
        from shm.segment import Segment

        Segment.unlink(int(base_id))


def test_virtual_outbound_ipv6(netns: NetNs, tmp_path: Path) -> None:
    """IP6T_SO_ORIGINAL_DST: the IPv6 passthrough reaches its real destination."""
    if netns.ipv6:
        pytest.skip(f"IPv6 REDIRECT unavailable: {netns.ipv6}")
    netns.spawn(sys.executable, str(tmp_path / "peer.py"), "serve", REAL6, "9000", "real6")
    netns.wait_port(REAL6, 9000)
    cfg = tmp_path / "v6.yaml"
    cfg.write_text(f"""
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {ADMIN}}}}}
static_resources:
  listeners:
  - name: virtualOutbound6
    address: {{socket_address: {{address: "::", port_value: 15001}}}}
    use_original_dst: true
    filter_chains:{tcp_chain("catchall", "PassthroughCluster", "PassthroughCluster",
                             log=tmp_path / "v6.log")}
  clusters:
  - name: PassthroughCluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s
""")
    base_id = str(os.getpid() % 50000 + 30000 + 11)
    trioxy = netns.spawn(sys.executable, "-m", "proxy.cli", "-c", str(cfg), "--concurrency", "1",
                         "--base-id", base_id, "--drain-time-s", "1",
                         "--parent-shutdown-time-s", "2", log=tmp_path / "trioxy6.log")
    try:
        netns.wait_port("::1", 15001)
        assert netns.connect(OUT_APP6, REAL6, 9000) == "hello from real6\nreal6:ping\n"
        deadline = time.monotonic() + 5
        log = tmp_path / "v6.log"
        while not (log.exists() and REAL6 in log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        # The first line is wait_port's probe of [::1]:15001 itself (not redirected: no host).
        assert log.read_text().splitlines()[-1].split() == [
            f"[{REAL6}]:9000", f"[{REAL6}]:9000", "PassthroughCluster"]
    finally:
        trioxy.send_signal(signal.SIGTERM)
        trioxy.wait(15)
        from shm.segment import Segment

        Segment.unlink(int(base_id))
