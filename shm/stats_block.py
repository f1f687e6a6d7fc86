"""Stats slots: one writer per slot, readers sum.

A slot belongs to one process at a time (the epoch's main process hands slot indexes to
its workers, so claiming needs no lock, and nothing a SIGKILLed process holds can wedge
anyone). The writer copies its in-process ``proxy.stats.Store`` into the slot once a
second; ``read_stats`` sums every slot.

Publication order (why a reader never sees half an entry): a new name's entry (name,
kind, value) is written in full first, and only then is the slot's entry count raised.
Histogram records are written before the histogram count, which is raised before the
entry that points at the record. On x86-64 stores become visible in program order and
aligned 8-byte values are never torn, so a reader that reads the count first and then at
most that many entries sees whole entries. (On a weakly ordered CPU the reader also skips
an entry whose kind or name is not there yet: it shows up on the next read.) A
histogram's counts, sum and count are separate words: a reader racing a flush may see
them one flush apart, never torn.

Monotonic counters: a process that takes a slot over (a replaced worker, a later epoch in
the same region) ``seed``s its Store from what the slot holds before it counts, so its
flushes go on from there and sums never go back. Gauges are not seeded: ``claim`` zeroes
the previous occupant's, and readers count gauges only from live processes.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shm.errors import SegmentError
from shm.layout import (
    AGENT_REGION,
    BODY_SIZE,
    BUCKET_BOUNDS,
    BUCKETS,
    COUNTER,
    ENTRY,
    ENTRY_SIZE,
    GAUGE,
    HIST,
    HISTOGRAM,
    HISTOGRAMS_PER_SLOT,
    N_SLOTS,
    NAME_LEN,
    S_EPOCH,
    S_GENERATION,
    S_N_HIST,
    S_N_STATS,
    S_OVERFLOW,
    S_PID,
    S_ROLE,
    S_WORKER,
    SLOT_HEADER,
    SLOT_HEADER_PAD,
    SLOT_HEADER_SIZE,
    SLOT_TABLE_OFFSET,
    SLOTS_PER_REGION,
    STATS_PER_SLOT,
    VALUE_AT,
    hist_offset,
    slot_body_offset,
    slot_header_offset,
    slot_number,
)

if TYPE_CHECKING:
    from shm.segment import Segment

U64_MAX = (1 << 64) - 1
PID_MAX_LIMIT = 1 << 22  # Linux's ceiling for pid_max
PID_REUSE_SLACK_S = 2.0  # /proc/stat's btime has whole seconds

# -- liveness -----------------------------------------------------------------------------
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_btime: tuple[float, float] = (0.0, -1e9)  # (boot time, when it was read)


def _boot_time() -> float | None:
    global _btime
    now = time.monotonic()
    if now - _btime[1] > 60:  # re-read now and then: the wall clock may be stepped
        try:
            with open("/proc/stat", "rb") as f:
                for line in f:
                    if line.startswith(b"btime "):
                        _btime = (float(line.split()[1]), now)
                        break
        except OSError:
            return None
    return _btime[0] or None


def pid_alive(pid: int, since: float | None = None) -> bool:
    """Is ``pid`` a live process (and, given ``since``, the one that registered then)?

    ``os.kill(pid, 0)``: no such process is dead; EPERM (another user's) is alive. Where
    /proc is readable, a zombie (exited, not yet reaped) is dead, and so is a process that
    started more than a moment after ``since`` (a wall-clock time it registered at): its
    pid was reused by someone else.
    """
    if not 0 < pid < PID_MAX_LIMIT:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True  # no /proc (or it vanished just now): trust the signal
    fields = data[data.rfind(b")") + 2 :].split()
    if not fields or fields[0] in (b"Z", b"X", b"x"):
        return False
    if since and len(fields) > 19:
        boot = _boot_time()
        if boot is not None and boot + int(fields[19]) / _CLK_TCK > since + PID_REUSE_SLACK_S:
            return False
    return True


# -- reading ------------------------------------------------------------------------------
@dataclass
class SlotInfo:
    region: int
    index: int
    pid: int
    epoch: int
    role: int
    worker_index: int
    start: float
    generation: int
    n_stats: int
    n_hist: int
    overflow: int

    @property
    def slot(self) -> int:
        return self.region * SLOTS_PER_REGION + self.index


def slots(segment: Segment, *, used_only: bool = True) -> list[SlotInfo]:
    """Every slot ever claimed (pid != 0), in table order; one read of the slot table."""
    table = segment.mm[SLOT_TABLE_OFFSET : SLOT_TABLE_OFFSET + N_SLOTS * SLOT_HEADER_SIZE]
    out = []
    for k, fields in enumerate(SLOT_HEADER_PAD.iter_unpack(table)):
        if fields[0] or not used_only:
            out.append(SlotInfo(k // SLOTS_PER_REGION, k % SLOTS_PER_REGION, *fields))
    return out


HistValue = tuple[list[int], float, int]


def read_entries(segment: Segment, info: SlotInfo) -> list[tuple[str, int, Any]]:
    """``(name, kind, value)`` of a slot's published entries; a histogram's value is
    ``(bucket counts, sum, count)``."""
    mm = segment.mm
    slot = info.slot
    n = min(info.n_stats, STATS_PER_SLOT)
    n_hist = min(info.n_hist, HISTOGRAMS_PER_SLOT)
    body = slot_body_offset(slot)
    out: list[tuple[str, int, Any]] = []
    for raw, kind, value in ENTRY.iter_unpack(mm[body : body + n * ENTRY_SIZE]):
        name = raw.rstrip(b"\0").decode("utf-8", "replace")
        if not name:
            continue  # not whole yet (weakly ordered CPU): next read
        if kind == HISTOGRAM:
            if value >= n_hist:
                continue
            f = HIST.unpack_from(mm, hist_offset(slot, value))
            out.append((name, kind, (list(f[:BUCKETS]), f[BUCKETS], f[BUCKETS + 1])))
        elif kind == COUNTER or kind == GAUGE:
            out.append((name, kind, value))
    return out


@dataclass
class Stats:
    counters: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, int] = field(default_factory=dict)
    histograms: dict[str, HistValue] = field(default_factory=dict)
    overflow: int = 0  # stats that did not fit in their slot (summed over slots)


def add_histograms(a: HistValue, b: HistValue) -> HistValue:
    """Two (bucket counts, sum, count) of the same bounds, summed."""
    return ([x + y for x, y in zip(a[0], b[0], strict=True)], a[1] + b[1], a[2] + b[2])


def read_stats(segment: Segment, *, alive: Any = pid_alive) -> Stats:
    """Sum every slot: counters and histograms over every slot ever used (dead or alive),
    gauges over slots whose process is alive (a gauge only dead processes had is listed
    at 0). The ``server.*`` gauges describe one epoch (its number, uptime, state): they
    come from the newest live epoch's main process instead of a sum; and
    ``server.total_connections`` / ``server.parent_connections`` are derived as Envoy
    does, from the live epochs' ``listener.*.downstream_cx_active``."""
    out = Stats()
    counters, gauges, histograms = out.counters, out.gauges, out.histograms
    newest_server: dict[str, tuple[int, int]] = {}
    connections: dict[int, int] = {}  # epoch -> live downstream connections
    for info in slots(segment):
        live = alive(info.pid, info.start)
        out.overflow += info.overflow
        for name, kind, value in read_entries(segment, info):
            if kind == COUNTER:
                counters[name] = counters.get(name, 0) + value
            elif kind == GAUGE:
                if not live:
                    gauges.setdefault(name, 0)
                    continue
                if (info.region != AGENT_REGION and name.startswith("listener.")
                        and name.endswith(".downstream_cx_active")):
                    connections[info.epoch] = connections.get(info.epoch, 0) + value
                if name.startswith("server."):
                    if name not in newest_server or info.epoch >= newest_server[name][0]:
                        newest_server[name] = (info.epoch, value)
                else:
                    gauges[name] = gauges.get(name, 0) + value
            else:
                prev = histograms.get(name)
                histograms[name] = value if prev is None else add_histograms(prev, value)
    for name, (_, value) in newest_server.items():
        gauges[name] = value
    if connections:
        newest = max(connections)
        gauges["server.total_connections"] = sum(connections.values())
        gauges["server.parent_connections"] = sum(
            v for e, v in connections.items() if e != newest)
    return out


def reset_dead_counters(segment: Segment, *, alive: Any = pid_alive) -> int:
    """Zero the counters of slots whose process is gone (admin ``/reset_counters``; live
    processes zero their own, keeping one writer per live slot). Returns how many slots
    were reset. A slot that a new process claims meanwhile may keep a value it seeded a
    moment before: the reset is for humans debugging, as Envoy's."""
    n = 0
    mm = segment.mm
    for info in slots(segment):
        if alive(info.pid, info.start):
            continue
        body = slot_body_offset(info.slot)
        count = min(info.n_stats, STATS_PER_SLOT)
        for i, (_, kind, _) in enumerate(ENTRY.iter_unpack(mm[body : body + count * ENTRY_SIZE])):
            if kind == COUNTER:
                struct.pack_into("<Q", mm, body + i * ENTRY_SIZE + VALUE_AT, 0)
        n += 1
    return n


def _num(x: float) -> str:
    return f"{x:.3f}".rstrip("0").rstrip(".") if x == x else "nan"


def format_stats(stats: Stats) -> str:
    """Envoy's /stats text: ``name: value`` lines sorted by name; a histogram prints
    ``name: count=N sum=S``."""
    rows = [(n, str(v)) for n, v in stats.counters.items()]
    rows += [(n, str(v)) for n, v in stats.gauges.items()]
    rows += [(n, f"count={c} sum={_num(s)}") for n, (_, s, c) in stats.histograms.items()]
    if stats.overflow:
        rows.append(("stats.overflow", str(stats.overflow)))
    rows.sort(key=lambda r: r[0])
    return "".join(f"{n}: {v}\n" for n, v in rows)


# -- writing ------------------------------------------------------------------------------
def _u64(v: Any) -> int:
    try:
        v = int(v)
    except (TypeError, ValueError, OverflowError):
        return 0
    return 0 if v < 0 else U64_MAX if v > U64_MAX else v


class SlotWriter:
    """The one process that writes a slot.

    ``claim`` it, ``seed`` the Store from it before counting, then ``flush`` the Store into
    it (once a second). Entries are keyed by (kind, name): names already in the slot are
    updated in place, new ones appended. A flush never raises: what does not fit (more
    than STATS_PER_SLOT names or HISTOGRAMS_PER_SLOT histograms, a name over NAME_LEN
    bytes, a histogram with other bounds than BUCKET_BOUNDS) is counted once per stat in
    the slot's ``overflow`` and left out.

    The Store is expected to keep one object per name for its life (``proxy.stats.Store``
    does): a flush goes straight down a list of (stat, word) pairs, rebuilt only when the
    Store has new names.
    """

    def __init__(self, segment: Segment, region: int, index: int) -> None:
        try:
            self.slot = slot_number(region, index)
        except ValueError as exc:
            raise SegmentError(str(exc)) from None
        self.seg = segment
        self.region = region
        self.index = index
        self._hdr = slot_header_offset(self.slot)
        self._hw = self._hdr // 8
        self._body = slot_body_offset(self.slot)
        self._index: dict[tuple[int, str], int] = {}  # value word; histograms: byte offset
        self._dropped: set[tuple[int, str]] = set()
        self._n = 0
        self._nh = 0
        self._store: Any = None
        self._sizes = (-1, -1, -1)
        self._plan: list[tuple[Any, int]] = []
        self._hplan: list[tuple[Any, int]] = []
        self._scan()

    # -- the slot header --------------------------------------------------------------
    def info(self) -> SlotInfo:
        return SlotInfo(self.region, self.index, *SLOT_HEADER.unpack_from(self.seg.mm, self._hdr))

    @property
    def overflow(self) -> int:
        return len(self._dropped)

    def _scan(self) -> None:
        """Learn the entries the slot already holds."""
        info = self.info()
        n = min(info.n_stats, STATS_PER_SLOT)
        nh = min(info.n_hist, HISTOGRAMS_PER_SLOT)
        body = self._body
        index: dict[tuple[int, str], int] = {}
        for i, (raw, kind, value) in enumerate(
                ENTRY.iter_unpack(self.seg.mm[body : body + n * ENTRY_SIZE])):
            name = raw.rstrip(b"\0").decode("utf-8", "replace")
            if kind == HISTOGRAM:
                if value < nh:
                    index[(kind, name)] = hist_offset(self.slot, value)
            elif kind == COUNTER or kind == GAUGE:
                index[(kind, name)] = (body + i * ENTRY_SIZE + VALUE_AT) // 8
        self._n, self._nh, self._index = n, nh, index

    def claim(self, pid: int, epoch: int, role: int, worker_index: int) -> None:
        """Take the slot, keeping what it holds (``seed`` a Store to continue from it).

        SegmentError if another live process holds it, or if /dev/shm has no room for the
        slot (reserved here, so a full /dev/shm is an error now rather than a SIGBUS on
        some later flush)."""
        words = self.seg.words
        hw = self._hw
        info = self.info()
        if info.pid and info.pid != pid and pid_alive(info.pid, info.start):
            raise SegmentError(
                f"stats slot {self.index} of region {self.region} in {self.seg.name} is held "
                f"by pid {info.pid}, which is alive: two processes cannot share a slot (is "
                f"another trioxy using --base-id {self.seg.base_id}?)"
            )
        self.seg.reserve(self._body, BODY_SIZE)
        self._scan()
        for (kind, _), word in self._index.items():
            if kind == GAUGE:
                words[word] = 0  # the previous occupant's gauges died with it
        struct.pack_into("<d", self.seg.mm, self._hdr + 32, time.time())
        words[hw + S_EPOCH] = _u64(epoch)
        words[hw + S_ROLE] = _u64(role)
        words[hw + S_WORKER] = _u64(worker_index)
        words[hw + S_GENERATION] = (info.generation + 1) & U64_MAX
        words[hw + S_OVERFLOW] = 0
        self._dropped.clear()
        self._store = None
        words[hw + S_PID] = _u64(pid)  # last: from here readers count the slot as live

    # -- continuing -------------------------------------------------------------------
    def load(self) -> dict[str, tuple[int, Any]]:
        """What the slot holds: name -> (kind, value), a histogram's value being
        ``(bucket counts, sum, count)``."""
        return {name: (kind, value) for name, kind, value in read_entries(self.seg, self.info())}

    def seed(self, store: Any) -> None:
        """Set the Store's counters and histograms to the slot's values (before the
        process counts). Gauges are not seeded: they describe the live process."""
        for name, (kind, value) in self.load().items():
            if kind == COUNTER:
                store.counter(name).value = value
            elif kind == HISTOGRAM:
                h = store.histogram(name)
                counts, hsum, hcount = value
                if tuple(h.buckets) == BUCKET_BOUNDS and len(h.counts) == len(counts):
                    h.counts = list(counts)
                    h.sum = hsum
                    h.count = hcount

    # -- flushing ---------------------------------------------------------------------
    def flush(self, store: Any) -> None:
        """Write every counter, gauge and histogram of ``store`` into the slot."""
        if store is not self._store or self._sizes != (
                len(store.counters), len(store.gauges), len(store.histograms)):
            self._sync(store)
        words = self.seg.words
        try:
            for stat, word in self._plan:
                words[word] = stat.value
        except (ValueError, TypeError):  # a negative, huge or non-int value: clamp them
            for stat, word in self._plan:
                words[word] = _u64(stat.value)
        mm = self.seg.mm
        pack = HIST.pack_into
        for h, off in self._hplan:
            try:
                pack(mm, off, *h.counts, h.sum, h.count)
            except (struct.error, TypeError):
                pass  # a malformed histogram keeps its last good values

    def _sync(self, store: Any) -> None:
        """Find the Store's stats in the slot, appending the new ones."""
        plan: list[tuple[Any, int]] = []
        for kind, stats in ((COUNTER, store.counters), (GAUGE, store.gauges)):
            for name, stat in stats.items():
                key = (kind, name)
                word = self._index.get(key)
                if word is None:
                    if key in self._dropped:
                        continue
                    word = self._append(kind, name, _u64(stat.value))
                    if word is None:
                        continue
                plan.append((stat, word))
        hplan: list[tuple[Any, int]] = []
        for name, h in store.histograms.items():
            key = (HISTOGRAM, name)
            off = self._index.get(key)
            if off is None:
                if key in self._dropped:
                    continue
                if tuple(h.buckets) != BUCKET_BOUNDS or len(h.counts) != BUCKETS:
                    self._drop(key)
                    continue
                off = self._append_hist(name)
                if off is None:
                    continue
            hplan.append((h, off))
        self._plan, self._hplan, self._store = plan, hplan, store
        self._sizes = (len(store.counters), len(store.gauges), len(store.histograms))

    def _drop(self, key: tuple[int, str]) -> None:
        self._dropped.add(key)
        self.seg.words[self._hw + S_OVERFLOW] = len(self._dropped)

    def _fits(self, key: tuple[int, str]) -> bytes | None:
        encoded = key[1].encode("utf-8", "replace")
        if self._n >= STATS_PER_SLOT or not 0 < len(encoded) <= NAME_LEN or b"\0" in encoded:
            self._drop(key)
            return None
        return encoded

    def _append(self, kind: int, name: str, value: int) -> int | None:
        """A new entry, published after it is whole; its value word, or None (overflow)."""
        encoded = self._fits((kind, name))
        if encoded is None:
            return None
        off = self._body + self._n * ENTRY_SIZE
        ENTRY.pack_into(self.seg.mm, off, encoded, kind, value)
        self._n += 1
        self.seg.words[self._hw + S_N_STATS] = self._n  # publish
        word = (off + VALUE_AT) // 8
        if kind != HISTOGRAM:
            self._index[(kind, name)] = word
        return word

    def _append_hist(self, name: str) -> int | None:
        key = (HISTOGRAM, name)
        if self._nh >= HISTOGRAMS_PER_SLOT:
            self._drop(key)
            return None
        if self._fits(key) is None:
            return None
        hi = self._nh
        off = hist_offset(self.slot, hi)
        HIST.pack_into(self.seg.mm, off, *([0] * BUCKETS), 0.0, 0)  # a torn writer's leftovers
        self._nh += 1
        self.seg.words[self._hw + S_N_HIST] = self._nh  # before the entry that points here
        self._append(HISTOGRAM, name, hi)
        self._index[key] = off
        return off
