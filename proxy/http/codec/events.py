"""The codec-neutral stream event vocabulary (hypercorn's ``protocol/events.py``, Envoy's codec API).

Every HTTP codec (HTTP/1.1 over h11 or httptools, HTTP/2 over h2) turns bytes into these
events and events into bytes, so the connection manager, filters and router never see a
wire format. HTTP/1.1 has one stream at a time and uses stream id 1, as hypercorn does;
HTTP/2 interleaves the events of many streams, each carrying its stream id, and adds
``StreamReset`` (RST_STREAM) and ``GoAway``.

Theory of operation:
1. A message is ``*Headers`` (``end_stream=True`` when no body follows), then zero or more
   ``Data``, then exactly one ``EndOfStream`` or ``Trailers`` unless the headers already
   ended the stream. Codecs compute ``end_stream`` from the framing, so a request without a
   body costs one event.
2. Header maps carry pseudo-headers: requests ``:method :path :authority :scheme``,
   responses ``:status``. Hop-by-hop headers never appear in an event: codecs strip them
   on the way in and add their own framing on the way out.
3. ``ConnectionClosed`` is the peer's EOF; what it means (DC, UC) is the caller's decision.
4. Errors are exceptions (``CodecError``) that say whose fault it was and carry the status
   and response-code details of the local reply, as h11's ``RemoteProtocolError`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.http.headers import HeaderMap

H1_STREAM_ID = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestHeaders:
    stream_id: int
    headers: HeaderMap
    end_stream: bool
    http_version: str = "1.1"  # "1.0", "1.1", "2"
    expect_continue: bool = False  # the client sent ``Expect: 100-continue`` (stripped)


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseHeaders:
    stream_id: int
    headers: HeaderMap
    end_stream: bool
    http_version: str = "1.1"


@dataclass(frozen=True, slots=True, kw_only=True)
class InformationalResponse:
    """A 1xx other than 101 from upstream (Envoy drops them unless proxy_100_continue)."""

    stream_id: int
    headers: HeaderMap


@dataclass(frozen=True, slots=True, kw_only=True)
class Data:
    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class EndOfStream:
    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Trailers:
    """Trailers end the stream."""

    stream_id: int
    trailers: HeaderMap


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionClosed:
    """The peer closed its sending side."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamReset:
    """HTTP/2: the stream ended abnormally (RST_STREAM); ``remote`` when the peer sent it.

    ``error_code`` is the HTTP/2 error code (``REFUSED_STREAM`` = 7 means the peer did not
    process the request: it may be retried)."""

    stream_id: int
    error_code: int
    remote: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class GoAway:
    """HTTP/2: the peer will open or process no stream above ``last_stream_id``."""

    last_stream_id: int
    error_code: int


Event = (
    RequestHeaders
    | ResponseHeaders
    | InformationalResponse
    | Data
    | EndOfStream
    | Trailers
    | ConnectionClosed
    | StreamReset
    | GoAway
)


class CodecError(Exception):
    """A protocol violation; ``status`` and ``details`` are for the local reply (if any)."""

    def __init__(self, message: str, *, status: int = 400, details: str = "http1.codec_error"):
        super().__init__(message)
        self.status = status
        self.details = details


class RemoteProtocolError(CodecError):
    """The peer broke the protocol (downstream: 4xx + DPE; upstream: 502 UPE)."""


class LocalProtocolError(CodecError):
    """We were asked to send something the protocol forbids (a bug or a bad upstream header)."""
