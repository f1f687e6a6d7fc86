"""``trioxy-agent``: the pilot-agent role. Launches proxy epochs and relays signals.

A thin shell around ``Restarter``: it reads signals with ``trio.open_signal_receiver``,
turns each into an event for the policy, and performs the actions the policy returns.
Every flag it does not know is passed to each epoch unchanged (trioxy's own flags). Each
epoch gets a pipe (``--ready-fd``) on which it says READY once its workers accept: that is
when a hot restart is complete and a queued SIGHUP may start the next one.

The agent also keeps a duplicate of every listening socket of the serving epoch (as
systemd's fd store does) and hands them to an epoch that has no parent to take them
from, one relaunched after a crash: the accept queue survives the crash, so clients
are delayed, never refused.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import trio

from proxy.server.hot_restart import (
    STORE,
    HotRestartError,
    ParentConnection,
    ParentHandlers,
    serve_children,
)
from proxy.server.stats_flush import AGENT_ROLE, flush_forever, open_slot
from proxy.stats import Store
from supervisor.restarter import Action, Exit, Log, Notify, Restarter, SignalEpoch, SpawnEpoch
from supervisor.sd_notify import Notifier, listen_fds

log = logging.getLogger("trioxy.agent")

_AGENT_COUNTERS = ("agent.reload_total", "agent.reload_failed", "agent.epoch_relaunch")

_SIGNALS = {
    signal.SIGHUP: "HUP",
    signal.SIGTERM: "TERM",
    signal.SIGINT: "INT",
    signal.SIGQUIT: "QUIT",
    signal.SIGUSR1: "USR1",
}


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="trioxy-agent",
        description="Supervise trioxy epochs; every other flag is passed to trioxy.",
    )
    p.add_argument("-l", "--log-level", default="info")
    p.add_argument("--base-id", type=int, default=0,
                   help="names the hot-restart sockets and the stats segment (default 0)")
    p.add_argument("--use-dynamic-base-id", action="store_true",
                   help="pick an unused base id (see --base-id-path)")
    p.add_argument("--base-id-path", help="write the base id in use to this file")
    p.add_argument("--pidfile", help="write the agent's pid here; refuse if a live agent has it")
    p.add_argument("--restart-backoff-max-s", type=float, default=30.0,
                   help="relaunch delays after crashes double from 0.5 s up to this")
    p.add_argument("--epoch-command", metavar="PATH",
                   help="run each epoch as PATH <flags> instead of this installation's trioxy;"
                        " resolved again at every spawn, so a binary upgrade is: repoint PATH"
                        " (a symlink or wrapper), then SIGHUP. Flags a wrapper appends win"
                        " (e.g. --concurrency)")
    ns, rest = p.parse_known_args(argv)
    return ns, rest + ["--log-level", ns.log_level]


class Agent:
    def __init__(self, epoch_args: list[str], base_id: int = 0,
                 backoff_max_s: float = 30.0, epoch_command: str | None = None) -> None:
        self.epoch_args = epoch_args
        self.epoch_command = epoch_command
        self.base_id = base_id
        self.policy = Restarter(backoff_max_s)
        self.procs: dict[int, Any] = {}
        self.exit_code: int | None = None
        self.store: dict[str, socket.socket] = {}  # the serving epoch's listening sockets
        self.notifier = Notifier()
        self._adopt_socket_activation()
        self.stats = Store()
        self.stats_writer: Any = None
        self._stat_base: dict[str, int] = {}

    def _open_stats(self) -> None:
        """The agent's own counters, in the stats segment beside the epochs'."""
        self.stats_writer = open_slot(self.base_id, 0, 0, AGENT_ROLE, 0, create=True)
        if self.stats_writer is not None:
            self.stats_writer.seed(self.stats)
        for name in _AGENT_COUNTERS:
            self._stat_base[name] = self.stats.counter(name).value

    def _update_stats(self) -> None:
        p = self.policy
        for name, value in (("agent.reload_total", p.reloads),
                            ("agent.reload_failed", p.reload_failures),
                            ("agent.epoch_relaunch", p.relaunches)):
            self.stats.counter(name).value = self._stat_base.get(name, 0) + value
        self.stats.gauge("agent.epochs_alive").set(len(p.live))

    def _adopt_socket_activation(self) -> None:
        """systemd socket activation: LISTEN_FDS sockets seed the store epoch 0 takes from."""
        from proxy.server.instance import address_key

        for sock in listen_fds():
            try:
                host, port = sock.getsockname()[:2]
            except OSError:
                continue
            self.store[address_key((host, port))] = sock
            log.info("socket activation: %s", address_key((host, port)))

    async def _run_epoch(self, epoch: int, delay_s: float, parent: int | None) -> None:
        if delay_s:
            await trio.sleep(delay_s)
        if self.policy.stopping is not None:
            # Stopped during the relaunch backoff: this epoch never starts.
            self._perform(self.policy.on_epoch_exit(epoch, 0))
            return
        ready_r, ready_w = os.pipe()
        # -P: never let the working directory shadow the installed package.
        command = [self.epoch_command] if self.epoch_command else [
            sys.executable, "-P", "-m", "proxy.cli"]
        argv = [
            *command, *self.epoch_args, "--base-id", str(self.base_id),
            "--restart-epoch", str(epoch), "--ready-fd", str(ready_w),
            "--parent-epoch", str(-1 if parent is None else parent),
        ]
        try:
            proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, pass_fds=[ready_w]
            )
        finally:
            os.close(ready_w)
        self.procs[epoch] = proc
        log.info("started epoch %d (pid %d)", epoch, proc.pid)
        self.nursery.start_soon(self._watch_ready, epoch, ready_r)
        rc = await proc.wait()
        del self.procs[epoch]
        log.info("epoch %d (pid %d) exited with %d", epoch, proc.pid, rc)
        self._perform(self.policy.on_epoch_exit(epoch, rc))

    async def _watch_ready(self, epoch: int, fd: int) -> None:
        stream = trio.lowlevel.FdStream(fd)
        buf = b""
        async with stream:
            while b"READY\n" not in buf:
                chunk = await stream.receive_some(64)
                if not chunk:
                    return  # exited before serving: on_epoch_exit tells the policy
                buf += chunk
        self._perform(self.policy.on_epoch_ready(epoch))
        await self._refresh_store(epoch)

    async def _refresh_store(self, epoch: int) -> None:
        """Keep duplicates of the serving epoch's listening sockets (and only those)."""

        def fetch() -> dict[str, socket.socket]:
            conn = ParentConnection.connect(self.base_id, epoch)
            if conn is None:
                return {}
            try:
                return conn.get_listen_sockets(None)
            finally:
                conn.close()

        try:
            fresh = await trio.to_thread.run_sync(fetch)
        except (HotRestartError, OSError) as exc:
            log.warning("could not keep epoch %d's listening sockets: %s", epoch, exc)
            return
        old, self.store = self.store, fresh
        for s in old.values():
            s.close()  # our duplicates only: the epochs hold their own

    def _store_handlers(self) -> ParentHandlers:
        return ParentHandlers(lambda: self.store, lambda: None, lambda: None)

    def _perform(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, SpawnEpoch):
                self.nursery.start_soon(self._run_epoch, a.epoch, a.delay_s, a.parent)
            elif isinstance(a, SignalEpoch):
                proc = self.procs.get(a.epoch)
                if proc is not None and proc.returncode is None:
                    proc.send_signal(getattr(signal, "SIG" + a.signal))
            elif isinstance(a, Exit):
                self.exit_code = a.code
                self.nursery.cancel_scope.cancel()
            elif isinstance(a, Log):
                log.info("%s", a.message)
            elif isinstance(a, Notify):
                self.notifier.notify(a.state)

    async def _claim_base_id(self, dynamic: bool) -> None:
        """Bind the socket store's address: the base id is ours only if that succeeds."""
        import random

        tries = 100 if dynamic else 1
        for attempt in range(tries):
            try:
                await self.nursery.start(
                    serve_children, self.base_id, STORE, self._store_handlers()
                )
                return
            except HotRestartError:
                if attempt == tries - 1:
                    raise
                self.base_id = random.randrange(1, 1 << 20)

    async def run(self, dynamic_base_id: bool = False, base_id_path: str | None = None) -> int:
        with trio.open_signal_receiver(*_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                try:
                    await self._claim_base_id(dynamic_base_id)
                except HotRestartError as exc:
                    log.critical("%s", exc)
                    return 2  # the epochs would collide too: a boot error
                if base_id_path:
                    await trio.Path(base_id_path).write_text(f"{self.base_id}\n")
                log.info("base id %d", self.base_id)
                self._open_stats()
                if self.stats_writer is not None:
                    nursery.start_soon(
                        flush_forever, self.stats_writer, self.stats, self._update_stats)
                self._perform(self.policy.on_start())
                async for signum in signals:
                    self._perform(self.policy.on_signal(_SIGNALS[signum]))
        return self.exit_code or 0


def main(argv: list[str] | None = None) -> int:
    # Until trio's receiver is installed, HUP and USR1 must not kill the agent.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    ns, epoch_args = _parse(sys.argv[1:] if argv is None else argv)
    from proxy.server.logging_setup import setup_logging

    setup_logging(ns.log_level, "agent")
    from supervisor import pidfile

    if ns.pidfile:
        try:
            pidfile.acquire(ns.pidfile)
        except (pidfile.PidFileError, OSError) as exc:
            log.critical("%s", exc)
            return 2
    agent = Agent(epoch_args, ns.base_id, ns.restart_backoff_max_s, ns.epoch_command)
    try:
        return trio.run(agent.run, ns.use_dynamic_base_id, ns.base_id_path)
    finally:
        if agent.stats_writer is not None:
            # Every epoch is gone: the stats segment has no one left to serve.
            from shm.segment import Segment

            Segment.unlink(agent.base_id)
        if ns.pidfile:
            pidfile.release(ns.pidfile)


if __name__ == "__main__":
    sys.exit(main())
