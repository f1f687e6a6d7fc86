"""Writers and readers: counters survive deaths, gauges are live-only, nothing is lost."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.stats import Histogram, Store
from shm import layout as L
from shm.segment import (
    AGENT_REGION,
    HISTOGRAMS_PER_SLOT,
    NAME_LEN,
    STATS_PER_SLOT,
    Segment,
    SlotWriter,
    Stats,
    format_stats,
    pid_alive,
    read_stats,
)

ROOT = Path(__file__).resolve().parents[2]


def writer(seg: Segment, region: int, index: int, epoch: int | None = None) -> SlotWriter:
    w = SlotWriter(seg, region, index)
    w.claim(os.getpid(), region if epoch is None else epoch, 0 if index == 0 else 1, index)
    return w


def test_write_then_read_through_another_mapping(base_id: int) -> None:
    seg = Segment.open(base_id)
    reader = Segment.open(base_id, create=False)
    w = writer(seg, 0, 0)
    store = Store()
    store.counter("server.total").inc(5)
    store.gauge("server.live").set(1)
    store.gauge("cluster.a.upstream_cx_active").set(3)
    h = store.histogram("http.a.downstream_rq_time")
    for v in (0.2, 7, 7, 99999999):
        h.record(v)
    w.flush(store)
    stats = read_stats(reader)
    assert stats.counters == {"server.total": 5}
    assert stats.gauges == {"server.live": 1, "cluster.a.upstream_cx_active": 3}
    counts, total, n = stats.histograms["http.a.downstream_rq_time"]
    assert (counts[0], counts[3], counts[-1], n) == (1, 2, 1, 4)
    assert total == pytest.approx(100000013.2)
    store.counter("server.total").inc()
    store.counter("server.new").inc(2)
    w.flush(store)
    stats = read_stats(reader)
    assert stats.counters == {"server.total": 6, "server.new": 2}
    info = w.info()
    assert (info.pid, info.n_stats, info.n_hist, info.generation) == (os.getpid(), 5, 1, 1)


def test_load_and_seed_continue_counters_not_gauges(base_id: int) -> None:
    seg = Segment.open(base_id)
    first = writer(seg, 1, 4)
    old = Store()
    old.counter("c").inc(40)
    old.gauge("g").set(9)
    old.histogram("h").record(3)
    first.flush(old)
    # The next occupant of the slot (a replacement worker, or epoch 5 in region 1):
    again = writer(seg, 1, 4, epoch=5)
    loaded = again.load()
    assert loaded["c"] == (L.COUNTER, 40)
    assert loaded["g"] == (L.GAUGE, 0)  # claim zeroed the old occupant's gauge
    assert loaded["h"][0] == L.HISTOGRAM and loaded["h"][1][2] == 1
    new = Store()
    again.seed(new)
    assert new.counter("c").value == 40 and new.histogram("h").count == 1
    assert "g" not in new.gauges
    new.counter("c").inc()
    new.histogram("h").record(3)
    again.flush(new)
    stats = read_stats(seg)
    assert stats.counters["c"] == 41 and stats.histograms["h"][2] == 2
    assert stats.gauges["g"] == 0
    assert again.info().generation == 2 and again.info().epoch == 5


def test_counters_survive_a_sigkilled_writer(
        base_id: int, child: Callable[..., subprocess.Popen]) -> None:
    seg = Segment.open(base_id)
    p = child("count", base_id, 2, 1, -1, 100)  # counts and flushes until killed
    assert p.stdout is not None and p.stdout.readline() == "ready 0\n"
    seen = [0]
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline or seen[-1] == 0:
        stats = read_stats(seg)
        seen.append(stats.counters["test.requests"])
        assert stats.gauges["test.active"] == 7  # alive: its gauge counts
    p.kill()
    p.wait()
    stats = read_stats(seg)
    killed_at = stats.counters["test.requests"]
    seen.append(killed_at)
    assert seen == sorted(seen) and killed_at > 0  # the reader's sum never went back
    assert stats.gauges.get("test.active", 0) == 0  # a dead process has no gauges...
    assert stats.histograms["test.latency"][2] == killed_at  # ...but keeps its counts
    assert "test.active: 0" in format_stats(stats)
    # A replacement in the same slot (here: this process) continues from there.
    w = writer(seg, 2, 1)
    store = Store()
    w.seed(store)
    assert store.counter("test.requests").value == killed_at
    store.counter("test.requests").inc()
    w.flush(store)
    assert read_stats(seg).counters["test.requests"] == killed_at + 1
    # And a replacement process does too, after this one's counts.
    w.seg.words[w._hw + L.S_PID] = 0  # as if this writer had gone
    q = child("count", base_id, 2, 1, 0.05, 10)
    out, _ = q.communicate(timeout=30)
    lines = out.split()
    assert lines[:2] == ["ready", str(killed_at + 1)]
    counted, final = int(lines[3]), int(lines[4])
    assert final == killed_at + 1 + counted == read_stats(seg).counters["test.requests"]


def test_two_processes_flushing_at_once_lose_nothing(
        base_id: int, child: Callable[..., subprocess.Popen]) -> None:
    seg = Segment.open(base_id)
    procs = [child("count", base_id, 0, slot, 1.0, 10) for slot in (1, 2)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "ready 0\n"
    seen = []
    while any(p.poll() is None for p in procs):
        stats = read_stats(seg)
        seen.append((stats.counters.get("test.requests", 0),
                     stats.histograms["test.latency"][2]))
        time.sleep(0.005)
    assert len(seen) > 20
    assert [s[0] for s in seen] == sorted(s[0] for s in seen)
    written = 0
    for p in procs:
        out, _ = p.communicate(timeout=30)
        assert p.returncode == 0
        written += int(out.split()[-2])
    stats = read_stats(seg)
    assert written > 1000
    assert stats.counters["test.requests"] == written
    counts, _, n = stats.histograms["test.latency"]
    assert n == sum(counts) == written
    assert stats.gauges["test.active"] == 0  # both exited


def test_gauges_of_dead_pids_do_not_count_but_their_counters_do(base_id: int) -> None:
    seg = Segment.open(base_id)
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    for index, pid in ((1, os.getpid()), (2, gone.pid)):
        w = SlotWriter(seg, 0, index)
        w.claim(pid, 0, 1, index)
        store = Store()
        store.counter("listener.x.downstream_cx_total").inc(10)
        store.gauge("listener.x.downstream_cx_active").set(4)
        w.flush(store)
    stats = read_stats(seg)
    assert stats.counters["listener.x.downstream_cx_total"] == 20
    assert stats.gauges["listener.x.downstream_cx_active"] == 4


def test_server_gauges_come_from_the_newest_live_epoch(base_id: int) -> None:
    seg = Segment.open(base_id)
    for epoch, conns in ((0, 3), (1, 5)):
        w = writer(seg, epoch % 4, 0, epoch=epoch)
        store = Store()
        store.gauge("server.hot_restart_epoch").set(epoch)
        store.gauge("listener.l.downstream_cx_active").set(conns)
        w.flush(store)
    agent = writer(seg, AGENT_REGION, 0, epoch=0)
    store = Store()
    store.counter("agent.reload_total").inc()
    store.gauge("agent.epochs_alive").set(2)
    agent.flush(store)
    g = read_stats(seg).gauges
    assert g["server.hot_restart_epoch"] == 1
    assert g["listener.l.downstream_cx_active"] == 8
    assert (g["server.total_connections"], g["server.parent_connections"]) == (8, 3)
    assert g["agent.epochs_alive"] == 2


def test_overflow_is_counted_once_per_stat_and_never_raised(base_id: int) -> None:
    seg = Segment.open(base_id)
    w = writer(seg, 3, 0)
    store = Store()
    for i in range(STATS_PER_SLOT + 5):
        store.counter(f"c{i}").inc()
    store.counter("x" * (NAME_LEN + 1)).inc()  # longer than an entry holds
    store.counter("é" * (NAME_LEN // 2)).inc()  # exactly NAME_LEN bytes: fits (but no room)
    w.flush(store)
    w.flush(store)  # the same stats again: not counted twice
    stats = read_stats(seg)
    assert len(stats.counters) == STATS_PER_SLOT
    assert stats.overflow == w.overflow == 7
    assert "stats.overflow: 7" in format_stats(stats)

    h = writer(seg, 3, 1)
    hstore = Store()
    for i in range(HISTOGRAMS_PER_SLOT + 3):
        hstore.histogram(f"h{i}").record(i)
    hstore.histograms["odd"] = Histogram("odd", buckets=(1.0, 2.0))  # other bounds
    hstore.counter("é" * (NAME_LEN // 2)).inc(3)
    h.flush(hstore)
    h.flush(hstore)
    stats = read_stats(seg)
    assert h.overflow == 4 and stats.overflow == 11
    assert len(stats.histograms) == HISTOGRAMS_PER_SLOT and "odd" not in stats.histograms
    assert stats.counters["é" * (NAME_LEN // 2)] == 3


def test_flush_clamps_values_it_cannot_store(base_id: int) -> None:
    seg = Segment.open(base_id)
    w = writer(seg, 0, 5)
    store = Store()
    store.counter("ok").inc(3)
    store.gauge("negative").dec(2)
    store.counter("huge").inc(1 << 70)
    store.gauge("float").set(2.7)  # type: ignore[arg-type]
    w.flush(store)
    stats = read_stats(seg)
    assert stats.counters == {"ok": 3, "huge": (1 << 64) - 1}
    assert stats.gauges == {"negative": 0, "float": 2}
    store.gauge("negative").set(1)
    w.flush(store)
    assert read_stats(seg).gauges["negative"] == 1


def test_same_name_different_kinds_are_separate_entries(base_id: int) -> None:
    seg = Segment.open(base_id)
    w = writer(seg, 0, 6)
    store = Store()
    store.counter("dup").inc(2)
    store.gauge("dup").set(5)
    w.flush(store)
    stats = read_stats(seg)
    assert stats.counters["dup"] == 2 and stats.gauges["dup"] == 5


def test_pid_alive() -> None:
    me = os.getpid()
    assert pid_alive(me) and pid_alive(me, time.time())
    assert pid_alive(1)  # EPERM or not: it exists
    assert not pid_alive(0) and not pid_alive(-1) and not pid_alive(1 << 40)
    # Registered long before this process started: the pid has been reused.
    assert not pid_alive(me, time.time() - 10**6)
    zombie = subprocess.Popen([sys.executable, "-c", ""])
    deadline = time.monotonic() + 10
    while pid_alive(zombie.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pid_alive(zombie.pid)  # exited, not yet reaped
    zombie.wait()


def test_format_stats_sorts_by_name() -> None:
    text = format_stats(Stats(
        counters={"a.b_c": 1, "a.b": 2, "a.b.c": 3},
        gauges={"a.a": 0},
        histograms={"a.h": ([0] * 20, 12.5, 3), "a.i": ([0] * 20, 1e6 / 3, 1)},
    ))
    assert text == ("a.a: 0\na.b: 2\na.b.c: 3\na.b_c: 1\na.h: count=3 sum=12.5\n"
                    "a.i: count=1 sum=333333.333\n")
    assert format_stats(Stats()) == ""


def test_python_m_shm(base_id: int) -> None:
    seg = Segment.open(base_id)
    w = writer(seg, 0, 0)
    store = Store()
    store.counter("cluster.c.upstream_rq_total").inc(12)
    store.histogram("cluster.c.upstream_rq_time").record(4)
    w.flush(store)
    run = [sys.executable, "-m", "shm"]
    out = subprocess.run([*run, str(base_id)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout == ("cluster.c.upstream_rq_time: count=1 sum=4\n"
                          "cluster.c.upstream_rq_total: 12\n")
    missing = subprocess.run([*run, str(base_id + 1)], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 1 and "no stats segment" in missing.stderr
    bad = subprocess.run([*run, "x"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_flush_cost(base_id: int) -> None:
    seg = Segment.open(base_id)
    w = writer(seg, 1, 0)
    store = Store()
    for i in range(1800):
        store.counter(f"cluster.c{i}.upstream_rq_total").inc(i)
    for i in range(150):
        store.gauge(f"cluster.c{i}.upstream_cx_active").set(i)
    for i in range(50):
        store.histogram(f"cluster.c{i}.upstream_rq_time").record(i)
    start = time.perf_counter()
    w.flush(store)
    first = time.perf_counter() - start
    rounds = 200
    start = time.perf_counter()
    for _ in range(rounds):
        w.flush(store)
    steady = (time.perf_counter() - start) / rounds
    only = Store()
    for i in range(2000):
        only.counter(f"cluster.d{i}.upstream_rq_total").inc(i)
    w2 = writer(seg, 1, 1)
    w2.flush(only)
    start = time.perf_counter()
    for _ in range(rounds):
        w2.flush(only)
    counters_only = (time.perf_counter() - start) / rounds
    start = time.perf_counter()
    for _ in range(20):
        read_stats(seg)
    read = (time.perf_counter() - start) / 20
    print(f"\nflush of 2000 stats (1800 counters, 150 gauges, 50 histograms): "
          f"{steady * 1e6:.0f} us steady, {first * 1e6:.0f} us first (appends the names); "
          f"2000 counters: {counters_only * 1e6:.0f} us; read_stats of 4000 stats: "
          f"{read * 1e3:.1f} ms")
    assert read_stats(seg).counters["cluster.c5.upstream_rq_total"] == 5


def test_an_epoch_whose_region_a_live_epoch_holds_takes_a_free_one(base_id: int) -> None:
    """Epoch numbers skip when a starting epoch is killed: epoch 5 can start while epoch 1
    (same region, 5 % 4) still drains. It must not lose its stats to that clash."""
    from proxy.server.stats_flush import MAIN_ROLE, WORKER_ROLE, open_slot
    from shm.segment import SlotWriter

    seg = Segment.open(base_id, create=True)
    try:
        SlotWriter(seg, 1, 0).claim(1, 1, MAIN_ROLE, 0)  # pid 1 is alive: epoch 1 drains
        main = open_slot(base_id, 5, 0, MAIN_ROLE, 0, create=True)
        assert main is not None and main.region == 2
        worker = open_slot(base_id, 5, 1, WORKER_ROLE, 0, create=False, region=main.region)
        assert worker is not None and worker.region == 2
    finally:
        seg.close()
