"""The agent's pidfile: atomic, refused while live, replaced when stale."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from supervisor import pidfile


def test_acquire_writes_our_pid_and_release_removes_it(tmp_path: Path) -> None:
    path = tmp_path / "agent.pid"
    pidfile.acquire(str(path))
    assert path.read_text() == f"{os.getpid()}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["agent.pid"]  # no temp file left
    pidfile.release(str(path))
    assert not path.exists()


def test_a_live_holder_is_refused(tmp_path: Path) -> None:
    holder = subprocess.Popen(["sleep", "30"])
    try:
        path = tmp_path / "agent.pid"
        path.write_text(f"{holder.pid}\n")
        with pytest.raises(pidfile.PidFileError, match=str(holder.pid)):
            pidfile.acquire(str(path))
        pidfile.release(str(path))
        assert path.exists()  # not ours: left alone
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_pidfile_is_replaced(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = tmp_path / "agent.pid"
    path.write_text(f"{dead.pid}\n")
    pidfile.acquire(str(path))
    assert path.read_text() == f"{os.getpid()}\n"
