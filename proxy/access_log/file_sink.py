"""Per-process access-log files, written off the event loop.

Theory of operation:

1. One ``Sink`` per path per process (``sink_for(path)``); ``/dev/stdout`` and ``/dev/stderr``
   write to fds 1 and 2, any other path is opened ``O_WRONLY | O_APPEND | O_CREAT`` (0644).
   Opening happens on first use, in the worker, so compiling a config opens nothing.
2. ``Sink.write(line)`` never blocks the trio loop: it appends the line to a deque and, when
   the writer is not already awake, sets an event. One daemon thread per sink drains the deque
   and writes batches of whole lines with one ``os.write`` each. Under load lines accumulate
   while a write is in progress, so batching grows by itself; when idle a line is written at
   once (Envoy buffers up to 1 s; a prompt write is friendlier to ``tail -f`` and costs little).
3. Lines stay whole across processes (every worker appends to the same file):
   - a regular file is opened ``O_APPEND``: each ``write(2)`` moves to the end of the file and
     writes under the inode lock, so on a local filesystem (ext4, xfs, tmpfs...) the bytes of
     one call are never interleaved with another process's call. A batch is at most 64 KiB of
     whole lines and is one call, so no line is split. (NFS gives no such guarantee.)
   - a pipe, FIFO or terminal (stdout under a supervisor) only promises atomicity up to
     ``PIPE_BUF`` (4096 bytes), so batches there are at most 4096 bytes of whole lines.
   - a single line longer than the limit is written alone; it can interleave only where the
     kernel splits a large write (a pipe), exactly as Envoy's does.
   A short write (disk full, pipe) is continued with the rest of the batch.
4. Bounded: when more than ``max_pending`` lines (100 000) wait for the writer, new lines are
   dropped and counted in ``dropped`` (Envoy counts ``access_log_file.write_buffered`` and
   drops when its buffer overflows) instead of growing without bound.
5. ``reopen_all()`` (SIGUSR1, logrotate) asks every sink's thread to reopen its path before its
   next write; ``flush_all(timeout)`` waits until every accepted line is written;
   ``close_all(timeout)`` flushes, stops the threads and closes the files (worker shutdown, and
   at interpreter exit). After ``fork`` the child starts with no sinks.
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import stat
import threading
import time
from collections import deque

__all__ = ["Sink", "close_all", "flush_all", "reopen_all", "sink_for"]

log = logging.getLogger(__name__)

MAX_PENDING_LINES = 100_000
MAX_BATCH_BYTES = 64 * 1024
PIPE_BUF = getattr(select, "PIPE_BUF", 4096)
_STD_FDS = {"/dev/stdout": 1, "/dev/stderr": 2}
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)


class Sink:
    """One open log destination with its writer thread."""

    def __init__(self, path: str, *, max_pending: int = MAX_PENDING_LINES) -> None:
        self.path = path
        self._std_fd = _STD_FDS.get(path)
        self._fd = self._open()  # raises OSError: the caller learns at once
        self._batch_limit = self._limit_for(self._fd)
        self._queue: deque[str | bytes] = deque()
        self._max_pending = max_pending
        self._wake = threading.Event()
        self._wake_pending = False
        self._cv = threading.Condition()
        self._busy = False
        self._reopen_requested = False
        self._stopping = False
        self.closed = False
        # Counters (Envoy's access_log_file.* stats are built from these).
        self.lines_written = 0
        self.bytes_written = 0
        self.write_failed = 0
        self.reopen_failed = 0
        self.dropped = 0
        self._thread = threading.Thread(
            target=self._run, name=f"access-log {path}", daemon=True)
        self._thread.start()

    # ---- producer side (the event loop) ---------------------------------------------------
    def write(self, line: str | bytes) -> None:
        """Queue one line (it carries its own newline); never blocks."""
        if self.closed or self._stopping or len(self._queue) >= self._max_pending:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("access log %s: writer behind or closed; dropping lines", self.path)
            return
        self._queue.append(line)
        if not self._wake_pending:
            self._wake_pending = True
            self._wake.set()

    def reopen(self) -> None:
        """Reopen the path before the next write (log rotation); returns at once."""
        if self._std_fd is not None or self.closed:
            return
        self._reopen_requested = True
        self._wake.set()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every line queued so far is written; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wake.set()
        with self._cv:
            while self._queue or self._busy or self._reopen_requested:
                if not self._thread.is_alive():
                    return not self._queue
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cv.wait(0.05 if remaining is None else min(remaining, 0.05))
        return True

    def close(self, timeout: float | None = 5.0) -> bool:
        """Flush, stop the writer and close the file; later writes are dropped."""
        if self.closed:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        flushed = self.flush(timeout)
        self._stopping = True
        self._wake.set()
        self._thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        stopped = not self._thread.is_alive()
        self.closed = True
        if stopped and self._std_fd is None:
            try:
                os.close(self._fd)
            except OSError:
                pass
        return flushed and stopped

    @property
    def pending(self) -> int:
        return len(self._queue)

    # ---- writer thread --------------------------------------------------------------------
    def _open(self) -> int:
        if self._std_fd is not None:
            return self._std_fd
        return os.open(self.path, _OPEN_FLAGS, 0o644)

    @staticmethod
    def _limit_for(fd: int) -> int:
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            regular = False
        return MAX_BATCH_BYTES if regular else PIPE_BUF

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            self._wake_pending = False  # before draining: a later line sets the event again
            try:
                if self._reopen_requested:
                    self._do_reopen()
                self._drain()
            except Exception:  # keep the writer alive whatever happens
                log.exception("access log %s: writer error", self.path)
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
            if self._stopping and not self._queue:
                return

    def _do_reopen(self) -> None:
        try:
            fd = os.open(self.path, _OPEN_FLAGS, 0o644)
        except OSError as exc:
            self.reopen_failed += 1
            log.error("access log %s: reopen failed: %s", self.path, exc)
        else:
            old, self._fd = self._fd, fd
            self._batch_limit = self._limit_for(fd)
            try:
                os.close(old)
            except OSError:
                pass
        with self._cv:
            self._reopen_requested = False
            self._cv.notify_all()

    def _drain(self) -> None:
        queue = self._queue
        limit = self._batch_limit
        self._busy = True  # before the first pop, so that flush() never sees "empty and idle"
        carry: bytes | None = None
        try:
            while queue or carry is not None:
                if self._reopen_requested:
                    self._do_reopen()
                    limit = self._batch_limit
                parts: list[bytes] = []
                size = 0
                if carry is not None:
                    parts.append(carry)
                    size = len(carry)
                    carry = None
                while queue:
                    try:
                        line = queue.popleft()
                    except IndexError:
                        break
                    b = line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line
                    if parts and size + len(b) > limit:
                        carry = b
                        break
                    parts.append(b)
                    size += len(b)
                if parts:
                    self._write_all(b"".join(parts) if len(parts) > 1 else parts[0], len(parts))
        finally:
            with self._cv:
                self._busy = False
                self._cv.notify_all()

    def _write_all(self, data: bytes, lines: int) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:
                time.sleep(0.001)  # stdout left non-blocking by someone: wait for room
                continue
            except OSError as exc:
                self.write_failed += 1
                if self.write_failed == 1:
                    log.error("access log %s: write failed: %s", self.path, exc)
                return
            view = view[n:]
        self.lines_written += lines
        self.bytes_written += len(data)

    def _forget_after_fork(self) -> None:
        """In a forked child: the thread is gone; close our copy of the file."""
        self.closed = True
        self._queue.clear()
        if self._std_fd is None:
            try:
                os.close(self._fd)
            except OSError:
                pass


# ============================================================================ registry
_lock = threading.Lock()
_sinks: dict[str, Sink] = {}


def sink_for(path: str) -> Sink:
    """This process's sink for ``path`` (created, and the file opened, on first use)."""
    sink = _sinks.get(path)
    if sink is not None and not sink.closed:
        return sink
    with _lock:
        sink = _sinks.get(path)
        if sink is None or sink.closed:
            sink = _sinks[path] = Sink(path)
        return sink


def reopen_all() -> None:
    """Reopen every file by path (SIGUSR1 after logrotate moved them)."""
    for sink in list(_sinks.values()):
        sink.reopen()


def flush_all(timeout: float = 5.0) -> bool:
    """Wait until every queued line of every sink is written; False on timeout."""
    deadline = time.monotonic() + timeout
    ok = True
    for sink in list(_sinks.values()):
        ok = sink.flush(max(0.0, deadline - time.monotonic())) and ok
    return ok


def close_all(timeout: float = 5.0) -> bool:
    """Flush and close every sink (worker shutdown); False if a writer did not finish."""
    deadline = time.monotonic() + timeout
    with _lock:
        sinks = list(_sinks.values())
        _sinks.clear()
    ok = True
    for sink in sinks:
        ok = sink.close(max(0.0, deadline - time.monotonic())) and ok
    return ok


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    for sink in list(_sinks.values()):
        sink._forget_after_fork()
    _sinks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(close_all, 2.0)
