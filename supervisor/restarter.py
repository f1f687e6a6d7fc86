"""The agent's restart policy: a pure object that turns events into actions.

The process shell (``agent.py``) feeds it events (start, a signal by name, an epoch's exit)
and performs the actions it returns. No I/O here, so every decision is unit-tested as is.

Signal meanings (one table, DESIGN §1):
  HUP        hot restart: start epoch N+1 (the next issue adds the socket handover)
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
FATAL_EXIT_CODES = frozenset({CONFIG_ERROR, BOOT_ERROR, HOT_RESTART_VERSION_MISMATCH, 64})

RELAUNCH_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class SpawnEpoch:
    epoch: int
    delay_s: float = 0.0


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


Action = SpawnEpoch | SignalEpoch | Exit | Log


class Restarter:
    def __init__(self) -> None:
        self.live: set[int] = set()
        self.next_epoch = 0
        self.stopping: str | None = None  # "graceful" or "fast"
        self.crashes = 0
        self.exit_code = 0

    def on_start(self) -> list[Action]:
        return [self._spawn()]

    def _spawn(self, delay_s: float = 0.0) -> SpawnEpoch:
        epoch = self.next_epoch
        self.next_epoch += 1
        self.live.add(epoch)
        return SpawnEpoch(epoch, delay_s)

    def on_signal(self, name: str) -> list[Action]:
        if name in ("TERM", "INT", "QUIT"):
            if self.stopping is None:
                self.stopping = "graceful" if name == "TERM" else "fast"
            if not self.live:
                return [Exit(self.exit_code)]
            sig = "TERM" if name == "TERM" else "INT"
            return [SignalEpoch(e, sig) for e in sorted(self.live)]
        if name == "USR1":
            return [SignalEpoch(e, "USR1") for e in sorted(self.live)]
        if name == "HUP":
            return [Log("SIGHUP: hot restart arrives with the hot-restart issue; ignored")]
        return [Log(f"SIG{name}: ignored")]

    def on_epoch_exit(self, epoch: int, code: int) -> list[Action]:
        self.live.discard(epoch)
        if self.stopping is not None:
            return [] if self.live else [Exit(self.exit_code)]
        if code in FATAL_EXIT_CODES:
            self.exit_code = code
            actions: list[Action] = [
                Log(f"epoch {epoch} exited with {code}: not relaunching (fix the cause)")
            ]
            if not self.live:
                actions.append(Exit(code))
            return actions
        if self.live:
            return [Log(f"epoch {epoch} exited with {code}; a newer epoch is serving")]
        delay = RELAUNCH_BACKOFF_S[min(self.crashes, len(RELAUNCH_BACKOFF_S) - 1)]
        self.crashes += 1
        return [
            Log(f"epoch {epoch} exited unexpectedly with {code}; relaunching in {delay:g} s"),
            self._spawn(delay),
        ]
