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
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import trio

from proxy.server.options import ExitCode, Options

log = logging.getLogger("trioxy.main")

LISTEN_BACKLOG = 4096
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


class Instance:
    def __init__(self, options: Options, snapshot: Any, serialized_bootstrap: bytes) -> None:
        self.options = options
        self.snapshot = snapshot
        self.serialized_bootstrap = serialized_bootstrap
        self.sockets: list[socket.socket] = []
        self.workers = [WorkerHandle(i) for i in range(options.concurrency)]
        self.shutting_down = False
        self.worker_restarts = 0

    # -- sockets ---------------------------------------------------------------------
    def bind_all(self) -> None:
        try:
            for lc in self.snapshot.listeners:
                self.sockets.append(bind_listener(lc.address))
        except BootError:
            for s in self.sockets:
                s.close()
            raise

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
        ]
        for li, s in enumerate(self.sockets):
            argv += ["--listen-fd", f"{li}={s.fileno()}"]
        return argv

    async def _start_worker(self, handle: WorkerHandle) -> None:
        proc = await trio.lowlevel.open_process(
            self._worker_argv(handle.index),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=[s.fileno() for s in self.sockets],
        )
        handle.process = proc
        assert proc.stdin is not None and proc.stdout is not None
        try:
            await proc.stdin.send_all(self.serialized_bootstrap)
        except trio.BrokenResourceError:
            pass
        finally:
            await proc.stdin.aclose()
        buf = b""
        with trio.move_on_after(WORKER_READY_TIMEOUT_S):
            while b"READY\n" not in buf:
                chunk = await proc.stdout.receive_some(64)
                if not chunk:
                    break
                buf += chunk
        if b"READY\n" in buf:
            handle.ready.set()

    async def _run_worker(self, handle: WorkerHandle, task_status: Any) -> None:
        """Keep one worker slot filled until shutdown; report when it first accepts."""
        started = False
        while True:
            await self._start_worker(handle)
            if handle.ready.is_set() and not started:
                started = True
                task_status.started()
            rc = await handle.process.wait()
            if self.shutting_down:
                return
            if not started:
                raise BootError(f"worker {handle.index} exited with {rc} before accepting")
            self.worker_restarts += 1
            delay = WORKER_RESTART_BACKOFF_S[min(handle.restarts, len(WORKER_RESTART_BACKOFF_S) - 1)]
            handle.restarts += 1
            log.warning(
                "worker %d (pid %d) exited with %s; restarting in %.1f s",
                handle.index, handle.process.pid, rc, delay,
            )
            handle.ready = trio.Event()
            await trio.sleep(delay)

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

    # -- main loop -------------------------------------------------------------------
    async def run(self) -> int:
        with trio.open_signal_receiver(
            signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGHUP
        ) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    for h in self.workers:
                        await nursery.start(self._run_worker, h)
                    log.info(
                        "trioxy epoch %d ready: %d worker(s), listening on %s",
                        self.options.restart_epoch,
                        len(self.workers),
                        ", ".join(self.bound_addresses()) or "nothing",
                    )
                    async for signum in signals:
                        if signum == signal.SIGUSR1:
                            self._signal_workers(signal.SIGUSR1)
                            continue
                        if signum == signal.SIGHUP:
                            log.info("SIGHUP: hot restart is run by trioxy-agent; ignored")
                            continue
                        self.shutting_down = True
                        if signum == signal.SIGTERM:
                            log.info("SIGTERM: draining for up to %.1f s", self.options.drain_time_s)
                            self._signal_workers(signal.SIGTERM)
                            await self._wait_workers(self.options.drain_time_s + 5.0)
                        else:
                            log.info("%s: exiting now", signal.Signals(signum).name)
                            self._signal_workers(signal.SIGINT)
                            await self._wait_workers(2.0)
                        nursery.cancel_scope.cancel()
                        break
            except BootError:
                self.shutting_down = True
                self._signal_workers(signal.SIGKILL)
                raise
            finally:
                for s in self.sockets:
                    s.close()
        return ExitCode.OK


def serve(options: Options, snapshot: Any, bootstrap: Any) -> int:
    inst = Instance(options, snapshot, bootstrap.SerializeToString())
    try:
        inst.bind_all()
        return trio.run(inst.run)
    except BootError as exc:
        log.critical("%s", exc)
        return ExitCode.BOOT_ERROR
