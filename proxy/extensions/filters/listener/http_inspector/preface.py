"""The first bytes of an HTTP connection as ``http_inspector`` reads them, sans-IO.

Envoy's ``HttpInspector::Filter::parseHttpHeader``:

1. The bytes so far are a prefix of the HTTP/2 connection preface
   (``PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n``): wait for all 24, then ``h2c``.
2. Otherwise the first line must be an HTTP/1 request line, ``method SP target SP
   HTTP/d.d`` ended by LF (optionally CR LF): a token method, a target of visible characters
   (and bytes >= 0x80), single spaces. ``HTTP/1.1`` gives ``http/1.1``; any other version, or
   none (``GET /``, HTTP/0.9), ``http/1.0``, as Envoy ("Set other HTTP protocols to
   HTTP/1.0"). An empty first line or a byte that cannot continue the request line answers
   "not HTTP" at once, without waiting for the end of the line (Envoy's parser stops on the
   first bad byte too).
3. ``parse_http_preface(data)`` depends only on ``data``; it never raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["H2_PREFACE", "NEED_MORE", "NeedMore", "NotHttp", "parse_http_preface"]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP10, HTTP11, H2C = "http/1.0", "http/1.1", "h2c"  # Envoy's ALPN names

_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TARGET = frozenset(range(0x21, 0x7F)) | frozenset(range(0x80, 0x100))
_DIGITS = frozenset(b"0123456789")
_VERSION_PREFIX = b"HTTP/"


class NeedMore:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = NeedMore()


@dataclass(frozen=True, slots=True)
class NotHttp:
    reason: str


def parse_http_preface(data: bytes) -> str | NeedMore | NotHttp:
    """``"h2c"``, ``"http/1.1"`` or ``"http/1.0"``; ``NEED_MORE``; or ``NotHttp``."""
    n = min(len(data), len(H2_PREFACE))
    if data[:n] == H2_PREFACE[:n]:
        return NEED_MORE if len(data) < len(H2_PREFACE) else H2C
    if data[:1] in (b"\r", b"\n"):
        return NotHttp("empty request line")
    return _request_line(data)


def _request_line(data: bytes) -> str | NeedMore | NotHttp:
    i, end = 0, len(data)
    while i < end and data[i] in _TCHAR:  # method
        i += 1
    if i == end:
        return NEED_MORE
    if i == 0 or data[i] != 0x20:
        return NotHttp("bad method")
    i += 1
    start = i
    while i < end and data[i] in _TARGET:  # request-target
        i += 1
    if i == end:
        return NEED_MORE
    if i == start:
        return NotHttp("bad request target")
    if data[i] in (0x0D, 0x0A):  # "GET /" alone: an HTTP/0.9 request line
        return _line_end(data, i, HTTP10)
    if data[i] != 0x20:
        return NotHttp("bad request target")
    i += 1
    version = data[i:i + 8]
    for k, byte in enumerate(version):  # "HTTP/" DIGIT "." DIGIT
        ok = byte == _VERSION_PREFIX[k] if k < 5 else (byte == 0x2E if k == 6 else byte in _DIGITS)
        if not ok:
            return NotHttp("bad HTTP version")
    i += len(version)
    if len(version) < 8 or i == end:
        return NEED_MORE
    return _line_end(data, i, HTTP11 if version == b"HTTP/1.1" else HTTP10)


def _line_end(data: bytes, i: int, protocol: str) -> str | NeedMore | NotHttp:
    if data[i] == 0x0D:
        i += 1
        if i == len(data):
            return NEED_MORE
    if data[i] != 0x0A:
        return NotHttp("bad end of the request line")
    return protocol
