"""Stats in POSIX shared memory: one segment per base id, one single-writer slot per process.

Counters survive worker deaths and hot restarts (a slot's next occupant continues them),
gauges count live processes only, and nothing takes a lock. See ``shm.segment`` (the
segment: create, attach, validate, reclaim), ``shm.stats_block`` (slots: write, read,
sum, print) and ``shm.layout`` (the versioned layout). ``python -m shm BASE_ID`` prints
the stats of a running trioxy.
"""

from shm.errors import SegmentError
from shm.layout import (
    AGENT_REGION,
    BUCKET_BOUNDS,
    EPOCH_REGIONS,
    HISTOGRAMS_PER_SLOT,
    LAYOUT_VERSION,
    NAME_LEN,
    REGIONS,
    SIZE,
    SLOTS_PER_REGION,
    STATS_PER_SLOT,
)
from shm.segment import Segment, segment_name, segment_path
from shm.stats_block import SlotInfo, SlotWriter, Stats, format_stats, pid_alive, read_stats

__all__ = [
    "AGENT_REGION", "BUCKET_BOUNDS", "EPOCH_REGIONS", "HISTOGRAMS_PER_SLOT", "LAYOUT_VERSION",
    "NAME_LEN", "REGIONS", "SIZE", "SLOTS_PER_REGION", "STATS_PER_SLOT", "Segment",
    "SegmentError", "SlotInfo", "SlotWriter", "Stats", "format_stats", "pid_alive",
    "read_stats", "segment_name", "segment_path",
]
