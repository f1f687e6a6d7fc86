"""A stats writer in its own process, for tests/shm (not a test module).

count BASE REGION SLOT SECONDS FLUSH_EVERY
    claim the slot, seed a Store from it, then count (counter test.requests, histogram
    test.latency, gauge test.active = 7) and flush every FLUSH_EVERY increments for
    SECONDS (< 0: until killed). Prints ``ready V`` after the first flush and
    ``done N V`` (N counted here, V the counter's final value) at the end.
create BASE SLOT START_AT
    wait until wall-clock START_AT, Segment.open(create=True), claim slot SLOT of region 0,
    count test.created once, flush, print the segment's inode.
init-and-die BASE
    create the segment by hand, set INITIALIZING, write a header, and SIGKILL itself.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import posix_ipc

from proxy.stats import Store
from shm import layout
from shm.segment import Segment, SlotWriter, segment_name


def count(base: int, region: int, slot: int, seconds: float, flush_every: int) -> None:
    seg = Segment.open(base, create=False)
    w = SlotWriter(seg, region, slot)
    w.claim(os.getpid(), region, 1, slot)
    store = Store()
    w.seed(store)
    c = store.counter("test.requests")
    h = store.histogram("test.latency")
    store.gauge("test.active").set(7)
    first = c.value
    w.flush(store)
    print(f"ready {c.value}", flush=True)
    deadline = time.monotonic() + seconds
    i = 0
    while seconds < 0 or time.monotonic() < deadline:
        c.inc()
        h.record(i % 100)
        i += 1
        if i % flush_every == 0:
            w.flush(store)
    w.flush(store)
    print(f"done {c.value - first} {c.value}", flush=True)


def create(base: int, slot: int, start_at: float) -> None:
    time.sleep(max(0.0, start_at - time.time()))
    seg = Segment.open(base, create=True)
    w = SlotWriter(seg, 0, slot)
    w.claim(os.getpid(), 0, 1, slot)
    store = Store()
    store.counter("test.created").inc()
    w.flush(store)
    print(os.fstat(seg._shm.fd).st_ino, flush=True)


def init_and_die(base: int) -> None:
    import mmap

    shm = posix_ipc.SharedMemory(segment_name(base), posix_ipc.O_CREX, mode=0o600,
                                 size=layout.SIZE)
    mm = mmap.mmap(shm.fd, layout.SIZE)
    mm[24:32] = layout.FLAG_INITIALIZING.to_bytes(8, "little")
    layout.HEADER.pack_into(mm, 0, *layout.header_values(
        os.getpid(), os.geteuid(), time.time(), layout.FLAG_INITIALIZING))
    print("initializing", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "count":
        count(int(args[0]), int(args[1]), int(args[2]), float(args[3]), int(args[4]))
    elif mode == "create":
        create(int(args[0]), int(args[1]), float(args[2]))
    elif mode == "init-and-die":
        init_and_die(int(args[0]))
    else:
        raise SystemExit(f"unknown mode {mode}")
