"""Envoy's substitution formatter: access-log format strings and JSON formats (sans-IO).

Theory of operation:

1. A format string is parsed once, as Envoy's ``SubstitutionFormatParser`` does: ``%%`` is a
   literal ``%``; any other ``%`` must start a command ``%COMMAND(SUBCOMMAND):LENGTH%`` matched
   by Envoy's regex ``^%((?:[A-Z]|[0-9]|_)+)(?:\\((.*?)\\))?(?::([0-9]+))?%``. The command must
   be one we implement (an Envoy operator trioxy has no data for is refused by name, an unknown
   one is refused with Envoy's "Not supported field in StreamInfo"), and its syntax is checked
   with Envoy's rules (``REQ requires parameters``, ``PROTOCOL does not take any parameters or
   length``, ``START_TIME does not allow length to be specified.``).
2. The result is a list of literal strings and small closures. Each operator compiles to a pair
   of readers over a ``StreamInfo``: ``text(info) -> str | None`` (``None`` prints ``-``, or
   nothing with ``omit_empty_values``) and ``value(info)`` for typed JSON (``None`` is ``null``;
   counters, durations, codes and ports are numbers).
3. ``START_TIME`` follows Envoy's ``DateFormatter``: strftime (UTC) plus ``%f`` / ``%1f``..``%9f``
   / ``%*f`` (sub-second digits, truncated), ``%s`` (epoch seconds) and absl's ``%E#S`` /
   ``%E*S`` / ``%E#f`` / ``%Ez`` / ``%E4Y``. Everything but the sub-second digits is rendered
   once per second and cached in the closure. The default is ``%Y-%m-%dT%H:%M:%E3SZ``
   (``2024-01-02T03:04:05.678Z``).
4. A JSON format (``json_format``) is Envoy's ``JsonFormatterImpl``: keys sorted, compact
   separators, one object per line ending in ``\\n``. A string value holding a single operator
   keeps that operator's type (``"%RESPONSE_CODE%"`` -> ``200``, missing -> ``null``); a value
   mixing text and operators is a string; literal numbers, booleans, nulls, lists and nested
   objects are kept. ``omit_empty_values`` drops keys whose value is ``null``.
5. Header values are latin-1 ``str`` (one char per wire byte). A non-ASCII value is re-read as
   UTF-8 with ``surrogateescape`` so that the sink, which encodes lines as UTF-8 with
   ``surrogateescape``, writes the very bytes the wire carried (as Envoy does); inside JSON an
   undecodable byte is written as the ``\\u00XX`` escape of its latin-1 reading, so the line
   stays valid JSON and UTF-8.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from proxy.config.errors import ConfigError, not_supported
from proxy.stream_info import FLAG_SHORT, ResponseFlag, flags_to_short_string

if TYPE_CHECKING:
    from proxy.http.headers import HeaderMap
    from proxy.stream_info import StreamInfo

__all__ = [
    "DEFAULT_FORMAT",
    "FLAG_LONG",
    "Formatter",
    "compile_format",
    "compile_json_format",
    "compile_substitution_format",
    "duration_ms",
    "flags_to_long_string",
]

# Envoy's SubstitutionFormatUtils::DEFAULT_FORMAT, byte for byte.
DEFAULT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
    "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "
    '"%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" '
    '"%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
)

UNSPECIFIED = "-"

# Envoy's ResponseFlagUtils long names (%RESPONSE_FLAGS_LONG%), in FLAG_SHORT's order.
FLAG_LONG: dict[ResponseFlag, str] = {
    ResponseFlag.FAILED_LOCAL_HEALTH_CHECK: "FailedLocalHealthCheck",
    ResponseFlag.NO_HEALTHY_UPSTREAM: "NoHealthyUpstream",
    ResponseFlag.UPSTREAM_REQUEST_TIMEOUT: "UpstreamRequestTimeout",
    ResponseFlag.LOCAL_RESET: "LocalReset",
    ResponseFlag.UPSTREAM_REMOTE_RESET: "UpstreamRemoteReset",
    ResponseFlag.UPSTREAM_CONNECTION_FAILURE: "UpstreamConnectionFailure",
    ResponseFlag.UPSTREAM_CONNECTION_TERMINATION: "UpstreamConnectionTermination",
    ResponseFlag.UPSTREAM_OVERFLOW: "UpstreamOverflow",
    ResponseFlag.NO_ROUTE_FOUND: "NoRouteFound",
    ResponseFlag.DELAY_INJECTED: "DelayInjected",
    ResponseFlag.FAULT_INJECTED: "FaultInjected",
    ResponseFlag.RATE_LIMITED: "RateLimited",
    ResponseFlag.UNAUTHORIZED_EXTERNAL_SERVICE: "UnauthorizedExternalService",
    ResponseFlag.RATELIMIT_SERVICE_ERROR: "RateLimitServiceError",
    ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION: "DownstreamConnectionTermination",
    ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED: "UpstreamRetryLimitExceeded",
    ResponseFlag.STREAM_IDLE_TIMEOUT: "StreamIdleTimeout",
    ResponseFlag.INVALID_ENVOY_REQUEST_HEADERS: "InvalidEnvoyRequestHeaders",
    ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR: "DownstreamProtocolError",
    ResponseFlag.UPSTREAM_MAX_STREAM_DURATION_REACHED: "UpstreamMaxStreamDurationReached",
    ResponseFlag.RESPONSE_FROM_CACHE_FILTER: "ResponseFromCacheFilter",
    ResponseFlag.NO_FILTER_CONFIG_FOUND: "NoFilterConfigFound",
    ResponseFlag.DURATION_TIMEOUT: "DurationTimeout",
    ResponseFlag.UPSTREAM_PROTOCOL_ERROR: "UpstreamProtocolError",
    ResponseFlag.NO_CLUSTER_FOUND: "NoClusterFound",
    ResponseFlag.OVERLOAD_MANAGER: "OverloadManagerTerminated",
    ResponseFlag.DNS_RESOLUTION_FAILURE: "DnsResolutionFailed",
    ResponseFlag.DROP_OVERLOAD: "DropOverload",
    ResponseFlag.DOWNSTREAM_REMOTE_RESET: "DownstreamRemoteReset",
}
_FLAG_LONG_ORDERED: tuple[tuple[ResponseFlag, str], ...] = tuple(
    (flag, FLAG_LONG[flag]) for flag, _ in FLAG_SHORT
)


def flags_to_long_string(flags: int) -> str:
    """Envoy's ``%RESPONSE_FLAGS_LONG%``: comma-joined long names, ``-`` when none."""
    if not flags:
        return UNSPECIFIED
    return ",".join(name for flag, name in _FLAG_LONG_ORDERED if flags & flag)


# ============================================================================ formatters
TextFn = Callable[["StreamInfo"], "str | None"]
ValueFn = Callable[["StreamInfo"], Any]


class Formatter:
    """A compiled format: ``format(stream_info)`` renders one access-log line."""

    __slots__ = ("source",)

    def __init__(self, source: str) -> None:
        self.source = source

    def format(self, stream_info: StreamInfo) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r})"


class _TextFormatter(Formatter):
    __slots__ = ("_fns", "_missing")

    def __init__(self, source: str, fns: list[TextFn], missing: str) -> None:
        super().__init__(source)
        self._fns = tuple(fns)
        self._missing = missing

    def format(self, stream_info: StreamInfo) -> str:
        missing = self._missing
        return "".join([missing if (v := f(stream_info)) is None else v for f in self._fns])


class _JsonFormatter(Formatter):
    __slots__ = ("_render",)

    def __init__(self, source: str, render: Callable[[StreamInfo], str]) -> None:
        super().__init__(source)
        self._render = render

    def format(self, stream_info: StreamInfo) -> str:
        return self._render(stream_info) + "\n"


# ============================================================================ parsing
_COMMAND = re.compile(r"%((?:[A-Z]|[0-9]|_)+)(?:\((.*?)\))?(?::([0-9]+))?%")

# CommandSyntaxChecker flags.
COMMAND_ONLY = 0
PARAMS_REQUIRED = 1
PARAMS_OPTIONAL = 2
LENGTH_ALLOWED = 4


class _Op:
    """One compiled operator: a text reader and a typed-value reader."""

    __slots__ = ("text", "value")

    def __init__(self, text: TextFn, value: ValueFn | None = None) -> None:
        self.text = text
        self.value = text if value is None else value


_Builder = Callable[[str, "int | None", str], _Op]


def _parse(fmt: str, path: str) -> list[str | _Op]:
    """Envoy's parse loop: literal runs (``%%`` unescaped) and operators."""
    out: list[str | _Op] = []
    literal: list[str] = []
    pos, n = 0, len(fmt)
    while pos < n:
        c = fmt[pos]
        if c != "%":
            nxt = fmt.find("%", pos)
            if nxt < 0:
                nxt = n
            literal.append(fmt[pos:nxt])
            pos = nxt
            continue
        if pos + 1 < n and fmt[pos + 1] == "%":
            literal.append("%")
            pos += 2
            continue
        if literal:
            out.append("".join(literal))
            literal = []
        m = _COMMAND.match(fmt, pos)
        if m is None:
            raise ConfigError(
                path,
                f"Incorrect configuration: {fmt!r}. Couldn't find valid command at position"
                f" {pos} ({fmt[pos:pos + 40]!r})",
            )
        command, sub, length = m.group(1), m.group(2) or "", m.group(3)
        out.append(_build_op(command, sub, None if length is None else int(length), path))
        pos = m.end()
    if literal or not out:
        out.append("".join(literal))
    return out


def _build_op(command: str, sub: str, length: int | None, path: str) -> _Op:
    entry = _OPERATORS.get(command)
    if entry is None:
        if command in _ENVOY_UNSUPPORTED:
            raise not_supported(path, f"access log operator %{command}%")
        raise ConfigError(path, f"Not supported field in StreamInfo: {command}")
    flags, builder = entry
    if flags == COMMAND_ONLY and (sub or length is not None):
        raise ConfigError(path, f"{command} does not take any parameters or length")
    if flags & PARAMS_REQUIRED and not sub:
        raise ConfigError(path, f"{command} requires parameters")
    if not flags & LENGTH_ALLOWED and length is not None:
        raise ConfigError(path, f"{command} does not allow length to be specified.")
    return builder(sub, length, path)


# ============================================================================ public API
def compile_format(fmt: str, path: str, omit_empty_values: bool = False) -> Formatter:
    """Compile an Envoy text format; ``ConfigError(path, ...)`` names a bad operator."""
    fns: list[TextFn] = []
    for piece in _parse(fmt, path):
        if isinstance(piece, str):
            fns.append(_const(piece))
        else:
            fns.append(piece.text)
    return _TextFormatter(fmt, fns, "" if omit_empty_values else UNSPECIFIED)


def compile_json_format(
    struct: Mapping[str, Any], path: str, omit_empty_values: bool = False, *, typed: bool = True
) -> Formatter:
    """Compile an Envoy JSON format (``json_format``); output is one JSON object and ``\\n``.

    ``typed=False`` is the deprecated ``FileAccessLog.json_format``: every operator value is a
    string (``"-"`` when missing).
    """
    if not isinstance(struct, Mapping):
        raise ConfigError(path, "json_format must be a mapping")
    node = _json_node(struct, path, omit_empty_values, typed)
    if omit_empty_values:
        render = _json_render_omit(node)
    else:
        render = _json_render_flat(node)
    return _JsonFormatter(json.dumps(struct, sort_keys=True, default=str), render)


def compile_substitution_format(msg: Any, path: str) -> Formatter:
    """A formatter from an ``envoy.config.core.v3.SubstitutionFormatString`` message."""
    if msg.content_type:
        raise not_supported(f"{path}.content_type", "content_type")
    if len(msg.formatters):
        raise not_supported(f"{path}.formatters", "formatters")
    if msg.HasField("json_format_options"):
        raise not_supported(f"{path}.json_format_options", "json_format_options")
    omit = bool(msg.omit_empty_values)
    kind = msg.WhichOneof("format")
    if kind == "text_format":
        return compile_format(msg.text_format, f"{path}.text_format", omit)
    if kind == "text_format_source":
        source = msg.text_format_source
        spec = source.WhichOneof("specifier")
        if spec != "inline_string":
            raise not_supported(
                f"{path}.text_format_source" + (f".{spec}" if spec else ""),
                f"text_format_source.{spec}" if spec else "an empty text_format_source",
            )
        return compile_format(
            source.inline_string, f"{path}.text_format_source.inline_string", omit)
    if kind == "json_format":
        from google.protobuf import json_format

        return compile_json_format(
            json_format.MessageToDict(msg.json_format), f"{path}.json_format", omit)
    raise ConfigError(path, "one of text_format, text_format_source or json_format is required")


# ============================================================================ JSON
# A compiled JSON node: ("lit", json_text) | ("sub", fn -> json_text | None)
# | ("map", [(key_json, node)]) | ("list", [node]).
_JsonNode = tuple[str, Any]
_encode_basestring = json.encoder.encode_basestring  # type: ignore[attr-defined]
_SURROGATE = re.compile("[\udc80-\udcff]")


def _json_string(s: str) -> str:
    out = _encode_basestring(s)
    if not s.isascii() and _SURROGATE.search(out):
        out = _SURROGATE.sub(lambda m: f"\\u00{ord(m.group()) - 0xDC00:02x}", out)
    return out


def _json_number(x: float) -> str:
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        return "null"
    if x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return repr(x)


def _json_value(v: Any) -> str | None:
    """Typed value -> JSON text; ``None`` for null."""
    if v is None:
        return None
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, str):
        return _json_string(v)
    if isinstance(v, int | float):
        return _json_number(v)
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def _json_node(v: Any, path: str, omit: bool, typed: bool) -> _JsonNode:
    if isinstance(v, Mapping):
        items = []
        for key in sorted(v):
            if not isinstance(key, str):
                raise ConfigError(path, f"json_format keys must be strings, got {key!r}")
            items.append((_json_string(key) + ":", _json_node(v[key], f"{path}.{key}", omit, typed)))
        return ("map", items)
    if isinstance(v, list | tuple):
        return ("list", [_json_node(x, f"{path}[{i}]", omit, typed) for i, x in enumerate(v)])
    if v is None:
        return ("lit", None)
    if isinstance(v, bool):
        return ("lit", "true" if v else "false")
    if isinstance(v, int | float):
        return ("lit", _json_number(v))
    if not isinstance(v, str):
        raise ConfigError(path, f"unsupported json_format value {v!r}")
    if "%" not in v:
        return ("lit", _json_string(v))
    pieces = _parse(v, path)
    if len(pieces) == 1 and isinstance(pieces[0], str):
        return ("lit", _json_string(pieces[0]))
    if len(pieces) == 1:
        op = pieces[0]
        assert isinstance(op, _Op)
        if typed:
            value = op.value
            return ("sub", lambda si: _json_value(value(si)))
        text = op.text
        if omit:
            return ("sub", lambda si: None if (t := text(si)) is None else _json_string(t))
        return ("sub", lambda si: _json_string(UNSPECIFIED if (t := text(si)) is None else t))
    # Several pieces: always a string; missing values print "-" (nothing with omit).
    missing = "" if omit else UNSPECIFIED
    fns: list[TextFn] = [
        _const(p) if isinstance(p, str) else p.text for p in pieces
    ]

    def mixed(si: StreamInfo) -> str:
        return _json_string("".join([missing if (t := f(si)) is None else t for f in fns]))

    return ("sub", mixed)


def _json_render_flat(node: _JsonNode) -> Callable[[StreamInfo], str]:
    """Keep-empty rendering: constant JSON pieces merged, operators in between."""
    pieces: list[str | Callable[[StreamInfo], str | None]] = []

    def emit(x: str | Callable[[StreamInfo], str | None]) -> None:
        if isinstance(x, str) and pieces and isinstance(pieces[-1], str):
            pieces[-1] += x
        else:
            pieces.append(x)

    def walk(n: _JsonNode) -> None:
        kind, body = n
        if kind == "lit":
            emit("null" if body is None else body)
        elif kind == "sub":
            emit(body)
        elif kind == "map":
            emit("{")
            for i, (key, child) in enumerate(body):
                if i:
                    emit(",")
                emit(key)
                walk(child)
            emit("}")
        else:
            emit("[")
            for i, child in enumerate(body):
                if i:
                    emit(",")
                walk(child)
            emit("]")

    walk(node)
    if len(pieces) == 1 and isinstance(pieces[0], str):
        const = pieces[0]
        return lambda si: const
    frozen = tuple(pieces)

    def render(si: StreamInfo) -> str:
        return "".join([
            p if p.__class__ is str else ("null" if (v := p(si)) is None else v)  # type: ignore[operator]
            for p in frozen
        ])

    return render


def _json_render_omit(node: _JsonNode) -> Callable[[StreamInfo], str]:
    """omit_empty_values rendering: map members whose value is null are left out."""

    def compile_node(n: _JsonNode) -> Callable[[StreamInfo], str | None]:
        kind, body = n
        if kind == "lit":
            return lambda si, _b=body: _b
        if kind == "sub":
            return body
        if kind == "map":
            members = [(key, compile_node(child)) for key, child in body]

            def render_map(si: StreamInfo) -> str:
                return "{" + ",".join(
                    [key + v for key, f in members if (v := f(si)) is not None]) + "}"

            return render_map
        elements = [compile_node(child) for child in body]

        def render_list(si: StreamInfo) -> str:
            return "[" + ",".join(
                ["null" if (v := f(si)) is None else v for f in elements]) + "]"

        return render_list

    root = compile_node(node)
    return lambda si: root(si) or "{}"


# ============================================================================ helpers
def _const(s: str) -> TextFn:
    return lambda _si: s


_WHITESPACE = re.compile(r"[ \t\f\v\n\r]")


def _wire(v: str) -> str:
    """A latin-1 header value as the text the sink should write (see theory, 5)."""
    if v.isascii():
        return v
    return v.encode("latin-1", "replace").decode("utf-8", "surrogateescape")


def _ms(start: float | None, end: float | None) -> int | None:
    if start is None or end is None:
        return None
    return duration_ms(end - start)


def duration_ms(seconds: float) -> int:
    """Whole milliseconds, truncated toward zero as ``duration_cast<milliseconds>``.

    Rounded to the microsecond first, so that float noise (``1.001`` s read as
    ``1000.9999...`` ms) does not lose a millisecond.
    """
    us = round(seconds * 1_000_000)
    return us // 1000 if us >= 0 else -(-us // 1000)


def _split_address(address: str) -> tuple[str, str | None]:
    """``"ip:port"`` / ``"[v6]:port"`` -> (ip, port); a bare address has no port."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, (rest[1:] if rest.startswith(":") else None)
    host, sep, port = address.rpartition(":")
    if not sep or ":" in host:
        return address, None
    return host, port


def _str_field(name: str) -> _Op:
    def text(si: StreamInfo) -> str | None:
        return getattr(si, name, None) or None

    return _Op(text)


def _uint_field(name: str) -> _Op:
    def value(si: StreamInfo) -> int:
        return int(getattr(si, name, 0) or 0)

    return _Op(lambda si: str(value(si)), value)


def _address_ops(reader: Callable[[StreamInfo], str | None]) -> tuple[_Op, _Op, _Op]:
    """(with port, without port, just the port) for one address field."""

    def without_port(si: StreamInfo) -> str | None:
        a = reader(si)
        return None if not a else _split_address(a)[0]

    def port_text(si: StreamInfo) -> str | None:
        a = reader(si)
        if not a:
            return None
        return _split_address(a)[1] or ""

    def port_value(si: StreamInfo) -> int | None:
        a = reader(si)
        if not a:
            return None
        p = _split_address(a)[1]
        return int(p) if p and p.isdigit() else None

    def with_port(si: StreamInfo) -> str | None:
        return reader(si) or None

    return _Op(with_port), _Op(without_port), _Op(port_text, port_value)


def _attr(name: str, fallback: str | None = None) -> Callable[[StreamInfo], str | None]:
    if fallback is None:
        return lambda si: getattr(si, name, None)
    return lambda si: getattr(si, name, None) or getattr(si, fallback, None)


def _duration_op(
    start: Callable[[StreamInfo], float | None], end: Callable[[StreamInfo], float | None]
) -> _Op:
    def value(si: StreamInfo) -> int | None:
        return _ms(start(si), end(si))

    def text(si: StreamInfo) -> str | None:
        v = _ms(start(si), end(si))
        return None if v is None else str(v)

    return _Op(text, value)


def _start(si: StreamInfo) -> float | None:
    return si.start_monotonic


def _end_or_now(si: StreamInfo) -> float:
    # Envoy's currentDuration(): the final duration once complete, else the time so far.
    end = si.end_monotonic
    return time.monotonic() if end is None else end


def _milestone(name: str) -> Callable[[StreamInfo], float | None]:
    return lambda si: getattr(si, name, None)


# ---------------------------------------------------------------------------- headers
def _header_builder(which: str) -> _Builder:
    def build(sub: str, length: int | None, path: str) -> _Op:
        names = sub.split("?")
        if len(names) > 2:
            raise ConfigError(path, f"More than 1 alternative header specified in token: {sub}")
        if any("\n" in n or "\r" in n or "\0" in n for n in names):
            raise ConfigError(path, "Invalid header configuration. Format string contains newline.")
        main = names[0].lower()
        alt = names[1].lower() if len(names) == 2 else ""

        def text(si: StreamInfo) -> str | None:
            headers: HeaderMap | None = getattr(si, which)
            if headers is None:
                return None
            v = headers.get(main)
            if v is None and alt:
                v = headers.get(alt)
            if v is None:
                return None
            if length is not None:
                v = v[:length]
            return _wire(v)

        return _Op(text)

    return build


def _headers_bytes_builder(which: str) -> _Builder:
    def build(sub: str, length: int | None, path: str) -> _Op:
        def value(si: StreamInfo) -> int:
            headers: HeaderMap | None = getattr(si, which)
            return 0 if headers is None else headers.byte_size()

        return _Op(lambda si: str(value(si)), value)

    return build


# ---------------------------------------------------------------------------- time
_TIME_NEWLINE = re.compile(r"%[-_0^#]*[1-9]*(E|O)?n")


class _DateFormat:
    """Envoy's ``DateFormatter``: strftime plus sub-second specifiers, cached per second.

    Tokens are strftime segments (rendered once per second) and sub-second specifiers
    ``("sub", width, dot)`` (rendered per call; width 0 is ``*``: trailing zeros trimmed).
    """

    __slots__ = ("_tokens", "_local", "_cache_second", "_cache_parts", "_simple")

    def __init__(self, fmt: str, local: bool) -> None:
        self._local = local
        self._tokens = self._tokenize(fmt, local)
        self._cache_second: int | None = None
        self._cache_parts: list[Any] = []
        self._simple = not any(isinstance(t, tuple) and t[0] == "sub" for t in self._tokens)

    @staticmethod
    def _tokenize(fmt: str, local: bool) -> list[Any]:
        tokens: list[Any] = []
        seg: list[str] = []

        def flush() -> None:
            if seg:
                tokens.append(("strf", "".join(seg)))
                seg.clear()

        i, n = 0, len(fmt)
        while i < n:
            c = fmt[i]
            if c != "%" or i + 1 >= n:
                seg.append(c)
                i += 1
                continue
            nxt = fmt[i + 1]
            if nxt == "%":
                seg.append("%%")
                i += 2
            elif nxt == "f":
                flush()
                tokens.append(("sub", 9, False))
                i += 2
            elif nxt in "123456789*" and i + 2 < n and fmt[i + 2] == "f":
                flush()
                tokens.append(("sub", 0 if nxt == "*" else int(nxt), False))
                i += 3
            elif nxt == "s":
                flush()
                tokens.append(("epoch",))
                i += 2
            elif nxt == "E" and i + 3 < n and fmt[i + 2] in "123456789*" and fmt[i + 3] in "Sf":
                width = 0 if fmt[i + 2] == "*" else int(fmt[i + 2])
                if fmt[i + 3] == "S":
                    seg.append("%S")
                    flush()
                    tokens.append(("sub", width, True))
                else:
                    flush()
                    tokens.append(("sub", width, False))
                i += 4
            elif nxt == "E" and fmt.startswith("z", i + 2):
                flush()
                tokens.append(("tz", False))
                i += 3
            elif nxt == "E" and fmt.startswith("*z", i + 2):
                flush()
                tokens.append(("tz", True))
                i += 4
            elif nxt == "E" and fmt.startswith("4Y", i + 2):
                flush()
                tokens.append(("year4",))
                i += 4
            elif nxt == "Z" and not local:
                flush()
                tokens.append(("lit", "UTC"))  # absl prints the zone name "UTC"
                i += 2
            else:
                seg.append(fmt[i:i + 2])
                i += 2
        flush()
        return tokens

    def _render_second(self, second: int) -> list[Any]:
        tm = time.localtime(second) if self._local else time.gmtime(second)
        parts: list[Any] = []
        for tok in self._tokens:
            kind = tok[0]
            if kind == "sub":
                parts.append(tok)
                continue
            if kind == "strf":
                s = time.strftime(tok[1], tm)
            elif kind == "epoch":
                s = str(second)
            elif kind == "tz":
                off = tm.tm_gmtoff or 0
                sign = "-" if off < 0 else "+"
                off = abs(off)
                s = f"{sign}{off // 3600:02d}:{off // 60 % 60:02d}"
                if tok[1]:
                    s += f":{off % 60:02d}"
            elif kind == "year4":
                s = f"{tm.tm_year:04d}"
            else:
                s = tok[1]
            if parts and isinstance(parts[-1], str):
                parts[-1] += s
            else:
                parts.append(s)
        return parts

    def format(self, t: float) -> str:
        micros = round(t * 1_000_000)
        second, frac = divmod(micros, 1_000_000)
        if second != self._cache_second:
            self._cache_parts = self._render_second(second)
            self._cache_second = second
        parts = self._cache_parts
        if self._simple:
            return parts[0] if parts else ""
        nanos = f"{frac * 1000:09d}"
        out = []
        for p in parts:
            if isinstance(p, str):
                out.append(p)
                continue
            _, width, dot = p
            if width == 0:
                digits = nanos.rstrip("0")
                if dot:
                    out.append("." + digits if digits else "")
                else:
                    out.append(digits or "0")
            else:
                out.append(("." if dot else "") + nanos[:width])
        return "".join(out)


def _time_builder(getter: Callable[[StreamInfo], float | None], local: bool) -> _Builder:
    def build(sub: str, length: int | None, path: str) -> _Op:
        if _TIME_NEWLINE.search(sub):
            raise ConfigError(path, "Invalid header configuration. Format string contains newline.")
        if sub:
            df = _DateFormat(sub, local)
        else:
            df = _DateFormat("%Y-%m-%dT%H:%M:%E3S%z" if local else "%Y-%m-%dT%H:%M:%E3SZ", local)
        try:
            df.format(0.0)
        except (ValueError, OverflowError) as exc:
            raise ConfigError(path, f"invalid time format {sub!r}: {exc}") from None
        fmt = df.format

        def text(si: StreamInfo) -> str | None:
            t = getter(si)
            return None if t is None else fmt(t)

        return _Op(text)

    return build


# ---------------------------------------------------------------------------- the table
def _simple(op: _Op) -> _Builder:
    return lambda sub, length, path: op


def _response_code_details(sub: str, length: int | None, path: str) -> _Op:
    if sub not in ("", "ALLOW_WHITESPACES"):
        raise ConfigError(
            path, f"RESPONSE_CODE_DETAILS takes no parameter or ALLOW_WHITESPACES, got {sub!r}")
    if sub:
        return _str_field("response_code_details")

    def text(si: StreamInfo) -> str | None:
        d = si.response_code_details
        if d is None:
            return None
        return _WHITESPACE.sub("_", d)

    return _Op(text)


def _upstream_transport_failure_reason(si: StreamInfo) -> str | None:
    r = si.upstream_transport_failure_reason
    return r.replace(" ", "_") if r else None


_HOSTNAME_OK = re.compile(r"[^A-Za-z0-9.\-]")


def _requested_server_name(si: StreamInfo) -> str | None:
    # StringUtil::sanitizeInvalidHostname (envoy.reloadable_features.sanitize_sni_in_access_log).
    sni = si.requested_server_name
    if not sni:
        return None
    clean = _HOSTNAME_OK.sub("_", sni)
    return clean if clean == sni else "invalid:" + clean


def _hostname_builder(sub: str, length: int | None, path: str) -> _Op:
    name = platform.node() or None
    return _Op(lambda si: name)


def _environment_builder(sub: str, length: int | None, path: str) -> _Op:
    value = os.environ.get(sub)
    value = UNSPECIFIED if value is None else (value if length is None else value[:length])
    return _Op(lambda si: value)


def _unique_id_builder(sub: str, length: int | None, path: str) -> _Op:
    return _Op(lambda si: str(uuid.uuid4()))


def _upstream_host_name(si: StreamInfo) -> str | None:
    # Envoy prints the host's hostname, or its address when it has none.
    return getattr(si, "upstream_host_name", None) or si.upstream_host or None


def _strip_port(host: str | None) -> str | None:
    if not host:
        return None
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end >= 0 else host
    h, sep, p = host.rpartition(":")
    return h if sep and p.isdigit() and ":" not in h else host


def _response_code(si: StreamInfo) -> int:
    return si.response_code or 0


_DOWNSTREAM_REMOTE = _address_ops(_attr("downstream_remote_address"))
_DOWNSTREAM_DIRECT_REMOTE = _address_ops(_attr("downstream_direct_remote_address"))
_DOWNSTREAM_LOCAL = _address_ops(_attr("downstream_local_address"))
# No listener filter rewrites the local address yet: the direct one is the local one unless
# StreamInfo says otherwise.
_DOWNSTREAM_DIRECT_LOCAL = _address_ops(
    _attr("downstream_direct_local_address", "downstream_local_address"))
_UPSTREAM_LOCAL = _address_ops(_attr("upstream_local_address"))
_UPSTREAM_REMOTE = _address_ops(_attr("upstream_host"))

_OPERATORS: dict[str, tuple[int, _Builder]] = {
    # ---- headers
    "REQ": (PARAMS_REQUIRED | LENGTH_ALLOWED, _header_builder("request_headers")),
    "RESP": (PARAMS_REQUIRED | LENGTH_ALLOWED, _header_builder("response_headers")),
    "TRAILER": (PARAMS_REQUIRED | LENGTH_ALLOWED, _header_builder("response_trailers")),
    "REQUEST_HEADERS_BYTES": (COMMAND_ONLY, _headers_bytes_builder("request_headers")),
    "RESPONSE_HEADERS_BYTES": (COMMAND_ONLY, _headers_bytes_builder("response_headers")),
    "RESPONSE_TRAILERS_BYTES": (COMMAND_ONLY, _headers_bytes_builder("response_trailers")),
    # ---- times
    "START_TIME": (PARAMS_OPTIONAL, _time_builder(lambda si: si.start_time, False)),
    "START_TIME_LOCAL": (PARAMS_OPTIONAL, _time_builder(lambda si: si.start_time, True)),
    "EMIT_TIME": (PARAMS_OPTIONAL, _time_builder(lambda si: time.time(), False)),
    "EMIT_TIME_LOCAL": (PARAMS_OPTIONAL, _time_builder(lambda si: time.time(), True)),
    # ---- durations (ms)
    "DURATION": (COMMAND_ONLY, _simple(_duration_op(_start, _end_or_now))),
    "REQUEST_DURATION": (COMMAND_ONLY, _simple(
        _duration_op(_start, _milestone("last_downstream_rx_byte")))),
    "REQUEST_TX_DURATION": (COMMAND_ONLY, _simple(
        _duration_op(_start, _milestone("last_upstream_tx_byte")))),
    "RESPONSE_DURATION": (COMMAND_ONLY, _simple(
        _duration_op(_start, _milestone("first_upstream_rx_byte")))),
    "RESPONSE_TX_DURATION": (COMMAND_ONLY, _simple(
        _duration_op(_milestone("first_upstream_rx_byte"),
                     _milestone("last_downstream_tx_byte")))),
    # ---- outcome
    "PROTOCOL": (COMMAND_ONLY, _simple(_Op(lambda si: si.protocol or None))),
    "RESPONSE_CODE": (COMMAND_ONLY, _simple(
        _Op(lambda si: str(_response_code(si)), _response_code))),
    "RESPONSE_CODE_DETAILS": (PARAMS_OPTIONAL, _response_code_details),
    "CONNECTION_TERMINATION_DETAILS": (COMMAND_ONLY, _simple(
        _str_field("connection_termination_details"))),
    "RESPONSE_FLAGS": (COMMAND_ONLY, _simple(
        _Op(lambda si: flags_to_short_string(si.response_flags)))),
    "RESPONSE_FLAGS_LONG": (COMMAND_ONLY, _simple(
        _Op(lambda si: flags_to_long_string(si.response_flags)))),
    "BYTES_RECEIVED": (COMMAND_ONLY, _simple(_uint_field("bytes_received"))),
    "BYTES_SENT": (COMMAND_ONLY, _simple(_uint_field("bytes_sent"))),
    # ---- upstream
    "UPSTREAM_HOST": (COMMAND_ONLY, _simple(_UPSTREAM_REMOTE[0])),
    "UPSTREAM_HOST_NAME": (COMMAND_ONLY, _simple(_Op(_upstream_host_name))),
    "UPSTREAM_HOST_NAME_WITHOUT_PORT": (COMMAND_ONLY, _simple(
        _Op(lambda si: _strip_port(_upstream_host_name(si))))),
    "UPSTREAM_REMOTE_ADDRESS": (COMMAND_ONLY, _simple(_UPSTREAM_REMOTE[0])),
    "UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": (COMMAND_ONLY, _simple(_UPSTREAM_REMOTE[1])),
    "UPSTREAM_REMOTE_PORT": (COMMAND_ONLY, _simple(_UPSTREAM_REMOTE[2])),
    "UPSTREAM_CLUSTER": (COMMAND_ONLY, _simple(_str_field("upstream_cluster"))),
    "UPSTREAM_CLUSTER_RAW": (COMMAND_ONLY, _simple(_str_field("upstream_cluster"))),
    "UPSTREAM_LOCAL_ADDRESS": (COMMAND_ONLY, _simple(_UPSTREAM_LOCAL[0])),
    "UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": (COMMAND_ONLY, _simple(_UPSTREAM_LOCAL[1])),
    "UPSTREAM_LOCAL_PORT": (COMMAND_ONLY, _simple(_UPSTREAM_LOCAL[2])),
    "UPSTREAM_TRANSPORT_FAILURE_REASON": (COMMAND_ONLY, _simple(
        _Op(_upstream_transport_failure_reason))),
    "UPSTREAM_REQUEST_ATTEMPT_COUNT": (COMMAND_ONLY, _simple(_uint_field("attempt_count"))),
    # ---- downstream
    "DOWNSTREAM_REMOTE_ADDRESS": (COMMAND_ONLY, _simple(_DOWNSTREAM_REMOTE[0])),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": (COMMAND_ONLY, _simple(_DOWNSTREAM_REMOTE[1])),
    "DOWNSTREAM_REMOTE_PORT": (COMMAND_ONLY, _simple(_DOWNSTREAM_REMOTE[2])),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS": (COMMAND_ONLY, _simple(_DOWNSTREAM_DIRECT_REMOTE[0])),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT": (COMMAND_ONLY, _simple(
        _DOWNSTREAM_DIRECT_REMOTE[1])),
    "DOWNSTREAM_DIRECT_REMOTE_PORT": (COMMAND_ONLY, _simple(_DOWNSTREAM_DIRECT_REMOTE[2])),
    "DOWNSTREAM_LOCAL_ADDRESS": (COMMAND_ONLY, _simple(_DOWNSTREAM_LOCAL[0])),
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": (COMMAND_ONLY, _simple(_DOWNSTREAM_LOCAL[1])),
    "DOWNSTREAM_LOCAL_PORT": (COMMAND_ONLY, _simple(_DOWNSTREAM_LOCAL[2])),
    "DOWNSTREAM_DIRECT_LOCAL_ADDRESS": (COMMAND_ONLY, _simple(_DOWNSTREAM_DIRECT_LOCAL[0])),
    "DOWNSTREAM_DIRECT_LOCAL_ADDRESS_WITHOUT_PORT": (COMMAND_ONLY, _simple(
        _DOWNSTREAM_DIRECT_LOCAL[1])),
    "DOWNSTREAM_DIRECT_LOCAL_PORT": (COMMAND_ONLY, _simple(_DOWNSTREAM_DIRECT_LOCAL[2])),
    "REQUESTED_SERVER_NAME": (COMMAND_ONLY, _simple(_Op(_requested_server_name))),
    "CONNECTION_ID": (COMMAND_ONLY, _simple(_uint_field("connection_id"))),
    # ---- routing
    "ROUTE_NAME": (COMMAND_ONLY, _simple(_str_field("route_name"))),
    "VIRTUAL_CLUSTER_NAME": (COMMAND_ONLY, _simple(_str_field("virtual_cluster_name"))),
    # ---- process
    "HOSTNAME": (COMMAND_ONLY, _hostname_builder),
    "ENVIRONMENT": (PARAMS_REQUIRED | LENGTH_ALLOWED, _environment_builder),
    "UNIQUE_ID": (COMMAND_ONLY, _unique_id_builder),
}



# ---- TLS (StreamInfo.downstream_ssl / upstream_ssl: proxy.tls.connection_info) ---------
def _ssl_op(side: str, read: Callable[[Any], Any]) -> _Op:
    """An operator over one side's SslConnectionInfo: ``-`` without TLS or without a value;
    several SANs are joined with ``,`` as Envoy joins them."""

    def text(si: StreamInfo) -> str | None:
        info = getattr(si, side, None)
        if info is None:
            return None
        v = read(info)
        if isinstance(v, tuple):
            return ",".join(v) or None
        return v or None

    return _Op(text)


def _tls_operators() -> dict[str, tuple[int, _Builder]]:
    def serial(i: Any) -> str | None:
        s = i.peer_serial
        return s if s is None or len(s) % 2 == 0 else "0" + s

    readers: dict[str, Callable[[Any], Any]] = {
        "TLS_VERSION": lambda i: i.tls_version,
        "TLS_CIPHER": lambda i: i.cipher,
        "TLS_SESSION_ID": lambda i: i.session_id_hex,
        "PEER_URI_SAN": lambda i: i.peer_sans.uri,
        "PEER_DNS_SAN": lambda i: i.peer_sans.dns,
        "PEER_IP_SAN": lambda i: i.peer_sans.ip,
        "PEER_SUBJECT": lambda i: i.peer_subject,
        "PEER_ISSUER": lambda i: i.peer_issuer,
        "LOCAL_URI_SAN": lambda i: i.local.uri,
        "LOCAL_DNS_SAN": lambda i: i.local.dns,
        "LOCAL_IP_SAN": lambda i: i.local.ip,
    }
    downstream_only: dict[str, Callable[[Any], Any]] = {
        "PEER_EMAIL_SAN": lambda i: i.peer_sans.email,
        "LOCAL_EMAIL_SAN": lambda i: i.local.email,
        "LOCAL_SUBJECT": lambda i: i.local.subject,
        "PEER_SERIAL": serial,
        "PEER_FINGERPRINT_256": lambda i: i.peer_fingerprint_256,
        "PEER_FINGERPRINT_1": lambda i: i.peer_fingerprint_1,
    }
    out: dict[str, tuple[int, _Builder]] = {}
    for name, read in readers.items():
        out[f"DOWNSTREAM_{name}"] = (COMMAND_ONLY, _simple(_ssl_op("downstream_ssl", read)))
        out[f"UPSTREAM_{name}"] = (COMMAND_ONLY, _simple(_ssl_op("upstream_ssl", read)))
    for name, read in downstream_only.items():
        out[f"DOWNSTREAM_{name}"] = (COMMAND_ONLY, _simple(_ssl_op("downstream_ssl", read)))
    return out


_OPERATORS.update(_tls_operators())

# Operators Envoy knows that trioxy has no data for (TLS, metadata, filter state, gRPC...):
# refused by name rather than printed as "-" forever.
_ENVOY_UNSUPPORTED: frozenset[str] = frozenset((
    "ACCESS_LOG_TYPE", "BYTES_RETRANSMITTED", "CEL", "CLUSTER_METADATA", "COMMON_DURATION",
    "CUSTOM_FLAGS", "DOWNSTREAM_HANDSHAKE_DURATION", "DOWNSTREAM_HEADER_BYTES_RECEIVED",
    "DOWNSTREAM_HEADER_BYTES_SENT", "DOWNSTREAM_LOCAL_DNS_SAN", "DOWNSTREAM_LOCAL_EMAIL_SAN",
    "DOWNSTREAM_LOCAL_IP_SAN", "DOWNSTREAM_LOCAL_OTHERNAME_SAN", "DOWNSTREAM_LOCAL_SUBJECT",
    "DOWNSTREAM_LOCAL_URI_SAN", "DOWNSTREAM_PEER_CERT", "DOWNSTREAM_PEER_CERT_V_END",
    "DOWNSTREAM_PEER_CERT_V_START", "DOWNSTREAM_PEER_CHAIN_FINGERPRINTS_1",
    "DOWNSTREAM_PEER_CHAIN_FINGERPRINTS_256", "DOWNSTREAM_PEER_CHAIN_SERIALS",
    "DOWNSTREAM_PEER_DNS_SAN", "DOWNSTREAM_PEER_EMAIL_SAN", "DOWNSTREAM_PEER_FINGERPRINT_1",
    "DOWNSTREAM_PEER_FINGERPRINT_256", "DOWNSTREAM_PEER_IP_SAN", "DOWNSTREAM_PEER_ISSUER",
    "DOWNSTREAM_PEER_OTHERNAME_SAN", "DOWNSTREAM_PEER_SERIAL", "DOWNSTREAM_PEER_SUBJECT",
    "DOWNSTREAM_PEER_URI_SAN", "DOWNSTREAM_TLS_CIPHER", "DOWNSTREAM_TLS_SESSION_ID",
    "DOWNSTREAM_TLS_VERSION", "DOWNSTREAM_TRANSPORT_FAILURE_REASON",
    "DOWNSTREAM_WIRE_BYTES_RECEIVED", "DOWNSTREAM_WIRE_BYTES_SENT", "DYNAMIC_METADATA",
    "FILTER_CHAIN_NAME", "FILTER_STATE", "GRPC_STATUS", "GRPC_STATUS_NUMBER",
    "LOCAL_REPLY_BODY", "METADATA", "PACKETS_RETRANSMITTED", "PATH", "QUERY_PARAM",
    "REQ_WITHOUT_QUERY", "ROUNDTRIP_DURATION", "STREAM_ID", "TLS_JA3_FINGERPRINT",
    "TLS_JA4_FINGERPRINT", "TRACE_ID", "UPSTREAM_CONNECTION_ID",
    "UPSTREAM_CONNECTION_POOL_READY_DURATION", "UPSTREAM_FILTER_STATE",
    "UPSTREAM_HEADER_BYTES_RECEIVED", "UPSTREAM_HEADER_BYTES_SENT", "UPSTREAM_LOCAL_DNS_SAN",
    "UPSTREAM_LOCAL_IP_SAN", "UPSTREAM_LOCAL_URI_SAN", "UPSTREAM_METADATA", "UPSTREAM_PEER_CERT",
    "UPSTREAM_PEER_CERT_V_END", "UPSTREAM_PEER_CERT_V_START", "UPSTREAM_PEER_DNS_SAN",
    "UPSTREAM_PEER_IP_SAN", "UPSTREAM_PEER_ISSUER", "UPSTREAM_PEER_SUBJECT",
    "UPSTREAM_PEER_URI_SAN", "UPSTREAM_PROTOCOL", "UPSTREAM_TLS_CIPHER",
    "UPSTREAM_TLS_SESSION_ID", "UPSTREAM_TLS_VERSION", "UPSTREAM_WIRE_BYTES_RECEIVED",
    "UPSTREAM_WIRE_BYTES_SENT",
))


def operators() -> Sequence[str]:
    """The operator names trioxy implements (for docs and tests)."""
    return sorted(_OPERATORS)
