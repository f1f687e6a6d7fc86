"""trioxy-drill as CI runs it: real agent, real load, real signals; the exit status gates.

About 30 s in all: a 5-HUP drill, a 6-step chaos drill with a fixed seed (every kind of
step once), a drill that must fail, and the guard for scenarios the agent cannot do yet.
Each drill picks its own free ports and a random base id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from drill import EXIT_INVARIANT_BROKEN, EXIT_OK, EXIT_UNSUPPORTED
from drill.agent import Target, epoch_command_script
from drill.config import broken_bootstrap, builtin_bootstrap, endpoints_of
from drill.load import PeerClosed, classify_error
from drill.upstream import free_port

ROOT = Path(__file__).resolve().parents[2]


def drill(tmp_path: Path, *args: str, timeout: float = 180) -> tuple[int, dict, str]:
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "drill", *args, "--report", str(report), "-q",
                        "--work-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    data = json.loads(report.read_text()) if report.exists() else {}
    return r.returncode, data, out


def test_hup_drill_passes(tmp_path: Path) -> None:
    rc, rep, out = drill(tmp_path, "hup", "--restarts", "5", "--interval", "1")
    assert rc == EXIT_OK, out
    assert rep["passed"]
    assert rep["restarts"]["hups_sent"] == 5
    assert rep["restarts"]["hot_restarts_serving"] >= 2  # HUPs during a start coalesce
    assert rep["requests"]["failed"] == 0 and rep["requests"]["ok"] > 500
    assert rep["connections"] == {"refused": 0, "reset": 0}
    assert rep["counters"]["monotonic"] and rep["counters"]["samples"] > 5
    cont = rep["counters"]["continuity"]
    assert cont["proxy_count"] == cont["drill_answered"]
    assert rep["fds"]["agent_after"] <= rep["fds"]["agent_before"]
    assert rep["epochs"]["max_alive"] <= 3
    assert rep["handover_s"]["spawn_to_serving"]["count"] >= 2
    modes = rep["requests"]["by_mode"]
    for mode in ("http1-keepalive", "http1-new", "http1-slow", "tcp"):
        assert modes[mode]["ok"] > 0, modes
    assert "PASSED" in out


def test_chaos_drill_with_a_fixed_seed_passes(tmp_path: Path) -> None:
    rc, rep, out = drill(tmp_path, "chaos", "--restarts", "6", "--interval", "0.5",
                         "--seed", "2")
    assert rc == EXIT_OK, out
    kinds = {a["kind"] for a in rep["actions"]}
    assert {"hup", "kill", "config_flip", "broken_config"} <= kinds
    targets = {k["target"].split(" (")[0] for k in rep["kills"]}
    assert "worker" in targets
    # The old epoch may finish draining before the kill lands (an idle one leaves fast):
    # the drill says so instead of killing.
    assert "oldest epoch mid-drain" in targets or any(
        "had already exited" in n for n in rep["notes"]), rep["notes"]
    assert any(t.startswith("newest epoch") for t in targets)
    assert rep["connections"]["refused"] == 0
    assert rep["requests"]["unexplained"] == 0
    assert rep["restarts"]["relaunches_serving"] >= 1  # the killed new epoch was relaunched
    # The broken config's epoch exited 1 and never served; the old one went on.
    assert any(e["outcome"] == "exited with 1 before serving"
               for e in rep["restarts"]["never_served"])
    assert rep["fds"]["agent_after"] <= rep["fds"]["agent_before"]


def test_a_broken_invariant_fails_the_drill(tmp_path: Path) -> None:
    """Every request answered 503 (the upstream is down): the drill must exit 1."""
    cfg = tmp_path / "dead-upstream.yaml"
    cfg.write_text(builtin_bootstrap(free_port(), free_port(), free_port(), free_port(),
                                     free_port()))
    rc, rep, out = drill(tmp_path, "hup", "--restarts", "1", "--interval", "0.5",
                         "-c", str(cfg), "--modes", "http1-new", "--rate", "20")
    assert rc == EXIT_INVARIANT_BROKEN, out
    assert not rep["passed"]
    assert "status_503" in rep["requests"]["failed_by_cause"]
    assert "VIOLATION" in out


def test_a_scenario_the_agent_cannot_do_says_which_flag_it_needs(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "supervisor.agent", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    if "--epoch-command" in r.stdout:
        pytest.skip("this trioxy-agent has --epoch-command")
    rc, _, out = drill(tmp_path, "concurrency", "--launcher", "epoch-command", timeout=60)
    assert rc == EXIT_UNSUPPORTED, out
    assert "--epoch-command" in out and "re-reads" in out


def test_launcher_choice_says_what_is_missing() -> None:
    from drill.cli import choose_launcher
    from drill.runner import Unsupported

    def yes() -> bool:
        return True

    def no() -> bool:
        return False

    assert choose_launcher("hup", "auto", no, True) == ("plain", None)
    assert choose_launcher("chaos", "shim", no, True) == ("shim", None)
    assert choose_launcher("upgrade", "auto", yes, True) == ("epoch-command", None)
    kind, note = choose_launcher("concurrency", "auto", no, True)
    assert kind == "shim" and note is not None and "--epoch-command PATH" in note
    for args in (("upgrade", "plain", yes, True), ("concurrency", "epoch-command", no, True),
                 ("upgrade", "auto", no, False), ("hup", "shim", no, False)):
        with pytest.raises(Unsupported):
            choose_launcher(*args)


def test_upgrade_without_a_target_is_a_usage_error(tmp_path: Path) -> None:
    rc, _, out = drill(tmp_path, "upgrade", timeout=60)
    assert rc == 2 and "--upgrade-ref" in out


def test_builtin_configs_validate_and_the_broken_one_does_not(tmp_path: Path) -> None:
    http, tcp, admin, up, slow = (free_port() for _ in range(5))
    for variant in ("a", "b"):
        text = builtin_bootstrap(http, tcp, admin, up, slow, variant=variant)
        (tmp_path / f"{variant}.yaml").write_text(text)
        ep = endpoints_of(text)
        assert (ep.http_port, ep.tcp_port, ep.admin_port) == (http, tcp, admin)
        assert (ep.http_stat_prefix, ep.tcp_stat_prefix) == ("drill_http", "drill_tcp")
    (tmp_path / "broken.yaml").write_text(
        broken_bootstrap(builtin_bootstrap(http, tcp, admin, up, slow)))
    for name, want in (("a", 0), ("b", 0), ("broken", 1)):
        r = subprocess.run([sys.executable, "-m", "proxy.cli", "--mode", "validate", "-c",
                            str(tmp_path / f"{name}.yaml")], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == want, (name, r.stdout, r.stderr)


def test_epoch_command_script_passes_the_agents_arguments_then_the_drills(
        tmp_path: Path) -> None:
    fake = tmp_path / "fake-trioxy"
    fake.write_text("#!/bin/sh\nfor a in \"$@\"; do echo \"[$a]\"; done\n")
    fake.chmod(0o755)
    script = tmp_path / "epoch-command"
    script.write_text(epoch_command_script(
        Target("fake", "/nonexistent/python", (str(fake),), str(tmp_path)),
        ["--concurrency", "3"]))
    script.chmod(0o755)
    r = subprocess.run([str(script), "-c", "a b.yaml", "--restart-epoch", "2"],
                       capture_output=True, text=True, timeout=10)
    assert r.stdout.split("\n")[:6] == ["[-c]", "[a b.yaml]", "[--restart-epoch]", "[2]",
                                        "[--concurrency]", "[3]"]


def test_shim_makes_a_venv_interpreter_path_the_drill_can_repoint(tmp_path: Path) -> None:
    from drill.agent import ShimLauncher, current_target

    if sys.prefix == sys.base_prefix:
        pytest.skip("not in a venv")
    shim = ShimLauncher(tmp_path)
    python = shim.agent_argv()[0]
    probe = "import sys, proxy; print(sys.executable); print(proxy.__name__)"
    r = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == python  # the agent would launch epochs through this path
    # Repointed: the same path now runs the target's interpreter with the drill's flags last.
    shim.switch(current_target(), ["--drill-extra"])
    r = subprocess.run([python, "-c", "import sys; print(sys.executable, sys.argv[1:])"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.stdout.strip() == f"{sys.executable} ['--drill-extra']", (r.stdout, r.stderr)
    assert os.path.islink(tmp_path / "interp")


def test_errors_are_classified_by_what_the_client_saw() -> None:
    import errno

    import h11

    assert classify_error(ConnectionRefusedError()) == "refused"
    assert classify_error(ConnectionResetError()) == "reset"
    assert classify_error(BrokenPipeError()) == "reset"
    assert classify_error(TimeoutError()) == "timeout"
    assert classify_error(PeerClosed()) == "closed_without_response"
    assert classify_error(h11.RemoteProtocolError("x")) == "protocol_error"
    assert classify_error(OSError(errno.EHOSTUNREACH, "x")) == "error_EHOSTUNREACH"
    assert classify_error(ValueError()) == "error_ValueError"


def test_plot_without_matplotlib_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from drill.plot import matplotlib_missing

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    why = matplotlib_missing()
    assert why is not None and "trioxy[drill]" in why


def test_log_tail_reads_whole_lines_only(tmp_path: Path) -> None:
    from drill.agent import LogTail

    log = tmp_path / "agent.log"
    tail = LogTail(log)
    assert tail.read() == []
    with open(log, "w") as f:
        f.write("[2026-11-24 10:00:01.000][1][INFO][agent] epoch 0 serves\n"
                "[2026-11-24 10:00:02.000][1][INFO][agent] SIGHUP: hot restart to ep")
    assert [(e.kind, e.epoch) for e in tail.read()] == [("serves", 0)]
    with open(log, "a") as f:
        f.write("och 1\n")
    assert [(e.kind, e.epoch) for e in tail.read()] == [("restart", 1)]


def test_drill_script_is_a_thin_wrapper() -> None:
    text = (ROOT / "scripts" / "drill").read_text()
    assert "_venv.sh" in text and "trioxy-drill" in text
    assert os.access(ROOT / "scripts" / "drill", os.X_OK)
    assert textwrap.dedent(text).startswith("#!/usr/bin/env bash")
