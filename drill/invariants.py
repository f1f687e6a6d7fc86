"""The drill's invariants, judged from its records after the fact (no I/O).

Rules, each with its reason:
1. No connection is ever refused: the listening sockets are handed over (and the agent keeps
   duplicates), so even a ``kill -9`` leaves the accept queue to the next epoch.
2. No request fails, except one whose connection was held by a process the drill killed with
   -9: the kill is the failure's cause, and such failures are counted apart. The proof is the
   client's local port among the victims' sockets, snapshotted just before the kill, on a
   connection established before it.
3. Counters read through the admin API never decrease: a process's counts outlive it.
4. At most ``MAX_EPOCHS`` epochs are alive; a fourth may exist for a moment while the oldest
   handles the SIGINT that ends it, hence a short grace.
5. An epoch's processes (main and workers) are gone by ``--parent-shutdown-time-s`` after its
   successor serves; a killed epoch's orphaned workers by their drain after it.
6. The agent's open fds do not grow: at one serving epoch, after the drill, no more than
   before.
7. The proxy's request counter agrees with what the drill saw answered.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from drill.model import (
    OK,
    REFUSED,
    CounterSample,
    EpochLife,
    KillRecord,
    ProcessSample,
    RequestRecord,
    Violation,
)

MAX_EPOCHS = 3
EPOCH_COUNT_GRACE_S = 1.0
CLOCK_SLACK_S = 0.05  # wall-clock stamps of the load threads and of the kill may disagree so much


@dataclass
class RequestVerdict:
    by_cause: dict[str, int] = field(default_factory=dict)  # raw causes of every failure
    killed_in_flight: int = 0
    unexplained: list[RequestRecord] = field(default_factory=list)
    refused: int = 0
    violations: list[Violation] = field(default_factory=list)


def excusing_kill(rec: RequestRecord, kills: Sequence[KillRecord],
                  window_s: float) -> KillRecord | None:
    """The kill that explains this failure, if any (rule 2).

    ``window_s`` bounds how long after a kill its victims' connections may still fail: a
    killed epoch's orphaned workers drain for a while before they exit.
    """
    if rec.cause in (OK, REFUSED) or not rec.port:
        return None
    end = rec.t + rec.latency
    for k in kills:
        if (rec.port in k.ports and rec.conn_t <= k.t + CLOCK_SLACK_S
                and k.t - CLOCK_SLACK_S <= end <= k.t + window_s):
            return k
    return None


def check_requests(records: Iterable[RequestRecord], kills: Sequence[KillRecord],
                   window_s: float) -> RequestVerdict:
    v = RequestVerdict()
    for rec in records:
        if rec.ok:
            continue
        v.by_cause[rec.cause] = v.by_cause.get(rec.cause, 0) + 1
        if rec.cause == REFUSED:
            v.refused += 1
        if excusing_kill(rec, kills, window_s) is not None:
            v.killed_in_flight += 1
        else:
            v.unexplained.append(rec)
    if v.refused:
        first = next(r for r in v.unexplained if r.cause == REFUSED)
        v.violations.append(Violation(
            "no connection refused",
            f"{v.refused} connection(s) refused, the first by mode {first.mode}", first.t))
    others: dict[str, list[RequestRecord]] = {}
    for r in v.unexplained:
        if r.cause != REFUSED:
            others.setdefault(r.cause, []).append(r)
    for cause, recs in sorted(others.items()):
        modes = sorted({r.mode for r in recs})
        v.violations.append(Violation(
            "no failed request but those killed in flight",
            f"{len(recs)} request(s) failed with {cause} (modes {', '.join(modes)}) on "
            f"connections no killed process held", recs[0].t))
    return v


def check_counters_monotonic(samples: Sequence[CounterSample]) -> list[Violation]:
    """Rule 3. A counter that vanishes after having counted is a decrease to zero."""
    out: list[Violation] = []
    last: dict[str, tuple[float, int]] = {}
    reported: set[str] = set()
    for s in samples:
        for name, (t_prev, prev) in last.items():
            now = s.values.get(name, 0)
            if now < prev and name not in reported:
                reported.add(name)  # one violation per counter is enough to act on
                out.append(Violation(
                    "counters monotonic",
                    f"{name} went from {prev} to {now} between "
                    f"t={t_prev:.3f} and t={s.t:.3f}", s.t))
        for name, value in s.values.items():
            if value >= last.get(name, (0.0, 0))[1]:
                last[name] = (s.t, value)
    return out


def check_epoch_count(samples: Sequence[ProcessSample], limit: int = MAX_EPOCHS,
                      grace_s: float = EPOCH_COUNT_GRACE_S) -> tuple[int, list[Violation]]:
    """Rule 4: (the most epochs seen alive at once, violations)."""
    most = max((len(s.epochs) for s in samples), default=0)
    out: list[Violation] = []
    over_since: float | None = None
    for s in samples:
        if len(s.epochs) > limit:
            if over_since is None:
                over_since = s.t
            elif s.t - over_since > grace_s:
                out.append(Violation(
                    f"at most {limit} epochs alive",
                    f"{len(s.epochs)} epochs alive ({', '.join(map(str, s.epochs))}) for "
                    f"more than {grace_s:g} s", over_since))
                over_since = None
                # keep looking: a later, separate excess is another violation
        else:
            over_since = None
    return most, out


@dataclass
class EpochExitVerdict:
    exit_after_successor_s: list[float] = field(default_factory=list)
    unchecked: list[int] = field(default_factory=list)  # the run ended before their deadline
    violations: list[Violation] = field(default_factory=list)


def check_old_epochs_gone(lives: Iterable[EpochLife], serves: dict[int, float],
                          parent_shutdown_s: float, orphan_s: float, slack_s: float,
                          observed_until: float) -> EpochExitVerdict:
    """Rule 5. ``serves`` maps each epoch to when the agent first logged it serving."""
    v = EpochExitVerdict()
    for life in sorted(lives, key=lambda x: x.epoch):
        successors = [e for e in serves if e > life.epoch]
        deadlines: list[tuple[float, str]] = []
        if successors:
            succ = min(successors)
            deadlines.append((serves[succ] + parent_shutdown_s + slack_s,
                              f"epoch {succ} served at {serves[succ]:.3f} + "
                              f"--parent-shutdown-time-s {parent_shutdown_s:g}"))
            v.exit_after_successor_s.append(max(0.0, life.last_alive - serves[succ]))
        if life.main_gone is not None:
            deadlines.append((life.main_gone + orphan_s + slack_s,
                              f"its main process was gone at {life.main_gone:.3f} + "
                              f"the workers' orphan drain {orphan_s:g} s"))
        if not deadlines:
            continue  # the serving epoch at the end
        deadline, why = min(deadlines)
        # Still alive at the last sample, before its deadline: the run ended too soon to tell.
        if life.last_alive >= observed_until and observed_until < deadline:
            v.unchecked.append(life.epoch)
            continue
        if life.last_alive > deadline:
            v.violations.append(Violation(
                "old epochs gone by parent-shutdown time",
                f"epoch {life.epoch} (pids {sorted(life.pids)}) was still alive at "
                f"{life.last_alive:.3f}, {life.last_alive - deadline + slack_s:.2f} s after "
                f"its deadline ({why})", life.last_alive))
    return v


def check_fds(before: int | None, after: int | None) -> list[Violation]:
    """Rule 6, both counted with one epoch serving."""
    if before is None or after is None or after <= before:
        return []
    return [Violation("agent fds not growing",
                      f"the agent held {before} fds before the drill and {after} after")]


@dataclass
class Continuity:
    proxy_count: int | None
    answered: int
    failed: int
    lost_with_kills: int = 0
    violations: list[Violation] = field(default_factory=list)


def check_continuity(proxy_count: int | None, answered: int, failed: int,
                     kills: int, name: str) -> Continuity:
    """Rule 7: ``answered`` <= the proxy's count <= ``answered + failed``.

    A request that failed may or may not have been counted. A SIGKILLed process loses what it
    had not flushed yet (up to a second's worth), so with kills only the upper bound holds
    and the shortfall is reported, not judged.
    """
    c = Continuity(proxy_count, answered, failed)
    if proxy_count is None:
        c.violations.append(Violation("counters continuity", f"{name} could not be read"))
        return c
    if proxy_count > answered + failed:
        c.violations.append(Violation(
            "counters continuity",
            f"{name} = {proxy_count}, more than the {answered + failed} requests the drill sent"))
    if proxy_count < answered:
        if kills:
            c.lost_with_kills = answered - proxy_count
        else:
            c.violations.append(Violation(
                "counters continuity",
                f"{name} = {proxy_count}, but {answered} requests were answered: "
                f"{answered - proxy_count} were not counted"))
    return c

