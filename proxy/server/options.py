"""Command-line options of one trioxy epoch, spelled as Envoy spells them."""

from __future__ import annotations

import argparse
import enum
import os
from dataclasses import dataclass

from proxy.server.drain_manager import DrainStrategy


class ExitCode(enum.IntEnum):
    """Named exit codes: the agent stops relaunching on the boot and config ones."""

    OK = 0
    CONFIG_ERROR = 1  # `--mode validate` and serve both exit 1 on a bad config, as Envoy does
    BOOT_ERROR = 2  # could not bind, could not start workers
    USAGE_ERROR = 64  # bad command line (sysexits EX_USAGE)
    HOT_RESTART_VERSION_MISMATCH = 65
    ADMIN_QUIT = 3  # admin /quitquitquit: trioxy-agent exits too (as pilot-agent with Envoy)


class Mode(enum.Enum):
    SERVE = "serve"
    VALIDATE = "validate"


@dataclass(frozen=True)
class Options:
    config_path: str | None
    config_yaml: str | None
    mode: Mode
    concurrency: int
    log_level: str
    restart_epoch: int
    base_id: int
    drain_time_s: float
    parent_shutdown_time_s: float
    drain_strategy: DrainStrategy
    argv: tuple[str, ...] = ()
    disable_hot_restart: bool = False
    ready_fd: int | None = None  # the agent's pipe: "READY" once the workers accept
    parent_epoch: int | None = None  # the epoch to take sockets from; None: none


LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="trioxy",
        description="An Envoy-class proxy: runs an Envoy v3 bootstrap (YAML or JSON).",
    )
    p.add_argument("-c", "--config-path", help="Envoy v3 bootstrap file (.yaml, .yml or .json)")
    p.add_argument(
        "--config-yaml", help="YAML merged over the bootstrap file (repeated fields append)"
    )
    p.add_argument("--mode", choices=[m.value for m in Mode], default="serve")
    p.add_argument(
        "--concurrency", type=int, default=None, help="worker processes (default: CPU count)"
    )
    p.add_argument("-l", "--log-level", default="info", choices=LOG_LEVELS)
    p.add_argument("--restart-epoch", type=int, default=0)
    p.add_argument("--base-id", type=int, default=0)
    p.add_argument("--drain-time-s", type=float, default=600.0)
    p.add_argument("--parent-shutdown-time-s", type=float, default=900.0)
    p.add_argument(
        "--drain-strategy", choices=[s.value for s in DrainStrategy], default="gradual"
    )
    p.add_argument(
        "--hot-restart-version", action="store_true", help="print the hot restart version and exit"
    )
    p.add_argument(
        "--disable-hot-restart", action="store_true",
        help="neither take sockets from the previous epoch nor serve the next one",
    )
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    # The agent names the parent (after a failed reload it is not restart_epoch - 1);
    # -1: no parent. Unset: restart_epoch - 1, as Envoy.
    p.add_argument("--parent-epoch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def parse_options(argv: list[str]) -> tuple[Options, argparse.Namespace]:
    ns = build_parser().parse_args(argv)
    concurrency = ns.concurrency if ns.concurrency is not None else (os.cpu_count() or 1)
    if concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    if ns.restart_epoch < 0:
        raise UsageError("--restart-epoch must not be negative")
    if ns.base_id < 0:
        raise UsageError("--base-id must not be negative")
    if ns.drain_time_s < 0:
        raise UsageError("--drain-time-s must not be negative")
    if ns.parent_shutdown_time_s <= 0:
        raise UsageError("--parent-shutdown-time-s must be positive")
    if ns.drain_time_s >= ns.parent_shutdown_time_s:
        raise UsageError(
            f"--drain-time-s ({ns.drain_time_s:g}) must be less than "
            f"--parent-shutdown-time-s ({ns.parent_shutdown_time_s:g})"
        )
    opts = Options(
        config_path=ns.config_path,
        config_yaml=ns.config_yaml,
        mode=Mode(ns.mode),
        concurrency=concurrency,
        log_level=ns.log_level,
        restart_epoch=ns.restart_epoch,
        base_id=ns.base_id,
        drain_time_s=ns.drain_time_s,
        parent_shutdown_time_s=ns.parent_shutdown_time_s,
        drain_strategy=DrainStrategy(ns.drain_strategy),
        argv=tuple(argv),
        disable_hot_restart=ns.disable_hot_restart,
        ready_fd=ns.ready_fd,
        parent_epoch=(
            (ns.restart_epoch - 1 if ns.restart_epoch > 0 else None)
            if ns.parent_epoch is None else (ns.parent_epoch if ns.parent_epoch >= 0 else None)
        ),
    )
    return opts, ns
