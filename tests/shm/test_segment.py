"""Creating, attaching, validating and reclaiming the segment."""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import posix_ipc
import pytest

from shm import layout as L
from shm import segment as segment_mod
from shm.segment import Segment, SegmentError, SlotWriter, read_stats, segment_name


def raw_segment(base: int, size: int = 0) -> tuple[posix_ipc.SharedMemory, mmap.mmap | None]:
    shm = posix_ipc.SharedMemory(segment_name(base), posix_ipc.O_CREX, mode=0o600, size=size)
    return shm, (mmap.mmap(shm.fd, size) if size else None)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def write_v3_header(mm: mmap.mmap, **changes: object) -> None:
    h = dict(zip(L.HEADER_FIELDS, L.header_values(os.getpid(), os.geteuid(), time.time(), 0),
                 strict=True))
    h.update(changes)
    L.HEADER.pack_into(mm, 0, *h.values())
    L.BOUNDS.pack_into(mm, L.BOUNDS_OFFSET, *L.BUCKET_BOUNDS)


def test_create_attach_and_validate(base_id: int) -> None:
    seg = Segment.open(base_id)
    assert seg.created
    h = seg.header()
    assert h["magic"] == b"TRIOXYST" and h["version"] == L.LAYOUT_VERSION == 3
    assert h["size"] == L.SIZE and h["flags"] == 0
    assert h["pid"] == os.getpid() and h["uid"] == os.geteuid()
    assert abs(h["created"] - time.time()) < 5
    assert (h["regions"], h["slots_per_region"], h["stats_per_slot"], h["name_len"],
            h["histograms"], h["buckets"]) == (5, 65, 2048, 120, 256, 20)
    assert h["bucket_bounds"] == L.BUCKET_BOUNDS
    assert os.stat(f"/dev/shm/trioxy.{base_id}").st_size == L.SIZE
    again = Segment.open(base_id)
    reader = Segment.open(base_id, create=False)
    assert not again.created and not reader.created
    assert again.header() == h
    for s in (seg, again, reader):
        s.close()
    assert Segment.unlink(base_id) and not Segment.unlink(base_id)
    with pytest.raises(SegmentError, match=f"no stats segment /trioxy.{base_id}.*--base-id"):
        Segment.open(base_id, create=False)


def test_foreign_magic_is_reported_then_reclaimed_when_stale(base_id: int) -> None:
    shm, _ = raw_segment(base_id, 4096)
    os.pwrite(shm.fd, b"NOTTRIOX" + bytes(100), 0)
    shm.close_fd()
    for create in (True, False):
        with pytest.raises(SegmentError) as err:
            Segment.open(base_id, create=create, reclaim_stale=False)
        msg = str(err.value)
        assert f"/trioxy.{base_id}" in msg and "not a trioxy stats segment" in msg
        assert f"--base-id other than {base_id}" in msg
        assert f"remove /dev/shm/trioxy.{base_id}" in msg
    # create=False never removes anything, even with reclaim_stale.
    with pytest.raises(SegmentError):
        Segment.open(base_id, create=False, reclaim_stale=True)
    seg = Segment.open(base_id, reclaim_stale=True)  # nobody alive uses it: recreated
    assert seg.created and seg.header()["magic"] == L.MAGIC
    assert os.stat(f"/dev/shm/trioxy.{base_id}").st_size == L.SIZE


def test_a_short_foreign_file_is_not_mistaken_for_one_being_created(base_id: int) -> None:
    shm, _ = raw_segment(base_id, 20)
    os.pwrite(shm.fd, b"somebody else", 0)
    shm.close_fd()
    start = time.monotonic()
    with pytest.raises(SegmentError, match="not a trioxy stats segment"):
        Segment.open(base_id, create=False)
    assert time.monotonic() - start < 0.5
    assert Segment.open(base_id).created


def test_old_layout_in_use_is_kept_and_reclaimed_once_its_users_are_gone(base_id: int) -> None:
    # A layout-2 segment (slot headers inline, 432-byte slots in this tiny geometry).
    slot_v2 = 128 + 1 * 128 + 1 * 176
    shm, mm = raw_segment(base_id, 4096 + 2 * slot_v2)
    assert mm is not None
    struct_v2 = "<8sQQQQQdQQQQQQ"
    struct.pack_into(struct_v2, mm, 0, L.MAGIC, 2, len(mm), 0, dead_pid(), os.geteuid(),
                     time.time(), 1, 2, 1, 112, 1, 20)
    struct.pack_into("<QQQQd", mm, 4096 + slot_v2, os.getpid(), 0, 1, 0, time.time())
    with pytest.raises(SegmentError, match=f"layout version 2, this trioxy uses 3; in use by "
                                           f"live pid {os.getpid()}"):
        Segment.open(base_id, reclaim_stale=True)
    struct.pack_into("<Q", mm, 4096 + slot_v2, dead_pid())  # the old trioxy is gone
    seg = Segment.open(base_id, reclaim_stale=True)
    assert seg.created and seg.header()["version"] == 3
    mm.close()
    shm.close_fd()


def test_another_owner_or_size_is_foreign(base_id: int) -> None:
    shm, mm = raw_segment(base_id, L.SIZE)
    assert mm is not None
    write_v3_header(mm, uid=os.geteuid() + 1, pid=dead_pid())
    with pytest.raises(SegmentError, match=f"belongs to uid {os.geteuid() + 1}"):
        Segment.open(base_id, reclaim_stale=False)
    # Someone alive registered in it: reported even with reclaim_stale.
    L.SLOT_HEADER.pack_into(mm, L.slot_header_offset(70), os.getpid(), 1, 1, 4, time.time(),
                            1, 0, 0, 0)
    with pytest.raises(SegmentError, match=f"live pid {os.getpid()}"):
        Segment.open(base_id, reclaim_stale=True)
    L.SLOT_HEADER.pack_into(mm, L.slot_header_offset(70), dead_pid(), 1, 1, 4, time.time(),
                            1, 0, 0, 0)
    assert Segment.open(base_id, reclaim_stale=True).created
    mm.close()
    shm.close_fd()
    Segment.unlink(base_id)
    shm, mm = raw_segment(base_id, L.SIZE + 4096)
    assert mm is not None
    write_v3_header(mm, pid=dead_pid())
    with pytest.raises(SegmentError, match=f"size {L.SIZE + 4096}"):
        Segment.open(base_id, create=False)
    mm.close()
    shm.close_fd()


def test_initializing_left_by_a_killed_creator_is_stale_after_the_wait(
        base_id: int, child: Callable[..., subprocess.Popen]) -> None:
    p = child("init-and-die", base_id)
    assert p.stdout is not None and p.stdout.readline() == "initializing\n"
    assert p.wait() == -9
    start = time.monotonic()
    seg = Segment.open(base_id)
    waited = time.monotonic() - start
    assert seg.created and seg.header()["pid"] == os.getpid()
    assert 0.95 <= waited < 2.0, waited


def test_initializing_reported_without_reclaim_and_kept_while_its_creator_lives(
        base_id: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segment_mod, "INIT_WAIT_S", 0.1)
    shm, mm = raw_segment(base_id, L.SIZE)
    assert mm is not None
    write_v3_header(mm, flags=L.FLAG_INITIALIZING, pid=dead_pid())
    with pytest.raises(SegmentError, match="died while initializing it"):
        Segment.open(base_id, reclaim_stale=False)
    write_v3_header(mm, flags=L.FLAG_INITIALIZING)  # its creator (we) still lives
    with pytest.raises(SegmentError, match="has been initializing it for over"):
        Segment.open(base_id, reclaim_stale=True)
    mm.close()
    shm.close_fd()


def test_a_creator_died_before_the_header_or_the_size(
        new_base_id: Callable[[], int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segment_mod, "INIT_WAIT_S", 0.1)
    for size in (0, L.SIZE):  # killed between shm_open and ftruncate, or before the header
        base = new_base_id()
        shm, _ = raw_segment(base, size)
        shm.close_fd()
        with pytest.raises(SegmentError, match="never initialized"):
            Segment.open(base, create=False)
        assert Segment.open(base).created


def test_an_attacher_waits_for_the_creator_to_finish(base_id: int) -> None:
    seg = Segment.open(base_id)
    seg.words[L.FLAGS_WORD] = L.FLAG_INITIALIZING
    t = threading.Timer(0.2, lambda: seg.words.__setitem__(L.FLAGS_WORD, 0))
    t.start()
    start = time.monotonic()
    again = Segment.open(base_id, create=False)
    assert 0.15 < time.monotonic() - start < 0.9
    assert not again.created
    t.join()


def test_simultaneous_creators_share_one_segment(
        base_id: int, child: Callable[..., subprocess.Popen]) -> None:
    start_at = time.time() + 0.4
    procs = [child("create", base_id, slot, start_at) for slot in range(1, 7)]
    inodes = set()
    for p in procs:
        out, _ = p.communicate(timeout=30)
        assert p.returncode == 0
        inodes.add(int(out))
    seg = Segment.open(base_id, create=False)
    assert inodes == {os.fstat(seg._shm.fd).st_ino}  # nobody replaced anybody's segment
    assert read_stats(seg).counters["test.created"] == 6


def test_a_slot_held_by_a_live_process_cannot_be_claimed(
        base_id: int, child: Callable[..., subprocess.Popen]) -> None:
    seg = Segment.open(base_id)
    p = child("count", base_id, 2, 3, -1, 1000)
    assert p.stdout is not None and p.stdout.readline().startswith("ready")
    with pytest.raises(SegmentError, match=f"held by pid {p.pid}, which is alive"):
        SlotWriter(seg, 2, 3).claim(os.getpid(), 2, 1, 3)
    p.kill()
    p.wait()
    SlotWriter(seg, 2, 3).claim(os.getpid(), 6, 1, 3)  # dead now: free to take over
    with pytest.raises(SegmentError, match="no stats slot 65 in region 0"):
        SlotWriter(seg, 0, 65)
