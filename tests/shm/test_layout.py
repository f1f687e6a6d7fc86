"""The layout: pure arithmetic, checked against what the writer and reader rely on."""

from __future__ import annotations

import pytest

from proxy.stats import DEFAULT_BUCKETS, Histogram
from shm import layout as L


def test_bucket_bounds_are_the_stores() -> None:
    assert L.BUCKET_BOUNDS == DEFAULT_BUCKETS
    assert L.BUCKETS == len(Histogram("h").counts)


def test_size_and_alignment() -> None:
    assert L.ENTRY_SIZE == L.NAME_LEN + 16 == 136
    assert L.HIST_SIZE == (L.BUCKETS + 2) * 8
    assert L.HEADER_SIZE == 4096 and L.SLOT_TABLE_OFFSET == 4096
    assert L.BODY_OFFSET % L.PAGE == 0 and L.BODY_SIZE % L.PAGE == 0
    assert L.SIZE == L.BODY_OFFSET + L.REGIONS * L.SLOTS_PER_REGION * L.BODY_SIZE
    assert L.SIZE == 105_213_952  # ~100 MiB, sparse: a slot's 316 KiB are reserved on claim
    last = L.N_SLOTS - 1
    assert L.slot_header_offset(last) + L.SLOT_HEADER_SIZE <= L.BODY_OFFSET
    assert L.hist_offset(last, L.HISTOGRAMS_PER_SLOT - 1) + L.HIST_SIZE <= L.SIZE
    assert L.entry_offset(0, L.STATS_PER_SLOT - 1) + L.ENTRY_SIZE <= L.hist_offset(0, 0)
    for off in (L.entry_offset(3, 7) + L.VALUE_AT, L.hist_offset(3, 7), L.slot_header_offset(9)):
        assert off % 8 == 0


def test_regions() -> None:
    assert (L.EPOCH_REGIONS, L.AGENT_REGION, L.REGIONS, L.SLOTS_PER_REGION) == (4, 4, 5, 65)
    assert L.slot_number(1, 0) == 65
    with pytest.raises(ValueError, match="no stats slot 65 in region 0"):
        L.slot_number(0, 65)
    with pytest.raises(ValueError):
        L.slot_number(L.REGIONS, 0)


def test_pid_locations_of_every_version() -> None:
    v3 = dict(zip(L.HEADER_FIELDS, L.header_values(1, 0, 0.0, 0), strict=True))
    locs = L.pid_locations(v3, L.SIZE)
    assert len(locs) == L.N_SLOTS
    assert locs[5] == (L.slot_header_offset(5), L.slot_header_offset(5) + 32)
    v2 = dict(v3, version=2, regions=5, slots_per_region=65, stats_per_slot=2048,
              name_len=112, histograms=128, buckets=20)
    slot_v2 = 128 + 2048 * 128 + 128 * 176
    assert L.pid_locations(v2, 10**9)[2] == (4096 + 2 * slot_v2, 4096 + 2 * slot_v2 + 32)
    assert len(L.pid_locations(v2, 4096 + slot_v2 + 40)) == 2  # only what the file holds
    assert L.pid_locations(dict(v3, version=0), L.SIZE) == []
    assert L.pid_locations(dict(v3, regions=1 << 40), L.SIZE) == []
