"""Factories for ``envoy.access_loggers.stdout`` / ``envoy.access_loggers.stderr``.

``log_format`` is a SubstitutionFormatString; without one, Envoy's default format. Lines go to
the process's fd 1 / fd 2 through the same non-blocking sink as files.
"""

from __future__ import annotations

from typing import Any

from envoy.extensions.access_loggers.stream.v3.stream_pb2 import (
    StderrAccessLog,
    StdoutAccessLog,
)

from proxy.access_log.access_log import AccessLoggerConfig
from proxy.access_log.formatter import (
    DEFAULT_FORMAT,
    Formatter,
    compile_format,
    compile_substitution_format,
)
from proxy.registry import access_loggers


def _formatter(msg: Any, path: str) -> Formatter:
    if msg.HasField("log_format"):
        return compile_substitution_format(msg.log_format, f"{path}.log_format")
    return compile_format(DEFAULT_FORMAT, path)


@access_loggers.register("envoy.access_loggers.stdout", StdoutAccessLog)
def create_stdout_access_log(msg: Any, ctx: Any, path: str) -> AccessLoggerConfig:
    return AccessLoggerConfig("/dev/stdout", _formatter(msg, path))


@access_loggers.register("envoy.access_loggers.stderr", StderrAccessLog)
def create_stderr_access_log(msg: Any, ctx: Any, path: str) -> AccessLoggerConfig:
    return AccessLoggerConfig("/dev/stderr", _formatter(msg, path))
