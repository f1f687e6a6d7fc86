"""gRPC over HTTP as Envoy's ``Grpc::Common`` / ``Grpc::Utility`` see it (pure).

What the data path needs to know about gRPC without a protobuf in sight: whether a request
is gRPC, how a local reply becomes a trailers-only gRPC response, the service and method of
a path, the ``grpc-timeout`` header, and where messages start in a stream of DATA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.http.headers import HeaderMap

__all__ = [
    "MessageCounter",
    "grpc_timeout_s",
    "http_to_grpc_status",
    "is_grpc_request",
    "percent_encode",
    "resolve_service_and_method",
    "to_grpc_timeout",
]

OK = 0
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16


def is_grpc_request(headers: HeaderMap) -> bool:
    """Envoy's ``Grpc::Common::isGrpcRequestHeaders``: content-type application/grpc[+...]."""
    ct = headers.get("content-type")
    if ct is None or not ct.startswith("application/grpc"):
        return False
    return len(ct) == 16 or ct[16] in "+;"


def http_to_grpc_status(status: int) -> int:
    """Envoy's ``Grpc::Utility::httpToGrpcStatus`` (gRPC's http-grpc-status-mapping.md)."""
    if status == 400:
        return INTERNAL
    if status == 401:
        return UNAUTHENTICATED
    if status == 403:
        return PERMISSION_DENIED
    if status == 404:
        return UNIMPLEMENTED
    if status in (429, 502, 503, 504):
        return UNAVAILABLE
    return UNKNOWN


_UNRESERVED = frozenset(range(0x20, 0x7F)) - {ord("%")}


def percent_encode(text: str) -> str:
    """``grpc-message`` encoding: printable ASCII except ``%`` as is, the rest %XX (UTF-8)."""
    raw = text.encode("utf-8")
    if all(b in _UNRESERVED for b in raw):
        return text
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in raw)


def resolve_service_and_method(path: str | None) -> tuple[str, str] | None:
    """``/package.Service/Method`` → (``package.Service``, ``Method``); None otherwise."""
    if not path or path[0] != "/":
        return None
    parts = path[1:].split("/")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        return None
    return parts[0], parts[1]


_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def grpc_timeout_s(headers: HeaderMap) -> float | None:
    """The ``grpc-timeout`` header in seconds (``1S``, ``200m``...); None when absent or bad.

    As Envoy's ``Grpc::Common::getGrpcTimeout``: at most 8 digits and one unit."""
    v = headers.get("grpc-timeout")
    if not v or len(v) < 2 or len(v) > 9:
        return None
    unit = _UNITS.get(v[-1])
    digits = v[:-1]
    if unit is None or not digits.isdigit():
        return None
    return int(digits) * unit


def to_grpc_timeout(seconds: float) -> str:
    """A ``grpc-timeout`` value for ``seconds`` (Envoy: milliseconds, or a coarser unit
    when the number would not fit in 8 digits)."""
    ms = max(0, int(seconds * 1000))
    if ms < 100_000_000:
        return f"{ms}m"
    s = ms // 1000
    if s < 100_000_000:
        return f"{s}S"
    m = s // 60
    if m < 100_000_000:
        return f"{m}M"
    return f"{min(m // 60, 99_999_999)}H"


class MessageCounter:
    """Counts gRPC messages (5-byte prefix + payload) across DATA chunks of any size.

    Envoy's ``Grpc::FrameInspector``: only message boundaries are tracked, nothing is kept."""

    __slots__ = ("count", "_header_left", "_length", "_body_left")

    def __init__(self) -> None:
        self.count = 0
        self._header_left = 5  # prefix bytes still to read
        self._length = 0
        self._body_left = 0

    def inspect(self, data: bytes) -> int:
        """Feed ``data``; returns how many messages started in it."""
        started = 0
        i = 0
        n = len(data)
        while i < n:
            if self._body_left:
                take = min(self._body_left, n - i)
                self._body_left -= take
                i += take
                continue
            if self._header_left == 5:
                started += 1  # the flag byte opens a message
                self._length = 0
            # prefix: 1 flag byte, then a 4-byte big-endian length
            if self._header_left < 5:
                self._length = (self._length << 8) | data[i]
            self._header_left -= 1
            i += 1
            if self._header_left == 0:
                self._header_left = 5
                self._body_left = self._length
        self.count += started
        return started
