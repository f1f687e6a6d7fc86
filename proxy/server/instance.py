"""The epoch's main process (Envoy's ``InstanceImpl``): config, sockets, workers, signals.

Theory of operation:
1. The config is loaded and compiled before anything is bound; a bad config exits with
   ``ExitCode.CONFIG_ERROR`` and touches nothing.
2. Listening sockets are bound here, once per listener, and shared by every worker (one
   accept queue per listener: a worker that dies leaves the queue intact for the others and
   for its replacement, and a later hot restart hands the very same sockets over).
3. Workers are started with fork+exec and receive the sockets as inherited fds and the
   serialized bootstrap on stdin. A worker that dies unexpectedly is replaced, with backoff,
   and counted (``server.worker_restarts``).
4. Signals: TERM drains (workers stop accepting at once and get ``--drain-time-s`` to finish),
   INT/QUIT exit fast, USR1 reopens access logs, HUP is the agent's (hot restart) and is
   logged and ignored by a lone epoch.
5. Hot restart (``hot_restart.py``): before binding, epoch N > 0 asks epoch N-1 for its
   listening sockets and binds only what it did not get; once its workers accept it tells
   the parent to drain, and after ``--parent-shutdown-time-s`` to terminate. Meanwhile this
   epoch answers epoch N+1 the same way. Then it tells the agent it serves (``--ready-fd``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from proxy.server.hot_restart import (
    STORE,
    HotRestartError,
    ParentConnection,
    ParentHandlers,
    VersionMismatch,
    serve_children,
)
from proxy.server.lifeline import watch_parent
from proxy.server.options import ExitCode, Options
from proxy.server.stats_flush import MAIN_ROLE, MAIN_SLOT, flush_forever, open_slot
from proxy.server.worker_control import ControlError, WorkerChannel
from proxy.stats import Store
from proxy.tls.context import days_until_first_cert_expiring as tls_cert_days

log = logging.getLogger("trioxy.main")

LISTEN_BACKLOG = 4096
STATS_INTERVAL_S = 5.0  # Envoy's default stats_flush_interval
WORKER_RESTART_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
WORKER_READY_TIMEOUT_S = 30.0


class BootError(Exception):
    """The epoch cannot start: a socket cannot be bound or a worker cannot start."""


def bind_listener(address: tuple[str, int]) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        host, port = address
        raise BootError(f"cannot bind listener {host}:{port}: {exc.strerror or exc}") from None
    return sock


@dataclass
class WorkerHandle:
    index: int
    process: Any = None
    restarts: int = 0
    ready: trio.Event = field(default_factory=trio.Event)
    channel: WorkerChannel | None = None


def address_key(address: tuple[str, int]) -> str:
    """How listening sockets are matched across a hot restart: (protocol, address)."""
    host, port = address
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def admin_key(address: tuple[str, int]) -> str:
    """The admin listener's key: never confused with a proxy listener on the same address."""
    return "admin+" + address_key(address)


def is_listening(sock: socket.socket) -> bool:
    """False for a socket that admin /drain_listeners shut down in an earlier epoch."""
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False


# Envoy's server.state values.
SERVER_STATES = {"LIVE": 0, "DRAINING": 1, "PRE_INITIALIZING": 2, "INITIALIZING": 3}


class Instance:
    def __init__(
        self,
        options: Options,
        snapshot: Any,
        serialized_bootstrap: bytes,
        parent: ParentConnection | None = None,
    ) -> None:
        self.options = options
        self.snapshot = snapshot
        self.serialized_bootstrap = serialized_bootstrap
        self.parent = parent
        self.sockets: list[socket.socket] = []
        self.keys: list[str] = []
        self.handed_over = 0
        self.workers = [WorkerHandle(i) for i in range(options.concurrency)]
        self.shutting_down = False
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.state = "PRE_INITIALIZING"
        self.health_check_failed = False
        self.admin_socket: socket.socket | None = None
        self.admin_server: Any = None
        self.stopped_listeners: set[int] = set()
        self.admin_draining = False
        self.exit_code = ExitCode.OK
        self._interval: Any = None
        self.loaded_at = time.time()
        self.stats = Store()
        self.stats_writer: Any = None
        if not options.disable_hot_restart:  # (stats are shared with later epochs)
            self.stats_writer = open_slot(
                options.base_id, options.restart_epoch, MAIN_SLOT, MAIN_ROLE, 0, create=True)
            if self.stats_writer is not None:
                self.stats_writer.seed(self.stats)
        self.stats.gauge("server.hot_restart_epoch").set(options.restart_epoch)
        self.stats.gauge("server.concurrency").set(options.concurrency)
        self._worker_restarts = self.stats.counter("server.worker_restarts")
        # Active health checking runs here, once per epoch; workers get the results.
        from proxy.upstream.health_check_manager import HealthCheckManager

        self.health_checks = HealthCheckManager(snapshot.clusters, self.stats,
                                                self._on_host_health,
                                                on_success=self._on_host_check_success)
        # (op, args) for every worker, in order: host_health, host_check_success.
        self._health_send, self._health_receive = trio.open_memory_channel[
            tuple[str, dict[str, Any]]](math.inf)

    # -- sockets ---------------------------------------------------------------------
    def listener_keys(self) -> list[str]:
        """Keys of the listeners a parent may hand over (an ephemeral port 0 never is)."""
        keys = [address_key(lc.address) for lc in self.snapshot.listeners if lc.address[1]]
        admin = self.snapshot.admin
        if admin is not None and admin.address[1]:
            keys.append(admin_key(admin.address))
        return keys

    def bind_all(self, inherited: dict[str, socket.socket] | None = None) -> None:
        inherited = dict(inherited or {})
        try:
            for lc in self.snapshot.listeners:
                key = address_key(lc.address)
                sock = self._take(inherited, key, lc.address)
                self.sockets.append(sock)
                self.keys.append(key)
            admin = self.snapshot.admin
            if admin is not None:
                try:
                    self.admin_socket = self._take(
                        inherited, admin_key(admin.address), admin.address)
                except BootError as exc:
                    raise BootError(f"admin: {exc}") from None
        except BootError:
            for s in self.sockets:
                s.close()
            raise
        finally:
            for s in inherited.values():
                s.close()  # a listener the new config dropped: the parent's copy stays open

    def _take(self, inherited: dict[str, socket.socket], key: str,
              address: tuple[str, int]) -> socket.socket:
        sock = inherited.pop(key, None) if address[1] else None
        if sock is not None and not is_listening(sock):
            sock.close()  # stopped by /drain_listeners in an earlier epoch: bind anew
            sock = None
        if sock is not None:
            sock.setblocking(False)
            self.handed_over += 1
            return sock
        return bind_listener(address)

    def sockets_for_child(self) -> dict[str, socket.socket]:
        out = {k: s for k, s in zip(self.keys, self.sockets, strict=True)
               if not k.endswith(":0") and is_listening(s)}
        admin = self.snapshot.admin
        if self.admin_socket is not None and admin is not None and admin.address[1]:
            out[admin_key(admin.address)] = self.admin_socket
        return out

    def bound_addresses(self) -> list[str]:
        out = []
        for s in self.sockets:
            host, port = s.getsockname()[:2]
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return out

    # -- workers ---------------------------------------------------------------------
    def _worker_argv(self, index: int) -> list[str]:
        argv = [
            sys.executable,
            "-P",  # the working directory must not shadow the installed package
            "-m",
            "proxy.server.worker",
            "--index",
            str(index),
            "--drain-time-s",
            str(self.options.drain_time_s),
            "--drain-strategy",
            self.options.drain_strategy.value,
            "--log-level",
            self.options.log_level,
            "--parent-pid",
            str(os.getpid()),
            "--base-id",
            str(self.options.base_id),
            "--epoch",
            str(self.options.restart_epoch),
            "--stats-slot",
            str(index + 1 if self.stats_writer is not None else -1),
            "--stats-region",
            str(self.stats_writer.region if self.stats_writer is not None else -1),
        ]
        for li, s in enumerate(self.sockets):
            argv += ["--listen-fd", f"{li}={s.fileno()}"]
        return argv

    async def _run_worker(self, handle: WorkerHandle, task_status: Any) -> None:
        """Keep one worker slot filled until shutdown; report when it first accepts."""
        started = False
        while True:
            # Answers come back on a pipe of their own: the worker's stdout stays the
            # process's (access logs may write there).
            answers_r, answers_w = os.pipe()
            try:
                proc = await trio.lowlevel.open_process(
                    [*self._worker_argv(handle.index), "--control-fd", str(answers_w)],
                    stdin=subprocess.PIPE,
                    pass_fds=[*(s.fileno() for s in self.sockets), answers_w],
                )
            except BaseException:
                os.close(answers_r)
                raise
            finally:
                os.close(answers_w)
            handle.process = proc
            assert proc.stdin is not None
            answers = trio.lowlevel.FdStream(answers_r)
            channel = handle.channel = WorkerChannel(proc.stdin, answers,
                                                     on_event=self._on_worker_event)
            async with trio.open_nursery() as n:
                n.start_soon(channel.read_loop)
                try:
                    await channel.send_bootstrap(self.serialized_bootstrap)
                    # The second frame: what the worker must know before it accepts.
                    await channel.send_bootstrap(json.dumps(
                        {"host_health": self.health_checks.snapshot()}).encode())
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                with trio.move_on_after(WORKER_READY_TIMEOUT_S):
                    await channel.ready.wait()
                if channel.ready.is_set():
                    handle.ready.set()
                    if not started:
                        started = True
                        task_status.started()
                    if self.health_check_failed:  # a replacement joins the failed state
                        n.start_soon(self._call_one, handle, "health_check",
                                     {"failed": True})
                    if self.health_checks:  # changes since the spawn-time frame
                        n.start_soon(self._call_one, handle, "host_health_snapshot",
                                     {"clusters": self.health_checks.snapshot()})
                elif proc.returncode is None:
                    log.error("worker %d did not start within %.0f s", handle.index,
                              WORKER_READY_TIMEOUT_S)
                    proc.kill()
                rc = await proc.wait()
                n.cancel_scope.cancel()
            await proc.stdin.aclose()
            await answers.aclose()
            if self.shutting_down:
                return
            if not started:
                raise BootError(f"worker {handle.index} exited with {rc} before accepting")
            self._worker_restarts.inc()
            delay = WORKER_RESTART_BACKOFF_S[min(handle.restarts, len(WORKER_RESTART_BACKOFF_S) - 1)]
            handle.restarts += 1
            log.warning(
                "worker %d (pid %d) exited with %s; restarting in %.1f s",
                handle.index, handle.process.pid, rc, delay,
            )
            handle.ready = trio.Event()
            await trio.sleep(delay)

    def _on_host_health(self, cluster: str, address: str, port: int, healthy: bool) -> None:
        """A checker saw a host's health change: queue it for every worker, in order."""
        self._health_send.send_nowait(("host_health", {
            "cluster": cluster, "address": address, "port": port, "healthy": healthy}))

    def _on_host_check_success(self, cluster: str, address: str, port: int) -> None:
        """A healthy host passed a check: workers un-eject it if outlier detection had."""
        self._health_send.send_nowait(("host_check_success", {
            "cluster": cluster, "address": address, "port": port}))

    def _on_worker_event(self, msg: dict[str, Any]) -> None:
        """An unsolicited line from a worker (``worker_control``)."""
        if msg.get("event") == "host_unhealthy":
            # x-envoy-immediate-health-check-fail: a PASSIVE failure of the host's session;
            # a change reaches every worker through _on_host_health.
            self.health_checks.set_unhealthy(str(msg["cluster"]), str(msg["address"]),
                                             int(msg["port"]))
        else:
            log.warning("unknown worker event %r", msg.get("event"))

    async def _send_host_health(self) -> None:
        async for op, args in self._health_receive:
            await self.worker_call(op, **args)

    async def _start_workers(self, nursery: trio.Nursery) -> None:
        """Start every worker at once (each costs an interpreter start and a config load:
        one after another, a restart with 4 workers took 4 times that)."""
        try:
            async with trio.open_nursery() as starting:
                for h in self.workers:
                    starting.start_soon(nursery.start, self._run_worker, h)
        except BaseExceptionGroup as group:
            boot = group.subgroup(BootError)
            if boot is not None:
                first: BaseException = boot
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                raise first from None
            raise

    def _signal_workers(self, signum: int) -> None:
        for h in self.workers:
            p = h.process
            if p is not None and p.returncode is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    async def _wait_workers(self, grace_s: float) -> None:
        with trio.move_on_after(grace_s):
            for h in self.workers:
                if h.process is not None:
                    await h.process.wait()
        for h in self.workers:
            if h.process is not None and h.process.returncode is None:
                h.process.kill()
                await h.process.wait()

    # -- shutdown ----------------------------------------------------------------------
    async def _drain_and_exit(self, why: str, grace_s: float) -> None:
        """Workers stop accepting now and finish within ``--drain-time-s``; then we exit."""
        if self.shutting_down:
            return
        self.shutting_down = True
        log.info("%s: draining for up to %.1f s", why, self.options.drain_time_s)
        self._signal_workers(signal.SIGTERM)
        await self._wait_workers(grace_s)
        self.nursery.cancel_scope.cancel()

    async def _fast_exit(self, why: str) -> None:
        self.shutting_down = True
        log.info("%s: exiting now", why)
        self._signal_workers(signal.SIGINT)
        await self._wait_workers(2.0)
        self.nursery.cancel_scope.cancel()

    def _server_gauges(self) -> None:
        s = self.stats
        s.gauge("server.uptime").set(int(time.monotonic() - self.started))
        state = self.server_state()
        s.gauge("server.state").set(SERVER_STATES[state])
        s.gauge("server.live").set(1 if state == "LIVE" else 0)
        s.gauge("server.days_until_first_cert_expiring").set(tls_cert_days(self.snapshot))

    # -- what the admin API asks (proxy.admin.context.AdminContext) -------------------
    def server_state(self) -> str:
        if self.state != "LIVE":
            return self.state
        return "DRAINING" if self.shutting_down or self.health_check_failed else "LIVE"

    def uptime_current_s(self) -> float:
        return time.monotonic() - self.started

    def uptime_all_s(self) -> float:
        first = self.started_wall
        if self.stats_writer is not None:  # the segment was made by epoch 0 (or the agent)
            first = min(first, float(self.stats_writer.seg.header().get("created", first)))
        return max(0.0, time.time() - first)

    def processes(self) -> list[tuple[str, int]]:
        out = [("main", os.getpid())]
        for h in self.workers:
            p = h.process
            if p is not None and p.returncode is None:
                out.append((f"worker {h.index}", p.pid))
        return out

    def listener_addresses(self) -> list[tuple[str, str, bool]]:
        return [(lc.name, addr, i in self.stopped_listeners) for i, (lc, addr) in
                enumerate(zip(self.snapshot.listeners, self.bound_addresses(), strict=True))]

    async def _call_one(self, h: WorkerHandle, op: str, args: dict[str, Any],
                        wait_s: float = 2.0) -> Any:
        if h.channel is None:
            raise ControlError("worker is not running")
        return await h.channel.call(op, wait_s, **args)

    async def worker_call(self, op: str, wait_s: float = 2.0, **args: Any) -> dict[int, Any]:
        answers: dict[int, Any] = {}

        async def one(h: WorkerHandle) -> None:
            try:
                answers[h.index] = await self._call_one(h, op, args, wait_s)
            except ControlError as exc:
                log.warning("worker %d: %s: %s", h.index, op, exc)

        async with trio.open_nursery() as n:
            for h in self.workers:
                if h.channel is not None and h.ready.is_set():
                    n.start_soon(one, h)
        return answers

    async def current_stats(self) -> Any:
        from shm.stats_block import Stats, add_histograms, read_stats

        self._server_gauges()
        if self.stats_writer is not None:
            await self.worker_call("flush", wait_s=0.5)
            self.stats_writer.flush(self.stats)
            return await trio.to_thread.run_sync(read_stats, self.stats_writer.seg)
        # No shared memory (--disable-hot-restart): this epoch's live processes only.
        out = Stats()
        stores = [self.stats.as_data(), *(await self.worker_call("stats")).values()]
        for d in stores:
            for name, v in d["counters"].items():
                out.counters[name] = out.counters.get(name, 0) + v
            for name, v in d["gauges"].items():
                out.gauges[name] = out.gauges.get(name, 0) + v
            for name, (counts, total, n) in d["histograms"].items():
                prev = out.histograms.get(name)
                value = (list(counts), total, n)
                out.histograms[name] = value if prev is None else add_histograms(prev, value)
        return out

    def histogram_interval(self) -> Any:
        return self._interval

    async def _track_intervals(self) -> None:
        """Envoy's interval quantiles: histogram deltas over each stats flush interval."""
        from shm.stats_block import Stats

        last: dict[str, Any] = {}
        while True:
            await trio.sleep(STATS_INTERVAL_S)
            stats = await self.current_stats()
            self.health_checks.note_traffic(stats.counters)
            cur = stats.histograms
            delta = Stats()
            for name, (counts, total, n) in cur.items():
                p = last.get(name)
                if p is None:
                    delta.histograms[name] = (counts, total, n)
                else:
                    delta.histograms[name] = (
                        [max(0, a - b) for a, b in zip(counts, p[0], strict=True)],
                        total - p[1], max(0, n - p[2]))
            last = cur
            self._interval = delta

    async def reset_counters(self) -> None:
        from shm.stats_block import reset_dead_counters

        await self.worker_call("reset_counters")
        for c in self.stats.counters.values():
            c.value = 0
        if self.stats_writer is not None:
            self.stats_writer.flush(self.stats)
            await trio.to_thread.run_sync(reset_dead_counters, self.stats_writer.seg)

    async def set_health_check_failed(self, failed: bool) -> None:
        self.health_check_failed = failed
        log.warning("admin: health checks now %s", "FAIL" if failed else "pass")
        await self.worker_call("health_check", failed=failed)

    async def drain_listeners(self, *, graceful: bool, inbound_only: bool,
                              skip_exit: bool) -> None:
        chosen = [i for i, lc in enumerate(self.snapshot.listeners)
                  if not inbound_only or lc.traffic_direction == "INBOUND"]
        if not graceful:
            await self._stop_listeners(chosen)
            return
        if self.state == "LIVE" and not self.admin_draining:
            self.admin_draining = True
            self.state = "DRAINING"
            log.info("admin: draining %d listener(s) for %.1f s", len(chosen),
                     self.options.drain_time_s)
            await self.worker_call("drain")

            async def stop_later() -> None:
                await trio.sleep(self.options.drain_time_s)
                if not skip_exit:
                    await self._stop_listeners(chosen)

            self.nursery.start_soon(stop_later)

    async def _stop_listeners(self, chosen: list[int]) -> None:
        """Stop accepting, then shut the sockets down so clients are refused rather than
        left queued. The socket is shared with the agent's store and later epochs: a
        stopped one is not handed over (``sockets_for_child``) and is bound anew."""
        chosen = [i for i in chosen if i not in self.stopped_listeners]
        if not chosen:
            return
        await self.worker_call("stop_accepting", listeners=chosen)
        for i in chosen:
            self.stopped_listeners.add(i)
            try:
                self.sockets[i].shutdown(socket.SHUT_RDWR)
            except OSError as exc:
                log.warning("could not stop listener %s: %s", self.keys[i], exc)
        log.info("admin: stopped %d listener(s)", len(chosen))

    def quit(self) -> None:
        self.exit_code = ExitCode.ADMIN_QUIT
        self.nursery.start_soon(self._drain_and_exit, "/quitquitquit",
                                self.options.drain_time_s + 5.0)

    async def set_log_level(self, level: str, logger: str | None) -> None:
        from proxy.server.logging_setup import set_log_level

        set_log_level(level, logger)
        await self.worker_call("log_level", level=level, logger=logger)

    async def _serve_admin(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from proxy.admin.admin import Admin
        from proxy.admin.clusters_handler import register as register_clusters
        from proxy.admin.server_handler import register as register_server
        from proxy.admin.stats_handler import register as register_stats

        assert self.admin_socket is not None and self.snapshot.admin is not None
        admin = Admin(self.snapshot.admin.access_logs)
        register_stats(admin, self)
        register_clusters(admin, self)
        register_server(admin, self)
        self.admin_server = admin
        sock = trio.socket.from_stdlib_socket(self.admin_socket.dup())
        with sock:
            await admin.serve(sock, task_status=task_status)

    def _on_child_drain(self) -> None:
        # The child serves admin from now on (it took the admin socket over).
        if self.admin_server is not None:
            self.admin_server.stop_accepting()
        # The child bounds our life with Terminate at --parent-shutdown-time-s; this is a
        # backstop should that message never come.
        grace = self.options.parent_shutdown_time_s + 5.0
        self.nursery.start_soon(self._drain_and_exit, "hot restart", grace)

    def _on_child_terminate(self) -> None:
        self.nursery.start_soon(self._fast_exit, "hot restart: parent shutdown time")

    async def _terminate_parent_later(self) -> None:
        assert self.parent is not None
        await trio.sleep(self.options.parent_shutdown_time_s)
        self.parent.terminate()
        self.parent.close()

    def _notify_ready(self) -> None:
        fd = self.options.ready_fd
        if fd is None:
            return
        try:
            os.write(fd, b"READY\n")
            os.close(fd)
        except OSError as exc:
            log.warning("could not tell the agent this epoch serves: %s", exc)

    # -- main loop -------------------------------------------------------------------
    async def run(self) -> int:
        opts = self.options
        with trio.open_signal_receiver(
            signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGHUP
        ) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    if self.stats_writer is not None:
                        nursery.start_soon(
                            flush_forever, self.stats_writer, self.stats, self._server_gauges)
                    if opts.ready_fd is not None:  # started by the agent: never outlive it
                        nursery.start_soon(
                            watch_parent, os.getppid(),
                            lambda: nursery.start_soon(self._fast_exit, "the agent is gone"),
                        )
                    if not opts.disable_hot_restart:
                        handlers = ParentHandlers(
                            self.sockets_for_child, self._on_child_drain, self._on_child_terminate
                        )
                        try:
                            await nursery.start(
                                serve_children, opts.base_id, opts.restart_epoch, handlers
                            )
                        except HotRestartError as exc:
                            raise BootError(str(exc)) from None
                    self.state = "INITIALIZING"
                    if self.health_checks:
                        # Envoy's cluster warming: each host's first check before serving.
                        nursery.start_soon(self._send_host_health)
                        await nursery.start(self.health_checks.run)
                    await self._start_workers(nursery)
                    self.state = "LIVE"
                    if self.admin_socket is not None:
                        # Only now: until the workers accept, the parent (if any) keeps
                        # answering admin requests on the same socket.
                        await nursery.start(self._serve_admin)
                    nursery.start_soon(self._track_intervals)
                    log.info(
                        "trioxy epoch %d ready: %d worker(s), listening on %s%s",
                        opts.restart_epoch,
                        len(self.workers),
                        ", ".join(self.bound_addresses()) or "nothing",
                        (f" ({self.handed_over} socket(s) from epoch {opts.parent_epoch})"
                         if self.parent is not None
                         else f" ({self.handed_over} socket(s) from the agent's store)")
                        if self.handed_over else "",
                    )
                    if self.parent is not None:
                        self.parent.drain_listeners()
                        nursery.start_soon(self._terminate_parent_later)
                    self._notify_ready()
                    async for signum in signals:
                        if signum == signal.SIGUSR1:
                            self._signal_workers(signal.SIGUSR1)
                            continue
                        if signum == signal.SIGHUP:
                            log.info("SIGHUP: hot restart is run by trioxy-agent; ignored")
                            continue
                        if signum == signal.SIGTERM:
                            nursery.start_soon(
                                self._drain_and_exit, "SIGTERM", opts.drain_time_s + 5.0
                            )
                        else:
                            nursery.start_soon(self._fast_exit, signal.Signals(signum).name)
            except BootError:
                self.shutting_down = True
                self._signal_workers(signal.SIGKILL)
                raise
            finally:
                for s in self.sockets:
                    s.close()
                if self.admin_socket is not None:
                    self.admin_socket.close()
                if self.parent is not None:
                    self.parent.close()
        return self.exit_code


def serve(options: Options, snapshot: Any, bootstrap: Any) -> int:
    parent: ParentConnection | None = None
    inherited: dict[str, socket.socket] = {}
    inst = Instance(options, snapshot, bootstrap.SerializeToString())
    if options.parent_epoch is not None and not options.disable_hot_restart:
        try:
            parent = ParentConnection.connect(options.base_id, options.parent_epoch)
            if parent is not None:
                inherited = parent.get_listen_sockets(inst.listener_keys())
        except VersionMismatch as exc:
            log.critical("hot restart refused, the running epoch keeps serving: %s", exc)
            return ExitCode.HOT_RESTART_VERSION_MISMATCH
        except (HotRestartError, OSError) as exc:
            log.critical("hot restart failed, the running epoch keeps serving: %s", exc)
            return ExitCode.BOOT_ERROR
    if parent is None and options.ready_fd is not None and not options.disable_hot_restart:
        # No epoch to take over from (a relaunch after a crash): the agent keeps
        # duplicates of the listening sockets, with their accept queues.
        try:
            store = ParentConnection.connect(options.base_id, STORE)
            if store is not None:
                inherited = store.get_listen_sockets(inst.listener_keys())
                store.close()
        except (HotRestartError, OSError) as exc:
            log.warning("the agent's socket store did not answer (%s); binding", exc)
    inst.parent = parent
    try:
        inst.bind_all(inherited)
        return trio.run(inst.run)
    except BootError as exc:
        log.critical("%s", exc)
        return ExitCode.BOOT_ERROR

