"""Access logs: ``access_log`` lists compiled into filter + formatter + sink.

``build_access_logs(protos, ctx, path)`` compiles an ``envoy.config.accesslog.v3.AccessLog``
list (HTTP connection manager, tcp_proxy): each entry's ``typed_config`` is looked up in
``proxy.registry.access_loggers`` by type URL (then name), unpacked and handed to the logger's
factory, which returns an ``AccessLoggerConfig`` (where to write, how to format); the optional
``filter`` is compiled by ``filters.compile_filter``. Building is pure: no file is opened until
the first line is logged (in the worker, through ``file_sink.sink_for``).

``AccessLog.log(stream_info)`` runs on the data path once a stream or connection is done:
filter, format, enqueue. It never blocks and never raises: a failure (a file that cannot be
opened, a formatter bug) is counted in ``errors`` and reported in the process log once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.access_log import file_sink
from proxy.access_log.filters import Filter, compile_filter
from proxy.access_log.formatter import Formatter
from proxy.config.errors import ConfigError
from proxy.registry import access_loggers

if TYPE_CHECKING:
    from proxy.stream_info import StreamInfo

__all__ = ["AccessLog", "AccessLoggerConfig", "build_access_logs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AccessLoggerConfig:
    """What an access-logger factory returns: where lines go and how they are made."""

    path: str  # a file path, or "/dev/stdout" / "/dev/stderr"
    formatter: Formatter


class AccessLog:
    """One configured access log: ``log(stream_info)`` filters, formats and enqueues a line."""

    __slots__ = ("name", "path", "formatter", "filter", "errors", "_sink")

    def __init__(self, name: str, path: str, formatter: Formatter,
                 filter: Filter | None = None) -> None:  # noqa: A002 - Envoy's field name
        self.name = name
        self.path = path
        self.formatter = formatter
        self.filter = filter
        self.errors = 0
        self._sink: file_sink.Sink | None = None

    def log(self, stream_info: StreamInfo) -> None:
        try:
            f = self.filter
            if f is not None and not f(stream_info):
                return
            line = self.formatter.format(stream_info)
            sink = self._sink
            if sink is None or sink.closed:
                sink = self._sink = file_sink.sink_for(self.path)
            sink.write(line)
        except Exception as exc:  # never into the data path
            self.errors += 1
            if self.errors == 1 or self.errors % 10_000 == 0:
                log.error("access log %s (%s): %d line(s) lost, last: %s: %s",
                          self.name, self.path, self.errors, type(exc).__name__, exc)

    def __repr__(self) -> str:
        return f"AccessLog({self.name!r}, {self.path!r}, {self.formatter!r})"


def build_access_logs(access_log_protos: Iterable[Any], ctx: Any, path: str) -> tuple[AccessLog, ...]:
    """Compile a repeated ``AccessLog`` field; ``path`` is the field's path."""
    # The registrations live in the extensions package; make sure they are loaded.
    import proxy.extensions.access_loggers  # noqa: F401
    from proxy.config.bootstrap import unpack_any

    runtime = getattr(ctx, "runtime", None)
    out: list[AccessLog] = []
    for i, msg in enumerate(access_log_protos):
        lpath = f"{path}[{i}]"
        if not msg.HasField("typed_config"):
            raise ConfigError(
                lpath, f"access log {msg.name!r} needs a typed_config"
                f" (known: {', '.join(access_loggers.names())})")
        tpath = f"{lpath}.typed_config"
        ext = access_loggers.lookup(msg.name, msg.typed_config.type_url, tpath)
        typed = unpack_any(msg.typed_config, tpath)
        cfg = ext.factory(typed, ctx, tpath)
        flt = compile_filter(msg.filter, f"{lpath}.filter", runtime) if msg.HasField("filter") else None
        out.append(AccessLog(msg.name or ext.name, cfg.path, cfg.formatter, flt))
    return tuple(out)
