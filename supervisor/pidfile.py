"""The agent's pidfile: written atomically, refused while a live agent holds it."""

from __future__ import annotations

import os


class PidFileError(Exception):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def acquire(path: str) -> None:
    """Write our pid to ``path``; a pidfile naming a live process other than us is refused,
    one naming a dead process (stale: the agent was killed) is replaced."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        text = ""
    if text:
        try:
            pid = int(text)
        except ValueError:
            pid = 0
        if pid > 0 and pid != os.getpid() and _alive(pid):
            raise PidFileError(f"{path}: trioxy-agent already runs as pid {pid}")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def release(path: str) -> None:
    try:
        with open(path) as f:
            mine = f.read().strip() == str(os.getpid())
        if mine:
            os.unlink(path)
    except OSError:
        pass
