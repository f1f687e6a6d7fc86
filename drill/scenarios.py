"""The drills: hup, chaos, upgrade, concurrency. Each is a function of a running ``Drill``.

Every step but a plain ``hup`` storm waits until the service is back to one epoch starting
nothing before the next, so a failure is attributable to the step that caused it, and
records what it expected and what it saw.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from drill import schedule
from drill.agent import Target, current_target
from drill.config import CONFIG_HEADER
from drill.runner import SERVE_TIMEOUT_S, Drill, Unsupported


def hup(d: Drill) -> None:
    """N SIGHUPs at an interval, without waiting: storms coalesce as in production."""
    for i in range(d.s.restarts):
        d.sleep(d.s.interval_s)
        d.hup(f"{i + 1}/{d.s.restarts}")
    d.wait_quiescent(SERVE_TIMEOUT_S * 2, "the last SIGHUP")


# -- chaos ----------------------------------------------------------------------------
def chaos(d: Drill) -> None:
    steps = schedule.chaos_schedule(d.s.seed, d.s.restarts, d.s.interval_s)
    d.say(f"chaos schedule (seed {d.s.seed}): {', '.join(s.action for s in steps)}")
    actions: dict[str, Callable[[Drill, schedule.ChaosStep], None]] = {
        schedule.HUP: _chaos_hup,
        schedule.KILL_WORKER: _kill_worker,
        schedule.KILL_NEW_MID_HANDOVER: _kill_newest_mid_handover,
        schedule.KILL_OLD_MID_DRAIN: _kill_oldest_mid_drain,
        schedule.CONFIG_FLIP: _config_flip,
        schedule.BROKEN_CONFIG: _broken_config,
    }
    for i, step in enumerate(steps):
        d.sleep(step.pause_s)
        d.wait_quiescent(SERVE_TIMEOUT_S, f"step {i}")
        d.say(f"chaos step {i + 1}/{len(steps)}: {step.action}")
        actions[step.action](d, step)


def _chaos_hup(d: Drill, step: schedule.ChaosStep) -> None:
    epoch = d.hup("chaos")
    if not d.wait_serves(epoch):
        d.violate("a SIGHUP starts a serving epoch", f"epoch {epoch} never served")


def _kill_worker(d: Drill, step: schedule.ChaosStep) -> None:
    assert d.monitor is not None
    serving = d.monitor.serving()
    ep = d.epochs().get(serving) if serving is not None else None
    workers = ep.workers() if ep else []
    if ep is None or not workers:
        d.notes.append("kill_worker: no worker to kill at that moment")
        return
    victim = workers[int(step.pick * len(workers))]
    if not d.kill(victim, "worker", ep.epoch, tree=False):
        return
    # The epoch's main process starts a replacement in the same slot.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = [w for w in ep.workers() if w.pid != victim.pid]
        if len(now) >= len(workers):
            return
        d.sleep(0.05)
    d.violate("a killed worker is replaced",
              f"epoch {ep.epoch} had {len(workers)} workers; 15 s after the kill of "
              f"pid {victim.pid} it has {len(ep.workers())}")


def _kill_newest_mid_handover(d: Drill, step: schedule.ChaosStep) -> None:
    assert d.monitor is not None
    epoch = d.hup("chaos: the new epoch will be killed mid-handover")
    deadline = time.monotonic() + 10
    proc = None
    while time.monotonic() < deadline:
        ep = d.epochs().get(epoch)
        if ep is not None:
            proc = ep.proc
            break
        time.sleep(0.005)
    if proc is None:
        d.violate("a SIGHUP starts an epoch", f"epoch {epoch} did not appear within 10 s")
        return
    # Strike somewhere in the first 300 ms of its life: asking for sockets, starting workers.
    time.sleep(step.pick * 0.3)
    target = "newest epoch mid-handover"
    if epoch in d.monitor.served:
        target = "newest epoch (it served before the kill landed)"
    d.kill(proc, target, epoch, tree=True)
    # The agent relaunches it (after its backoff) from the epoch still serving.
    d.wait_quiescent(SERVE_TIMEOUT_S, f"the kill of epoch {epoch}")


def _kill_oldest_mid_drain(d: Drill, step: schedule.ChaosStep) -> None:
    assert d.monitor is not None
    old = d.monitor.serving()
    epoch = d.hup("chaos: the old epoch will be killed mid-drain")
    if not d.wait_serves(epoch):
        d.violate("a SIGHUP starts a serving epoch", f"epoch {epoch} never served")
        return
    time.sleep(step.pick * d.s.drain_time_s)
    draining = sorted(e for e in d.epochs() if e < epoch)
    if not draining:
        d.notes.append(f"kill_oldest_mid_drain: epoch {old} had already exited")
        return
    oldest = d.epochs().get(draining[0])
    if oldest is not None:
        d.kill(oldest.proc, "oldest epoch mid-drain", oldest.epoch, tree=True)
    d.wait_quiescent(SERVE_TIMEOUT_S, f"the kill of epoch {draining[0]}")


def _config_flip(d: Drill, step: schedule.ChaosStep) -> None:
    to = "b" if d.current_config == "a" else "a"
    d.write_config(to)
    d.act("config_flip", f"to config {to}")
    epoch = d.hup(f"config flip to {to}")
    if not d.wait_serves(epoch):
        d.violate("a valid config reloads", f"epoch {epoch} (config {to}) never served")
        return
    if d.s.config_path is not None:
        return  # a user's configs carry no marker to check
    # New connections go to the new epoch once it serves (the old one stops accepting).
    seen = ""
    for _ in range(20):
        status, headers = d.probe("/")
        seen = headers.get(CONFIG_HEADER, "")
        if status == 200 and seen == to:
            return
        time.sleep(0.1)
    d.violate("a config flip takes effect",
              f"after epoch {epoch} served, new connections still got config {seen!r}, not {to!r}")


def _broken_config(d: Drill, step: schedule.ChaosStep) -> None:
    assert d.monitor is not None
    serving = d.monitor.serving()
    d.write_config("broken")
    d.act("broken_config", "a config no trioxy accepts")
    epoch = d.hup("broken config")
    mon = d.monitor
    mon.wait_for(lambda: epoch in mon.failed_reloads or epoch in mon.served, SERVE_TIMEOUT_S)
    d.write_config(d.current_config)  # put the good one back before anything else reloads
    if epoch in mon.served:
        d.violate("a broken config is refused", f"epoch {epoch} served a broken config")
    elif epoch not in mon.failed_reloads:
        d.violate("a broken config is refused",
                  f"the agent did not report epoch {epoch}'s reload as failed")
    elif mon.serving() != serving:
        d.violate("a failed reload keeps the old epoch",
                  f"epoch {serving} served before the broken reload, {mon.serving()} after")


# -- upgrade and concurrency ------------------------------------------------------------
def hot_restart_version(python: str, cwd: Path) -> str:
    r = subprocess.run([python, "-m", "proxy.cli", "--hot-restart-version"], cwd=cwd,
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise Unsupported(f"{python} -m proxy.cli --hot-restart-version failed: {r.stderr[-500:]}")
    return r.stdout.strip()


def upgrade(d: Drill, other: Target) -> None:
    """N → N+1 → N ...: each restart onto the other install, by hot restart."""
    assert d.launcher is not None and d.monitor is not None
    mine = current_target()
    versions = {t.label: hot_restart_version(t.python, d.run_dir) for t in (mine, other)}
    d.notes.append("hot-restart versions: " + "; ".join(f"{k}: {v}" for k, v in versions.items()))
    compatible = len(set(versions.values())) == 1
    if not compatible:
        d.notes.append("the versions differ: each upgrade must be refused by the new epoch "
                       "(exit 65) while the old one keeps serving (the documented fallback)")
    for i, which in enumerate(schedule.upgrade_schedule(d.s.restarts)):
        target = other if which == "other" else mine
        d.sleep(d.s.interval_s)
        d.wait_quiescent(SERVE_TIMEOUT_S, f"upgrade step {i}")
        d.launcher.switch(target, [])
        d.act("upgrade", f"to {target.label}")
        epoch = d.hup(f"upgrade to {target.label}")
        d.say(f"upgrade {i + 1}/{d.s.restarts}: epoch {epoch} runs {target.label}")
        if not compatible and which == "other":
            mon = d.monitor
            mon.wait_for(lambda: epoch in mon.failed_reloads or epoch in mon.served,  # noqa: B023
                         SERVE_TIMEOUT_S)
            code = mon.ended.get(epoch)
            if epoch in mon.served or code != 65:
                d.violate("an incompatible upgrade falls back",
                          f"epoch {epoch} ({target.label}) "
                          f"{'served' if epoch in mon.served else f'exited with {code}'}"
                          ", expected exit 65 and the old epoch serving")
            continue
        if not d.wait_serves(epoch):
            d.violate("an upgrade by hot restart serves",
                      f"epoch {epoch} ({target.label}) never served; exit code "
                      f"{d.monitor.ended.get(epoch)}")
            continue
        ep = d.epochs().get(epoch)
        cmd = ep.proc.cmdline() if ep else []
        if not target.runs(cmd):
            d.violate("the new epoch runs the new install",
                      f"epoch {epoch} runs {cmd[:3]}, not {target.label} ({target.root})")
        # The load's modes were probed against our version; one the other lacks fails
        # while it serves. Say so, so the failures are read as a feature gap, not a restart.
        for mode in d.load.modes if d.load else []:
            why = mode.probe(3.0)
            if why is not None:
                d.notes.append(f"while epoch {epoch} ({target.label}) served, load mode "
                               f"{mode.name} could not run: {why}")


def concurrency(d: Drill) -> None:
    """Each restart changes --concurrency, up and down; queued connections must survive."""
    assert d.launcher is not None and d.monitor is not None
    values = schedule.concurrency_schedule(d.s.seed, d.s.restarts, d.s.concurrency,
                                           d.s.max_concurrency)
    d.say(f"concurrency schedule: {d.s.concurrency} -> {' -> '.join(map(str, values))}")
    for i, n in enumerate(values):
        d.sleep(d.s.interval_s)
        d.wait_quiescent(SERVE_TIMEOUT_S, f"concurrency step {i}")
        d.launcher.switch(current_target(), ["--concurrency", str(n)])
        d.act("concurrency", f"--concurrency {n}")
        epoch = d.hup(f"--concurrency {n}")
        if not d.wait_serves(epoch):
            d.violate("a --concurrency change serves", f"epoch {epoch} never served")
            continue
        ep = d.epochs().get(epoch)
        workers = len(ep.workers()) if ep else 0
        if workers != n:
            d.violate("the new epoch runs the asked --concurrency",
                      f"epoch {epoch} has {workers} workers, asked {n}")
