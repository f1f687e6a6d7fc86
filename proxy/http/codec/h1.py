"""HTTP/1.1 server (downstream) and client (upstream) codecs over h11, sans-IO.

h11 is the reference parser; these classes translate between its events and the
codec-neutral vocabulary of ``events.py``, so a faster parser (httptools) can sit beside
this one behind the same methods and be checked against it with the same inputs.

Theory of operation:
1. Bytes in: ``receive_data(data)`` (``b""`` is EOF); events out: ``next_event()`` returns an
   event or ``None`` when more bytes are needed (or, on the server, while a pipelined
   request waits for the current response to finish).
2. Events in: ``send_*`` methods return the bytes to write; the caller owns the socket.
3. ``end_stream`` is computed from the framing so a bodiless message is one event; the
   ``EndOfMessage`` h11 produces for it is swallowed.
4. Request-smuggling shapes are refused beyond what h11 refuses itself (h11 already
   refuses differing duplicate Content-Length, bad chunk framing, codings other than
   chunked, multiple Host): Content-Length together with Transfer-Encoding, and obs-fold
   (a header line starting with SP/HTAB, which h11 would silently join).
5. Header limits (Envoy's max_request_headers_kb / max_headers_count) give 431; h11's
   ``max_incomplete_event_size`` bounds a head that is still arriving, and a complete head
   is measured after parsing.
6. Hop-by-hop headers (connection, keep-alive, proxy-connection, transfer-encoding,
   upgrade, te other than "trailers") are stripped on the way in; framing and
   ``Connection: close`` are added on the way out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from http import HTTPStatus

import h11

from proxy.http.codec.events import (
    H1_STREAM_ID,
    CodecError,
    ConnectionClosed,
    Data,
    EndOfStream,
    Event,
    InformationalResponse,
    LocalProtocolError,
    RemoteProtocolError,
    RequestHeaders,
    ResponseHeaders,
    Trailers,
)
from proxy.http.headers import HeaderMap

DEFAULT_MAX_REQUEST_HEADERS_KB = 60
DEFAULT_MAX_HEADERS_COUNT = 100

# Envoy's list (HeaderUtility / conn_manager_utility): never forwarded across the proxy.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_HOP_BY_HOP_STR = frozenset(n.decode() for n in HOP_BY_HOP) | {"te", "host"}

# Methods whose requests carry no body, so a headers-only request needs no Content-Length: 0
# (RFC 9110 §8.6; Envoy's encoder does the same).
_BODILESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT"})

_OBS_FOLD = re.compile(rb"\n[ \t]")
_HEAD_END = re.compile(rb"\r?\n\r?\n")

_REASONS: dict[int, bytes] = {s.value: s.phrase.encode() for s in HTTPStatus}


def reason_phrase(status: int) -> bytes:
    return _REASONS.get(status, b"")


def _to_map(pseudo: list[tuple[str, str]], headers: Iterable[tuple[bytes, bytes]]) -> HeaderMap:
    for name, value in headers:
        pseudo.append((name.decode("latin-1"), value.decode("latin-1")))
    return HeaderMap(pseudo)


def _te_value(value: bytes) -> bool:
    """True when a ``te`` header asks for trailers (the one ``te`` Envoy forwards)."""
    return b"trailers" in value.lower()


def _filter_hop_by_hop(
    headers: Iterable[tuple[bytes, bytes]],
) -> tuple[list[tuple[str, str]], bytes | None, bool]:
    """(end-to-end headers, ``host`` value, whether ``te: trailers`` was asked)."""
    out: list[tuple[str, str]] = []
    host: bytes | None = None
    te_trailers = False
    for name, value in headers:
        if name in HOP_BY_HOP:
            continue
        if name == b"host":
            host = value
            continue
        if name == b"te":
            te_trailers = te_trailers or _te_value(value)
            continue
        out.append((name.decode("latin-1"), value.decode("latin-1")))
    return out, host, te_trailers


def _encode_headers(headers: HeaderMap, skip: frozenset[str]) -> list[tuple[bytes, bytes]]:
    return [
        (k.encode("latin-1"), v.encode("latin-1"))
        for k, v in headers.items()
        if k[0] != ":" and k not in skip
    ]


def _encode_trailers(trailers: HeaderMap | None) -> list[tuple[bytes, bytes]]:
    if trailers is None:
        return []
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in trailers.regular()]


def error_response(status: int, body: bytes) -> bytes:
    """A complete ``Connection: close`` response for a request that could not be parsed."""
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\ncontent-type: text/plain\r\n"
        b"connection: close\r\n\r\n" % (status, reason_phrase(status), len(body))
    )
    return head + body


def _header_bytes(headers: Iterable[tuple[bytes, bytes]]) -> int:
    return sum(len(n) + len(v) for n, v in headers)


class Http1ServerCodec:
    """The downstream side: parses requests, serializes responses."""

    __slots__ = (
        "_conn",
        "_max_header_bytes",
        "_max_headers_count",
        "_scheme",
        "_accept_http_10",
        "_swallow_eom",
        "_head_scan",
        "_scanning_head",
        "_request_method",
        "_response_no_body",
        "request_complete",
        "response_complete",
        "bytes_received",
    )

    def __init__(
        self,
        *,
        max_request_headers_kb: int = DEFAULT_MAX_REQUEST_HEADERS_KB,
        max_headers_count: int = DEFAULT_MAX_HEADERS_COUNT,
        scheme: str = "http",
        accept_http_10: bool = True,
    ) -> None:
        self._max_header_bytes = max_request_headers_kb * 1024
        self._max_headers_count = max_headers_count
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_header_bytes)
        self._scheme = scheme
        self._accept_http_10 = accept_http_10
        self._swallow_eom = False
        self._head_scan = bytearray()
        self._scanning_head = True
        self._request_method = ""
        self._response_no_body = False
        self.request_complete = False
        self.response_complete = False
        self.bytes_received = 0

    # -- receiving -----------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the socket; ``b""`` means the peer closed."""
        self.bytes_received += len(data)
        if self._scanning_head and data:
            self._head_scan += data
            self._check_head()
        try:
            self._conn.receive_data(data)
        except h11.RemoteProtocolError as exc:  # data after EOF
            raise RemoteProtocolError(str(exc)) from None

    def _check_head(self) -> None:
        """Refuse obs-fold in the request head (h11 would join the lines silently)."""
        buf = self._head_scan
        start = 0
        while start < len(buf) and buf[start] in b"\r\n":
            start += 1  # leading empty lines before the request line are ignored
        m = _HEAD_END.search(buf, start)
        end = m.start() + 1 if m else len(buf)
        if _OBS_FOLD.search(buf, start, end):
            raise RemoteProtocolError("obs-fold in request headers", details="http1.codec_error")
        if m:
            self._scanning_head = False
            self._head_scan = bytearray()
        elif len(buf) > self._max_header_bytes + 4:
            raise RemoteProtocolError(
                "request headers too large", status=431, details="http1.headers_too_large"
            )

    def next_event(self) -> Event | None:
        """The next request event, or None when more bytes are needed."""
        while True:
            try:
                ev = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                if self._conn.their_state is h11.ERROR and self._eof_mid_message(str(exc)):
                    return ConnectionClosed()
                status = exc.error_status_hint
                if status == 431:
                    raise RemoteProtocolError(
                        str(exc), status=431, details="http1.headers_too_large"
                    ) from None
                if status == 501:
                    raise RemoteProtocolError(
                        str(exc), status=501, details="http1.invalid_transfer_encoding"
                    ) from None
                raise RemoteProtocolError(str(exc)) from None
            t = type(ev)
            if t is h11.Data:
                return Data(stream_id=H1_STREAM_ID, data=bytes(ev.data))
            if t is h11.Request:
                out = self._on_request(ev)
                if self._swallow_eom:
                    self._take_eom()
                return out
            if t is h11.EndOfMessage:
                self.request_complete = True
                if self._swallow_eom:
                    self._swallow_eom = False
                    continue
                if ev.headers:
                    return Trailers(stream_id=H1_STREAM_ID, trailers=_to_map([], ev.headers))
                return EndOfStream(stream_id=H1_STREAM_ID)
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return None
            if t is h11.ConnectionClosed:
                return ConnectionClosed()
            raise RemoteProtocolError(f"unexpected event {ev!r}")  # pragma: no cover

    def _take_eom(self) -> None:
        """Consume the EndOfMessage of a bodiless message now, so keep-alive state is final."""
        if type(self._conn.next_event()) is h11.EndOfMessage:
            self._swallow_eom = False
            self.request_complete = True

    @staticmethod
    def _eof_mid_message(message: str) -> bool:
        return message.startswith("peer closed connection")

    def _on_request(self, ev: h11.Request) -> RequestHeaders:
        headers = ev.headers
        if len(headers) > self._max_headers_count:
            raise RemoteProtocolError(
                "too many headers", status=431, details="http1.too_many_headers"
            )
        if _header_bytes(headers) + len(ev.target) > self._max_header_bytes:
            raise RemoteProtocolError(
                "request headers too large", status=431, details="http1.headers_too_large"
            )
        version = ev.http_version.decode("ascii")
        if version == "1.0" and not self._accept_http_10:
            raise RemoteProtocolError(
                "HTTP/1.0 is not accepted", status=426, details="http1.codec_error"
            )
        chunked = False
        content_length: bytes | None = None
        expect_continue = False
        for name, value in headers:
            if name == b"transfer-encoding":
                chunked = True
            elif name == b"content-length":
                content_length = value
            elif name == b"expect" and value.lower() == b"100-continue":
                expect_continue = True
        if chunked and content_length is not None:
            raise RemoteProtocolError(
                "both Content-Length and Transfer-Encoding",
                details="http1.content_length_and_chunked_not_allowed",
            )
        end_stream = not chunked and (content_length is None or content_length == b"0")
        self._swallow_eom = end_stream
        self.request_complete = False
        self.response_complete = False
        method = ev.method.decode("ascii")
        self._request_method = method
        regular, host, te_trailers = _filter_hop_by_hop(headers)
        pseudo = [(":method", method), (":scheme", self._scheme)]
        if host is not None:
            pseudo.insert(1, (":authority", host.decode("latin-1")))
        pseudo.insert(1, (":path", ev.target.decode("latin-1")))
        if te_trailers:
            regular.append(("te", "trailers"))
        if expect_continue:
            regular = [kv for kv in regular if kv[0] != "expect"]
        pseudo.extend(regular)
        return RequestHeaders(
            stream_id=H1_STREAM_ID,
            headers=HeaderMap(pseudo),
            end_stream=end_stream,
            http_version=version,
            expect_continue=expect_continue,
        )

    # -- sending -------------------------------------------------------------------------
    def send_continue(self) -> bytes:
        """``100 Continue`` for a client that sent ``Expect: 100-continue``."""
        return self._conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""

    def send_headers(self, headers: HeaderMap, end_stream: bool, *, close: bool = False) -> bytes:
        """Serialize response headers; ``close`` adds ``Connection: close``."""
        status = int(headers.get(":status") or 0)
        if status < 200:
            raise LocalProtocolError(f"cannot send status {status} as a final response")
        no_body = self._request_method == "HEAD" or status in (204, 304)
        self._response_no_body = no_body
        raw = _encode_headers(headers, _HOP_BY_HOP_STR)
        if end_stream and not no_body and headers.get("content-length") is None:
            raw.append((b"content-length", b"0"))
        if close:
            raw.append((b"connection", b"close"))
        try:
            out = self._conn.send(
                h11.Response(status_code=status, headers=raw, reason=reason_phrase(status))
            )
            if end_stream:
                out += self._conn.send(h11.EndOfMessage())
                self.response_complete = True
        except h11.LocalProtocolError as exc:
            raise LocalProtocolError(str(exc)) from None
        return out or b""

    def send_data(self, data: bytes, end_stream: bool = False) -> bytes:
        out = b""
        try:
            if data and not self._response_no_body:
                out = self._conn.send(h11.Data(data=data)) or b""
            if end_stream:
                out += self._conn.send(h11.EndOfMessage()) or b""
                self.response_complete = True
        except h11.LocalProtocolError as exc:
            raise LocalProtocolError(str(exc)) from None
        return out

    def send_trailers(self, trailers: HeaderMap) -> bytes:
        try:
            out = self._conn.send(h11.EndOfMessage(headers=_encode_trailers(trailers))) or b""
        except h11.LocalProtocolError as exc:
            raise LocalProtocolError(str(exc)) from None
        self.response_complete = True
        return out

    error_response = staticmethod(error_response)

    # -- connection state ----------------------------------------------------------------
    @property
    def response_started(self) -> bool:
        return self._conn.our_state in (h11.SEND_BODY, h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    @property
    def keep_alive(self) -> bool:
        """Whether this connection may carry another request after the current one."""
        return self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE

    def start_next_cycle(self) -> bool:
        """Reset for the next (possibly pipelined) request; False when the connection must close."""
        if not self.keep_alive:
            return False
        self._conn.start_next_cycle()
        self._request_method = ""
        self._response_no_body = False
        self.request_complete = False
        self.response_complete = False
        pending, _ = self._conn.trailing_data
        self._scanning_head = True
        self._head_scan = bytearray(pending)
        if pending:
            self._check_head()
        return True

    @property
    def has_buffered_data(self) -> bool:
        return bool(self._conn.trailing_data[0])


class Http1ClientCodec:
    """The upstream side: serializes requests, parses responses."""

    __slots__ = (
        "_conn",
        "_swallow_eom",
        "_method",
        "bytes_received",
        "response_headers_received",
        "response_complete",
        "_eof",
    )

    def __init__(self, *, max_response_headers_kb: int = DEFAULT_MAX_REQUEST_HEADERS_KB) -> None:
        self._conn = h11.Connection(
            h11.CLIENT, max_incomplete_event_size=max_response_headers_kb * 1024
        )
        self._swallow_eom = False
        self._method = ""
        self.bytes_received = 0
        self.response_headers_received = False
        self.response_complete = False
        self._eof = False

    def send_request_headers(self, headers: HeaderMap, end_stream: bool) -> bytes:
        method = headers.get(":method") or "GET"
        self._method = method
        raw: list[tuple[bytes, bytes]] = [
            (b"host", (headers.get(":authority") or "").encode("latin-1"))
        ]
        raw += _encode_headers(headers, _HOP_BY_HOP_STR)
        if headers.get("te") is not None:
            raw.append((b"te", b"trailers"))
        has_length = headers.get("content-length") is not None
        if end_stream:
            if not has_length and method not in _BODILESS_METHODS:
                raw.append((b"content-length", b"0"))
        elif not has_length:
            raw.append((b"transfer-encoding", b"chunked"))
        try:
            out = self._conn.send(
                h11.Request(
                    method=method.encode("ascii"),
                    target=(headers.get(":path") or "/").encode("latin-1"),
                    headers=raw,
                )
            ) or b""
            if end_stream:
                out += self._conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError as exc:
            raise LocalProtocolError(str(exc)) from None
        return out

    def send_data(self, data: bytes, end_stream: bool = False) -> bytes:
        try:
            out = (self._conn.send(h11.Data(data=data)) or b"") if data else b""
            if end_stream:
                out += self._conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError as exc:
            raise LocalProtocolError(str(exc)) from None
        return out

    def send_trailers(self, trailers: HeaderMap) -> bytes:
        try:
            return self._conn.send(h11.EndOfMessage(headers=_encode_trailers(trailers))) or b""
        except h11.LocalProtocolError as exc:
            raise LocalProtocolError(str(exc)) from None

    def receive_data(self, data: bytes) -> None:
        self.bytes_received += len(data)
        if not data:
            self._eof = True
        try:
            self._conn.receive_data(data)
        except h11.RemoteProtocolError as exc:
            raise RemoteProtocolError(str(exc), status=502) from None

    def next_event(self) -> Event | None:
        while True:
            try:
                ev = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                if self._eof:  # any complaint after EOF is the peer closing mid-message
                    return ConnectionClosed()
                raise RemoteProtocolError(str(exc), status=502) from None
            t = type(ev)
            if t is h11.Data:
                return Data(stream_id=H1_STREAM_ID, data=bytes(ev.data))
            if t is h11.Response:
                out = self._on_response(ev)
                if self._swallow_eom:
                    self._take_eom()
                return out
            if t is h11.EndOfMessage:
                self.response_complete = True
                if self._swallow_eom:
                    self._swallow_eom = False
                    continue
                if ev.headers:
                    return Trailers(stream_id=H1_STREAM_ID, trailers=_to_map([], ev.headers))
                return EndOfStream(stream_id=H1_STREAM_ID)
            if t is h11.InformationalResponse:
                if ev.status_code == 101:
                    raise RemoteProtocolError("upgrade responses are not supported", status=502)
                return InformationalResponse(
                    stream_id=H1_STREAM_ID,
                    headers=_to_map([(":status", str(ev.status_code))], ev.headers),
                )
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return None
            if t is h11.ConnectionClosed:
                return ConnectionClosed()
            raise RemoteProtocolError(f"unexpected event {ev!r}", status=502)  # pragma: no cover

    def _take_eom(self) -> None:
        if type(self._conn.next_event()) is h11.EndOfMessage:
            self._swallow_eom = False
            self.response_complete = True

    def _on_response(self, ev: h11.Response) -> ResponseHeaders:
        status = ev.status_code
        self.response_headers_received = True
        if self._method == "HEAD" or status in (204, 304):
            end_stream = True
        else:
            chunked = False
            length: bytes | None = None
            for name, value in ev.headers:
                if name == b"transfer-encoding":
                    chunked = True
                elif name == b"content-length":
                    length = value
            if chunked and length is not None:
                raise RemoteProtocolError(
                    "both Content-Length and Transfer-Encoding in a response", status=502
                )
            end_stream = not chunked and length == b"0"
        self._swallow_eom = end_stream
        regular, _host, _te = _filter_hop_by_hop(ev.headers)
        regular.insert(0, (":status", str(status)))
        return ResponseHeaders(
            stream_id=H1_STREAM_ID,
            headers=HeaderMap(regular),
            end_stream=end_stream,
            http_version=ev.http_version.decode("ascii"),
        )

    @property
    def reusable(self) -> bool:
        return self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE

    def start_next_cycle(self) -> None:
        self._conn.start_next_cycle()
        self._method = ""
        self.bytes_received = 0
        self.response_headers_received = False
        self.response_complete = False


__all__ = [
    "CodecError",
    "Http1ClientCodec",
    "Http1ServerCodec",
    "HOP_BY_HOP",
    "reason_phrase",
]
