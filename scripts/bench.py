"""Side-by-side benchmark: trioxy against HAProxy and nginx, in one run.

Starts one nginx upstream (HTTP/1.1, 100-byte body), then for each proxy in turn (HAProxy
nbthread 1, nginx reverse proxy, trioxy --concurrency 1 and 2, all keeping upstream
connections alive) drives it and reads the proxy's CPU time from /proc (all its processes).
Prints requests/s, p50/p99 latency, CPU-µs per request and each ratio to HAProxy.
``--mode h1`` (default): wrk, HTTP/1.1 keep-alive. ``--mode h2c``: h2load, prior-knowledge
HTTP/2 cleartext downstream (``-c 10 -m 10``). ``--mode tls``: wrk over HTTPS (TLS 1.3,
keep-alive), with a certificate made for the run.
Rounds are interleaved (A B C D, A B C D, ...) and medians reported, because absolute req/s
moves a lot between runs on a shared 2-core machine while CPU per request holds.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} never opened")


def tree_cpu_s(pid: int) -> float:
    """utime+stime of a process and all its live descendants, plus reaped children's."""
    total = 0.0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime stime cutime cstime are fields 14-17 (1-based) → 11..14 after the ')' split
        total += sum(int(x) for x in fields[11:15]) / CLK_TCK
    return total


def _tree(pid: int) -> list[int]:
    out = [pid]
    kids: list[str] = []
    # A child is listed under the thread that spawned it, not always the main thread.
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += (task / "children").read_text().split()
        except OSError:
            continue
    for k in kids:
        out += _tree(int(k))
    return out


@dataclass
class Result:
    rps: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)


def parse_latency(text: str, pct: str) -> float:
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not m:
        return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def run_wrk(port: int, duration: int, conns: int, threads: int, scheme: str = "http",
            ) -> tuple[int, float, float, float, str]:
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--latency",
         f"{scheme}://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True,
    ).stdout
    m = re.search(r"(\d+) requests in", out)
    reqs = int(m.group(1)) if m else 0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        print(f"  ! {errors.group(1)} non-2xx responses", file=sys.stderr)
    return reqs, rps, parse_latency(out, "50"), parse_latency(out, "99"), out


def run_h2load(port: int, requests: int, conns: int, streams: int,
               ) -> tuple[int, float, float, float, str]:
    # A request count, not -D: h2load's timed mode measured nothing against nginx here.
    out = subprocess.run(
        ["h2load", f"-c{conns}", f"-m{streams}", f"-n{requests}",
         f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True,
    ).stdout
    m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored", out)
    done = int(m.group(2)) if m else 0
    if m and (int(m.group(4)) or int(m.group(5))):
        print(f"  ! h2load: {m.group(4)} failed, {m.group(5)} errored", file=sys.stderr)
    rps = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    # h2load reports the mean time per request (no percentiles): shown in the p50 column.
    lat = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    mean = float("nan")
    if lat:
        v, unit = float(lat.group(1)), lat.group(2)
        mean = v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
    return done, rps, mean, float("nan"), out


def make_cert(tmp: Path) -> tuple[Path, Path, Path]:
    """A self-signed localhost certificate: (cert, key, cert+key for HAProxy)."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "2", "-subj", "/CN=localhost", "-addext",
         "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem")],
        check=True, capture_output=True)
    both = tmp / "both.pem"
    both.write_text((tmp / "cert.pem").read_text() + (tmp / "key.pem").read_text())
    return tmp / "cert.pem", tmp / "key.pem", both


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["h1", "h2c", "tls"], default="h1")
    ap.add_argument("--streams", type=int, default=10, help="h2c: streams per connection")
    ap.add_argument("--requests", type=int, default=30000, help="h2c: requests per round")
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="", help="comma list: haproxy,nginx,trioxy-1,trioxy-2")
    args = ap.parse_args()
    if args.mode == "h2c" and args.connections == 50:
        args.connections = 10  # the h2load -c 10 -m 10
    for tool in ("wrk", "nginx", "haproxy", "h2load", "openssl"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench needs {tool} (apt-get install wrk nginx-light haproxy)", file=sys.stderr)
            return 2

    tmp = Path(tempfile.mkdtemp(prefix="trioxy-bench-"))
    procs: list[subprocess.Popen] = []
    try:
        up = free_port()
        (tmp / "html").mkdir()
        (tmp / "html" / "index.html").write_text("x" * 99 + "\n")
        temps = " ".join(
            f"{k}_temp_path {tmp}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (tmp / "upstream.conf").write_text(f"""
daemon off; master_process off; worker_processes 1; user root; pid {tmp}/up.pid;
error_log stderr error; events {{ worker_connections 4096; }}
http {{ access_log off; {temps} keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{up} backlog=4096; root {tmp}/html; }} }}
""")
        procs.append(subprocess.Popen(["nginx", "-p", str(tmp), "-c", str(tmp / "upstream.conf")]))
        wait_port(up)

        proxies: dict[str, list[str]] = {}
        ports: dict[str, int] = {}
        hp = ports["haproxy"] = free_port()
        cert = key = both = None
        if args.mode == "tls":
            cert, key, both = make_cert(tmp)
        hp_bind = {"h1": "", "h2c": " proto h2", "tls": f" ssl crt {both} alpn http/1.1"}[args.mode]
        ng_listen = {"h1": "", "h2c": " http2", "tls": " ssl"}[args.mode]
        ng_tls = (f"ssl_certificate {cert}; ssl_certificate_key {key};"
                  if args.mode == "tls" else "")
        (tmp / "haproxy.cfg").write_text(f"""
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:{hp}{hp_bind}
  default_backend be
backend be
  server s1 127.0.0.1:{up}
""")
        proxies["haproxy"] = ["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")]
        np_ = ports["nginx"] = free_port()
        (tmp / "proxy.conf").write_text(f"""
daemon off; worker_processes 2; user root; pid {tmp}/proxy.pid;
error_log stderr error; events {{ worker_connections 4096; }}
http {{ access_log off; {temps}
  upstream be {{ server 127.0.0.1:{up}; keepalive 256; }}
  server {{ listen 127.0.0.1:{np_}{ng_listen} backlog=4096; {ng_tls}
    location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }} }} }}
""")
        proxies["nginx"] = ["nginx", "-p", str(tmp), "-c", str(tmp / "proxy.conf")]
        for n in (1, 2):
            tp = ports[f"trioxy-{n}"] = free_port()
            cfg = tmp / f"trioxy-{n}.yaml"
            tls = ""
            if args.mode == "tls":
                tls = f"""
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: ["http/1.1"]
            tls_certificates:
            - certificate_chain: {{filename: {cert}}}
              private_key: {{filename: {key}}}"""
            cfg.write_text(f"""
static_resources:
  listeners:
  - name: bench
    address: {{socket_address: {{address: 127.0.0.1, port_value: {tp}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: upstream}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router{tls}
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {up}}}}}}}
""")
            proxies[f"trioxy-{n}"] = [
                str(ROOT / ".venv/bin/trioxy"), "-c", str(cfg), "--concurrency", str(n),
                "-l", "warning", "--drain-time-s", "0", "--parent-shutdown-time-s", "1",
            ]
        names = [n for n in proxies if not args.only or n in args.only.split(",")]
        results = {n: Result() for n in names}
        for rnd in range(args.rounds):
            for name in names:
                p = subprocess.Popen(proxies[name], stdout=subprocess.DEVNULL)
                try:
                    wait_port(ports[name])
                    time.sleep(1.0)  # let every worker reach its accept loop
                    if args.mode == "h2c":
                        run_h2load(ports[name], 1000, args.connections, args.streams)  # warm-up
                        cpu0 = tree_cpu_s(p.pid)
                        reqs, rps, p50, p99, _ = run_h2load(
                            ports[name], args.requests, args.connections, args.streams)
                    else:
                        scheme = "https" if args.mode == "tls" else "http"
                        run_wrk(ports[name], 1, args.connections, args.threads, scheme)
                        cpu0 = tree_cpu_s(p.pid)
                        reqs, rps, p50, p99, _ = run_wrk(
                            ports[name], args.duration, args.connections, args.threads, scheme)
                    cpu1 = tree_cpu_s(p.pid)
                finally:
                    p.send_signal(signal.SIGINT if name.startswith("trioxy") else signal.SIGTERM)
                    try:
                        p.wait(10)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
                r = results[name]
                r.rps.append(rps)
                r.p50.append(p50)
                r.p99.append(p99)
                r.cpu_us.append((cpu1 - cpu0) * 1e6 / max(reqs, 1))
                print(f"round {rnd + 1} {name:10s} {rps:9.0f} req/s  "
                      f"{r.cpu_us[-1]:7.1f} CPU-µs/req", file=sys.stderr)
        med = {n: {k: statistics.median(getattr(r, k)) for k in ("rps", "p50", "p99", "cpu_us")}
               for n, r in results.items()}
        base = med.get("haproxy")
        driver = {"h1": f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s",
                  "h2c": f"h2load -c{args.connections} -m{args.streams} -n{args.requests} "
                         "(h2c; the p50 column is h2load's mean)",
                  "tls": f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s "
                         "https (TLS, keep-alive)"}[args.mode]
        print(f"\n{driver}, 100-byte body, "
              f"medians of {args.rounds} interleaved rounds, {os.cpu_count()} cores")
        print(f"{'proxy':12s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'CPU-µs/req':>11s}"
              f" {'CPU ×HAProxy':>13s} {'req/s ×HAProxy':>15s}")
        for n, m in med.items():
            ratio_cpu = f"{m['cpu_us'] / base['cpu_us']:.2f}" if base else "-"
            ratio_rps = f"{m['rps'] / base['rps']:.2f}" if base else "-"
            print(f"{n:12s} {m['rps']:9.0f} {m['p50']:8.2f} {m['p99']:8.2f} {m['cpu_us']:11.1f}"
                  f" {ratio_cpu:>13s} {ratio_rps:>15s}")
        return 0
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
