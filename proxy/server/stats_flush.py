"""Each process's stats go to its shared-memory slot (``shm/``) once a second.

The hot path only bumps ints in the process's ``Store``; this task copies the Store into
the slot, so ``trioxy stats`` (and later the admin API) can sum every process of every
epoch. A process that takes a slot over continues its counters (``seed``), so counters
survive worker deaths and hot restarts. Without shared memory (no /dev/shm, a foreign
segment) trioxy serves anyway and says so once.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import trio

from proxy.stats import Store

log = logging.getLogger("trioxy.stats")

FLUSH_INTERVAL_S = 1.0
MAIN_SLOT = 0
MAIN_ROLE, WORKER_ROLE, AGENT_ROLE = 0, 1, 2


def open_slot(base_id: int, epoch: int, slot: int, role: int, worker_index: int,
              create: bool, region: int | None = None) -> Any:
    """A claimed ``SlotWriter`` for this process, or None when stats cannot be shared.

    An epoch's main process (``region`` None) takes region ``epoch % EPOCH_REGIONS`` unless a
    live process holds it, then the next free one: epoch numbers skip when a starting epoch
    is killed, so epoch N and N+4 can both be alive (one draining). At most three epochs
    live, so one of the four regions is always free. Workers are told their epoch's region
    (``writer.region``)."""
    from shm.segment import AGENT_REGION, EPOCH_REGIONS, Segment, SegmentError, SlotWriter

    try:
        seg = Segment.open(base_id, create=create, reclaim_stale=create)
        if role == AGENT_ROLE:
            candidates = [AGENT_REGION]
        elif region is not None:
            candidates = [region]
        else:
            candidates = [(epoch + k) % EPOCH_REGIONS for k in range(EPOCH_REGIONS)]
        last: Exception | None = None
        for r in candidates:
            writer = SlotWriter(seg, r, slot)
            try:
                writer.claim(os.getpid(), epoch, role, worker_index)
            except SegmentError as exc:
                last = exc
                continue
            return writer
        assert last is not None
        raise last
    except (SegmentError, OSError) as exc:
        log.error("stats are not shared (trioxy stats will not see this process): %s", exc)
        return None


async def flush_forever(writer: Any, store: Store, before: Any = None) -> None:
    """Flush now and every second until cancelled; a last flush on the way out."""
    try:
        while True:
            if before is not None:
                before()
            writer.flush(store)
            await trio.sleep(FLUSH_INTERVAL_S)
    finally:
        if before is not None:
            before()
        writer.flush(store)
