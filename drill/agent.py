"""The process side of a drill: trioxy-agent, how it launches epochs, its log, its admin API.

Launchers
---------
``trioxy-agent`` starts every epoch as ``sys.executable -m proxy.cli <flags>`` with the flags
it was given at start, and re-reads neither on SIGHUP. A binary upgrade by hot restart, or a
``--concurrency`` change, needs the agent to run something the drill can change between
restarts. Three launchers:

* ``plain``: the agent as it is; nothing can be switched (hup, chaos).
* ``epoch-command``: assumes ``trioxy-agent --epoch-command PATH`` (a program run, resolved
  anew for every epoch, instead of ``sys.executable -m proxy.cli``, with the same arguments:
  Envoy's hot-restarter runs its start script the same way). The drill points it at a script
  it rewrites atomically to switch the binary or add flags. Refused when the agent lacks it.
* ``shim``: works with today's agent. The agent is started through a symlink to the venv
  (``run/interp -> .venv``), so its ``sys.executable`` is ``run/interp/bin/python`` and each
  epoch is exec'd through that path. To switch, the drill repoints the link at a shim
  directory whose ``bin/python`` execs the chosen interpreter with the extra flags (and
  whose ``lib`` is the venv's, so the agent's own ``sys.path`` stays valid). A drill
  device, not a deployment method: it proves what the epochs can do before the agent can
  be told to do it.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from drill.model import LogEvent, parse_log_line

EPOCH_COMMAND_FLAG = "--epoch-command"


@dataclass(frozen=True)
class Target:
    """An installed trioxy an epoch can run: its interpreter, and its ``trioxy`` command."""

    label: str
    python: str
    trioxy: tuple[str, ...]  # argv prefix that runs trioxy's epoch CLI
    root: str  # the install's prefix (a venv): an epoch running it has this in its argv

    def runs(self, cmdline: list[str]) -> bool:
        """Whether a process's argv is this install's (paths compared unresolved: venv
        interpreters are symlinks to one base interpreter)."""
        prefix = self.root.rstrip("/") + "/"
        return any(arg.startswith(prefix) for arg in cmdline[:2])


def current_target() -> Target:
    """The trioxy the drill itself runs from."""
    return Target("this checkout", sys.executable, (sys.executable, "-m", "proxy.cli"),
                  sys.prefix)


def agent_supports(python: str, flag: str, cwd: Path) -> bool:
    r = subprocess.run([python, "-m", "supervisor.agent", "--help"], cwd=cwd,
                       capture_output=True, text=True, timeout=60)
    return flag in r.stdout


def _write_atomically(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)  # an epoch starting now sees the old file or the new, never half


class Launcher:
    kind = "plain"
    can_switch = False

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def agent_argv(self) -> list[str]:
        return [sys.executable, "-m", "supervisor.agent"]

    def switch(self, target: Target, extra: list[str]) -> None:
        raise RuntimeError(f"the {self.kind} launcher cannot change what epochs run")


class EpochCommandLauncher(Launcher):
    kind = "epoch-command"
    can_switch = True

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir)
        self.script = run_dir / "epoch-command"
        self.switch(current_target(), [])

    def agent_argv(self) -> list[str]:
        return [*super().agent_argv(), EPOCH_COMMAND_FLAG, str(self.script)]

    def switch(self, target: Target, extra: list[str]) -> None:
        _write_atomically(self.script, epoch_command_script(target, extra), 0o755)


def epoch_command_script(target: Target, extra: list[str]) -> str:
    """The program ``--epoch-command`` runs: the target's trioxy with the agent's arguments,
    then the drill's extra flags (argparse: the last of a repeated flag wins)."""
    argv = " ".join(shlex.quote(a) for a in target.trioxy)
    tail = " ".join(shlex.quote(a) for a in extra)
    return (f"#!/bin/sh\n# trioxy-drill: what the next epoch runs ({target.label}); rewritten "
            f"to switch.\nexec {argv} \"$@\"{' ' + tail if tail else ''}\n")


class ShimLauncher(Launcher):
    kind = "shim"
    can_switch = True

    def __init__(self, run_dir: Path, venv: Path | None = None) -> None:
        super().__init__(run_dir)
        self.venv = Path(venv or sys.prefix)
        if not (self.venv / "pyvenv.cfg").exists():
            raise RuntimeError(f"the shim launcher needs a venv; {self.venv} has no pyvenv.cfg")
        self.link = run_dir / "interp"
        self._n = 0
        self._point(self.venv)

    def _point(self, where: Path) -> None:
        tmp = self.run_dir / "interp.tmp"
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(where)
        os.replace(tmp, self.link)

    def agent_argv(self) -> list[str]:
        return [str(self.link / "bin" / "python"), "-m", "supervisor.agent"]

    def switch(self, target: Target, extra: list[str]) -> None:
        self._n += 1
        shim = self.run_dir / f"shim-{self._n}"
        (shim / "bin").mkdir(parents=True)
        (shim / "pyvenv.cfg").write_text((self.venv / "pyvenv.cfg").read_text())
        # The agent's sys.path names run/interp/lib/...: keep it resolving to our venv.
        (shim / "lib").symlink_to(self.venv / "lib")
        tail = " ".join(shlex.quote(a) for a in extra)
        _write_atomically(
            shim / "bin" / "python",
            f"#!/bin/sh\n# trioxy-drill shim: epochs run {target.label}\n"
            f"exec {shlex.quote(target.python)} \"$@\"{' ' + tail if tail else ''}\n", 0o755)
        self._point(shim)


@dataclass
class EpochProc:
    epoch: int
    proc: psutil.Process

    def workers(self) -> list[psutil.Process]:
        return _alive(self.proc.children())


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def epoch_of(cmdline: list[str]) -> int | None:
    if "--restart-epoch" in cmdline:
        i = cmdline.index("--restart-epoch")
        if i + 1 < len(cmdline) and cmdline[i + 1].lstrip("-").isdigit():
            return int(cmdline[i + 1])
    return None


@dataclass
class AgentProcess:
    argv: list[str]
    cwd: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _ps: psutil.Process | None = None
    seen_pids: dict[int, psutil.Process] = field(default_factory=dict)

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            # Its own session: a Ctrl-C meant for the drill must not reach the agent first;
            # the drill stops it in order.
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self._ps = psutil.Process(self.proc.pid)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def ps(self) -> psutil.Process:
        assert self._ps is not None
        return self._ps

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def epochs(self) -> dict[int, EpochProc]:
        out: dict[int, EpochProc] = {}
        try:
            children = _alive(self.ps.children())
        except psutil.Error:
            return out
        for c in children:
            try:
                epoch = epoch_of(c.cmdline())
            except psutil.Error:
                continue
            if epoch is not None:
                out[epoch] = EpochProc(epoch, c)
                self.seen_pids.setdefault(c.pid, c)
        return out

    def num_fds(self) -> int | None:
        try:
            return self.ps.num_fds()
        except psutil.Error:
            return None

    def stop(self, timeout: float) -> int | None:
        """SIGTERM (graceful drain of every epoch), then SIGKILL of the whole tree if stuck."""
        if self.proc is None:
            return None
        try:
            for p in self.ps.children(recursive=True):
                self.seen_pids.setdefault(p.pid, p)
        except psutil.Error:
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_tree()
        return self.proc.returncode

    def kill_tree(self) -> None:
        """Last resort: only the processes this agent started (its tree), by pid."""
        procs = list(self.seen_pids.values())
        try:
            procs += self.ps.children(recursive=True)
        except psutil.Error:
            pass
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for p in procs:
            try:
                if p.is_running():
                    p.kill()
            except psutil.Error:
                pass

    def leftovers(self, wait_s: float) -> list[int]:
        """Processes of the agent's tree still running ``wait_s`` after it exited."""
        deadline = time.monotonic() + wait_s
        while True:
            alive = []
            for pid, p in self.seen_pids.items():
                try:
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(pid)
                except psutil.Error:
                    pass
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)


class LogTail:
    """Reads the agent's log as it grows; yields its restart events."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def read(self) -> list[LogEvent]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        out = []
        for raw in lines:
            ev = parse_log_line(raw.decode("utf-8", "replace"))
            if ev is not None:
                out.append(ev)
        return out


class Admin:
    """Envoy's admin API over one short connection per call (a scraper's pattern)."""

    def __init__(self, host: str, port: int, timeout: float = 3.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout

    def get(self, path: str) -> tuple[int, bytes]:
        import http.client

        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def counters(self, regex: str) -> dict[str, int]:
        status, body = self.get("/stats?filter=" + urllib.parse.quote(regex, safe=""))
        if status != 200:
            raise RuntimeError(f"/stats answered {status}: {body[:200]!r}")
        out: dict[str, int] = {}
        for line in body.decode().splitlines():
            name, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out


def held_client_ports(procs: list[psutil.Process], listen_ports: set[int]) -> frozenset[int]:
    """Client ports of the connections these processes accepted on the drill's listeners."""
    ports: set[int] = set()
    for p in procs:
        try:
            conns = p.net_connections(kind="tcp")
        except psutil.Error:
            continue
        for c in conns:
            if c.raddr and c.laddr and c.laddr.port in listen_ports:
                ports.add(c.raddr.port)
    return frozenset(ports)
