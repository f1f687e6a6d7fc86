"""From a drill's records to its report: figures, invariant verdicts and a text summary.

Pure: ``build_report(RunData)`` returns a JSON-ready dict, ``render_text`` a summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from drill import invariants
from drill.metrics import in_windows, per_second, percentile, summarize
from drill.model import (
    RESET,
    Action,
    CounterSample,
    EpochLife,
    KillRecord,
    LogEvent,
    ProcessSample,
    RequestRecord,
    Violation,
)


@dataclass
class Handover:
    """One new epoch: started by a SIGHUP (maybe queued behind another) or a relaunch."""

    epoch: int
    kind: str  # "hup", "hup (queued)", "relaunch"
    t_signal: float  # the HUP the agent saw first for it, or the crash it replaces
    t_spawn: float
    t_serves: float | None = None
    outcome: str = "serving"  # or why it never served

    @property
    def spawn_to_serving(self) -> float | None:
        return None if self.t_serves is None else self.t_serves - self.t_spawn

    @property
    def signal_to_serving(self) -> float | None:
        return None if self.t_serves is None else self.t_serves - self.t_signal


def handovers(events: Sequence[LogEvent]) -> list[Handover]:
    """Pair the agent's restart decisions with the epochs' serving, from its log events."""
    out: dict[int, Handover] = {}
    first_queued: float | None = None  # the first HUP queued since the last spawn
    last_crash: float | None = None
    for e in sorted(events, key=lambda x: x.t):
        if e.epoch is None:
            continue
        if e.kind == "hup_queued":
            if first_queued is None:
                first_queued = e.t
        elif e.kind == "restart":
            out[e.epoch] = Handover(e.epoch, "hup", e.t, e.t)
        elif e.kind == "restart_queued":
            out[e.epoch] = Handover(e.epoch, "hup (queued)",
                                    first_queued if first_queued is not None else e.t, e.t)
            first_queued = None
        elif e.kind == "crashed":
            last_crash = e.t
        elif e.kind == "started" and e.epoch not in out and e.epoch > 0:
            out[e.epoch] = Handover(e.epoch, "relaunch",
                                    last_crash if last_crash is not None else e.t, e.t)
            last_crash = None
        elif e.kind == "serves":
            h = out.get(e.epoch)
            if h is not None and h.t_serves is None:
                h.t_serves = e.t
        elif e.kind in ("reload_failed", "exited", "crashed"):
            h = out.get(e.epoch)
            if h is not None and h.t_serves is None and h.outcome == "serving":
                h.outcome = f"exited with {e.code} before serving"
    return [out[k] for k in sorted(out)]


@dataclass
class RunData:
    scenario: str
    settings: dict[str, Any]
    t0: float  # the load started
    t_end: float  # the load stopped
    requests: list[RequestRecord]
    kills: list[KillRecord]
    events: list[LogEvent]
    process_samples: list[ProcessSample]
    counter_samples: list[CounterSample]
    epoch_lives: list[EpochLife]
    actions: list[Action]
    fds_before: int | None
    fds_after: int | None
    final_counters: dict[str, int] | None
    rq_counter: str  # the HTTP listener's downstream_rq_total, for continuity
    http_modes: frozenset[str]  # load modes whose requests pass that listener
    drain_time_s: float
    parent_shutdown_s: float
    observed_until: float  # the monitor's last sample
    orphan_s: float = 2.0  # how long a killed epoch's workers may drain (worker.py)
    exit_slack_s: float = 1.5  # process exit and the monitor's sampling, on a busy machine
    runner_violations: list[Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    admin_errors: list[tuple[float, str]] = field(default_factory=list)
    skipped_modes: dict[str, str] = field(default_factory=dict)
    agent_exit_code: int | None = None
    leftover_pids: list[int] = field(default_factory=list)
    failure_examples: dict[str, str] = field(default_factory=dict)  # cause -> first error
    # Modes whose latency is the upstream's deliberate delay: kept out of latency figures.
    delayed_modes: frozenset[str] = frozenset({"http1-slow"})


def _latency_series(reqs: Sequence[RequestRecord], t0: float, t1: float) -> list[float | None]:
    """p99 of the successful requests started in each second (None: none)."""
    bins: list[list[float]] = [[] for _ in per_second([], t0, t1)]
    for r in reqs:
        i = int(r.t - t0)
        if r.ok and 0 <= i < len(bins):
            bins[i].append(r.latency)
    out = []
    for b in bins:
        p = percentile(b, 99)
        out.append(None if p is None else round(p * 1000, 2))
    return out


def _ms(values: Sequence[float]) -> dict[str, float | int | None]:
    return summarize(values, scale=1000.0, digits=2)


def build_report(run: RunData) -> dict[str, Any]:
    violations: list[Violation] = list(run.runner_violations)
    reqs = run.requests
    kill_window = run.drain_time_s + run.orphan_s + run.exit_slack_s

    verdict = invariants.check_requests(reqs, run.kills, kill_window)
    violations += verdict.violations
    by_mode: dict[str, dict[str, int]] = {}
    for r in reqs:
        m = by_mode.setdefault(r.mode, {"sent": 0, "ok": 0, "failed": 0})
        m["sent"] += 1
        m["ok" if r.ok else "failed"] += 1
    ok = sum(1 for r in reqs if r.ok)
    duration = max(1e-9, run.t_end - run.t0)

    hos = handovers(run.events)
    served = [h for h in hos if h.t_serves is not None]
    restarts = [h for h in served if h.kind != "relaunch"]
    relaunches = [h for h in served if h.kind == "relaunch"]
    windows = [(h.t_signal, h.t_serves + run.drain_time_s) for h in served
               if h.t_serves is not None]
    timed = [r for r in reqs if r.ok and r.mode not in run.delayed_modes]
    ok_steady = [r.latency for r in timed if not in_windows(r.t, windows)]
    ok_handover = [r.latency for r in timed if in_windows(r.t, windows)]
    steady, during = _ms(ok_steady), _ms(ok_handover)

    def added(q: str) -> float | None:
        a, b = during[q], steady[q]
        return None if a is None or b is None else round(float(a) - float(b), 2)

    violations += invariants.check_counters_monotonic(run.counter_samples)
    most, epoch_violations = invariants.check_epoch_count(run.process_samples)
    violations += epoch_violations
    serves: dict[int, float] = {}
    for e in run.events:
        if e.kind == "serves" and e.epoch is not None:
            serves.setdefault(e.epoch, e.t)
    exits = invariants.check_old_epochs_gone(
        run.epoch_lives, serves, run.parent_shutdown_s, run.orphan_s, run.exit_slack_s,
        run.observed_until)
    violations += exits.violations
    violations += invariants.check_fds(run.fds_before, run.fds_after)
    http = [r for r in reqs if r.mode in run.http_modes]
    answered = sum(1 for r in http if r.ok or r.cause.startswith("status_"))
    proxy_count = None if run.final_counters is None else run.final_counters.get(run.rq_counter)
    cont = invariants.check_continuity(proxy_count, answered, len(http) - answered,
                                       len(run.kills), run.rq_counter)
    violations += cont.violations
    admin_bad = [(t, err) for t, err in run.admin_errors
                 if "Refused" in err or not any(k.t - invariants.CLOCK_SLACK_S <= t
                                                <= k.t + kill_window + 10 for k in run.kills)]
    if admin_bad:
        violations.append(Violation(
            "admin API answers across restarts",
            f"{len(admin_bad)} admin /stats call(s) failed away from any kill; the first: "
            f"{admin_bad[0][1]}", admin_bad[0][0]))
    if run.agent_exit_code not in (0, None):
        violations.append(Violation("agent exits cleanly",
                                    f"trioxy-agent exited with {run.agent_exit_code} on SIGTERM"))
    if run.leftover_pids:
        violations.append(Violation(
            "nothing left behind",
            f"processes of the agent's tree outlived it: {sorted(run.leftover_pids)}"))

    t_first = min([run.t0] + [a.t for a in run.actions])
    series_t0 = min(run.t0, t_first)
    series_t1 = max(run.t_end, run.observed_until)
    failures = [r for r in reqs if not r.ok]
    excused = {id(r) for r in failures
               if invariants.excusing_kill(r, run.kills, kill_window) is not None}
    report: dict[str, Any] = {
        "scenario": run.scenario,
        "settings": run.settings,
        "passed": not violations,
        "duration_s": round(duration, 2),
        "requests": {
            "sent": len(reqs),
            "ok": ok,
            "failed": len(reqs) - ok,
            "failed_by_cause": dict(sorted(verdict.by_cause.items())),
            "killed_in_flight": verdict.killed_in_flight,
            "unexplained": len(verdict.unexplained),
            "rate_per_s": round(len(reqs) / duration, 1),
            "by_mode": by_mode,
            "skipped_modes": run.skipped_modes,
            "first_unexplained": [asdict(r) for r in verdict.unexplained[:10]],
            "first_error_by_cause": run.failure_examples,
        },
        "connections": {
            "refused": verdict.refused,
            "reset": verdict.by_cause.get(RESET, 0),
        },
        "restarts": {
            "hups_sent": sum(1 for a in run.actions if a.kind == "hup"),
            "hot_restarts_serving": len(restarts),
            "relaunches_serving": len(relaunches),
            "never_served": [{"epoch": h.epoch, "kind": h.kind, "outcome": h.outcome}
                             for h in hos if h.t_serves is None],
            "kills": len(run.kills),
            "epochs": [asdict(h) for h in hos],
        },
        "handover_s": {
            "spawn_to_serving": summarize([h.spawn_to_serving for h in restarts
                                           if h.spawn_to_serving is not None]),
            "hup_to_serving": summarize([h.signal_to_serving for h in restarts
                                         if h.signal_to_serving is not None]),
            "crash_to_serving": summarize([h.signal_to_serving for h in relaunches
                                           if h.signal_to_serving is not None]),
        },
        "latency_ms": {
            "steady": steady,
            "during_handover": during,
            "added_p50_ms": added("p50"),
            "added_p99_ms": added("p99"),
            "handover_window": "HUP (or crash) to the new epoch serving + --drain-time-s",
            "excluded_modes": sorted(run.delayed_modes),
        },
        "counters": {
            "samples": len(run.counter_samples),
            "monotonic": not invariants.check_counters_monotonic(run.counter_samples),
            "final": run.final_counters,
            "continuity": {
                "counter": run.rq_counter,
                "proxy_count": cont.proxy_count,
                "drill_answered": cont.answered,
                "drill_failed": cont.failed,
                "lost_with_killed_processes": cont.lost_with_kills,
            },
            "admin_errors": len(run.admin_errors),
        },
        "epochs": {
            "max_alive": most,
            "old_epoch_exit_after_successor_serves_s": summarize(exits.exit_after_successor_s),
            "unchecked_at_end": exits.unchecked,
        },
        "fds": {"agent_before": run.fds_before, "agent_after": run.fds_after},
        "kills": [{"t": round(k.t - series_t0, 3), "target": k.target, "epoch": k.epoch,
                   "pids": list(k.pids), "client_connections_held": len(k.ports)}
                  for k in run.kills],
        "actions": [{"t": round(a.t - series_t0, 3), "kind": a.kind, "detail": a.detail}
                    for a in run.actions],
        "series": {
            "t0": series_t0,
            "bin_s": 1.0,
            "requests": per_second([r.t for r in reqs], series_t0, series_t1),
            "failed": per_second([r.t for r in failures if id(r) not in excused],
                                 series_t0, series_t1),
            "killed_in_flight": per_second([r.t for r in failures if id(r) in excused],
                                           series_t0, series_t1),
            "latency_p99_ms": _latency_series(timed, series_t0, series_t1),
            "epochs_alive": [(round(s.t - series_t0, 2), len(s.epochs))
                             for s in run.process_samples[::5]],
            "serves": [round(t - series_t0, 3) for t in sorted(serves.values())],
        },
        "notes": run.notes,
        "violations": [asdict(v) for v in violations],
    }
    return report


def _fmt(s: dict[str, Any], unit: str) -> str:
    if not s.get("count"):
        return "n/a"
    return f"p50 {s['p50']}{unit}  p99 {s['p99']}{unit}  max {s['max']}{unit}  (n={s['count']})"


def render_text(rep: dict[str, Any]) -> str:
    rq, cx, rs = rep["requests"], rep["connections"], rep["restarts"]
    lat, ho, ct = rep["latency_ms"], rep["handover_s"], rep["counters"]
    causes = ", ".join(f"{k} {v}" for k, v in rq["failed_by_cause"].items()) or "none"
    lines = [
        f"== trioxy-drill {rep['scenario']}: {'PASSED' if rep['passed'] else 'FAILED'} "
        f"({rep['duration_s']} s) ==",
        f"requests      sent {rq['sent']}  ok {rq['ok']}  failed {rq['failed']} "
        f"(killed in flight {rq['killed_in_flight']}, unexplained {rq['unexplained']})  "
        f"{rq['rate_per_s']}/s",
        f"  by cause    {causes}",
        "  by mode     " + "  ".join(f"{m} {d['ok']}/{d['sent']}"
                                     for m, d in sorted(rq["by_mode"].items())),
    ]
    for mode, why in rq["skipped_modes"].items():
        lines.append(f"  skipped     {mode}: {why}")
    lines += [
        f"connections   refused {cx['refused']}  reset {cx['reset']}",
        f"restarts      HUPs sent {rs['hups_sent']}  hot restarts serving "
        f"{rs['hot_restarts_serving']}  relaunches {rs['relaunches_serving']}  "
        f"kills {rs['kills']}  never served {len(rs['never_served'])}",
        f"handover      spawn->serving {_fmt(ho['spawn_to_serving'], ' s')}",
        f"              HUP->serving   {_fmt(ho['hup_to_serving'], ' s')}",
    ]
    if ho["crash_to_serving"]["count"]:
        lines.append(f"              crash->serving {_fmt(ho['crash_to_serving'], ' s')}")
    lines += [
        f"latency       steady   {_fmt(lat['steady'], ' ms')}",
        f"              handover {_fmt(lat['during_handover'], ' ms')}",
        f"              added    p50 {lat['added_p50_ms']} ms  p99 {lat['added_p99_ms']} ms",
        f"counters      {ct['samples']} admin samples, monotonic: {ct['monotonic']}; "
        f"{ct['continuity']['counter']} = {ct['continuity']['proxy_count']} vs "
        f"{ct['continuity']['drill_answered']} answered"
        + (f" ({ct['continuity']['lost_with_killed_processes']} lost with killed processes)"
           if ct["continuity"]["lost_with_killed_processes"] else ""),
        f"epochs        max alive {rep['epochs']['max_alive']}; old epoch gone after successor "
        f"serves: {_fmt(rep['epochs']['old_epoch_exit_after_successor_serves_s'], ' s')}",
        f"agent fds     before {rep['fds']['agent_before']}  after {rep['fds']['agent_after']}",
    ]
    for note in rep["notes"]:
        lines.append(f"note          {note}")
    for v in rep["violations"]:
        lines.append(f"VIOLATION     [{v['invariant']}] {v['detail']}")
    return "\n".join(lines)

