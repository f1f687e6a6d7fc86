"""The stats segment with real shared memory and real processes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import posix_ipc
import pytest

from proxy.stats import Store
from shm.segment import (
    STATS_PER_SLOT,
    Segment,
    SegmentError,
    SlotWriter,
    format_stats,
    read_stats,
    segment_name,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def base_id() -> Iterator[int]:
    base = random.randrange(2_000_000, 3_000_000)  # host-wide names: stay clear of real ones
    yield base
    Segment.unlink(base)


def child_writer(base: int, region: int, slot: int, script: str) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import os, sys, time
        from proxy.stats import Store
        from shm.segment import Segment, SlotWriter
        seg = Segment.open({base}, create=False)
        w = SlotWriter(seg, {region}, {slot})
        w.claim(os.getpid(), {region}, 1, {slot})
        store = Store()
        w.seed(store)
    """) + textwrap.dedent(script)
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE)


def test_create_then_attach_and_read(base_id: int) -> None:
    seg = Segment.open(base_id)
    assert seg.created and seg.header()["magic"] == b"TRIOXYST"
    again = Segment.open(base_id)
    assert not again.created
    w = SlotWriter(seg, 0, 0)
    w.claim(os.getpid(), 0, 0, 0)
    store = Store()
    store.counter("server.total").inc(5)
    store.gauge("server.live").set(1)
    store.histogram("http.a.downstream_rq_time").record(7)
    w.flush(store)
    stats = read_stats(again)
    assert stats.counters == {"server.total": 5}
    assert stats.gauges == {"server.live": 1}
    assert stats.histograms["http.a.downstream_rq_time"][2] == 1
    assert "server.total: 5" in format_stats(stats)


def test_foreign_segment_is_reported_and_reclaimed_when_stale(base_id: int) -> None:
    shm = posix_ipc.SharedMemory(segment_name(base_id), posix_ipc.O_CREX, size=4096)
    os.write(shm.fd, b"NOTTRIOX" + b"\0" * 100)
    shm.close_fd()
    with pytest.raises(SegmentError, match=f"--base-id {base_id}"):
        Segment.open(base_id, reclaim_stale=False)
    seg = Segment.open(base_id, reclaim_stale=True)  # nobody alive uses it: recreated
    assert seg.created


def test_initializing_left_by_a_killed_creator_is_stale_after_a_second(base_id: int) -> None:
    seg = Segment.open(base_id)
    seg.words[3] = 1  # INITIALIZING, as if the creator died mid-way
    seg.words[4] = 0  # ... and its pid is gone
    start = time.monotonic()
    again = Segment.open(base_id)
    assert again.created and 0.9 < time.monotonic() - start < 3


def test_counters_survive_a_killed_writer_and_continue(base_id: int) -> None:
    seg = Segment.open(base_id)
    p = child_writer(base_id, 2, 1, """
        for i in range(50):
            store.counter("cluster.x.upstream_rq_total").inc(10)
            store.gauge("cluster.x.upstream_cx_active").set(3)
            w.flush(store)
        print("flushed", flush=True)
        time.sleep(30)
    """)
    assert p.stdout is not None and p.stdout.readline() == b"flushed\n"
    stats = read_stats(seg)
    assert stats.counters["cluster.x.upstream_rq_total"] == 500
    assert stats.gauges["cluster.x.upstream_cx_active"] == 3
    p.send_signal(signal.SIGKILL)
    p.wait()
    stats = read_stats(seg)
    assert stats.counters["cluster.x.upstream_rq_total"] == 500  # kept
    assert stats.gauges["cluster.x.upstream_cx_active"] == 0  # a dead process has none
    # Its replacement takes the slot and goes on from 500.
    q = child_writer(base_id, 2, 1, """
        store.counter("cluster.x.upstream_rq_total").inc(1)
        w.flush(store)
    """)
    assert q.wait(30) == 0
    assert read_stats(seg).counters["cluster.x.upstream_rq_total"] == 501


def test_two_processes_flushing_at_once_lose_nothing(base_id: int) -> None:
    seg = Segment.open(base_id)
    script = """
        for i in range(2000):
            store.counter("http.in.downstream_rq_total").inc()
            if i % 10 == 0:
                w.flush(store)
        w.flush(store)
    """
    procs = [child_writer(base_id, 0, s, script) for s in (1, 2)]
    for p in procs:
        assert p.wait(60) == 0
    assert read_stats(seg).counters["http.in.downstream_rq_total"] == 4000


def test_overflow_is_counted_not_raised(base_id: int) -> None:
    seg = Segment.open(base_id)
    w = SlotWriter(seg, 3, 0)
    w.claim(os.getpid(), 3, 0, 0)
    store = Store()
    for i in range(STATS_PER_SLOT + 5):
        store.counter(f"c{i}").inc()
    store.counter("x" * 500).inc()  # a name longer than a slot entry holds
    w.flush(store)
    stats = read_stats(seg)
    assert len(stats.counters) == STATS_PER_SLOT
    assert stats.overflow == 6


def test_flush_cost(base_id: int) -> None:
    seg = Segment.open(base_id)
    w = SlotWriter(seg, 1, 0)
    w.claim(os.getpid(), 1, 0, 0)
    store = Store()
    for i in range(2000):
        store.counter(f"cluster.c{i}.upstream_rq_total").inc(i)
    w.flush(store)
    start = time.perf_counter()
    for _ in range(20):
        w.flush(store)
    print(f"\nflush of 2000 stats: {(time.perf_counter() - start) / 20 * 1e6:.0f} us")
