"""Hot restart as users run it: trioxy-agent under load, SIGHUPs, real sockets and processes."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from harness import ROOT, PyUpstream, free_port, http_get, wait_for_port


def proxy_config(port: int, upstream_port: int) -> str:
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
          stat_prefix: ingress
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
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream_port}}}}}}}
"""


class Agent:
    def __init__(self, cfg: Path, log: Path, *extra: str) -> None:
        self.log_path = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.agent", "-c", str(cfg), "--concurrency", "2",
             "--drain-time-s", "1", "--parent-shutdown-time-s", "3",
             *(extra or ("--base-id", str(os.getpid() % 60000 + 1000)))],
            cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def epochs(self) -> list[psutil.Process]:
        out = []
        for c in psutil.Process(self.proc.pid).children():
            try:
                if c.status() != psutil.STATUS_ZOMBIE:
                    out.append(c)
            except psutil.NoSuchProcess:
                pass
        return out

    def wait_log(self, text: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the agent log:\n{self.log}")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


BASE = str(os.getpid() % 60000 + 5000)


def restart_times(log: str) -> list[float]:
    """Seconds from 'hot restart to epoch N' to 'epoch N serves', from the agent's log."""
    import re
    from datetime import datetime

    def ts(line: str) -> float:
        return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S.%f").timestamp()

    start: dict[str, float] = {}
    out = []
    for line in log.splitlines():
        m = re.search(r"hot restart to epoch (\d+)", line)
        if m:
            start[m.group(1)] = ts(line)
        m = re.search(r"\[agent\] epoch (\d+) serves", line)
        if m and m.group(1) in start:
            out.append(ts(line) - start[m.group(1)])
    return out


class Load:
    """Clients for a bounded time: keep-alive ones and one-request-per-connection ones."""

    def __init__(self, port: int, seconds: float, keepalive: int = 4, fresh: int = 2) -> None:
        self.port = port
        self.until = time.monotonic() + seconds
        self.ok = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._keepalive, daemon=True)
                        for _ in range(keepalive)]
        self.threads += [threading.Thread(target=self._fresh, daemon=True) for _ in range(fresh)]
        for t in self.threads:
            t.start()

    def _record(self, status: int | None, error: str | None = None) -> None:
        with self.lock:
            if status == 200:
                self.ok += 1
            else:
                self.failures.append(error or f"status {status}")

    def _keepalive(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while time.monotonic() < self.until:
            try:
                conn.request("GET", "/ok")
                r = conn.getresponse()
                r.read()
                self._record(r.status)
            except (OSError, http.client.HTTPException) as exc:
                self._record(None, f"keep-alive: {exc!r}")
                conn.close()
        conn.close()

    def _fresh(self) -> None:
        while time.monotonic() < self.until:
            try:
                self._record(http_get(self.port, "/ok")[0])
            except (OSError, http.client.HTTPException) as exc:
                self._record(None, f"new connection: {exc!r}")

    def join(self) -> None:
        for t in self.threads:
            t.join(30)


def test_sighups_under_load_fail_no_request(tmp_path: Path) -> None:
    up = PyUpstream()
    port = free_port()
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(proxy_config(port, up.port))
    agent = Agent(cfg, tmp_path / "agent.log")
    try:
        wait_for_port(port, proc=agent.proc)
        agent.wait_log("epoch 0 serves")
        first = agent.epochs()[0].pid
        load = Load(port, seconds=17.0)
        slow: dict[str, object] = {}

        def slow_request() -> None:
            slow["result"] = http_get(port, "/slow?ms=2500", timeout=15)

        hups = 20
        started = time.monotonic()
        for i in range(hups):
            time.sleep(0.5 + (i % 3) * 0.25)  # 0.5-1.0 s apart
            if i == 2:
                t = threading.Thread(target=slow_request, daemon=True)
                t.start()
                time.sleep(0.2)  # the slow request is on the epoch about to be replaced
            agent.proc.send_signal(signal.SIGHUP)
        load.join()
        t.join(15)
        elapsed = time.monotonic() - started
        assert load.failures == [], load.failures[:5]
        assert load.ok > 200, load.ok
        assert slow["result"][0] == 200  # type: ignore[index]
        # Storms coalesce, so fewer epochs than HUPs may start, but at least a few did,
        # the last one serves, and every older one has exited.
        agent.wait_log("SIGHUP: hot restart to epoch 1")
        deadline = time.monotonic() + 10
        while len(agent.epochs()) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        (last,) = agent.epochs()
        assert last.pid != first
        assert "handed over 1 listening socket(s)" in agent.log
        assert http_get(port, "/ok")[0] == 200
        # A new connection is served by a worker of the newest epoch: find the process
        # that holds its server side.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/ok")
        conn.getresponse().read()
        client_port = conn.sock.getsockname()[1]
        owners = [w.pid for w in last.children()
                  if any(c.raddr and c.raddr.port == client_port for c in w.net_connections())]
        conn.close()
        assert len(owners) == 1, owners
        times = restart_times(agent.log)
        print(f"\n{load.ok} requests, 0 failed, {hups} SIGHUPs in {elapsed:.1f} s; "
              f"{len(times)} restarts, SIGHUP to new epoch serving: "
              f"median {sorted(times)[len(times) // 2]:.2f} s, max {max(times):.2f} s")
        assert agent.stop() == 0
    finally:
        agent.stop()
        up.close()


def test_bad_config_on_reload_keeps_the_old_epoch_serving(tmp_path: Path) -> None:
    up = PyUpstream()
    port = free_port()
    cfg = tmp_path / "envoy.yaml"
    good = proxy_config(port, up.port)
    cfg.write_text(good)
    agent = Agent(cfg, tmp_path / "agent.log", "--base-id", BASE)
    try:
        wait_for_port(port, proc=agent.proc)
        agent.wait_log("epoch 0 serves")
        cfg.write_text(good.replace("codec_type: AUTO", "").replace(
            "stat_prefix: ingress", "stat_prefix: ingress\n          codec_type: HTTP3"))
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_log("reload failed: epoch 1 exited with 1")
        assert "codec_type" in agent.log  # the epoch said which field
        deadline = time.monotonic() + 5
        while read_stats(BASE).get("agent.reload_failed") != "1":
            assert time.monotonic() < deadline, read_stats(BASE)
            time.sleep(0.2)
        assert http_get(port, "/ok")[0] == 200
        assert len(agent.epochs()) == 1
        cfg.write_text(good)
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_log("epoch 2 serves")
        assert http_get(port, "/ok")[0] == 200
    finally:
        agent.stop()
        up.close()


def test_killed_serving_epoch_is_relaunched(tmp_path: Path) -> None:
    up = PyUpstream()
    port = free_port()
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(proxy_config(port, up.port))
    agent = Agent(cfg, tmp_path / "agent.log")
    try:
        wait_for_port(port, proc=agent.proc)
        agent.wait_log("epoch 0 serves")
        agent.epochs()[0].kill()
        agent.wait_log("epoch 1 serves")
        assert http_get(port, "/ok")[0] == 200
        agent.proc.send_signal(signal.SIGHUP)  # and the next reload works
        agent.wait_log("epoch 2 serves")
        assert http_get(port, "/ok")[0] == 200
    finally:
        agent.stop()
        up.close()


def test_kill_9_of_the_epoch_refuses_no_connection(tmp_path: Path) -> None:
    """The agent keeps the listening sockets: the relaunched epoch takes the same queue."""
    up = PyUpstream()
    port = free_port()
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(proxy_config(port, up.port))
    agent = Agent(cfg, tmp_path / "agent.log")
    refused: list[str] = []
    other: list[str] = []
    ok = [0]
    until = time.monotonic() + 6.0

    def client() -> None:
        while time.monotonic() < until:
            try:
                status = http_get(port, "/ok", timeout=15)[0]
                if status == 200:
                    ok[0] += 1
                else:
                    other.append(f"status {status}")
            except ConnectionRefusedError as exc:
                refused.append(repr(exc))
            except (OSError, http.client.HTTPException) as exc:
                other.append(repr(exc))

    try:
        wait_for_port(port, proc=agent.proc)
        agent.wait_log("epoch 0 serves")
        time.sleep(0.3)  # the agent has taken its duplicates
        threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        agent.epochs()[0].kill()
        agent.wait_log("epoch 1 serves")
        for t in threads:
            t.join(30)
        assert refused == []
        assert len(other) <= 4, other  # at most what was in flight on the killed epoch
        assert ok[0] > 50
        assert "1 socket(s) from the agent's store" in agent.log
    finally:
        agent.stop()
        up.close()


def test_sd_notify_and_socket_activation(tmp_path: Path) -> None:
    """The agent as systemd sees it: an activated socket, READY, RELOADING, READY, STOPPING."""
    import socket as so

    up = PyUpstream()
    notify = so.socket(so.AF_UNIX, so.SOCK_DGRAM)
    notify.bind(f"\0trioxy-it-notify-{os.getpid()}")
    notify.settimeout(20)
    activated = so.socket()
    activated.bind(("127.0.0.1", 0))
    activated.listen(128)
    port = activated.getsockname()[1]
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(proxy_config(port, up.port))
    log = tmp_path / "agent.log"
    fd = activated.fileno()
    cmd = (f"exec 3<&{fd}; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=http exec {sys.executable}"
           f" -m supervisor.agent -c {cfg} --concurrency 1 --drain-time-s 1"
           f" --parent-shutdown-time-s 2 --base-id {os.getpid() % 60000 + 2000}")
    env = {**os.environ, "NOTIFY_SOCKET": f"@trioxy-it-notify-{os.getpid()}"}
    proc = subprocess.Popen(["bash", "-c", cmd], cwd=ROOT, env=env, pass_fds=[fd],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    activated.close()  # only systemd (here: the agent) holds it now

    def next_state() -> list[str]:
        return notify.recv(4096).decode().split("\n")

    try:
        first = next_state()
        assert first[0] == "READY=1", first
        assert http_get(port, "/ok")[0] == 200  # served on the activated socket
        assert "socket activation" in log.read_text()
        proc.send_signal(signal.SIGHUP)
        reloading = next_state()
        assert reloading[0] == "RELOADING=1"
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading)
        assert next_state()[0] == "READY=1"
        assert http_get(port, "/ok")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert next_state()[0] == "STOPPING=1"
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()
        up.close()


def test_second_agent_on_a_base_id_fails_fast_and_dynamic_ids_do_not_collide(
    tmp_path: Path,
) -> None:
    up = PyUpstream()
    port, port2 = free_port(), free_port()
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(proxy_config(port, up.port))
    cfg2 = tmp_path / "envoy2.yaml"
    cfg2.write_text(proxy_config(port2, up.port))
    first = Agent(cfg, tmp_path / "a1.log")
    second = None
    third = None
    try:
        wait_for_port(port, proc=first.proc)
        base = str(os.getpid() % 60000 + 1000)
        started = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "supervisor.agent", "-c", str(cfg2), "--base-id", base],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )
        assert second.returncode == 2
        assert f"--base-id {base}" in second.stdout + second.stderr
        assert time.monotonic() - started < 5  # (interpreter start included)
        id_path = tmp_path / "base-id"
        third = Agent(cfg2, tmp_path / "a3.log", "--use-dynamic-base-id",
                      "--base-id-path", str(id_path))
        wait_for_port(port2, proc=third.proc)
        assert http_get(port2, "/ok")[0] == 200
        chosen = int(id_path.read_text())
        assert str(chosen) != base
    finally:
        first.stop()
        if third is not None:
            third.stop()
        up.close()


def test_concurrency_changes_across_restarts_reset_no_queued_connection(tmp_path: Path) -> None:
    """Epochs 2 → 1 → 3 workers, started by hand as an operator would, with a full queue."""
    import socket as so

    up = PyUpstream()
    port = free_port()
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(proxy_config(port, up.port))
    base = str(os.getpid() % 60000 + 3000)
    epochs: list[subprocess.Popen] = []

    def start(epoch: int, concurrency: int) -> subprocess.Popen:
        p = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "-c", str(cfg), "--base-id", base,
             "--restart-epoch", str(epoch), "--concurrency", str(concurrency),
             "--drain-time-s", "1", "--parent-shutdown-time-s", "2"],
            cwd=ROOT, stdout=open(tmp_path / f"e{epoch}.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        epochs.append(p)
        return p

    try:
        start(0, 2)
        wait_for_port(port, proc=epochs[0])
        time.sleep(1.0)  # every worker of epoch 0 accepts
        for epoch, concurrency in ((1, 1), (2, 3)):
            # Connections that wait in the kernel's accept queue across the handover: the
            # serving epoch's workers are stopped, so nobody accepts them until epoch+1.
            old_workers = psutil.Process(epochs[epoch - 1].pid).children()
            for w in old_workers:
                w.suspend()
            queued = [so.create_connection(("127.0.0.1", port), timeout=10) for _ in range(30)]
            start(epoch, concurrency)
            deadline = time.monotonic() + 20
            while "ready" not in (tmp_path / f"e{epoch}.log").read_text():
                assert time.monotonic() < deadline, (tmp_path / f"e{epoch}.log").read_text()
                time.sleep(0.05)
            for w in old_workers:
                w.resume()
            for s in queued:
                s.sendall(b"GET /ok HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            for s in queued:
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                assert data.startswith(b"HTTP/1.1 200 "), data[:100]
                s.close()
            epochs[epoch - 1].wait(10)  # the parent drained and left
        assert http_get(port, "/ok")[0] == 200
    finally:
        for p in epochs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(10)
        up.close()
        from shm.segment import Segment

        Segment.unlink(int(base))


RESTARTS = 200  # the figure: ~0.6 s each here, two minutes in all


def test_no_fd_growth_across_restarts(tmp_path: Path) -> None:
    up = PyUpstream()
    port = free_port()
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(proxy_config(port, up.port))
    agent = Agent(cfg, tmp_path / "agent.log")
    try:
        wait_for_port(port, proc=agent.proc)
        agent.wait_log("epoch 0 serves")
        me = psutil.Process(agent.proc.pid)

        def restart(n: int) -> None:
            agent.proc.send_signal(signal.SIGHUP)
            agent.wait_log(f"epoch {n} serves", timeout=30)

        restart(1)
        restart(2)
        time.sleep(0.5)
        fds_before = me.num_fds()
        children_before = len(me.children(recursive=True))
        for n in range(3, RESTARTS + 3):
            restart(n)
        time.sleep(0.5)
        assert me.num_fds() <= fds_before, (fds_before, me.num_fds())
        # No process left behind either: epochs and their workers all went.
        deadline = time.monotonic() + 10
        while len(me.children(recursive=True)) > children_before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(me.children(recursive=True)) <= children_before
        deadline = time.monotonic() + 10
        while len(agent.epochs()) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        (serving,) = agent.epochs()
        fds_epoch = serving.num_fds()
        assert fds_epoch < 40, fds_epoch
        assert http_get(port, "/ok")[0] == 200
    finally:
        agent.stop()
        up.close()


def read_stats(base: str) -> dict[str, str]:
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "stats", "--base-id", base],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return dict(line.split(": ", 1) for line in r.stdout.splitlines())


def test_counters_keep_counting_across_hot_restarts(tmp_path: Path) -> None:
    up = PyUpstream()
    port = free_port()
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(proxy_config(port, up.port))
    base = str(os.getpid() % 60000 + 4000)
    agent = Agent(cfg, tmp_path / "agent.log", "--base-id", base)

    def total_after(expected: int) -> dict[str, str]:
        deadline = time.monotonic() + 10
        while True:
            stats = read_stats(base)
            if int(stats.get("http.ingress.downstream_rq_total", 0)) >= expected:
                return stats
            assert time.monotonic() < deadline, stats
            time.sleep(0.3)

    try:
        wait_for_port(port, proc=agent.proc)
        agent.wait_log("epoch 0 serves")
        for _ in range(30):
            assert http_get(port, "/ok")[0] == 200
        stats = total_after(30)
        assert stats["server.hot_restart_epoch"] == "0"
        assert int(stats["cluster.upstream.upstream_rq_total"]) == 30
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_log("epoch 1 serves")
        for _ in range(20):
            assert http_get(port, "/ok")[0] == 200
        stats = total_after(50)
        assert int(stats["http.ingress.downstream_rq_total"]) == 50
        assert stats["server.hot_restart_epoch"] == "1"
        assert int(stats["server.total_connections"]) >= 0
        assert "server.parent_connections" in stats
        deadline = time.monotonic() + 10
        while len(agent.epochs()) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = read_stats(base)  # epoch 0 is gone; its counts are not
        assert int(stats["http.ingress.downstream_rq_total"]) == 50
        assert int(stats["http.ingress.downstream_rq_2xx"]) == 50
    finally:
        agent.stop()
        up.close()
        from shm.segment import Segment

        Segment.unlink(int(base))


def test_kills_mid_handover_and_mid_drain_never_stop_the_service(tmp_path: Path) -> None:
    up = PyUpstream()
    port = free_port()
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(proxy_config(port, up.port))
    agent = Agent(cfg, tmp_path / "agent.log")
    refused: list[str] = []
    done = threading.Event()

    def prober() -> None:
        while not done.is_set():
            try:
                http_get(port, "/ok", timeout=15)
            except ConnectionRefusedError as exc:
                refused.append(repr(exc))
            except (OSError, http.client.HTTPException):
                pass  # an in-flight request on a killed epoch may fail; a refusal may not
            time.sleep(0.02)

    try:
        wait_for_port(port, proc=agent.proc)
        agent.wait_log("epoch 0 serves")
        t = threading.Thread(target=prober, daemon=True)
        t.start()
        # 1. The new epoch dies while it takes over.
        old = {p.pid for p in agent.epochs()}
        agent.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not (new := [p for p in agent.epochs() if p.pid not in old]):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        new[0].kill()
        agent.wait_log("epoch 2 serves", timeout=30)  # relaunched from epoch 0's sockets
        # 2. The old epoch dies while it drains.
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_log("epoch 3 serves", timeout=30)
        for p in agent.epochs():
            if p.cmdline()[-1] != "-1" and "--restart-epoch" in p.cmdline():
                idx = p.cmdline().index("--restart-epoch")
                if p.cmdline()[idx + 1] == "2":
                    p.kill()
        # 3. The next reload still works.
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_log("epoch 4 serves", timeout=30)
        assert http_get(port, "/ok")[0] == 200
        done.set()
        t.join(20)
        assert refused == []
    finally:
        done.set()
        agent.stop()
        up.close()
