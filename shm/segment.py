"""The stats segment: one POSIX shared-memory object per base id, ``/trioxy.<base-id>``.

Theory of operation:
1. Creating: ``shm_open(O_CREAT | O_EXCL)`` decides who creates it. The creator sets
   INITIALIZING, writes the header (magic, layout version, size, creator pid/uid,
   creation time, layout parameters, bucket bounds), then clears INITIALIZING. Nothing
   else is written at creation: the segment is sparse (tmpfs allocates on touch), and
   each writer reserves its own slot's pages when it claims the slot (``reserve``), so a
   full /dev/shm is a clear error at claim time, never a SIGBUS in the middle of a flush.
2. Attaching: an attacher waits up to ``INIT_WAIT_S`` while the segment is still being
   created (empty, header not written yet, or INITIALIZING), then validates magic,
   layout version, size, parameters and owner. A segment that fails is *foreign*.
3. Foreign segments: if nobody is alive in it (neither its creator nor any process
   registered in a slot: ``os.kill(pid, 0)``, EPERM counting as alive, zombies and
   reused pids as dead), an opener with ``create=True, reclaim_stale=True`` removes it and
   creates a fresh one; otherwise ``SegmentError`` says what is wrong and how to fix it.
   Slot pids are found in segments of older layout versions too (``layout.pid_locations``),
   so an upgrade reclaims the old layout's segment once the old trioxy is gone. Removal
   first checks that the name still refers to the very object it judged (same inode), so
   two openers reclaiming at once cannot remove each other's fresh segment.
4. No locks anywhere: creation is decided by O_EXCL, each slot has a single writer
   (``shm.stats_block``), readers only read. Nothing a SIGKILLed process leaves behind
   can wedge anyone; at worst it leaves INITIALIZING set, which the next opener reclaims
   after ``INIT_WAIT_S``.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import time
from typing import Any

import posix_ipc

from shm.errors import SegmentError
from shm.layout import (
    AGENT_REGION,
    BODY_OFFSET,
    BOUNDS,
    BOUNDS_OFFSET,
    BUCKET_BOUNDS,
    EPOCH_REGIONS,
    FLAG_INITIALIZING,
    FLAGS_WORD,
    HEADER,
    HEADER_FIELDS,
    HISTOGRAMS_PER_SLOT,
    LAYOUT_VERSION,
    MAGIC,
    NAME_LEN,
    REGIONS,
    SIZE,
    SLOTS_PER_REGION,
    STATS_PER_SLOT,
    header_values,
    pid_locations,
)
from shm.stats_block import (
    SlotInfo,
    SlotWriter,
    Stats,
    format_stats,
    pid_alive,
    read_stats,
    slots,
)

__all__ = [
    "AGENT_REGION", "EPOCH_REGIONS", "HISTOGRAMS_PER_SLOT", "INIT_WAIT_S", "LAYOUT_VERSION",
    "NAME_LEN", "REGIONS", "SIZE", "SLOTS_PER_REGION", "STATS_PER_SLOT", "Segment",
    "SegmentError", "SlotInfo", "SlotWriter", "Stats", "format_stats", "pid_alive",
    "read_stats", "segment_name", "segment_path",
]

INIT_WAIT_S = 1.0  # how long an attacher waits for a creator to finish the header
_POLL_S = 0.005
_ZERO_MAGIC = bytes(len(MAGIC))
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")


def segment_name(base_id: int) -> str:
    return f"/trioxy.{base_id}"


def segment_path(base_id: int) -> str:
    """Where Linux shows the segment (glibc's shm_open lives in /dev/shm)."""
    return f"/dev/shm{segment_name(base_id)}"


def _fix_hint(base_id: int) -> str:
    return (f"start trioxy with a --base-id other than {base_id}, or, if no trioxy uses "
            f"that base id, remove {segment_path(base_id)}")


class Segment:
    """A mapped stats segment. ``mm`` is the mapping, ``words`` the same memory as u64s."""

    def __init__(self, base_id: int, shm: Any, mm: mmap.mmap, created: bool) -> None:
        self.base_id = base_id
        self.name = segment_name(base_id)
        self._shm = shm
        self.mm = mm
        self.words = memoryview(mm).cast("Q")
        self.created = created

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, base_id: int, *, create: bool = True, reclaim_stale: bool = True) -> Segment:
        """Create the segment (``create``) or attach to it.

        A foreign segment (another layout version, size, magic or owner) or one whose
        creator died mid-way is removed and created afresh when ``create`` and
        ``reclaim_stale`` are set and nobody is alive in it; otherwise SegmentError."""
        name = segment_name(base_id)
        for _ in range(4):
            if create:
                try:
                    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=SIZE)
                except posix_ipc.ExistentialError:
                    pass  # it exists: attach below
                except (posix_ipc.Error, OSError) as exc:
                    raise SegmentError(f"cannot create stats segment {name}: {exc}") from None
                else:
                    return cls._initialize(base_id, shm)
            try:
                shm = posix_ipc.SharedMemory(name)
            except posix_ipc.ExistentialError:
                if create:
                    continue  # removed between our two calls: create it
                raise SegmentError(
                    f"no stats segment {name}: is trioxy running with --base-id {base_id}?"
                ) from None
            except posix_ipc.PermissionsError:
                raise SegmentError(
                    f"stats segment {name} cannot be used: permission denied (it belongs to "
                    f"another user); {_fix_hint(base_id)}"
                ) from None
            try:
                problem, live, ino = _inspect(shm.fd)
                if problem is None:
                    seg = cls(base_id, shm, mmap.mmap(shm.fd, SIZE), created=False)
                    shm = None
                    return seg
                if create and reclaim_stale and not live:
                    _unlink_if_same(name, ino)
                    continue
            finally:
                if shm is not None:
                    shm.close_fd()
            in_use = (f"; in use by live pid {', '.join(map(str, live))}" if live
                      else "; no live process uses it")
            raise SegmentError(
                f"stats segment {name} cannot be used: {problem}{in_use}; {_fix_hint(base_id)}"
            )
        raise SegmentError(f"stats segment {name} keeps changing under us; {_fix_hint(base_id)}")

    @classmethod
    def _initialize(cls, base_id: int, shm: Any) -> Segment:
        try:
            mm = mmap.mmap(shm.fd, SIZE)
            seg = cls(base_id, shm, mm, created=True)
            seg.words[FLAGS_WORD] = FLAG_INITIALIZING  # before the magic is visible
            seg.reserve(0, BODY_OFFSET)  # the header and the slot table
            HEADER.pack_into(mm, 0, *header_values(
                os.getpid(), os.geteuid(), time.time(), FLAG_INITIALIZING))
            BOUNDS.pack_into(mm, BOUNDS_OFFSET, *BUCKET_BOUNDS)
            seg.words[FLAGS_WORD] = 0  # the layout is in place
            return seg
        except BaseException:
            _unlink_if_same(segment_name(base_id), os.fstat(shm.fd).st_ino)
            shm.close_fd()
            raise

    @staticmethod
    def unlink(base_id: int) -> bool:
        """Remove the name (mappings stay valid until closed); False if there was none."""
        try:
            posix_ipc.unlink_shared_memory(segment_name(base_id))
        except posix_ipc.ExistentialError:
            return False
        except posix_ipc.PermissionsError as exc:
            raise SegmentError(f"cannot remove {segment_path(base_id)}: {exc}") from None
        return True

    def close(self) -> None:
        self.words.release()
        try:
            self.mm.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with the process
        if self._shm is not None:
            self._shm.close_fd()
            self._shm = None

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- contents -----------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        h = dict(zip(HEADER_FIELDS, HEADER.unpack_from(self.mm, 0), strict=True))
        h["bucket_bounds"] = BOUNDS.unpack_from(self.mm, BOUNDS_OFFSET)
        return h

    def slots(self) -> list[SlotInfo]:
        return slots(self)

    def reserve(self, offset: int, length: int) -> None:
        """Allocate the pages now (``posix_fallocate``): ENOSPC becomes SegmentError here
        instead of SIGBUS when the page is first touched."""
        if self._shm is None:
            return
        try:
            os.posix_fallocate(self._shm.fd, offset, length)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EDQUOT):
                raise SegmentError(
                    f"no room in /dev/shm for {length} bytes of stats segment {self.name} "
                    f"({exc.strerror}): enlarge /dev/shm (docker: --shm-size)"
                ) from None
            # EOPNOTSUPP and the like: pages are allocated when touched


def _inspect(fd: int) -> tuple[str | None, list[int], int]:
    """(what is wrong or None, live pids in it, inode). Waits out a creator in progress."""
    deadline = time.monotonic() + INIT_WAIT_S
    while True:
        st = os.fstat(fd)
        head = os.pread(fd, HEADER.size, 0) if st.st_size else b""
        magic = head[:8]
        flags = int.from_bytes(head[24:32], "little") if len(head) >= 32 else 0
        creating = len(magic) < 8 or magic == _ZERO_MAGIC or (
            magic == MAGIC and (len(head) < HEADER.size or flags & FLAG_INITIALIZING))
        if not creating or time.monotonic() >= deadline:
            break
        time.sleep(_POLL_S)
    ino = st.st_ino
    if len(magic) < 8 or magic == _ZERO_MAGIC:
        what = f"{st.st_size} bytes" if len(magic) < 8 else "its header is zeros"
        return (f"it was never initialized ({what}): its creator died while creating it",
                [], ino)
    if magic != MAGIC:
        return f"it is not a trioxy stats segment (magic {magic!r})", [], ino
    if len(head) < HEADER.size:
        return f"it is truncated ({st.st_size} bytes)", [], ino
    h = dict(zip(HEADER_FIELDS, HEADER.unpack(head), strict=True))
    creator = [h["pid"]] if pid_alive(h["pid"], h["created"]) else []
    if flags & FLAG_INITIALIZING:
        if creator:
            return (f"its creator, pid {h['pid']}, has been initializing it for over "
                    f"{INIT_WAIT_S:g} s", creator, ino)
        return f"its creator, pid {h['pid']}, died while initializing it", [], ino
    problem = None
    if h["version"] != LAYOUT_VERSION:
        problem = f"layout version {h['version']}, this trioxy uses {LAYOUT_VERSION}"
    elif h["size"] != SIZE or st.st_size != SIZE:
        problem = f"size {st.st_size} (header: {h['size']}), this trioxy uses {SIZE}"
    elif tuple(HEADER.unpack(head)[7:]) != header_values(0, 0, 0.0, 0)[7:]:
        problem = "its layout parameters differ from this trioxy's (same layout version)"
    elif BOUNDS.unpack(os.pread(fd, BOUNDS.size, BOUNDS_OFFSET)) != BUCKET_BOUNDS:
        problem = "its histogram bucket bounds differ from this trioxy's"
    elif h["uid"] != os.geteuid():
        problem = f"it belongs to uid {h['uid']}, this process runs as uid {os.geteuid()}"
    if problem is None:
        return None, [], ino
    live = set(creator)
    for pid_at, start_at in pid_locations(h, st.st_size):
        (pid,) = _U64.unpack(os.pread(fd, 8, pid_at))
        (start,) = _F64.unpack(os.pread(fd, 8, start_at))
        if pid and pid not in live and pid_alive(pid, start if start > 0 else None):
            live.add(pid)
    return problem, sorted(live), ino


def _unlink_if_same(name: str, ino: int) -> None:
    """Remove ``name`` only if it still is the object we judged (inode ``ino``)."""
    try:
        again = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError:
        return
    except posix_ipc.PermissionsError as exc:
        raise SegmentError(f"cannot remove stale stats segment /dev/shm{name}: {exc}") from None
    try:
        if os.fstat(again.fd).st_ino != ino:
            return
    finally:
        again.close_fd()
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass
    except posix_ipc.PermissionsError as exc:
        raise SegmentError(f"cannot remove stale stats segment /dev/shm{name}: {exc}") from None
