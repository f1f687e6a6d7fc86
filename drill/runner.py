"""One drill from setup to teardown: upstreams, config, agent, monitor, load, then the records.

A scenario (``drill.scenarios``) is a function of a running ``Drill``; it acts through the
helpers here (``hup``, ``kill``, ``write_config``, ``wait_*``) so every action is recorded
the same way. Teardown always runs, in the order that makes the final figures meaningful:
settle to one epoch, stop the load, let the stats flush, read the counters and the agent's
fds, then stop the agent and check nothing of its tree outlived it.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from drill import config as configs
from drill.agent import (
    Admin,
    AgentProcess,
    EpochCommandLauncher,
    EpochProc,
    Launcher,
    ShimLauncher,
    held_client_ports,
)
from drill.load import MODES, H1Client, LoadGenerator, LoadMode, PeerClosed, classify_error
from drill.model import OK, Action, KillRecord, RequestRecord, Violation, status_cause
from drill.monitor import Monitor
from drill.report import RunData
from drill.upstream import BuiltinUpstream, NginxUpstream, free_port, nginx_available

# The longest an epoch may take to serve before the drill calls it stuck; an epoch start is
# about 1.3 s on the 2-core development machine, more under the drill's own load.
SERVE_TIMEOUT_S = 30.0


class Abort(Exception):
    """The drill cannot go on (the agent died, the service did not come back)."""


class Unsupported(Exception):
    """The scenario needs something this trioxy does not have; the message says what."""


@dataclass
class Settings:
    scenario: str
    restarts: int
    interval_s: float = 1.0
    rate: float = 200.0
    seed: int = 0
    concurrency: int = 2
    max_concurrency: int = 4
    drain_time_s: float = 1.0
    parent_shutdown_s: float = 3.0
    modes: tuple[str, ...] = ()
    upstream: str = "auto"  # auto | builtin | nginx
    config_path: str | None = None
    flip_config_path: str | None = None
    launcher: str = "auto"  # auto | plain | epoch-command | shim
    upgrade_to: str | None = None
    upgrade_ref: str | None = None
    work_dir: str | None = None
    keep_dir: bool = False
    max_seconds: float = 600.0
    progress: bool = True
    agent_args: str = ""
    request_timeout_s: float = 10.0


@dataclass
class Drill:
    s: Settings
    say: Callable[[str], None] = field(default=lambda m: print(f"[drill] {m}", file=sys.stderr,
                                                                 flush=True))

    def __post_init__(self) -> None:
        self.rng = random.Random(self.s.seed)
        self.violations: list[Violation] = []
        self.notes: list[str] = []
        self.actions: list[Action] = []
        self.kills: list[KillRecord] = []
        self.run_dir = Path(tempfile.mkdtemp(prefix="trioxy-drill-", dir=self.s.work_dir))
        self.upstreams: list[BuiltinUpstream | NginxUpstream] = []
        self.agent: AgentProcess | None = None
        self.monitor: Monitor | None = None
        self.load: LoadGenerator | None = None
        self.launcher: Launcher | None = None
        self.config_file = self.run_dir / "envoy.yaml"
        self.configs: dict[str, str] = {}  # "a", "b" (two valid ones), "broken"
        self.current_config = "a"
        self.endpoints: configs.Endpoints | None = None
        self.fds_before: int | None = None
        self.fds_after: int | None = None
        self.final_counters: dict[str, int] | None = None
        self.agent_exit_code: int | None = None
        self.leftovers: list[int] = []
        self.base_id: int | None = None
        self.t_load_start = 0.0
        self.t_load_stop = 0.0
        self.probe_records: list[RequestRecord] = []
        self.settings_out: dict[str, object] = {}
        self.target_restarts = self.s.restarts

    # -- setup -----------------------------------------------------------------------
    def setup(self, launcher_kind: str) -> None:
        s = self.s
        slow = BuiltinUpstream()
        self.upstreams.append(slow)
        main_port = slow.port
        if s.config_path is None:
            if s.upstream == "nginx" and not nginx_available():
                raise Abort("--upstream nginx: nginx is not installed")
            if s.upstream in ("auto", "nginx") and nginx_available():
                ng = NginxUpstream(self.run_dir)
                self.upstreams.append(ng)
                main_port = ng.port
            http, tcp, admin_port = free_port(), free_port(), free_port()
            for v in ("a", "b"):
                self.configs[v] = configs.builtin_bootstrap(http, tcp, admin_port, main_port,
                                                            slow.port, v)
        else:
            text = Path(s.config_path).read_text()
            self.configs["a"] = text
            self.configs["b"] = (Path(s.flip_config_path).read_text()
                                 if s.flip_config_path else text)
            if not s.flip_config_path:
                self.notes.append("config flips re-apply the same -c config (no --flip-config)")
        self.configs["broken"] = configs.broken_bootstrap(self.configs["a"])
        self.endpoints = configs.endpoints_of(self.configs["a"])
        if self.endpoints.http_port is None and self.endpoints.tcp_port is None:
            raise Abort("the config has neither an HTTP nor a tcp_proxy listener to load")
        self.write_config("a")
        self.launcher = self._launcher(launcher_kind)
        self.base_id = random.randrange(1, 1 << 20)
        argv = [*self.launcher.agent_argv(), "-c", str(self.config_file),
                "--concurrency", str(s.concurrency), "--drain-time-s", f"{s.drain_time_s:g}",
                "--parent-shutdown-time-s", f"{s.parent_shutdown_s:g}",
                "--base-id", str(self.base_id), "--use-dynamic-base-id",
                "--base-id-path", str(self.run_dir / "base-id"), *shlex.split(s.agent_args)]
        self.agent = AgentProcess(argv, self.run_dir, self.run_dir / "agent.log")
        self.say(f"run dir {self.run_dir}; agent: {' '.join(argv)}")
        self.agent.start()
        # A scraper's patience: a killed epoch's admin calls wait for its relaunch.
        admin = (Admin(self.endpoints.host, self.endpoints.admin_port, timeout=10.0)
                 if self.endpoints.admin_port else None)
        if admin is None:
            self.notes.append("no admin address in the config: counters were not checked")
        agent = self.agent
        mon = self.monitor = Monitor(agent, admin,
                                     progress=self._progress if s.progress else None)
        mon.start()
        if not mon.wait_for(lambda: 0 in mon.served or not agent.alive(),
                            SERVE_TIMEOUT_S * 2) or not agent.alive():
            raise Abort(f"epoch 0 did not serve; the agent's log ends:\n{self.log_tail()}")
        try:
            self.base_id = int((self.run_dir / "base-id").read_text())
        except (OSError, ValueError):
            pass
        mon.start_admin()
        time.sleep(1.0)  # the agent takes its duplicates of epoch 0's sockets after READY
        self.fds_before = self.agent.num_fds()
        self.settings_out = {
            "restarts": s.restarts, "interval_s": s.interval_s, "rate": s.rate, "seed": s.seed,
            "concurrency": s.concurrency, "drain_time_s": s.drain_time_s,
            "parent_shutdown_time_s": s.parent_shutdown_s, "launcher": self.launcher.kind,
            "upstream": "+".join(u.name for u in self.upstreams), "base_id": self.base_id,
            "config": s.config_path or "built-in", "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
        }

    def _launcher(self, kind: str) -> Launcher:
        if kind == "epoch-command":
            return EpochCommandLauncher(self.run_dir)
        if kind == "shim":
            return ShimLauncher(self.run_dir)
        return Launcher(self.run_dir)

    def start_load(self) -> None:
        assert self.endpoints is not None
        ep = self.endpoints
        modes: list[LoadMode] = []
        for name in self.s.modes:
            cls = MODES[name]
            port = ep.tcp_port if name == "tcp" else ep.http_port
            if port is None:
                self.notes.append(f"load mode {name}: the config has no listener for it")
                continue
            modes.append(cls(ep.host, port))
        self.load = LoadGenerator(modes, self.s.rate, self.s.max_seconds,
                                  timeout=self.s.request_timeout_s)
        self.load.probe(self.say)
        if not self.load.modes:
            raise Abort("no load mode can run")
        self.load.start()
        self.t_load_start = self.load.t_start

    # -- what scenarios do -----------------------------------------------------------
    def act(self, kind: str, detail: str = "") -> None:
        self.actions.append(Action(time.time(), kind, detail))

    def hup(self, detail: str = "") -> int:
        """SIGHUP the agent; returns the epoch it will start (if nothing is starting)."""
        assert self.agent is not None and self.monitor is not None
        self.check_alive()
        nxt = self.monitor.next_epoch()
        self.act("hup", detail)
        self.agent.signal(signal.SIGHUP)
        return nxt

    def write_config(self, which: str) -> None:
        tmp = self.config_file.with_name("envoy.yaml.tmp")
        tmp.write_text(self.configs[which])
        os.replace(tmp, self.config_file)  # the epoch reads the old file or the new, whole
        if which != "broken":
            self.current_config = which

    def epochs(self) -> dict[int, EpochProc]:
        assert self.agent is not None
        return self.agent.epochs()

    @property
    def listen_ports(self) -> set[int]:
        assert self.endpoints is not None
        return {p for p in (self.endpoints.http_port, self.endpoints.tcp_port) if p}

    def kill(self, proc: psutil.Process, target: str, epoch: int, tree: bool) -> bool:
        """``kill -9`` one process, after noting which of our connections it (and, for an
        epoch, its workers) held: those may fail, and only those."""
        try:
            procs = [proc, *(proc.children(recursive=True) if tree else [])]
        except psutil.Error:
            return False
        # Freeze them first: reading a process's sockets takes milliseconds, and a worker
        # that accepted a connection meanwhile would fail it unaccounted for. Stopped, they
        # accept nothing; the snapshot is exact.
        for p in procs:
            try:
                p.suspend()
            except psutil.Error:
                pass
        ports = held_client_ports(procs, self.listen_ports)
        t = time.time()
        try:
            proc.kill()  # psutil checks the pid is still this process first
        except psutil.Error:
            return False
        finally:
            for p in procs[1:]:  # the workers go on (to notice their epoch is gone)
                try:
                    p.resume()
                except psutil.Error:
                    pass
        self.kills.append(KillRecord(t, target, epoch, tuple(p.pid for p in procs), ports))
        self.actions.append(Action(t, "kill", f"{target}: epoch {epoch} pid {proc.pid}"))
        self.say(f"kill -9 {target}: epoch {epoch} pid {proc.pid} "
                 f"({len(ports)} client connection(s) held)")
        return True

    def check_alive(self) -> None:
        assert self.agent is not None
        if not self.agent.alive():
            rc = self.agent.proc.returncode if self.agent.proc else None
            raise Abort(f"trioxy-agent exited with {rc}:\n{self.log_tail()}")

    def wait_serves(self, epoch: int, timeout: float = SERVE_TIMEOUT_S) -> bool:
        """True once ``epoch`` serves; False if it ended first or the time ran out."""
        mon = self.monitor
        assert mon is not None
        mon.wait_for(lambda: epoch in mon.served or epoch in mon.ended
                     or epoch in mon.failed_reloads, timeout)
        self.check_alive()
        return epoch in mon.served

    def wait_quiescent(self, timeout: float = SERVE_TIMEOUT_S, why: str = "") -> bool:
        mon = self.monitor
        assert mon is not None
        ok = mon.wait_for(mon.quiescent, timeout)
        self.check_alive()
        if not ok:
            self.violate("the service comes back",
                         f"no epoch serving steadily {timeout:g} s after {why or 'the step'}")
        return ok

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.check_alive()
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def violate(self, invariant: str, detail: str) -> None:
        self.violations.append(Violation(invariant, detail, time.time()))
        self.say(f"VIOLATION [{invariant}] {detail}")

    def probe(self, path: str = "/") -> tuple[int, dict[str, str]]:
        """One request on a new connection, recorded like the load's (mode ``probe``)."""
        assert self.endpoints is not None and self.endpoints.http_port is not None
        client = H1Client(self.endpoints.host, self.endpoints.http_port, self.s.request_timeout_s)
        t, started = time.time(), time.perf_counter()
        status, headers, cause = 0, dict[str, str](), OK
        try:
            client.connect()
            status, headers, _ = client.request(path, close=True)
            if status != 200:
                cause = status_cause(status)
        except (OSError, PeerClosed) as exc:
            cause = classify_error(exc)
        finally:
            client.close()
        self.probe_records.append(RequestRecord(t, time.perf_counter() - started, "probe", cause,
                                                client.local_port, client.conn_t))
        return status, headers

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.run_dir / "agent.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _progress(self, mon: Monitor) -> str:
        load = self.load
        now = time.time()
        alive = mon.samples[-1].epochs if mon.samples else ()
        if load is None or not self.t_load_start:
            return ""
        rec = load.recorder
        n = rec.count()
        last_n, last_t = getattr(self, "_last_progress", (0, self.t_load_start))
        self._last_progress = (n, now)
        rate = (n - last_n) / max(1e-6, now - last_t)
        return (f"[drill {now - self.t_load_start:6.1f}s] {rate:5.0f} req/s  ok {rec.ok}  "
                f"failed {rec.failed} (refused {rec.refused})  kills {len(self.kills)}  "
                f"epochs alive {list(alive)}  restarts {mon.restarts_done()}/"
                f"{self.target_restarts}")

    # -- teardown --------------------------------------------------------------------
    def settle(self) -> None:
        mon = self.monitor
        if mon is None or self.agent is None or not self.agent.alive():
            return

        def one_epoch() -> bool:
            return mon.quiescent() and bool(mon.samples) and len(mon.samples[-1].epochs) == 1

        if not mon.wait_for(one_epoch, self.s.parent_shutdown_s + 15):
            self.violate("the service settles", "more than one epoch still alive, or none "
                         f"serving, {self.s.parent_shutdown_s + 15:g} s after the last step")
        self.sleep(1.0)  # steady traffic on the final epoch, for the latency baseline too

    def teardown(self) -> None:
        if self.load is not None:
            self.load.stop()
            self.t_load_stop = self.load.t_stop
        mon, agent = self.monitor, self.agent
        if mon is not None and agent is not None and agent.alive():
            time.sleep(1.5)  # a stats flush (every second) after the last request
            if mon.admin is not None:
                try:
                    self.final_counters = mon.admin.counters(r".")
                except Exception as exc:
                    self.notes.append(f"final counters unreadable: {exc!r}")
            if len(mon.samples[-1].epochs if mon.samples else ()) == 1:
                self.fds_after = agent.num_fds()
            else:
                self.notes.append("fds after not measured: not at one epoch")
        if mon is not None:
            mon.stop()
        if agent is not None:
            self.agent_exit_code = agent.stop(self.s.parent_shutdown_s + 15)
            self.leftovers = agent.leftovers(3.0)
            if self.leftovers:
                agent.kill_tree()
        for u in self.upstreams:
            u.close()
        if self.base_id is not None:
            try:
                from shm.segment import Segment

                Segment.unlink(self.base_id)  # the agent does it on exit; this if it was killed
            except Exception:
                pass

    def cleanup_dir(self, passed: bool) -> None:
        if self.s.keep_dir or not passed:
            self.say(f"kept {self.run_dir} (agent.log, configs)")
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def run_data(self) -> RunData:
        mon = self.monitor
        load = self.load
        requests = (list(load.recorder.records) if load is not None else []) + self.probe_records
        requests.sort(key=lambda r: r.t)
        http_modes = frozenset([m for m, cls in MODES.items() if cls.through_http_listener]
                               + ["probe"])
        prefix = self.endpoints.http_stat_prefix if self.endpoints else None
        if load is not None and load.recorder.dropped:
            self.notes.append(f"{load.recorder.dropped} request records dropped (over the cap)")
        if load is not None and load.recorder.h2_goaway_retries:
            self.notes.append(f"{load.recorder.h2_goaway_retries} h2 request(s) sent again "
                              "after a GOAWAY that said they were not processed")
        if mon is not None and mon.error is not None:
            self.violations.append(Violation("drill monitor", f"the monitor died: {mon.error!r}"))
        return RunData(
            scenario=self.s.scenario,
            settings=self.settings_out,
            t0=self.t_load_start or time.time(),
            t_end=self.t_load_stop or time.time(),
            requests=requests,
            kills=self.kills,
            events=mon.events if mon else [],
            process_samples=mon.samples if mon else [],
            counter_samples=mon.counter_samples if mon else [],
            epoch_lives=list(mon.lives.values()) if mon else [],
            actions=self.actions,
            fds_before=self.fds_before,
            fds_after=self.fds_after,
            final_counters=self.final_counters,
            rq_counter=f"http.{prefix}.downstream_rq_total",
            http_modes=http_modes,
            drain_time_s=self.s.drain_time_s,
            parent_shutdown_s=self.s.parent_shutdown_s,
            observed_until=mon.last_sample_t if mon else 0.0,
            # worker.py: an orphaned worker notices within 0.5 s and drains min(drain, 5 s).
            orphan_s=0.5 + min(self.s.drain_time_s, 5.0),
            runner_violations=self.violations,
            notes=self.notes,
            admin_errors=mon.admin_errors if mon else [],
            skipped_modes=load.skipped if load else {},
            agent_exit_code=self.agent_exit_code,
            leftover_pids=self.leftovers,
            failure_examples=dict(load.recorder.examples) if load else {},
        )

