"""The drill's pure layers: percentiles, schedules, log parsing, invariants, the report."""

from __future__ import annotations

import ast
import random
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drill import invariants, metrics, schedule
from drill.model import (
    CLOSED,
    OK,
    REFUSED,
    RESET,
    CounterSample,
    EpochLife,
    KillRecord,
    LogEvent,
    ProcessSample,
    RequestRecord,
    parse_log_line,
)
from drill.report import RunData, build_report, handovers, render_text

ROOT = Path(__file__).resolve().parents[2]
PURE = ["drill/model.py", "drill/metrics.py", "drill/schedule.py", "drill/invariants.py",
        "drill/report.py"]
FORBIDDEN = {"trio", "socket", "subprocess", "asyncio", "selectors", "threading", "signal",
             "psutil", "os"}


@pytest.mark.parametrize("path", PURE)
def test_pure_modules_import_no_io(path: str) -> None:
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for n in names:
            assert n.split(".")[0] not in FORBIDDEN, f"{path} imports {n}"


# -- percentiles -------------------------------------------------------------------------
def test_percentile_interpolates_like_numpy_linear() -> None:
    v = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert metrics.percentile(v, 0) == 15.0
    assert metrics.percentile(v, 100) == 50.0
    assert metrics.percentile(v, 50) == 35.0
    assert metrics.percentile(v, 40) == pytest.approx(29.0)  # numpy.percentile(v, 40)
    assert metrics.percentile(v, 99) == pytest.approx(49.6)
    assert metrics.percentile([7.0], 99) == 7.0
    assert metrics.percentile([], 50) is None


def test_percentile_agrees_with_statistics_quantiles_inclusive() -> None:
    rng = random.Random(5)
    values = [rng.expovariate(1.0) for _ in range(1001)]
    q = statistics.quantiles(values, n=100, method="inclusive")
    for i in (1, 50, 90, 99):
        assert metrics.percentile(values, i) == pytest.approx(q[i - 1])


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=200),
       st.floats(0, 100), st.floats(0, 100))
def test_percentile_is_bounded_and_monotonic_in_q(values: list[float], a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    p_lo, p_hi = metrics.percentile(values, lo), metrics.percentile(values, hi)
    assert p_lo is not None and p_hi is not None
    eps = 1e-9 * max(1.0, max(abs(v) for v in values))  # interpolation rounding
    assert min(values) - eps <= p_lo <= p_hi + eps and p_hi <= max(values) + eps


def test_percentile_is_order_independent_and_rejects_bad_q() -> None:
    assert metrics.percentile([3.0, 1.0, 2.0], 50) == 2.0
    with pytest.raises(ValueError):
        metrics.percentile([1.0], 101)


def test_summarize_scales_and_handles_empty() -> None:
    s = metrics.summarize([0.001, 0.002, 0.003], scale=1000)
    assert s["count"] == 3 and s["p50"] == 2.0 and s["max"] == 3.0 and s["mean"] == 2.0
    assert metrics.summarize([])["p99"] is None


def test_per_second_bins_and_drops_outside() -> None:
    assert metrics.per_second([0.1, 0.9, 1.0, 2.5, -1, 3.0], 0.0, 3.0) == [2, 1, 1]
    assert metrics.in_windows(1.5, [(0, 1), (1.2, 2)])
    assert not metrics.in_windows(1.1, [(0, 1), (1.2, 2)])


# -- schedules ---------------------------------------------------------------------------
def test_chaos_schedule_is_a_function_of_the_seed() -> None:
    a = schedule.chaos_schedule(42, 30, 1.0)
    assert a == schedule.chaos_schedule(42, 30, 1.0)
    assert a != schedule.chaos_schedule(43, 30, 1.0)


def test_chaos_schedule_covers_every_action_first_then_draws_by_weight() -> None:
    kinds = set(schedule.CHAOS_WEIGHTS)
    for seed in range(20):
        steps = schedule.chaos_schedule(seed, len(kinds), 1.0)
        assert {s.action for s in steps} == kinds
    many = schedule.chaos_schedule(1, 6000, 1.0)[len(kinds):]
    hups = sum(1 for s in many if s.action == schedule.HUP)
    broken = sum(1 for s in many if s.action == schedule.BROKEN_CONFIG)
    assert 2.4 < hups / broken < 3.6  # weights 3 : 1


def test_chaos_schedule_pauses_and_picks_are_bounded() -> None:
    for s in schedule.chaos_schedule(9, 200, 2.0):
        assert 1.0 <= s.pause_s <= 3.0
        assert 0.0 <= s.pick < 1.0
    assert schedule.chaos_schedule(1, 3, 1.0)[0].action in schedule.CHAOS_WEIGHTS
    only = schedule.chaos_schedule(1, 5, 1.0, {schedule.HUP: 1, schedule.KILL_WORKER: 0})
    assert {s.action for s in only} == {schedule.HUP}
    with pytest.raises(ValueError):
        schedule.chaos_schedule(1, 5, 1.0, {schedule.HUP: 0})


def test_concurrency_schedule_changes_every_time_both_ways_within_bounds() -> None:
    for seed in range(10):
        values = schedule.concurrency_schedule(seed, 12, 2, 4)
        prev = 2
        for v in values:
            assert 1 <= v <= 4 and v != prev
            prev = v
        ups = sum(1 for a, b in zip([2, *values], values, strict=False) if b > a)
        assert 0 < ups < len(values)
    with pytest.raises(ValueError):
        schedule.concurrency_schedule(1, 3, 1, 1)


def test_upgrade_schedule_goes_there_and_back() -> None:
    assert schedule.upgrade_schedule(2) == ["other", "ours"]
    assert schedule.upgrade_schedule(3) == ["other", "ours", "other"]


# -- the agent's log ---------------------------------------------------------------------
def _line(t: str, msg: str, who: str = "agent") -> str:
    return f"[2026-11-24 10:00:{t}][123][INFO][{who}] {msg}"


def parsed(line: str) -> LogEvent:
    e = parse_log_line(line)
    assert e is not None, line
    return e


def test_parse_log_line_reads_the_agents_restart_events_only() -> None:
    e = parsed(_line("01.250", "SIGHUP: hot restart to epoch 3"))
    assert (e.kind, e.epoch) == ("restart", 3)
    assert parsed(_line("01.250", "queued SIGHUP: hot restart to epoch 4")).kind \
        == "restart_queued"
    assert parsed(_line("01.250", "SIGHUP while epoch 4 starts: queued")).kind == "hup_queued"
    failed = parse_log_line(_line("02.000", "reload failed: epoch 5 exited with 1; epoch 4 keeps"))
    assert failed is not None and (failed.kind, failed.epoch, failed.code) == ("reload_failed", 5, 1)
    crash = parse_log_line(_line("02.000", "epoch 2 exited unexpectedly with -9; relaunching"))
    assert crash is not None and crash.code == -9
    assert parsed(_line("02.000", "epoch 2 (pid 77) exited with -9")).code == -9
    # An epoch's own line, or anything else, is not the agent's decision.
    assert parse_log_line(_line("02.000", "epoch 2 serves", who="main")) is None
    assert parse_log_line("trioxy: invalid configuration x") is None
    a = parse_log_line(_line("01.000", "epoch 1 serves"))
    b = parse_log_line(_line("01.250", "epoch 2 serves"))
    assert a is not None and b is not None and b.t - a.t == pytest.approx(0.25)


def test_handovers_pair_direct_queued_relaunched_and_failed_restarts() -> None:
    ev = [
        LogEvent(10.0, "restart", 1), LogEvent(10.1, "started", 1),
        LogEvent(10.5, "hup_queued", 1), LogEvent(10.8, "hup_queued", 1),
        LogEvent(11.3, "serves", 1), LogEvent(11.3, "restart_queued", 2),
        LogEvent(11.4, "started", 2), LogEvent(12.5, "serves", 2),
        LogEvent(13.0, "exited", 2, -9), LogEvent(13.0, "crashed", 2, -9),
        LogEvent(13.5, "started", 3), LogEvent(14.7, "serves", 3),
        LogEvent(15.0, "restart", 4), LogEvent(15.1, "started", 4),
        LogEvent(15.6, "exited", 4, 1), LogEvent(15.6, "reload_failed", 4, 1),
    ]
    hs = {h.epoch: h for h in handovers(ev)}
    assert hs[1].kind == "hup" and hs[1].spawn_to_serving == pytest.approx(1.3)
    assert hs[2].kind == "hup (queued)"
    assert hs[2].signal_to_serving == pytest.approx(2.0)  # from the first queued HUP
    assert hs[2].spawn_to_serving == pytest.approx(1.2)
    assert hs[3].kind == "relaunch" and hs[3].signal_to_serving == pytest.approx(1.7)
    assert hs[4].t_serves is None and hs[4].outcome == "exited with 1 before serving"


# -- invariants --------------------------------------------------------------------------
def rec(t: float, cause: str = OK, port: int = 1000, conn_t: float | None = None,
        latency: float = 0.01, mode: str = "http1-new") -> RequestRecord:
    return RequestRecord(t, latency, mode, cause, port, t if conn_t is None else conn_t)


def test_refused_is_never_excused_even_by_a_kill() -> None:
    kill = KillRecord(10.0, "worker", 1, (5,), frozenset({1000}))
    v = invariants.check_requests([rec(10.0, REFUSED)], [kill], 5.0)
    assert v.refused == 1 and v.killed_in_flight == 0
    assert [x.invariant for x in v.violations] == ["no connection refused"]


def test_a_failure_on_a_killed_process_connection_is_excused() -> None:
    kill = KillRecord(10.0, "worker", 1, (5,), frozenset({1000, 1001}))
    records = [
        rec(9.99, RESET, port=1000, latency=0.02),  # in flight across the kill
        rec(11.0, CLOSED, port=1001, conn_t=9.0),  # keep-alive held by the victim, used after
        rec(10.5, RESET, port=2000),  # another process's connection
        rec(10.5, RESET, port=1000, conn_t=10.4),  # the port reused after the kill: not excused
        rec(30.0, RESET, port=1001, conn_t=9.0),  # far too late to blame the kill
        rec(9.0, RESET, port=1000, latency=0.1),  # failed before the kill
    ]
    v = invariants.check_requests(records, [kill], 5.0)
    assert v.killed_in_flight == 2
    assert [r.t for r in v.unexplained] == [10.5, 10.5, 30.0, 9.0]
    assert v.by_cause == {RESET: 5, CLOSED: 1}
    assert len(v.violations) == 1 and "4 request(s) failed with reset" in v.violations[0].detail


def test_no_failures_no_violations() -> None:
    v = invariants.check_requests([rec(1.0), rec(2.0)], [], 5.0)
    assert v.violations == [] and v.by_cause == {}


def test_counters_must_not_decrease_or_vanish() -> None:
    ok = [CounterSample(1, {"a": 1, "b": 5}), CounterSample(2, {"a": 3, "b": 5})]
    assert invariants.check_counters_monotonic(ok) == []
    bad = [*ok, CounterSample(3, {"a": 2, "b": 5}), CounterSample(4, {"a": 1})]
    v = invariants.check_counters_monotonic(bad)
    assert [x.detail.split()[0] for x in v] == ["a", "b"]  # one violation per counter
    assert "from 3 to 2" in v[0].detail and "from 5 to 0" in v[1].detail


def test_a_fourth_epoch_is_tolerated_only_briefly() -> None:
    def samples(counts: list[int], step: float = 0.1) -> list[ProcessSample]:
        return [ProcessSample(i * step, tuple(range(n)), 10) for i, n in enumerate(counts)]

    most, v = invariants.check_epoch_count(samples([1, 2, 3, 4, 4, 3, 2]))
    assert most == 4 and v == []
    most, v = invariants.check_epoch_count(samples([3] + [4] * 15 + [3]))
    assert most == 4 and len(v) == 1 and "4 epochs alive" in v[0].detail


def test_old_epochs_must_be_gone_by_parent_shutdown_after_their_successor_serves() -> None:
    serves = {0: 1.0, 1: 10.0, 2: 20.0}
    lives = [
        EpochLife(0, 100, {100, 101}, 0.0, last_alive=12.5),  # gone 2.5 s after 1 serves
        EpochLife(1, 200, {200}, 9.0, last_alive=25.0),  # 5 s after 2 serves: too late
        EpochLife(2, 300, {300}, 19.0, last_alive=30.0),  # the serving one
    ]
    v = invariants.check_old_epochs_gone(lives, serves, 3.0, 1.5, 1.0, observed_until=30.0)
    assert [x.detail.split()[1] for x in v.violations] == ["1"]
    assert v.exit_after_successor_s == [2.5, 5.0]
    # The run ended at 22.0 with epoch 1 alive and its deadline (24.0) still ahead.
    lives[1].last_alive = 22.0
    early = invariants.check_old_epochs_gone(lives, serves, 3.0, 1.5, 1.0, observed_until=22.0)
    assert early.unchecked == [1] and early.violations == []
    # Seen gone before the end: judged, even though the run ended before its deadline.
    lives[1].last_alive = 21.0
    gone = invariants.check_old_epochs_gone(lives, serves, 3.0, 1.5, 1.0, observed_until=22.0)
    assert gone.unchecked == [] and gone.violations == []


def test_a_killed_epochs_orphaned_workers_must_go_too() -> None:
    life = EpochLife(3, 300, {300, 301}, 0.0, last_alive=9.0, main_gone=5.0)
    v = invariants.check_old_epochs_gone([life], {}, 3.0, 1.5, 1.0, observed_until=20.0)
    assert len(v.violations) == 1 and "orphan" in v.violations[0].detail
    life.last_alive = 7.0
    assert invariants.check_old_epochs_gone([life], {}, 3.0, 1.5, 1.0, 20.0).violations == []


def test_fds_and_continuity() -> None:
    assert invariants.check_fds(15, 15) == [] and invariants.check_fds(None, 20) == []
    assert len(invariants.check_fds(15, 16)) == 1
    assert invariants.check_continuity(100, 100, 0, 0, "n").violations == []
    assert invariants.check_continuity(101, 100, 1, 0, "n").violations == []  # a failed one
    assert len(invariants.check_continuity(102, 100, 1, 0, "n").violations) == 1
    assert len(invariants.check_continuity(90, 100, 0, 0, "n").violations) == 1
    killed = invariants.check_continuity(90, 100, 3, 2, "n")
    assert killed.violations == [] and killed.lost_with_kills == 10
    assert len(invariants.check_continuity(None, 1, 0, 0, "n").violations) == 1


# -- the report --------------------------------------------------------------------------
def run_data(**over: Any) -> RunData:
    t0 = 1000.0
    reqs = [rec(t0 + i * 0.01, latency=0.001 + (0.01 if 300 <= i < 500 else 0), port=i + 2000)
            for i in range(1000)]
    events = [LogEvent(t0 + 3.0, "restart", 1), LogEvent(t0 + 3.0, "started", 1),
              LogEvent(t0 + 4.0, "serves", 1)]
    base: dict[str, Any] = dict(
        scenario="hup", settings={"restarts": 1}, t0=t0, t_end=t0 + 10, requests=reqs,
        kills=[], events=events,
        process_samples=[ProcessSample(t0 + i * 0.1, (0,) if i < 30 else (0, 1) if i < 45 else (1,),
                                       15) for i in range(100)],
        counter_samples=[CounterSample(t0 + i, {"http.x.downstream_rq_total": i * 100})
                         for i in range(10)],
        epoch_lives=[EpochLife(0, 1, {1, 2}, t0, last_alive=t0 + 4.5),
                     EpochLife(1, 3, {3, 4}, t0 + 3, last_alive=t0 + 10)],
        actions=[], fds_before=15, fds_after=15,
        final_counters={"http.x.downstream_rq_total": 1000},
        rq_counter="http.x.downstream_rq_total", http_modes=frozenset({"http1-new"}),
        drain_time_s=1.0, parent_shutdown_s=3.0, observed_until=t0 + 10,
    )
    base.update(over)
    return RunData(**base)


def test_report_of_a_clean_run_passes_with_its_figures() -> None:
    rep = build_report(run_data())
    assert rep["passed"], rep["violations"]
    assert rep["requests"]["sent"] == 1000 and rep["requests"]["failed"] == 0
    assert rep["restarts"]["hot_restarts_serving"] == 1
    assert rep["handover_s"]["spawn_to_serving"]["p50"] == 1.0
    # Requests from 3.0 to 5.0 s (HUP to serving + drain) were 10 ms slower.
    assert rep["latency_ms"]["steady"]["p50"] == 1.0
    assert rep["latency_ms"]["added_p50_ms"] == pytest.approx(10.0, abs=0.5)
    assert rep["epochs"]["max_alive"] == 2
    assert rep["epochs"]["old_epoch_exit_after_successor_serves_s"]["max"] == 0.5
    assert rep["counters"]["continuity"]["proxy_count"] == 1000
    assert sum(rep["series"]["requests"]) == 1000
    text = render_text(rep)
    assert "PASSED" in text and "VIOLATION" not in text


def test_report_fails_on_each_broken_invariant() -> None:
    t0 = 1000.0
    cases: dict[str, dict[str, Any]] = {
        "no connection refused": dict(requests=[rec(t0, REFUSED)]),
        "agent fds not growing": dict(fds_after=16),
        "counters monotonic": dict(counter_samples=[CounterSample(1, {"a": 2}),
                                                    CounterSample(2, {"a": 1})]),
        "counters continuity": dict(final_counters={"http.x.downstream_rq_total": 10}),
        "old epochs gone by parent-shutdown time": dict(
            epoch_lives=[EpochLife(0, 1, {1}, t0, last_alive=t0 + 9.0)]),
        "agent exits cleanly": dict(agent_exit_code=1),
        "nothing left behind": dict(leftover_pids=[123]),
        "admin API answers across restarts": dict(admin_errors=[(t0, "ConnectionRefusedError")]),
    }
    for invariant, over in cases.items():
        rep = build_report(run_data(**over))
        assert not rep["passed"], invariant
        assert invariant in {v["invariant"] for v in rep["violations"]}, (invariant, rep["violations"])
        assert f"[{invariant}]" in render_text(rep)


def test_report_counts_killed_in_flight_apart() -> None:
    t0 = 1000.0
    kill = KillRecord(t0 + 5, "worker", 1, (9,), frozenset({5000}))
    r = run_data(kills=[kill], requests=[*run_data().requests,
                                         rec(t0 + 5.0, RESET, port=5000, conn_t=t0 + 1)],
                 final_counters={"http.x.downstream_rq_total": 990})
    rep = build_report(r)
    assert rep["passed"], rep["violations"]
    assert rep["requests"]["killed_in_flight"] == 1
    assert rep["connections"]["reset"] == 1
    assert rep["counters"]["continuity"]["lost_with_killed_processes"] == 10
    assert sum(rep["series"]["killed_in_flight"]) == 1


def test_now_is_wall_clock() -> None:
    # The records are stamped with time.time(), like the agent's log; not a monotonic clock.
    assert abs(parsed(
        f"[{time.strftime('%Y-%m-%d %H:%M:%S')}.000][1][INFO][agent] epoch 1 serves").t
        - time.time()) < 2
