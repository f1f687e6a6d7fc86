"""What a drill records: plain frozen records, shared by the shells and the pure judges.

Times are wall-clock seconds (``time.time()``), because the agent's log lines carry wall-clock
timestamps and every record must line up with them; durations are measured with
``time.perf_counter()`` and stored as seconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime

# Request outcomes. A failure's cause says what the client saw; ``KILLED`` is given afterwards
# to failures on connections held by a process the drill killed with -9.
OK = "ok"
REFUSED = "refused"  # ECONNREFUSED: nothing listened, or the accept queue was closed
RESET = "reset"  # ECONNRESET / EPIPE: the peer reset the connection
CLOSED = "closed_without_response"  # the peer closed cleanly before (all of) the response
TIMEOUT = "timeout"
PROTOCOL = "protocol_error"
KILLED = "killed_in_flight"


def status_cause(status: int) -> str:
    return f"status_{status}"


@dataclass(frozen=True, slots=True)
class RequestRecord:
    t: float  # wall-clock start
    latency: float  # seconds, until the outcome was known
    mode: str  # the load mode's name
    cause: str  # OK or a failure cause
    port: int = 0  # the client's local port (0: never connected)
    conn_t: float = 0.0  # when that connection was established (wall clock)

    @property
    def ok(self) -> bool:
        return self.cause == OK


@dataclass(frozen=True, slots=True)
class KillRecord:
    """A ``kill -9`` the drill sent, with the client connections its victims held."""

    t: float
    target: str  # "worker", "newest epoch mid-handover", "oldest epoch mid-drain", ...
    epoch: int
    pids: tuple[int, ...]  # the killed process and, for an epoch, its workers at that moment
    ports: frozenset[int]  # local ports of the drill's connections those processes held


@dataclass(frozen=True, slots=True)
class LogEvent:
    t: float
    kind: str  # see LOG_PATTERNS
    epoch: int | None
    code: int | None = None  # exit code, where the line has one


@dataclass(frozen=True, slots=True)
class ProcessSample:
    t: float
    epochs: tuple[int, ...]  # epochs whose main process is alive (children of the agent)
    agent_fds: int


@dataclass(frozen=True, slots=True)
class CounterSample:
    t: float
    values: dict[str, int]


@dataclass(frozen=True, slots=True)
class Action:
    """One thing the scenario did, for the report and the plot."""

    t: float
    kind: str  # "hup", "kill", "config_flip", "broken_config", "upgrade", "concurrency", ...
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Violation:
    invariant: str
    detail: str
    t: float | None = None


@dataclass
class EpochLife:
    """The processes of one epoch as the monitor saw them."""

    epoch: int
    main_pid: int
    pids: set[int] = field(default_factory=set)  # main and every worker ever seen
    first_seen: float = 0.0
    last_alive: float = 0.0  # last sample where any of ``pids`` was alive
    main_gone: float | None = None  # first sample where the main process was gone
    max_workers: int = 0


# The agent's log: ``[2026-11-24 10:00:00.123][pid][LEVEL][agent] message`` (logging_setup).
LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\]\[(\d+)\]\[(\w+)\]\[(\w+)\] (.*)$")
LOG_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("hup_queued", re.compile(r"^SIGHUP while epoch (\d+) starts: queued")),
    ("restart_queued", re.compile(r"^queued SIGHUP: hot restart to epoch (\d+)")),
    ("restart", re.compile(r"^SIGHUP: hot restart to epoch (\d+)")),
    ("started", re.compile(r"^started epoch (\d+) \(pid \d+\)")),
    ("serves", re.compile(r"^epoch (\d+) serves")),
    ("reload_failed", re.compile(r"^reload failed: epoch (\d+) exited with (-?\d+)")),
    ("crashed", re.compile(r"^epoch (\d+) exited unexpectedly with (-?\d+)")),
    ("exited", re.compile(r"^epoch (\d+) \(pid \d+\) exited with (-?\d+)")),
    ("terminate_oldest", re.compile(r"^\d+ epochs alive: terminating epoch (\d+)")),
)


def parse_log_line(line: str) -> LogEvent | None:
    """The restart events in one line of the agent's log; None for anything else.

    Epochs share the agent's stdout, so only ``[agent]`` lines count: an epoch's own line
    could otherwise be taken for the agent's decision.
    """
    m = LINE.match(line.rstrip("\n"))
    if m is None or m.group(4) != "agent":
        return None
    t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
    message = m.group(5)
    for kind, pattern in LOG_PATTERNS:
        hit = pattern.match(message)
        if hit:
            code = int(hit.group(2)) if hit.lastindex and hit.lastindex >= 2 else None
            return LogEvent(t, kind, int(hit.group(1)), code)
    return None
