"""Real shared memory, real processes. Every segment a test names is unlinked afterwards;
base ids are random in a high range so parallel runs (and a real trioxy) never collide."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shm.segment import Segment

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("_child.py")


@pytest.fixture
def new_base_id() -> Iterator[Callable[[], int]]:
    made: list[int] = []

    def make() -> int:
        base = random.SystemRandom().randrange(3_000_000_000, 4_000_000_000)
        made.append(base)
        return base

    yield make
    for base in made:
        Segment.unlink(base)


@pytest.fixture
def base_id(new_base_id: Callable[[], int]) -> int:
    return new_base_id()


@pytest.fixture
def child() -> Iterator[Callable[..., subprocess.Popen]]:
    """``child(*args)`` runs tests/shm/_child.py; whatever is left is SIGKILLed at the end."""
    procs: list[subprocess.Popen] = []

    def start(*args: object) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, str(CHILD), *map(str, args)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()
        if p.stdout:
            p.stdout.close()
