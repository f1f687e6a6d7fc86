"""Die with the parent: a worker never outlives its epoch, an epoch never outlives its agent.

PR_SET_PDEATHSIG fires when the parent *thread* exits, and trio starts processes from a
worker thread that it retires after 10 s idle: children were killed ten seconds into their
life. So the child watches instead: once ``os.getppid()`` is no longer the process that
started it (it was re-parented to init or a subreaper), the parent is gone.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

CHECK_INTERVAL_S = 0.5


async def watch_parent(parent_pid: int, on_orphaned: Callable[[], None]) -> None:
    """Call ``on_orphaned`` once the parent is gone; returns then."""
    if parent_pid <= 0:
        return
    while True:
        if os.getppid() != parent_pid:  # no event tells us this: we have to look
            on_orphaned()
            return
        await trio.sleep(CHECK_INTERVAL_S)
