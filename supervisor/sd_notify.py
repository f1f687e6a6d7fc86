"""systemd's notify protocol (sd_notify(3)) and socket activation (sd_listen_fds(3)).

No libsystemd: the protocol is a datagram of ``KEY=value`` lines to the AF_UNIX socket
named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace). Without the
variable every call is a no-op, so the agent runs the same under systemd and without it.
"""

from __future__ import annotations

import os
import socket
import time

SD_LISTEN_FDS_START = 3


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self.address: str | None = None
        if address:
            self.address = "\0" + address[1:] if address.startswith("@") else address
        self.sent: list[str] = []  # what was sent, for logs and tests

    def notify(self, state: str) -> bool:
        """Send ``state`` (lines of KEY=value); False when not under systemd or it failed."""
        if self.address is None:
            return False
        if "RELOADING=1" in state.split("\n") and "MONOTONIC_USEC=" not in state:
            # systemd ≥ 253 wants the reload's start time with RELOADING=1.
            state += f"\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(state.encode(), self.address)
        except OSError:
            return False
        self.sent.append(state)
        return True


def listen_fds(unset_environment: bool = True) -> list[socket.socket]:
    """Sockets systemd passed us (``LISTEN_FDS``, checked against ``LISTEN_PID``)."""
    try:
        pid = int(os.environ.get("LISTEN_PID", "0"))
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    if unset_environment:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)  # never leak them to the epochs
    if pid != os.getpid() or n <= 0:
        return []
    out = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n):
        os.set_inheritable(fd, False)
        out.append(socket.socket(fileno=fd))
    return out
