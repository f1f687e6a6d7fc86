"""sd_notify and socket activation against sockets the test creates, as systemd would."""

from __future__ import annotations

import os
import socket

import pytest

from supervisor.sd_notify import Notifier, listen_fds


def test_notify_reaches_an_abstract_notify_socket() -> None:
    name = f"trioxy-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind("\0" + name)
        n = Notifier("@" + name)
        assert n.notify("READY=1\nSTATUS=epoch 0 serves")
        assert srv.recv(4096) == b"READY=1\nSTATUS=epoch 0 serves"
        assert n.notify("RELOADING=1")
        lines = srv.recv(4096).decode().split("\n")
        assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
        assert int(lines[1].split("=")[1]) > 0


def test_notify_without_systemd_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert Notifier().notify("READY=1") is False


def test_listen_fds_takes_only_sockets_meant_for_this_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listen_fds() == []
    assert "LISTEN_FDS" not in os.environ  # never inherited by the epochs
