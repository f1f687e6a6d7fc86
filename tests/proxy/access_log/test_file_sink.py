"""The file sink: whole lines from several processes, rotation, overflow, shutdown."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.access_log import file_sink

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def _clean_registry() -> Iterator[None]:
    yield
    file_sink.close_all(5.0)


WRITER = r"""
import os, sys
from proxy.access_log import file_sink
path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
sink = file_sink.sink_for(path)
for i in range(n):
    # Lines of 10 bytes to ~9 KiB, so that batches often reach the 64 KiB cap.
    body = "x" * ((i * 7919) % 9000)
    sink.write(f"{tag} {i} {len(body)} {body} end\n")
assert file_sink.close_all(30.0)
assert sink.dropped == 0, sink.dropped
"""


def test_four_processes_append_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    n = 1500
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"p{k}", str(n)], env=env,
                         cwd=ROOT)
        for k in range(4)
    ]
    for p in procs:
        assert p.wait(timeout=60) == 0
    data = path.read_bytes()
    assert data.endswith(b"\n")
    lines = data.decode().split("\n")[:-1]
    assert len(lines) == 4 * n
    pattern = re.compile(r"(p\d) (\d+) (\d+) (x*) end")
    seen: Counter[str] = Counter()
    last: dict[str, int] = {}
    for line in lines:
        m = pattern.fullmatch(line)
        assert m is not None, line[:120]
        tag, i, size, body = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        assert len(body) == size
        assert i == last.get(tag, -1) + 1  # each process's lines stay in order
        last[tag] = i
        seen[tag] += 1
    assert seen == {f"p{k}": n for k in range(4)}


def test_reopen_after_rename(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    sink = file_sink.sink_for(str(path))
    assert file_sink.sink_for(str(path)) is sink
    for i in range(3):
        sink.write(f"before {i}\n")
    assert sink.flush(5.0)
    rotated = tmp_path / "access.log.1"
    path.rename(rotated)
    sink.write("still old fd\n")  # logrotate without copytruncate: lands in the renamed file
    assert sink.flush(5.0)
    file_sink.reopen_all()
    sink.write("after 0\n")
    assert file_sink.flush_all(5.0)
    assert rotated.read_text() == "before 0\nbefore 1\nbefore 2\nstill old fd\n"
    assert path.read_text() == "after 0\n"


def test_reopen_creates_file_even_without_writes(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    sink = file_sink.sink_for(str(path))
    path.unlink()
    sink.reopen()
    assert sink.flush(5.0)
    assert path.exists()


def test_overflow_drops_and_counts(tmp_path: Path) -> None:
    gate = threading.Event()

    class Slow(file_sink.Sink):
        def _write_all(self, data: bytes, lines: int) -> None:
            gate.wait(10)
            super()._write_all(data, lines)

    sink = Slow(str(tmp_path / "slow.log"), max_pending=5)
    try:
        for i in range(50):
            sink.write(f"{i}\n")
        assert sink.pending <= 5
        # The writer holds at most one batch (<= 5 lines) at the gate, the queue 5 more.
        assert sink.dropped >= 50 - 2 * 5
        gate.set()
        assert sink.flush(5.0)
        assert sink.lines_written + sink.dropped == 50
        assert sink.lines_written == len((tmp_path / "slow.log").read_text().splitlines())
    finally:
        gate.set()
        sink.close(5.0)


def test_close_flushes_everything_and_later_writes_drop(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    sink = file_sink.sink_for(str(path))
    for i in range(20_000):
        sink.write(f"line {i}\n")
    assert file_sink.close_all(10.0)
    assert sink.closed
    assert len(path.read_text().splitlines()) == 20_000
    sink.write("late\n")
    assert sink.dropped == 1
    # A new sink_for after close opens a fresh sink on the same path.
    again = file_sink.sink_for(str(path))
    assert again is not sink
    again.write("new\n")
    assert again.flush(5.0)
    assert path.read_text().endswith("line 19999\nnew\n")


def test_batches_respect_the_size_cap(tmp_path: Path) -> None:
    writes: list[int] = []

    class Recording(file_sink.Sink):
        def _write_all(self, data: bytes, lines: int) -> None:
            writes.append(len(data))
            super()._write_all(data, lines)

    gate_sink = Recording(str(tmp_path / "b.log"))
    try:
        line = "y" * 999 + "\n"  # 1000 bytes
        for _ in range(300):
            gate_sink.write(line)
        assert gate_sink.flush(5.0)
        assert sum(writes) == 300_000
        assert all(w % 1000 == 0 and w <= file_sink.MAX_BATCH_BYTES for w in writes)
    finally:
        gate_sink.close(5.0)


def test_pipe_batches_stay_under_pipe_buf(tmp_path: Path) -> None:
    r, w = os.pipe()
    writes: list[int] = []

    class Recording(file_sink.Sink):
        def _open(self) -> int:
            return w

        def _write_all(self, data: bytes, lines: int) -> None:
            writes.append(len(data))
            super()._write_all(data, lines)

    got = bytearray()
    reader = threading.Thread(target=lambda: got.extend(b"".join(iter_read(r))), daemon=True)
    reader.start()
    sink = Recording("/dev/stdout")  # a std path: close() leaves the fd alone
    try:
        for i in range(200):
            sink.write(f"{i:04d}" + "z" * 95 + "\n")  # 100 bytes
        assert sink.flush(5.0)
        assert all(n <= file_sink.PIPE_BUF for n in writes)
    finally:
        sink.close(5.0)
        os.close(w)
    reader.join(5)
    os.close(r)
    assert len(got) == 200 * 100


def iter_read(fd: int) -> Iterator[bytes]:
    while chunk := os.read(fd, 65536):
        yield chunk


def test_stdout_sink_writes_fd_1() -> None:
    code = (
        "from proxy.access_log import file_sink\n"
        "s = file_sink.sink_for('/dev/stdout')\n"
        "[s.write(f'out {i}\\n') for i in range(3)]\n"
        "file_sink.sink_for('/dev/stderr').write('err\\n')\n"
        "assert file_sink.close_all(5.0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout == "out 0\nout 1\nout 2\n"
    assert r.stderr == "err\n"


def test_exit_without_close_still_flushes(tmp_path: Path) -> None:
    path = tmp_path / "exit.log"
    code = (
        "import sys\n"
        "from proxy.access_log import file_sink\n"
        "s = file_sink.sink_for(sys.argv[1])\n"
        "[s.write(f'{i}\\n') for i in range(5000)]\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(path)], timeout=30, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0
    assert len(path.read_text().splitlines()) == 5000


def test_surrogateescape_bytes_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "bytes.log"
    sink = file_sink.sink_for(str(path))
    sink.write(b"caf\xc3\xa9 \xff".decode("utf-8", "surrogateescape") + "\n")
    sink.write(b"raw bytes\n")
    assert sink.flush(5.0)
    assert path.read_bytes() == b"caf\xc3\xa9 \xff\nraw bytes\n"


def test_open_failure_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        file_sink.sink_for(str(tmp_path / "no" / "such" / "dir.log"))


def test_child_after_fork_gets_fresh_sinks(tmp_path: Path) -> None:
    path = tmp_path / "fork.log"
    sink = file_sink.sink_for(str(path))
    sink.write("parent\n")
    assert sink.flush(5.0)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        ok = False
        try:
            child = file_sink.sink_for(str(path))
            ok = child is not sink and sink.closed
            child.write("child\n")
            ok = child.flush(5.0) and ok
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not sink.closed
    sink.write("parent again\n")
    assert sink.flush(5.0)
    assert path.read_text() == "parent\nchild\nparent again\n"
