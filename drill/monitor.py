"""The drill's watcher: a thread that samples the agent's log, process tree and admin API.

It keeps what the judges need (events, process samples, counter samples, every epoch's
processes and when they were last alive) and what the scenario waits on (which epochs
started, serve, ended), and prints the progress line. The scenario thread waits on
``changed`` instead of polling the log itself.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

import psutil

from drill.agent import Admin, AgentProcess, LogTail, epoch_of
from drill.model import CounterSample, EpochLife, LogEvent, ProcessSample

# Counters judged monotonic: Envoy's cumulative counters the drill's traffic moves, and the
# agent's own (a relaunch or a failed reload must not reset them).
COUNTER_FILTER = (r"(downstream_rq_total|downstream_rq_[1-5]xx|downstream_cx_total|"
                  r"upstream_rq_total|upstream_cx_total|agent\.reload_total|"
                  r"agent\.reload_failed|agent\.epoch_relaunch)$")


class Monitor(threading.Thread):
    def __init__(self, agent: AgentProcess, admin: Admin | None, interval_s: float = 0.1,
                 admin_interval_s: float = 0.5,
                 progress: Callable[[Monitor], str] | None = None,
                 progress_interval_s: float = 1.0) -> None:
        super().__init__(daemon=True, name="drill-monitor")
        self.agent = agent
        self.admin = admin
        self.interval_s = interval_s
        self.admin_interval_s = admin_interval_s
        self.progress = progress
        self.progress_interval_s = progress_interval_s
        self.changed = threading.Condition()
        self._stop_event = threading.Event()
        self.tail = LogTail(agent.log_path)
        self.events: list[LogEvent] = []
        self.samples: list[ProcessSample] = []
        self.counter_samples: list[CounterSample] = []
        self.admin_errors: list[tuple[float, str]] = []
        self.lives: dict[int, EpochLife] = {}
        self._procs: dict[int, psutil.Process] = {}  # every pid of every epoch, to re-check
        self._live_pids: set[int] = set()
        self.started: set[int] = set()
        self.served: set[int] = set()
        self.ended: dict[int, int] = {}  # epoch -> exit code
        self.failed_reloads: set[int] = set()
        self.relaunch_pending = False
        self.last_sample_t = 0.0
        self.error: BaseException | None = None
        self._admin_thread: threading.Thread | None = None

    # -- the thread ------------------------------------------------------------------
    def run(self) -> None:
        next_progress = 0.0
        try:
            while not self._stop_event.is_set():
                now = time.monotonic()
                self.poll()
                if self.progress is not None and now >= next_progress:
                    next_progress = now + self.progress_interval_s
                    line = self.progress(self)
                    if line:
                        print(line, file=sys.stderr, flush=True)
                self._stop_event.wait(self.interval_s)
        except BaseException as exc:  # a dead monitor must fail the drill, not hide
            self.error = exc
            with self.changed:
                self.changed.notify_all()

    def start_admin(self) -> None:
        """Poll the admin API from now on (once epoch 0 serves: before, it is not bound).

        Its own thread: an admin call waiting out a killed epoch's relaunch must not stop the
        process sampling, which is what sees the epochs come and go.
        """
        if self.admin is not None and self._admin_thread is None:
            self._admin_thread = threading.Thread(target=self._admin_loop, daemon=True,
                                                  name="drill-admin")
            self._admin_thread.start()

    def _admin_loop(self) -> None:
        while not self._stop_event.wait(self.admin_interval_s):
            self.poll_admin()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)
        if self._admin_thread is not None:
            self._admin_thread.join(15)
        self.poll()  # the last lines and processes

    # -- sampling --------------------------------------------------------------------
    def poll(self) -> None:
        events = self.tail.read()
        t = time.time()
        alive: list[int] = []
        try:
            children = self.agent.ps.children()
        except psutil.Error:
            children = []
        for c in children:
            try:
                if c.status() == psutil.STATUS_ZOMBIE:
                    continue
                epoch = epoch_of(c.cmdline())
                workers = c.children()
            except psutil.Error:
                continue
            if epoch is None:
                continue
            alive.append(epoch)
            life = self.lives.get(epoch)
            if life is None:
                life = self.lives[epoch] = EpochLife(epoch, c.pid, first_seen=t)
            for p in (c, *workers):
                if p.pid not in life.pids:
                    life.pids.add(p.pid)
                    self._procs[p.pid] = p
                    self._live_pids.add(p.pid)
            life.max_workers = max(life.max_workers, len(workers))
        for life in self.lives.values():
            if self._any_alive(life):
                life.last_alive = t
            if life.main_gone is None and not self._is_alive(life.main_pid):
                life.main_gone = t
        fds = self.agent.num_fds()
        with self.changed:
            for e in events:
                self._apply(e)
            self.events.extend(events)
            self.samples.append(ProcessSample(t, tuple(sorted(alive)), fds or 0))
            self.last_sample_t = t
            self.changed.notify_all()

    def _is_alive(self, pid: int) -> bool:
        if pid not in self._live_pids:
            return False
        p = self._procs[pid]
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.Error:
            pass
        self._live_pids.discard(pid)  # gone stays gone (is_running guards pid reuse)
        return False

    def _any_alive(self, life: EpochLife) -> bool:
        return any([self._is_alive(pid) for pid in life.pids])  # list: check (prune) every pid

    def _apply(self, e: LogEvent) -> None:
        if e.epoch is None:
            return
        if e.kind == "started":
            self.started.add(e.epoch)
            self.relaunch_pending = False
        elif e.kind == "serves":
            self.served.add(e.epoch)
        elif e.kind == "crashed":
            self.relaunch_pending = True
        elif e.kind == "reload_failed":
            self.failed_reloads.add(e.epoch)
        elif e.kind == "exited" and e.code is not None:
            self.ended[e.epoch] = e.code

    def poll_admin(self) -> None:
        assert self.admin is not None
        t = time.time()
        try:
            values = self.admin.counters(COUNTER_FILTER)
        except Exception as exc:  # recorded and judged: a scraper would have seen it too
            self.admin_errors.append((t, f"{type(exc).__name__}: {exc}"))
            return
        with self.changed:
            self.counter_samples.append(CounterSample(t, values))

    # -- what the scenario asks ------------------------------------------------------
    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self.changed:
            ok = self.changed.wait_for(lambda: predicate() or self.error is not None, timeout)
        if self.error is not None:
            raise RuntimeError(f"the drill's monitor died: {self.error!r}") from self.error
        return bool(ok) and predicate()

    def starting(self) -> set[int]:
        return self.started - self.served - set(self.ended)

    def quiescent(self) -> bool:
        """No epoch is starting or waiting to be relaunched, and one serves."""
        return (not self.starting() and not self.relaunch_pending
                and self.serving() is not None)

    def serving(self) -> int | None:
        """The newest epoch that served and has not exited."""
        live = [e for e in self.served if e not in self.ended]
        return max(live) if live else None

    def next_epoch(self) -> int:
        return max(self.started, default=-1) + 1

    def restarts_done(self) -> int:
        return len([e for e in self.served if e > 0])
