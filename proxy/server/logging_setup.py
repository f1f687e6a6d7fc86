"""Envoy-shaped log lines on stderr: ``[time][pid][level][component] message``."""

from __future__ import annotations

import logging
import sys

_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": logging.CRITICAL + 10,
}


def setup_logging(level: str, component: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"[%(asctime)s.%(msecs)03d][%(process)d][%(levelname)s][{component}] %(message)s",
            "%Y-%m-%d %H:%M:%S",
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.INFO))


def set_log_level(level: str, logger: str | None = None) -> None:
    """Admin /logging: the level of every logger, or of one (``trioxy.admin``)."""
    if level not in _LEVELS:
        raise ValueError(f"unknown log level {level!r} (known: {', '.join(LEVELS)})")
    logging.getLogger(logger or None).setLevel(_LEVELS[level])


def get_log_levels() -> dict[str, str]:
    """Admin /logging: the effective level of the root logger and of each named one."""
    names = {_LEVELS[k]: k for k in ("debug", "info", "warning", "error", "critical", "off")}
    out = {"root": names.get(logging.getLogger().getEffectiveLevel(), "info")}
    for name in sorted(logging.root.manager.loggerDict):
        if not name.startswith(("trioxy", "proxy")):
            continue  # trio's and the libraries' own loggers follow the root
        lg = logging.getLogger(name)
        out[name] = names.get(lg.getEffectiveLevel(), "info")
    return out


LEVELS = ("trace", "debug", "info", "warning", "error", "critical", "off")
