"""Envoy's access-log filters (``envoy.config.accesslog.v3.AccessLogFilter``), compiled (sans-IO).

``compile_filter(proto, path, runtime)`` returns a predicate over a finished ``StreamInfo``;
the access log writes a line only when it is true. Semantics are Envoy's
(``source/common/access_log/access_log_impl.cc``):

- ``status_code_filter``: compares the response code, 0 when there is none (a TCP connection,
  a downstream that went away before any response).
- ``duration_filter``: compares the stream's duration in whole milliseconds (truncated), the
  time so far if the stream is still in flight (Envoy's ``currentDuration()``).
- A ``ComparisonFilter`` (``EQ`` / ``GE`` / ``LE`` / ``NE``) compares against
  ``value.default_value``, or the runtime's unsigned integer under ``value.runtime_key`` when
  the runtime has one. The runtime is an immutable snapshot that travels with the config, so
  the threshold is read once, here.
- ``response_flag_filter``: true when any of the listed flags is set; with no flags listed,
  when any flag at all is set. A flag name Envoy does not know is a ``ConfigError``.
- ``not_health_check_filter``: true unless the stream is a health check request, one the
  ``envoy.filters.http.health_check`` filter matched (``StreamInfo.health_check``).
- ``and_filter`` / ``or_filter``: all / any of at least two sub-filters, in order, stopping
  at the first that decides.

Any other filter kind is refused (``supported.py`` refuses it first in a full bootstrap).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from proxy.access_log.formatter import duration_ms
from proxy.config.errors import ConfigError, not_supported
from proxy.stream_info import SHORT_TO_FLAG

if TYPE_CHECKING:
    from proxy.config.runtime import Runtime
    from proxy.stream_info import StreamInfo

__all__ = ["Filter", "compile_filter"]

Filter = Callable[["StreamInfo"], bool]

_EQ, _GE, _LE, _NE = 0, 1, 2, 3  # envoy.config.accesslog.v3.ComparisonFilter.Op

# Flags Envoy's ResponseFlagFilter accepts that trioxy never sets: a filter on them is valid
# and simply never matches.
_NEVER_SET_FLAGS = frozenset({"UDO"})

_KINDS = (
    "status_code_filter", "duration_filter", "response_flag_filter", "not_health_check_filter",
    "and_filter", "or_filter",
)


def compile_filter(msg: Any, path: str, runtime: Runtime | None = None) -> Filter:
    """Compile one ``AccessLogFilter``; ``path`` names it in errors."""
    kind = msg.WhichOneof("filter_specifier")
    if kind is None:
        raise ConfigError(path, f"an access log filter needs one of {', '.join(_KINDS)}")
    fpath = f"{path}.{kind}"
    body = getattr(msg, kind)
    if kind == "status_code_filter":
        compare = _comparison(body, f"{fpath}.comparison", runtime)

        def status_code(si: StreamInfo) -> bool:
            return compare(si.response_code or 0)

        return status_code
    if kind == "duration_filter":
        compare = _comparison(body, f"{fpath}.comparison", runtime)

        def duration(si: StreamInfo) -> bool:
            end = si.end_monotonic
            if end is None:
                end = time.monotonic()
            return compare(duration_ms(end - si.start_monotonic))

        return duration
    if kind == "response_flag_filter":
        return _response_flags(body, fpath)
    if kind == "not_health_check_filter":
        return _not_health_check
    if kind in ("and_filter", "or_filter"):
        if len(body.filters) < 2:
            raise ConfigError(f"{fpath}.filters", "value must contain at least 2 item(s)")
        subs = tuple(
            compile_filter(f, f"{fpath}.filters[{i}]", runtime) for i, f in enumerate(body.filters)
        )
        if kind == "and_filter":
            return lambda si: all(f(si) for f in subs)
        return lambda si: any(f(si) for f in subs)
    raise not_supported(fpath, kind)


def _not_health_check(si: StreamInfo) -> bool:
    return not si.health_check


def _comparison(parent: Any, path: str, runtime: Runtime | None) -> Callable[[int], bool]:
    """The ``ComparisonFilter`` at ``parent.comparison`` as a predicate over an integer."""
    if not parent.HasField("comparison"):
        raise ConfigError(path, "value is required")
    cmp = parent.comparison
    if not cmp.HasField("value"):
        raise ConfigError(f"{path}.value", "value is required")
    threshold = cmp.value.default_value
    key = cmp.value.runtime_key
    if key and runtime is not None:
        threshold = runtime.get_int(key, threshold)
    op = cmp.op
    if op == _EQ:
        return lambda v: v == threshold
    if op == _GE:
        return lambda v: v >= threshold
    if op == _LE:
        return lambda v: v <= threshold
    if op == _NE:
        return lambda v: v != threshold
    raise ConfigError(f"{path}.op", f"unknown comparison op {op}")


def _response_flags(body: Any, path: str) -> Filter:
    mask = 0
    for i, name in enumerate(body.flags):
        flag = SHORT_TO_FLAG.get(name)
        if flag is None:
            if name in _NEVER_SET_FLAGS:
                continue
            known = ", ".join([*SHORT_TO_FLAG, *sorted(_NEVER_SET_FLAGS)])
            raise ConfigError(
                f"{path}.flags[{i}]", f"unknown response flag {name!r} (known: {known})")
        mask |= flag
    if not body.flags:
        return lambda si: bool(si.response_flags)
    if not mask:
        return lambda si: False
    return lambda si: bool(si.response_flags & mask)
