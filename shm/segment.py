"""Stats in POSIX shared memory: one segment per base id, one single-writer slot per process.

Theory of operation:
1. ``/trioxy.<base-id>`` holds a self-describing header (magic, layout version, size,
   INITIALIZING flag, creator pid/uid, creation time, layout parameters) and
   ``REGIONS × SLOTS_PER_REGION`` slots. An epoch uses region ``epoch % EPOCH_REGIONS``: at
   most three epochs live, so a region is reused only once its previous epoch is dead. The
   last region is the agent's (slot 0: reloads, failed reloads, relaunches). Within a
   region the epoch's main process hands out slots (0: itself, 1..: workers by index), so
   claiming a slot needs no lock, and nothing a SIGKILLed process holds can wedge anyone.
2. A slot is its writer's alone: a name table (name, kind, value) plus histogram bucket
   arrays. A writer publishes a new name by writing the entry first and bumping the
   entry count after, so readers never see half a name; 8-byte aligned values are never
   torn on x86-64.
3. A process that takes over a slot (a replaced worker, a later epoch in the region)
   ``load``s what it holds and ``seed``s its counters from it: counters continue, so the
   sums readers compute never go back. Gauges are not seeded, and readers count gauges
   only from slots whose process is alive.
4. Fixed sizes: a slot that runs out of entries or histograms counts the overflow and
   goes on. Unused pages of the segment cost no memory (tmpfs allocates on touch).
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import posix_ipc

MAGIC = b"TRIOXYST"
LAYOUT_VERSION = 2
EPOCH_REGIONS = 4
AGENT_REGION = EPOCH_REGIONS
REGIONS = EPOCH_REGIONS + 1
SLOTS_PER_REGION = 65
STATS_PER_SLOT = 2048
NAME_LEN = 112
HISTOGRAMS_PER_SLOT = 128
BUCKETS = 20  # len(proxy.stats.DEFAULT_BUCKETS) + 1 (the overflow bucket)

COUNTER, GAUGE, HISTOGRAM = 1, 2, 3
FLAG_INITIALIZING = 1

HEADER_SIZE = 4096
_HEADER = struct.Struct("<8sQQQQQdQQQQQQ")  # magic version size flags pid uid created + layout
SLOT_HEADER = 128
_SLOT_HEADER = struct.Struct("<QQQQdQQQQ")  # pid epoch role index start generation n n_hist overflow
ENTRY = 128  # name (NAME_LEN) | kind u8 | pad | value u64 at +120
HIST = (BUCKETS + 2) * 8  # counts..., sum (f64), count
SLOT_SIZE = SLOT_HEADER + STATS_PER_SLOT * ENTRY + HISTOGRAMS_PER_SLOT * HIST
SIZE = HEADER_SIZE + REGIONS * SLOTS_PER_REGION * SLOT_SIZE

_INIT_WAIT_S = 1.0


class SegmentError(Exception):
    pass


def segment_name(base_id: int) -> str:
    return f"/trioxy.{base_id}"


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Segment:
    def __init__(self, base_id: int, mm: mmap.mmap, created: bool) -> None:
        self.base_id = base_id
        self.mm = mm
        self.created = created
        self.words = memoryview(mm).cast("Q")

    # -- opening --------------------------------------------------------------------
    @classmethod
    def open(cls, base_id: int, *, create: bool = True, reclaim_stale: bool = True) -> Segment:
        name = segment_name(base_id)
        for _ in range(2):
            try:
                shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=SIZE)
                created = True
            except posix_ipc.ExistentialError:
                if not create:
                    try:
                        shm = posix_ipc.SharedMemory(name)
                    except posix_ipc.ExistentialError:
                        raise SegmentError(f"no stats segment {name}: is trioxy running with "
                                           f"--base-id {base_id}?") from None
                else:
                    shm = posix_ipc.SharedMemory(name)
                created = False
            size = shm.size
            mm = mmap.mmap(shm.fd, size)
            shm.close_fd()
            seg = cls(base_id, mm, created)
            if created:
                seg._initialize()
                return seg
            problem = seg._validate(size)
            if problem is None:
                return seg
            if reclaim_stale and seg._stale(problem):
                seg.close()
                cls.unlink(base_id)
                continue
            seg.close()
            raise SegmentError(
                f"stats segment {name} is not usable: {problem}. Another trioxy may use "
                f"--base-id {base_id} (pick another), or remove /dev/shm{name}"
            )
        raise SegmentError(f"stats segment {name} could not be created")

    def _initialize(self) -> None:
        _HEADER.pack_into(
            self.mm, 0, MAGIC, LAYOUT_VERSION, SIZE, FLAG_INITIALIZING, os.getpid(), os.getuid(),
            time.time(), REGIONS, SLOTS_PER_REGION, STATS_PER_SLOT, NAME_LEN,
            HISTOGRAMS_PER_SLOT, BUCKETS,
        )
        self.words[3] = 0  # flags: INITIALIZING cleared, the layout is in place

    def header(self) -> dict[str, Any]:
        f = _HEADER.unpack_from(self.mm, 0)
        keys = ("magic", "version", "size", "flags", "pid", "uid", "created", "regions",
                "slots_per_region", "stats_per_slot", "name_len", "histograms", "buckets")
        return dict(zip(keys, f, strict=True))

    def _validate(self, size: int) -> str | None:
        if size < HEADER_SIZE:
            return f"it is {size} bytes"
        deadline = time.monotonic() + _INIT_WAIT_S
        while self.words[3] & FLAG_INITIALIZING:
            if time.monotonic() > deadline:
                return "its creator never finished initializing it"
            time.sleep(0.01)
        h = self.header()
        if h["magic"] != MAGIC:
            return "it is not a trioxy stats segment"
        if h["version"] != LAYOUT_VERSION:
            return f"layout version {h['version']}, this binary uses {LAYOUT_VERSION}"
        if h["size"] != SIZE or size != SIZE:
            return f"size {size}, expected {SIZE}"
        if h["uid"] != os.getuid():
            return f"it belongs to uid {h['uid']}"
        return None

    def _stale(self, problem: str) -> bool:
        """Reclaimable: ours to remove and nobody registered in it is alive."""
        if "belongs to uid" in problem:
            return False
        if "creator never finished" in problem and pid_alive(self.header()["pid"]):
            return False
        if self.mm.size() >= SIZE and self.header()["magic"] == MAGIC:
            return not any(pid_alive(s.pid) for s in self.slots())
        return True

    @staticmethod
    def unlink(base_id: int) -> None:
        try:
            posix_ipc.unlink_shared_memory(segment_name(base_id))
        except posix_ipc.ExistentialError:
            pass

    def close(self) -> None:
        self.words.release()
        try:
            self.mm.close()
        except BufferError:
            pass  # a writer's view is still alive; the mapping goes with the process

    # -- slots ----------------------------------------------------------------------
    @staticmethod
    def slot_offset(region: int, index: int) -> int:
        if not (0 <= region < REGIONS and 0 <= index < SLOTS_PER_REGION):
            raise SegmentError(f"no slot {index} in region {region}")
        return HEADER_SIZE + (region * SLOTS_PER_REGION + index) * SLOT_SIZE

    def slots(self) -> list[SlotInfo]:
        out = []
        for region in range(REGIONS):
            for index in range(SLOTS_PER_REGION):
                off = self.slot_offset(region, index)
                pid, epoch, role, widx, start, gen, n, nh, overflow = _SLOT_HEADER.unpack_from(
                    self.mm, off)
                if pid:
                    out.append(SlotInfo(region, index, pid, epoch, role, widx, start, gen,
                                        n, nh, overflow))
        return out


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


def _read_entries(seg: Segment, info: SlotInfo) -> list[tuple[str, int, Any]]:
    mm = seg.mm
    words = seg.words
    base = seg.slot_offset(info.region, info.index)
    entries = base + SLOT_HEADER
    hists = entries + STATS_PER_SLOT * ENTRY
    out: list[tuple[str, int, Any]] = []
    for i in range(min(info.n_stats, STATS_PER_SLOT)):
        off = entries + i * ENTRY
        raw = mm[off : off + NAME_LEN]
        name = raw[: raw.find(b"\0") if b"\0" in raw else NAME_LEN].decode("utf-8", "replace")
        kind = mm[off + NAME_LEN]
        value = words[(off + 120) // 8]
        if kind == HISTOGRAM:
            h = hists + value * HIST
            counts = list(words[h // 8 : h // 8 + BUCKETS])
            hsum = struct.unpack_from("<d", mm, h + BUCKETS * 8)[0]
            hcount = words[h // 8 + BUCKETS + 1]
            out.append((name, kind, (counts, hsum, hcount)))
        else:
            out.append((name, kind, value))
    return out


class SlotWriter:
    """The one process that writes a slot."""

    def __init__(self, segment: Segment, region: int, index: int) -> None:
        self.seg = segment
        self.base = segment.slot_offset(region, index)
        self.region = region
        self.index = index
        self.entries = self.base + SLOT_HEADER
        self.hists = self.entries + STATS_PER_SLOT * ENTRY
        self._index: dict[str, int] = {}  # name -> value word index
        self._hist: dict[str, int] = {}  # name -> first word of its histogram
        self._n = 0
        self._nh = 0
        self._overflow = 0

    def _header_word(self, i: int) -> int:
        return self.base // 8 + i

    def claim(self, pid: int, epoch: int, role: int, worker_index: int) -> None:
        """Take the slot (keeping what it holds: ``load`` it to continue its counters)."""
        words = self.seg.words
        info = _SLOT_HEADER.unpack_from(self.seg.mm, self.base)
        self._n, self._nh, self._overflow = info[6], info[7], info[8]
        mm = self.seg.mm
        for i in range(min(self._n, STATS_PER_SLOT)):
            off = self.entries + i * ENTRY
            raw = mm[off : off + NAME_LEN]
            name = raw.rstrip(b"\0").decode("utf-8", "replace")
            word = (off + 120) // 8
            if mm[off + NAME_LEN] == HISTOGRAM:
                self._hist[name] = (self.hists + words[word] * HIST) // 8
            else:
                self._index[name] = word
        struct.pack_into("<d", self.seg.mm, self.base + 32, time.time())
        words[self._header_word(1)] = epoch
        words[self._header_word(2)] = role
        words[self._header_word(3)] = worker_index
        words[self._header_word(5)] = info[5] + 1  # generation
        words[self._header_word(0)] = pid  # last: the slot is live from here

    def _info(self) -> SlotInfo:
        f = _SLOT_HEADER.unpack_from(self.seg.mm, self.base)
        return SlotInfo(self.region, self.index, *f)

    def load(self) -> dict[str, tuple[int, Any]]:
        return {name: (kind, value) for name, kind, value in _read_entries(self.seg, self._info())}

    def seed(self, store: Any) -> None:
        """Counters and histograms continue from what the slot holds."""
        for name, (kind, value) in self.load().items():
            if kind == COUNTER:
                store.counter(name).value = value
            elif kind == HISTOGRAM:
                h = store.histogram(name)
                counts, hsum, hcount = value
                if len(counts) == len(h.counts):
                    h.counts = list(counts)
                    h.sum = hsum
                    h.count = hcount

    def _new_entry(self, name: str, kind: int, value: int) -> int | None:
        encoded = name.encode()
        if self._n >= STATS_PER_SLOT or len(encoded) > NAME_LEN:
            self._overflow += 1
            self.seg.words[self._header_word(8)] = self._overflow
            return None
        off = self.entries + self._n * ENTRY
        mm = self.seg.mm
        mm[off : off + NAME_LEN] = encoded.ljust(NAME_LEN, b"\0")
        mm[off + NAME_LEN] = kind
        word = (off + 120) // 8
        self.seg.words[word] = value
        self._n += 1
        self.seg.words[self._header_word(6)] = self._n  # publish after the entry is whole
        return word

    def flush(self, store: Any) -> None:
        words = self.seg.words
        index = self._index
        for kind, stats in ((COUNTER, store.counters), (GAUGE, store.gauges)):
            for name, stat in stats.items():
                word = index.get(name)
                value = stat.value if stat.value >= 0 else 0
                if word is None:
                    word = self._new_entry(name, kind, value)
                    if word is None:
                        continue
                    index[name] = word
                else:
                    words[word] = value
        for name, h in store.histograms.items():
            start = self._hist.get(name)
            if start is None:
                if self._nh >= HISTOGRAMS_PER_SLOT or len(h.counts) != BUCKETS:
                    if name not in index:
                        self._overflow += 1
                        words[self._header_word(8)] = self._overflow
                        index[name] = -1
                    continue
                hi = self._nh
                start = (self.hists + hi * HIST) // 8
                self._nh += 1
                words[self._header_word(7)] = self._nh
                self._hist[name] = start
                self._write_hist(start, h)
                if self._new_entry(name, HISTOGRAM, hi) is None:
                    continue
            else:
                self._write_hist(start, h)

    def _write_hist(self, start: int, h: Any) -> None:
        words = self.seg.words
        words[start : start + BUCKETS] = memoryview(struct.pack(f"<{BUCKETS}Q", *h.counts)).cast("Q")
        struct.pack_into("<d", self.seg.mm, (start + BUCKETS) * 8, h.sum)
        words[start + BUCKETS + 1] = h.count


@dataclass
class Stats:
    counters: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, int] = field(default_factory=dict)
    histograms: dict[str, tuple[list[int], float, int]] = field(default_factory=dict)
    overflow: int = 0


def read_stats(seg: Segment) -> Stats:
    """Counters summed over every slot ever used; gauges over live processes. The
    ``server.*`` gauges describe one epoch (its number, uptime, state): they come from the
    newest live epoch's main process instead of a sum."""
    out = Stats()
    newest_server: dict[str, tuple[int, int]] = {}
    connections: dict[int, int] = {}  # epoch -> live downstream connections
    for info in seg.slots():
        alive = pid_alive(info.pid)
        out.overflow += info.overflow
        for name, kind, value in _read_entries(seg, info):
            if (alive and kind == GAUGE and info.region != AGENT_REGION
                    and name.startswith("listener.") and name.endswith(".downstream_cx_active")):
                connections[info.epoch] = connections.get(info.epoch, 0) + value
            if kind == COUNTER:
                out.counters[name] = out.counters.get(name, 0) + value
            elif kind == GAUGE:
                if not alive:
                    out.gauges.setdefault(name, 0)
                elif name.startswith("server."):
                    if name not in newest_server or info.epoch >= newest_server[name][0]:
                        newest_server[name] = (info.epoch, value)
                else:
                    out.gauges[name] = out.gauges.get(name, 0) + value
            elif kind == HISTOGRAM:
                counts, hsum, hcount = value
                prev = out.histograms.get(name)
                if prev is None:
                    out.histograms[name] = (list(counts), hsum, hcount)
                else:
                    out.histograms[name] = (
                        [a + b for a, b in zip(prev[0], counts, strict=True)],
                        prev[1] + hsum, prev[2] + hcount,
                    )
    for name, (_, value) in newest_server.items():
        out.gauges[name] = value
    # Envoy's: connections of every live epoch, and of the epochs being replaced.
    if connections:
        newest = max(connections)
        out.gauges["server.total_connections"] = sum(connections.values())
        out.gauges["server.parent_connections"] = sum(
            v for e, v in connections.items() if e != newest)
    return out


def format_stats(stats: Stats) -> str:
    """Envoy's /stats text: ``name: value`` sorted by name."""
    lines = [f"{n}: {v}" for n, v in stats.counters.items()]
    lines += [f"{n}: {v}" for n, v in stats.gauges.items()]
    lines += [f"{n}: count={c} sum={s:g}" for n, (_, s, c) in stats.histograms.items()]
    if stats.overflow:
        lines.append(f"stats.overflow: {stats.overflow}")
    return "\n".join(sorted(lines)) + "\n"
