"""trioxy-agent with real processes and signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from harness import ROOT, free_port, http_get, wait_for_port

DIRECT = """
static_resources:
  listeners:
  - name: page
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: page
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                direct_response: {{status: 200, body: {{inline_string: "hello from the agent\\n"}}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""


def agent(cfg: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "supervisor.agent", "-c", str(cfg), "--concurrency", "1",
         "--drain-time-s", "1", "--parent-shutdown-time-s", "2"],
        cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )


def epoch_mains(agent_pid: int) -> list[psutil.Process]:
    """The agent's live epoch main processes (a killed one stays a zombie until reaped)."""
    out = []
    for c in psutil.Process(agent_pid).children():
        try:
            if c.status() != psutil.STATUS_ZOMBIE:
                out.append(c)
        except psutil.NoSuchProcess:
            pass
    return out


def test_agent_serves_relaunches_a_crashed_epoch_and_exits_on_term(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(DIRECT.format(port=port))
    log = tmp_path / "agent.log"
    a = agent(cfg, log)
    try:
        wait_for_port(port, proc=a)
        assert http_get(port)[2] == b"hello from the agent\n"
        (epoch0,) = epoch_mains(a.pid)
        epoch0.kill()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                mains = epoch_mains(a.pid)
                if mains and mains[0].pid != epoch0.pid and http_get(port, timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        (epoch1,) = epoch_mains(a.pid)
        assert epoch1.pid != epoch0.pid
        assert "relaunching" in log.read_text()
        a.send_signal(signal.SIGTERM)
        assert a.wait(15) == 0
        assert not epoch1.is_running() or epoch1.status() == psutil.STATUS_ZOMBIE
    finally:
        if a.poll() is None:
            a.kill()


def test_agent_stops_on_config_error_instead_of_relaunching(tmp_path: Path) -> None:
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text("static_resources: {clusters: [{name: c, type: EDS}]}\n")
    log = tmp_path / "agent.log"
    a = agent(cfg, log)
    assert a.wait(30) == 1
    text = log.read_text()
    assert "not relaunching" in text
    assert text.count("started epoch") == 1


def test_agent_forwards_usr1_without_dying(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(DIRECT.format(port=port))
    a = agent(cfg, tmp_path / "agent.log")
    try:
        wait_for_port(port, proc=a)
        os.kill(a.pid, signal.SIGUSR1)
        time.sleep(0.3)
        assert http_get(port)[0] == 200
    finally:
        a.send_signal(signal.SIGTERM)
        a.wait(15)


def test_epoch_command_switches_binary_and_flags_on_sighup(tmp_path: Path) -> None:
    """--epoch-command PATH is resolved at every spawn: repointing it, then SIGHUP, is a
    binary upgrade by hot restart (here: the same trioxy with another --concurrency)."""
    port = free_port()
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(DIRECT.format(port=port))
    wrapper = tmp_path / "trioxy-current"

    def point(concurrency: int) -> None:
        tmp = tmp_path / "wrapper.tmp"
        tmp.write_text(f'#!/bin/sh\nexec {sys.executable} -P -m proxy.cli "$@" '
                       f"--concurrency {concurrency}\n")
        tmp.chmod(0o755)
        os.replace(tmp, wrapper)

    point(1)
    log = tmp_path / "agent.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor.agent", "-c", str(cfg), "--concurrency", "2",
         "--drain-time-s", "1", "--parent-shutdown-time-s", "2", "--epoch-command", str(wrapper),
         "--base-id", str(os.getpid() % 50000 + 9000)],
        cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )
    try:
        wait_for_port(port, proc=proc)

        def workers_when_alone(deadline_s: float = 20) -> int:
            deadline = time.monotonic() + deadline_s
            while True:
                mains = epoch_mains(proc.pid)
                if len(mains) == 1 and "serves" in log.read_text():
                    n = len(mains[0].children())
                    if n:
                        return n
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)

        assert workers_when_alone() == 1  # the wrapper's flag wins over the agent's
        point(3)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "epoch 1 serves" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        time.sleep(2.5)  # epoch 0 drains and leaves
        assert workers_when_alone() == 3
        assert http_get(port)[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
