"""``trioxy``: one proxy epoch. Envoy's flags; exit codes named in ``ExitCode``."""

from __future__ import annotations

import logging
import sys

from proxy import __version__
from proxy.server.hot_restart import HOT_RESTART_VERSION
from proxy.server.options import ExitCode, Mode, UsageError, parse_options

log = logging.getLogger("trioxy.main")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The listeners are bound before trio installs its signal receiver; a USR1 or HUP in
    # between (the agent forwards them) must not kill the epoch with Python's default.
    import signal

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if argv[:1] == ["stats"]:
        return _stats(argv[1:])
    try:
        opts, ns = parse_options(argv)
    except UsageError as exc:
        print(f"trioxy: {exc}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    if ns.version:
        print(f"trioxy {__version__}")
        return ExitCode.OK
    if ns.hot_restart_version:
        print(HOT_RESTART_VERSION)
        return ExitCode.OK

    from proxy.server.logging_setup import setup_logging

    setup_logging(opts.log_level, "main")
    from proxy.config.bootstrap import default_bootstrap_path, load_bootstrap
    from proxy.config.errors import ConfigError
    from proxy.config.snapshot import build_snapshot

    config_path = opts.config_path
    if config_path is None and opts.config_yaml is None:
        config_path = str(default_bootstrap_path())
        log.info("no -c/--config-path given: using the embedded default config %s", config_path)
    try:
        bootstrap = load_bootstrap(config_path, opts.config_yaml)
        snapshot = build_snapshot(bootstrap)
    except ConfigError as exc:
        where = config_path or "--config-yaml"
        print(f"trioxy: invalid configuration {where}: {exc}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    except OSError as exc:
        print(f"trioxy: cannot read configuration: {exc}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    if opts.mode is Mode.VALIDATE:
        print(f"configuration '{config_path or '--config-yaml'}' OK")
        return ExitCode.OK

    from proxy.server.instance import serve

    return serve(opts, snapshot, bootstrap)


def _stats(argv: list[str]) -> int:
    """``trioxy stats [--base-id N]``: every process's stats, summed, in Envoy's text form."""
    import argparse

    p = argparse.ArgumentParser(prog="trioxy stats")
    p.add_argument("--base-id", type=int, default=0)
    p.add_argument("--filter", default="", help="only stats whose name contains this")
    ns = p.parse_args(argv)
    from shm.segment import Segment, SegmentError, format_stats, read_stats

    try:
        seg = Segment.open(ns.base_id, create=False, reclaim_stale=False)
    except SegmentError as exc:
        print(f"trioxy stats: {exc}", file=sys.stderr)
        return 1
    lines = format_stats(read_stats(seg)).splitlines()
    sys.stdout.write("".join(f"{line}\n" for line in lines if ns.filter in line))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
