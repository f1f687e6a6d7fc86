"""The stats segment's layout: constants, record formats and offsets (pure, versioned).

```
0                      header (HEADER_SIZE): magic, version, size, flags, creator pid/uid,
                       creation time, the layout parameters, the histogram bucket bounds
SLOT_TABLE_OFFSET      slot headers, REGIONS × SLOTS_PER_REGION × SLOT_HEADER_SIZE
                       (pid, epoch, role, worker index, start time, generation, n_stats,
                       n_hist, overflow): all in a few pages, so a reader scans every slot
                       without touching the slots' bodies
BODY_OFFSET            slot bodies, page aligned, BODY_SIZE each:
                         STATS_PER_SLOT entries: name (NAME_LEN bytes, NUL padded), kind (u8),
                                                 padding, value (u64, 8-aligned)
                         HISTOGRAMS_PER_SLOT records: BUCKETS counts (u64), sum (f64), count
```

Every u64 sits at an 8-byte aligned offset (x86-64 never tears those). Little endian
throughout. Whatever changes here bumps ``LAYOUT_VERSION``, which is part of the
hot-restart version (``trioxy --hot-restart-version``).

Invariants every later version keeps, so an older or newer trioxy can still recognise a
segment and tell whether anyone uses it: the first four header words (magic, version,
size, flags) never move; from version 3 on, the header fields through ``body_size`` stay
where they are, and each slot header starts with its pid (u64) and start time (f64 at +32).
"""

from __future__ import annotations

import struct

MAGIC = b"TRIOXYST"
LAYOUT_VERSION = 3  # 1: first layout; 2: + the agent's region; 3: slot table, NAME_LEN 120

# Regions: an epoch uses region ``epoch % EPOCH_REGIONS``, or the next one no live process
# holds (epoch numbers skip when a starting epoch is killed, so N and N+4 can both live; at
# most three epochs live at once, so a free region always exists); the last region is the
# agent's. Slot 0 of a region is its main process, slots 1..64 its workers.
EPOCH_REGIONS = 4
AGENT_REGION = EPOCH_REGIONS
REGIONS = EPOCH_REGIONS + 1
SLOTS_PER_REGION = 65
N_SLOTS = REGIONS * SLOTS_PER_REGION

STATS_PER_SLOT = 2048
NAME_LEN = 120
HISTOGRAMS_PER_SLOT = 256
# Envoy's default histogram bounds (ms), the same as ``proxy.stats.DEFAULT_BUCKETS`` (shm
# imports nothing of ours; a test keeps the two equal). A histogram with other bounds is
# not shared: it counts as overflow.
BUCKET_BOUNDS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
    300000, 600000, 1800000, 3600000,
)
BUCKETS = len(BUCKET_BOUNDS) + 1  # counts per histogram: the last one is "above every bound"

COUNTER, GAUGE, HISTOGRAM = 1, 2, 3
KIND_NAMES = {COUNTER: "counter", GAUGE: "gauge", HISTOGRAM: "histogram"}
MAIN_ROLE, WORKER_ROLE, AGENT_ROLE = 0, 1, 2

FLAG_INITIALIZING = 1

PAGE = 4096


def _round_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


# -- header -------------------------------------------------------------------------------
HEADER = struct.Struct(
    "<8s"  # 0   magic
    "Q"  # 8   layout version
    "Q"  # 16  total size
    "Q"  # 24  flags (FLAG_INITIALIZING)
    "Q"  # 32  creator pid
    "Q"  # 40  creator uid
    "d"  # 48  creation time (time.time())
    "Q"  # 56  regions
    "Q"  # 64  slots per region
    "Q"  # 72  stats per slot
    "Q"  # 80  name length
    "Q"  # 88  histograms per slot
    "Q"  # 96  buckets (counts) per histogram
    "Q"  # 104 slot table offset
    "Q"  # 112 slot header size
    "Q"  # 120 slot body offset
    "Q"  # 128 slot body size
)
HEADER_FIELDS = (
    "magic", "version", "size", "flags", "pid", "uid", "created", "regions",
    "slots_per_region", "stats_per_slot", "name_len", "histograms", "buckets",
    "slot_table_offset", "slot_header_size", "body_offset", "body_size",
)
FLAGS_WORD = 3  # the flags' index as a u64 word
BOUNDS_OFFSET = HEADER.size  # BUCKET_BOUNDS as f64, after the fixed fields
BOUNDS = struct.Struct(f"<{len(BUCKET_BOUNDS)}d")
HEADER_SIZE = _round_up(BOUNDS_OFFSET + BOUNDS.size)

# -- slot headers -------------------------------------------------------------------------
SLOT_HEADER = struct.Struct("<QQQQdQQQQ")
SLOT_HEADER_SIZE = 128
SLOT_HEADER_PAD = struct.Struct(f"<QQQQdQQQQ{SLOT_HEADER_SIZE - SLOT_HEADER.size}x")
# word indexes inside a slot header
S_PID, S_EPOCH, S_ROLE, S_WORKER, S_START, S_GENERATION, S_N_STATS, S_N_HIST, S_OVERFLOW = range(9)
SLOT_TABLE_OFFSET = HEADER_SIZE
SLOT_TABLE_SIZE = _round_up(N_SLOTS * SLOT_HEADER_SIZE)

# -- slot bodies --------------------------------------------------------------------------
ENTRY = struct.Struct(f"<{NAME_LEN}sB7xQ")  # name, kind, value
ENTRY_SIZE = ENTRY.size
KIND_AT = NAME_LEN  # offset of the kind byte inside an entry
VALUE_AT = NAME_LEN + 8  # offset of the value word inside an entry
HIST = struct.Struct(f"<{BUCKETS}QdQ")  # counts..., sum, count
HIST_SIZE = HIST.size
HISTS_AT = STATS_PER_SLOT * ENTRY_SIZE  # offset of the histogram area inside a body
BODY_OFFSET = SLOT_TABLE_OFFSET + SLOT_TABLE_SIZE
BODY_SIZE = _round_up(HISTS_AT + HISTOGRAMS_PER_SLOT * HIST_SIZE)

SIZE = BODY_OFFSET + N_SLOTS * BODY_SIZE

assert HEADER_SIZE % 8 == 0 and SLOT_TABLE_OFFSET % PAGE == 0 and BODY_OFFSET % PAGE == 0
assert ENTRY_SIZE % 8 == 0 and VALUE_AT % 8 == 0 and HIST_SIZE % 8 == 0
assert SLOT_HEADER.size <= SLOT_HEADER_SIZE and SLOT_HEADER_SIZE % 8 == 0


def header_values(pid: int, uid: int, created: float, flags: int) -> tuple:
    """This layout's header fields, in ``HEADER`` order."""
    return (
        MAGIC, LAYOUT_VERSION, SIZE, flags, pid, uid, created, REGIONS, SLOTS_PER_REGION,
        STATS_PER_SLOT, NAME_LEN, HISTOGRAMS_PER_SLOT, BUCKETS, SLOT_TABLE_OFFSET,
        SLOT_HEADER_SIZE, BODY_OFFSET, BODY_SIZE,
    )


def slot_number(region: int, index: int) -> int:
    """The slot's position in the table; ValueError outside the layout."""
    if not (0 <= region < REGIONS and 0 <= index < SLOTS_PER_REGION):
        raise ValueError(
            f"no stats slot {index} in region {region} (regions 0..{REGIONS - 1}, "
            f"slots 0..{SLOTS_PER_REGION - 1})"
        )
    return region * SLOTS_PER_REGION + index


def slot_header_offset(slot: int) -> int:
    return SLOT_TABLE_OFFSET + slot * SLOT_HEADER_SIZE


def slot_body_offset(slot: int) -> int:
    return BODY_OFFSET + slot * BODY_SIZE


def entry_offset(slot: int, i: int) -> int:
    return slot_body_offset(slot) + i * ENTRY_SIZE


def hist_offset(slot: int, i: int) -> int:
    return slot_body_offset(slot) + HISTS_AT + i * HIST_SIZE


def pid_locations(header: dict, mapped_size: int) -> list[tuple[int, int]]:
    """Where a segment of any layout version keeps its slots' pids and start times.

    Returns ``(pid offset, start-time offset)`` for every slot that fits in
    ``mapped_size``. Versions 1 and 2 kept each slot header inline before its body;
    version 3 on name the slot table in the header.
    """
    version = header["version"]
    regions, per_region = header["regions"], header["slots_per_region"]
    n = regions * per_region if 0 < regions < 1 << 16 and 0 < per_region < 1 << 16 else 0
    out: list[tuple[int, int]] = []
    if version in (1, 2):
        slot_size = (128 + header["stats_per_slot"] * (header["name_len"] + 16)
                     + header["histograms"] * (header["buckets"] + 2) * 8)
        for k in range(n):
            off = 4096 + k * slot_size
            if off + 40 > mapped_size:
                break
            out.append((off, off + 32))
    elif version >= 3:
        table, step = header["slot_table_offset"], header["slot_header_size"]
        if step < 40:
            return out
        for k in range(n):
            off = table + k * step
            if off + 40 > mapped_size:
                break
            out.append((off, off + 32))
    return out
