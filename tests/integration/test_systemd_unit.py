"""systemd/trioxy.service passes `systemd-analyze verify` and agrees with the drain timers."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from harness import ROOT

UNIT = ROOT / "systemd" / "trioxy.service"


def test_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    agent = ROOT / ".venv" / "bin" / "trioxy-agent"
    unit = tmp_path / "trioxy.service"
    unit.write_text(UNIT.read_text().replace("/opt/trioxy/.venv/bin/trioxy-agent", str(agent)))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (r.stdout + r.stderr).splitlines()
                if "trioxy.service" in line or "Failed" in line]
    assert r.returncode == 0 and problems == [], r.stdout + r.stderr


def test_unit_timers_are_consistent() -> None:
    text = UNIT.read_text()
    assert re.search(r"^Type=notify$", text, re.M)
    assert re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", text, re.M)
    drain = float(re.search(r"--drain-time-s (\d+)", text).group(1))  # type: ignore[union-attr]
    shutdown = float(re.search(r"--parent-shutdown-time-s (\d+)", text).group(1))  # type: ignore[union-attr]
    stop = float(re.search(r"^TimeoutStopSec=(\d+)$", text, re.M).group(1))  # type: ignore[union-attr]
    assert drain < shutdown < stop - 5  # an old epoch's last moment still fits in the stop
