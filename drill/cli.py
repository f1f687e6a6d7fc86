"""``trioxy-drill SCENARIO``: run a restart drill and gate on its invariants.

Exit status: 0 every invariant held; 1 one broke (the report says which); 2 the drill could
not be set up; 3 the scenario needs an agent feature this trioxy lacks (the message says
which flag).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

from drill import EXIT_INVARIANT_BROKEN, EXIT_OK, EXIT_SETUP_ERROR, EXIT_UNSUPPORTED, scenarios
from drill.agent import EPOCH_COMMAND_FLAG, Target, agent_supports
from drill.load import DEFAULT_MODES, MODES
from drill.plot import matplotlib_missing, plot
from drill.report import build_report, render_text
from drill.runner import Abort, Drill, Settings, Unsupported

DEFAULT_RESTARTS = {"hup": 10, "chaos": 20, "upgrade": 2, "concurrency": 6}

AGENT_FLAG_NEEDED = (
    f"trioxy-agent has no {EPOCH_COMMAND_FLAG}: it starts every epoch as "
    "`sys.executable -m proxy.cli` with the flags it was given at start, and re-reads "
    "neither on SIGHUP, so a binary upgrade or a --concurrency change cannot be done by hot "
    f"restart. It needs `trioxy-agent {EPOCH_COMMAND_FLAG} PATH`: run PATH (resolved anew "
    "for each epoch) instead of `sys.executable -m proxy.cli`, with the same arguments")


def choose_launcher(scenario: str, requested: str, has_epoch_command: Callable[[], bool],
                    in_venv: bool) -> tuple[str, str | None]:
    """(launcher kind, a note for the report), or Unsupported with what is missing."""
    switching = scenario in ("upgrade", "concurrency")
    if requested == "plain" and switching:
        raise Unsupported(f"{scenario} changes what epochs run; the plain launcher cannot")
    if requested == "epoch-command" and not has_epoch_command():
        raise Unsupported(AGENT_FLAG_NEEDED + ".")
    if requested == "shim" and not in_venv:
        raise Unsupported("the shim launcher needs trioxy installed in a venv")
    if requested != "auto":
        return requested, None
    if not switching:
        return "plain", None
    if has_epoch_command():
        return "epoch-command", None
    if in_venv:
        return "shim", (AGENT_FLAG_NEEDED + ". This drill ran through the interpreter shim "
                        "instead (--launcher shim: the agent's sys.executable is a symlink "
                        "the drill repoints), which proves the epochs handle it; production "
                        "needs the flag.")
    raise Unsupported(AGENT_FLAG_NEEDED + "; and no venv for --launcher shim.")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trioxy-drill",
        description="Restart drills against a real trioxy-agent under load; exits 1 when an "
                    "invariant broke (no refused connection, no failed request but those in "
                    "flight on a killed process, monotonic counters, at most 3 epochs, old "
                    "epochs gone in time, no fd growth).")
    p.add_argument("scenario", choices=sorted(DEFAULT_RESTARTS))
    p.add_argument("--restarts", type=int, help="restarts / steps (default: hup 10, chaos 20, "
                   "upgrade 2 = there and back, concurrency 6)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between steps")
    p.add_argument("--rate", type=float, default=200.0, help="requests/s over all load modes")
    p.add_argument("--seed", type=int, help="chaos and concurrency schedules (default: random, "
                   "printed)")
    p.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="requests/s, errors and restarts over time")
    p.add_argument("-c", "--config", help="an Envoy bootstrap to run instead of the built-in one")
    p.add_argument("--flip-config", help="with -c: the second valid config chaos flips to")
    p.add_argument("--concurrency", type=int, default=2, help="workers per epoch (default 2)")
    p.add_argument("--max-concurrency", type=int, default=4,
                   help="concurrency scenario: the largest --concurrency tried")
    p.add_argument("--drain-time-s", type=float, default=1.0)
    p.add_argument("--parent-shutdown-time-s", type=float, default=3.0)
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help=f"load modes, comma-separated, of {', '.join(MODES)}")
    p.add_argument("--upstream", choices=["auto", "builtin", "nginx"], default="auto",
                   help="auto: nginx when installed, else the built-in server")
    p.add_argument("--launcher", choices=["auto", "plain", "epoch-command", "shim"],
                   default="auto", help="how the agent's epochs are started (see README)")
    p.add_argument("--upgrade-to", metavar="PATH", help="upgrade: the other trioxy binary")
    p.add_argument("--upgrade-ref", metavar="GIT_REF",
                   help="upgrade: build that ref side by side (git archive + venv)")
    p.add_argument("--agent-args", default="", help="more trioxy-agent flags (one string)")
    p.add_argument("--max-seconds", type=float, help="hard bound on the load's duration")
    p.add_argument("--work-dir", help="where the run directory goes (default: the temp dir)")
    p.add_argument("--keep-dir", action="store_true", help="keep logs and configs afterwards")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    restarts = ns.restarts if ns.restarts is not None else DEFAULT_RESTARTS[ns.scenario]
    seed = ns.seed if ns.seed is not None else random.randrange(1 << 31)
    modes = tuple(m.strip() for m in ns.modes.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown or restarts < 0 or ns.rate <= 0 or ns.interval < 0:
        print(f"trioxy-drill: bad arguments: unknown modes {unknown}" if unknown else
              "trioxy-drill: --restarts, --rate and --interval must be positive",
              file=sys.stderr)
        return EXIT_SETUP_ERROR
    if ns.scenario == "upgrade" and not (ns.upgrade_to or ns.upgrade_ref):
        print("trioxy-drill upgrade: needs --upgrade-to PATH_TO_OTHER_TRIOXY or "
              "--upgrade-ref GIT_REF", file=sys.stderr)
        return EXIT_SETUP_ERROR
    if ns.plot and (why := matplotlib_missing()):
        print(f"trioxy-drill: {why}; the drill runs without the plot", file=sys.stderr)
        ns.plot = None
    per_step = {"hup": 3.0, "chaos": 12.0}.get(ns.scenario, 10.0)
    settings = Settings(
        scenario=ns.scenario, restarts=restarts, interval_s=ns.interval, rate=ns.rate,
        seed=seed, concurrency=ns.concurrency, max_concurrency=ns.max_concurrency,
        drain_time_s=ns.drain_time_s, parent_shutdown_s=ns.parent_shutdown_time_s,
        modes=modes, upstream=ns.upstream, config_path=ns.config,
        flip_config_path=ns.flip_config, launcher=ns.launcher, upgrade_to=ns.upgrade_to,
        upgrade_ref=ns.upgrade_ref, work_dir=ns.work_dir, keep_dir=ns.keep_dir,
        max_seconds=ns.max_seconds or 90 + restarts * (ns.interval * 1.5 + per_step),
        progress=not ns.quiet, agent_args=ns.agent_args,
    )
    d = Drill(settings)
    d.say(f"{ns.scenario}: {restarts} restart(s), interval {ns.interval:g} s, "
          f"rate {ns.rate:g}/s, seed {seed}")
    return run(d, ns)


def run(d: Drill, ns: argparse.Namespace) -> int:
    s = d.s
    unsupported: str | None = None
    try:
        other = None
        if s.scenario == "upgrade":
            other = _upgrade_target(d)
        kind, note = choose_launcher(
            s.scenario, s.launcher,
            lambda: agent_supports(sys.executable, EPOCH_COMMAND_FLAG, d.run_dir),
            sys.prefix != sys.base_prefix)
        if note:
            d.notes.append(note)
            d.say("NOTE: " + note)
        d.setup(kind)
        d.start_load()
        if s.scenario == "hup":
            scenarios.hup(d)
        elif s.scenario == "chaos":
            scenarios.chaos(d)
        elif s.scenario == "upgrade":
            assert other is not None
            scenarios.upgrade(d, other)
        else:
            scenarios.concurrency(d)
        d.settle()
    except Unsupported as exc:
        unsupported = str(exc)
    except Abort as exc:
        d.violate("the drill completes", str(exc))
    except KeyboardInterrupt:
        d.violate("the drill completes", "interrupted")
    finally:
        d.teardown()
    if unsupported is not None:
        print(f"trioxy-drill {s.scenario}: unsupported: {unsupported}", file=sys.stderr)
        d.cleanup_dir(True)
        return EXIT_UNSUPPORTED
    if d.agent is None:
        d.cleanup_dir(False)
        return EXIT_SETUP_ERROR
    report = build_report(d.run_data())
    report["run_dir"] = str(d.run_dir)
    print(render_text(report), flush=True)
    if ns.report:
        Path(ns.report).write_text(json.dumps(report, indent=1, default=str) + "\n")
        d.say(f"report written to {ns.report}")
    if ns.plot:
        plot(report, ns.plot)
        d.say(f"plot written to {ns.plot}")
    d.cleanup_dir(report["passed"])
    return EXIT_OK if report["passed"] else EXIT_INVARIANT_BROKEN


def _upgrade_target(d: Drill) -> Target:
    from drill.upgrade import UpgradeError, build_ref, repo_root, target_from_bin

    s = d.s
    try:
        if s.upgrade_to:
            return target_from_bin(s.upgrade_to)
        if s.upgrade_ref:
            return build_ref(repo_root(Path(__file__).resolve().parent), s.upgrade_ref, d.say)
    except UpgradeError as exc:
        raise Abort(str(exc)) from exc
    raise Unsupported("upgrade needs --upgrade-to PATH_TO_OTHER_TRIOXY or --upgrade-ref GIT_REF")
