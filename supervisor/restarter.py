"""The agent's restart policy: a pure object that turns events into actions.

The process shell (``agent.py``) feeds it events (start, a signal by name, an epoch's exit)
and performs the actions it returns. No I/O here, so every decision is unit-tested as is.

Signal meanings (one table, DESIGN §1):
  HUP        hot restart: start epoch N+1, which takes epoch N's sockets and drains it
  TERM       graceful: drain every epoch, then exit
  INT, QUIT  fast exit
  USR1       forwarded: reopen access logs
"""

from __future__ import annotations

from dataclasses import dataclass

# Exit codes of an epoch that mean "relaunching will not help" (proxy.server.options.ExitCode).
CONFIG_ERROR = 1
BOOT_ERROR = 2
HOT_RESTART_VERSION_MISMATCH = 65
ADMIN_QUIT = 3
FATAL_EXIT_CODES = frozenset({CONFIG_ERROR, BOOT_ERROR, HOT_RESTART_VERSION_MISMATCH, 64})

RELAUNCH_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class SpawnEpoch:
    epoch: int
    delay_s: float = 0.0
    parent: int | None = None  # the epoch to take sockets from (None: bind fresh)


@dataclass(frozen=True)
class SignalEpoch:
    epoch: int
    signal: str  # "TERM", "INT", "USR1", ...


@dataclass(frozen=True)
class Exit:
    code: int


@dataclass(frozen=True)
class Log:
    message: str


@dataclass(frozen=True)
class Notify:
    """An sd_notify state (READY=1, RELOADING=1, STOPPING=1, STATUS=...)."""

    state: str


Action = SpawnEpoch | SignalEpoch | Exit | Log | Notify


MAX_LIVE_EPOCHS = 3


class Restarter:
    """Events in (start, signal, an epoch ready, an epoch exited), actions out.

    Hot restart: HUP spawns epoch N+1, which takes the sockets from epoch N and tells it to
    drain. One restart runs at a time: a HUP while an epoch is starting is remembered, and
    any number of them coalesce into one more restart once it serves. At most
    ``MAX_LIVE_EPOCHS`` epochs live; starting another terminates the oldest.
    """

    def __init__(self, backoff_max_s: float = RELAUNCH_BACKOFF_S[-1]) -> None:
        self.backoff = tuple(min(d, backoff_max_s) for d in RELAUNCH_BACKOFF_S)
        self.live: set[int] = set()
        self.next_epoch = 0
        self.stopping: str | None = None  # "graceful" or "fast"
        self.crashes = 0
        self.exit_code = 0
        self.starting: int | None = None  # spawned, not serving yet
        self.serving: int | None = None  # the newest epoch that reported ready
        self.pending_restart = False
        self.reloads = 0
        self.reload_failures = 0
        self.relaunches = 0

    def on_start(self) -> list[Action]:
        return self._spawn()

    def _spawn(self, delay_s: float = 0.0) -> list[Action]:
        actions: list[Action] = []
        if len(self.live) >= MAX_LIVE_EPOCHS:
            oldest = min(self.live)
            actions.append(Log(f"{len(self.live)} epochs alive: terminating epoch {oldest}"))
            actions.append(SignalEpoch(oldest, "INT"))
        # The parent is the newest epoch alive: the serving one, or after a crash an older one
        # that still holds the listening sockets while it drains.
        parent = max(self.live) if self.live else None
        epoch = self.next_epoch
        self.next_epoch += 1
        self.live.add(epoch)
        self.starting = epoch
        actions.append(SpawnEpoch(epoch, delay_s, parent))
        return actions

    def on_signal(self, name: str) -> list[Action]:
        if name in ("TERM", "INT", "QUIT"):
            notify: list[Action] = []
            if self.stopping is None:
                self.stopping = "graceful" if name == "TERM" else "fast"
                notify = [Notify(f"STOPPING=1\nSTATUS=SIG{name}: stopping")]
            if not self.live:
                return [*notify, Exit(self.exit_code)]
            sig = "TERM" if name == "TERM" else "INT"
            return [*notify, *(SignalEpoch(e, sig) for e in sorted(self.live))]
        if name == "USR1":
            return [SignalEpoch(e, "USR1") for e in sorted(self.live)]
        if name == "HUP":
            if self.stopping is not None:
                return [Log("SIGHUP during shutdown: ignored")]
            if self.starting is not None:
                self.pending_restart = True
                return [Log(f"SIGHUP while epoch {self.starting} starts: queued")]
            self.reloads += 1
            return [
                Log(f"SIGHUP: hot restart to epoch {self.next_epoch}"),
                Notify(f"RELOADING=1\nSTATUS=reloading: starting epoch {self.next_epoch}"),
                *self._spawn(),
            ]
        return [Log(f"SIG{name}: ignored")]

    def on_epoch_ready(self, epoch: int) -> list[Action]:
        if epoch != self.starting:
            return []
        self.starting = None
        self.serving = epoch
        self.crashes = 0
        actions: list[Action] = [
            Log(f"epoch {epoch} serves"),
            Notify(f"READY=1\nSTATUS=epoch {epoch} serves; {self.reloads} reload(s), "
                   f"{self.reload_failures} failed"),
        ]
        if self.pending_restart and self.stopping is None:
            self.pending_restart = False
            self.reloads += 1
            actions += [Log(f"queued SIGHUP: hot restart to epoch {self.next_epoch}"),
                        *self._spawn()]
        return actions

    def on_epoch_exit(self, epoch: int, code: int) -> list[Action]:
        newest = max(self.live) if self.live else None
        self.live.discard(epoch)
        was_starting = epoch == self.starting
        if was_starting:
            self.starting = None
        if self.serving == epoch:
            self.serving = None
        if self.stopping is not None:
            return [] if self.live else [Exit(self.exit_code)]
        if code == ADMIN_QUIT and epoch == newest:
            # admin /quitquitquit on the serving epoch: the operator stops the service, as
            # pilot-agent exits when its Envoy does. Older epochs are told to drain too.
            self.stopping = "graceful"
            msg = f"epoch {epoch} exited on admin /quitquitquit: stopping"
            if not self.live:
                return [Log(msg), Notify(f"STOPPING=1\nSTATUS={msg}"), Exit(0)]
            return [Log(msg), Notify(f"STOPPING=1\nSTATUS={msg}"),
                    *(SignalEpoch(e, "TERM") for e in sorted(self.live))]
        if code in FATAL_EXIT_CODES:
            if self.live:
                # A failed reload: the epoch that was serving goes on serving.
                self.reload_failures += 1
                self.pending_restart = False
                msg = (f"reload failed: epoch {epoch} exited with {code}; epoch "
                       f"{max(self.live)} keeps serving (fix the config, then SIGHUP)")
                return [Log(msg), Notify(f"READY=1\nSTATUS={msg}")]
            self.exit_code = code
            return [Log(f"epoch {epoch} exited with {code}: not relaunching (fix the cause)"),
                    Exit(code)]
        if epoch != newest and self.live:
            return [Log(f"epoch {epoch} exited with {code}; epoch {max(self.live)} serves")]
        if code == 0 and not was_starting and self.live:
            return [Log(f"epoch {epoch} exited")]
        delay = self.backoff[min(self.crashes, len(self.backoff) - 1)]
        self.crashes += 1
        self.relaunches += 1
        return [
            Log(f"epoch {epoch} exited unexpectedly with {code}; relaunching in {delay:g} s"),
            *self._spawn(delay),
        ]
