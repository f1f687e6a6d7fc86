"""HTTP/1.1 codecs over httptools (llhttp, Node's parser), the request path's default.

Same methods, events and refusals as the h11 codecs in ``h1.py`` (the reference): the
tests run one suite against both, and a hypothesis test feeds both the same bytes. h11
costs about 100 µs per proxied request in parsing and framing alone; llhttp parses in C
and the framing here is a few byte joins, so this codec is what makes the CPU target of
the foundation issue reachable. Sans-IO.

Theory of operation:
1. ``receive_data`` feeds llhttp, whose callbacks append events to a queue; ``next_event``
   pops them. llhttp parses pipelined requests eagerly, so each queued event carries its
   message number and the server hands out only the current message's events until
   ``start_next_cycle`` (h11's PAUSED). A parse error found in a later pipelined message
   waits in the queue behind the events that came before it.
2. llhttp is strict where HTTP smuggling lives (CL+TE, duplicate Content-Length, bad chunk
   framing, obs-fold, bare LF, invalid tokens). On top of it: a Transfer-Encoding other
   than ``chunked`` is 501 (Envoy), a second Host is 400, HTTP versions other than 1.0 and
   1.1 are 400, and the head is bounded (431) while it arrives, not only once complete.
3. Responses to HEAD, and 204/304, have no body whatever their headers say; llhttp cannot
   be told about HEAD, so the client codec ends such a response itself at its headers and
   starts a fresh parser for the next one.
4. Framing out: ``content-length`` when known, else chunked (HTTP/1.1) or close-delimited
   (HTTP/1.0 clients); ``Connection: close`` when asked or when the client cannot keep
   the connection alive. Outgoing headers are checked for CR/LF/NUL (header injection)
   before any byte is produced.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

import httptools

from proxy.http.codec.events import (
    H1_STREAM_ID,
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
from proxy.http.codec.h1 import (
    DEFAULT_MAX_HEADERS_COUNT,
    DEFAULT_MAX_REQUEST_HEADERS_KB,
    error_response,
    reason_phrase,
)
from proxy.http.headers import HeaderMap

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "host"}
)
_BODILESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
# A header block is lines of token ": " value-without-CR/LF/NUL (RFC 9110 field syntax).
_SAFE_BLOCK = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+: [^\r\n\x00]*\r\n)*\Z")
_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status))
    return line


def _head_block(items: list[tuple[str, str]]) -> bytes:
    block = "".join([f"{k}: {v}\r\n" for k, v in items if k[0] != ":" and k not in _HOP_BY_HOP])
    raw = block.encode("latin-1")
    if not _SAFE_BLOCK.match(raw):
        raise LocalProtocolError("illegal character in an outgoing header")
    return raw


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _trailer_block(trailers: HeaderMap | None) -> bytes:
    if trailers is None:
        return b"0\r\n\r\n"
    return b"0\r\n" + _head_block(list(trailers.regular())) + b"\r\n"


class _Stop(Exception):
    """Raised from a callback to stop llhttp at a point it cannot be told about."""


class Http1ServerCodec:
    """The downstream side: parses requests, serializes responses."""

    __slots__ = (
        "_parser", "_events", "_msg", "_cur", "_url", "_headers", "_in_trailers", "_trailers",
        "_head_bytes", "_max_header_bytes", "_max_headers_count", "_scheme", "_accept_http_10",
        "_hosts", "_te", "_cl", "_expect", "_te_trailers", "_method", "_keep_alive",
        "_response_no_body", "_response_chunked", "_response_close", "_our_done",
        "_their_done", "_headers_done", "_error", "_eof", "_started", "_end_at_headers",
        "_complete_msg", "_raw_head",
        "request_complete", "response_complete", "bytes_received",
    )

    def __init__(
        self,
        *,
        max_request_headers_kb: int = DEFAULT_MAX_REQUEST_HEADERS_KB,
        max_headers_count: int = DEFAULT_MAX_HEADERS_COUNT,
        scheme: str = "http",
        accept_http_10: bool = True,
    ) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._events: deque[tuple[int, Any]] = deque()
        self._msg = 0  # number of the message being parsed
        self._cur = 1  # number of the message being served
        self._complete_msg = 0
        self._raw_head = 0
        self._max_header_bytes = max_request_headers_kb * 1024
        self._max_headers_count = max_headers_count
        self._scheme = scheme
        self._accept_http_10 = accept_http_10
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self._reset_message()
        self._reset_response()
        self._their_done = False
        self.request_complete = False
        self.bytes_received = 0

    def _reset_message(self) -> None:
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._in_trailers = False
        self._trailers: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._hosts = 0
        self._te: bytes | None = None
        self._cl = False
        self._expect = False
        self._te_trailers = False
        self._headers_done = False
        self._end_at_headers = False

    def _reset_response(self) -> None:
        self._method = ""
        self._keep_alive = True
        self._response_no_body = False
        self._response_chunked = False
        self._response_close = False
        self._our_done = False
        self._started = False
        self.response_complete = False

    # -- llhttp callbacks -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._msg += 1
        self._reset_message()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_trailers:
            self._trailers.append((name.decode("latin-1").lower(), value.decode("latin-1")))
            return
        self._head_bytes += len(name) + len(value)
        n = name.decode("latin-1").lower()
        if n == "host":
            self._hosts += 1
        elif n == "transfer-encoding":
            self._te = value
        elif n == "content-length":
            self._cl = True
        elif n == "expect":
            if value.lower() == b"100-continue":
                self._expect = True
                return
        elif n == "te":
            if b"trailers" in value.lower():
                self._te_trailers = True
            return
        self._headers.append((n, value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self._in_trailers = True
        p = self._parser
        msg = self._msg
        if len(self._headers) > self._max_headers_count:
            raise self._fail(RemoteProtocolError(
                "too many headers", status=431, details="http1.too_many_headers"))
        if self._head_bytes > self._max_header_bytes:
            raise self._fail(RemoteProtocolError(
                "request headers too large", status=431, details="http1.headers_too_large"))
        version = p.get_http_version()
        if version not in ("1.1", "1.0"):
            raise self._fail(RemoteProtocolError(f"unsupported HTTP version {version}"))
        if version == "1.0" and not self._accept_http_10:
            raise self._fail(RemoteProtocolError("HTTP/1.0 is not accepted", status=426))
        if self._hosts > 1:
            raise self._fail(RemoteProtocolError("more than one Host header"))
        if self._te is not None and self._te.strip().lower() != b"chunked":
            raise self._fail(RemoteProtocolError(
                "unsupported transfer encoding", status=501,
                details="http1.invalid_transfer_encoding"))
        method = p.get_method().decode("ascii")
        host = None
        regular = self._headers
        for i, (k, v) in enumerate(regular):
            if k == "host":
                host = v
                del regular[i]
                break
        if self._te_trailers:
            regular.append(("te", "trailers"))
        items = [(":method", method), (":path", self._url.decode("latin-1"))]
        if host is not None:
            items.append((":authority", host))
        items.append((":scheme", self._scheme))
        items += [kv for kv in regular if kv[0] not in _HOP_BY_HOP or kv[0] == "te"]
        end_stream = self._te is None and (not self._cl or self._bodiless_by_length())
        self._end_at_headers = end_stream
        self._events.append((msg, ("state", method, p.should_keep_alive(), end_stream)))
        self._events.append((msg, RequestHeaders(
            stream_id=H1_STREAM_ID,
            headers=HeaderMap(items),
            end_stream=end_stream,
            http_version=version,
            expect_continue=self._expect,
        )))

    def _bodiless_by_length(self) -> bool:
        for k, v in self._headers:
            if k == "content-length":
                return v.strip() == "0"
        return True

    def on_body(self, body: bytes) -> None:
        if body:
            self._events.append((self._msg, Data(stream_id=H1_STREAM_ID, data=body)))

    def on_message_complete(self) -> None:
        self._complete_msg = self._msg
        if self._end_at_headers:
            return
        if self._trailers:
            ev: Any = Trailers(stream_id=H1_STREAM_ID, trailers=HeaderMap(self._trailers))
        else:
            ev = EndOfStream(stream_id=H1_STREAM_ID)
        self._events.append((self._msg, ev))

    def _fail(self, err: RemoteProtocolError) -> _Stop:
        self._error = err
        return _Stop()

    def _error_msg(self) -> int:
        """The message an error belongs to: one that has not completed."""
        return self._msg if self._msg > self._complete_msg else self._msg + 1

    # -- receiving ------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        self.bytes_received += len(data)
        if not data:
            self._eof = True
            return
        if self._error is not None:
            return  # nothing after a bad message is parsed
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as up:
            # CONNECT / Upgrade: served as a plain request (Upgrade is hop-by-hop and
            # stripped); llhttp stops at the upgrade, so the rest goes to a fresh parser.
            self._parser = httptools.HttpRequestParser(self)
            rest = data[int(up.args[0]) :] if up.args else b""
            if rest:
                self.bytes_received -= len(rest)
                self.receive_data(rest)
            return
        except httptools.HttpParserCallbackError:
            pass  # self._error was set by the callback
        except httptools.HttpParserError as exc:
            self._error = RemoteProtocolError(str(exc))
        else:
            # llhttp buffers a header line until it ends: bound what can pile up meanwhile.
            if self._headers_done or self._msg == self._complete_msg:
                self._raw_head = 0
            else:
                self._raw_head += len(data)
                if self._raw_head > self._max_header_bytes + 1024:
                    self._error = RemoteProtocolError(
                        "request headers too large", status=431,
                        details="http1.headers_too_large")
        if self._error is not None:
            self._events.append((self._error_msg(), self._error))

    def next_event(self) -> Event | None:
        events = self._events
        while events:
            msg, ev = events[0]
            if msg > self._cur:
                return None  # a pipelined request waits for start_next_cycle
            events.popleft()
            if type(ev) is tuple:
                _, self._method, self._keep_alive, end = ev
                if end:
                    self._their_done = True
                    self.request_complete = True
                continue
            if isinstance(ev, RemoteProtocolError):
                raise ev
            t = type(ev)
            if t is EndOfStream or t is Trailers:
                self._their_done = True
                self.request_complete = True
            return ev  # type: ignore[no-any-return]
        if self._eof:
            return ConnectionClosed()  # between requests, or a request cut short
        return None

    # -- sending --------------------------------------------------------------------------
    def send_continue(self) -> bytes:
        return b"HTTP/1.1 100 Continue\r\n\r\n"

    def send_headers(self, headers: HeaderMap, end_stream: bool, *, close: bool = False) -> bytes:
        try:
            status = int(headers.get(":status") or 0)
        except ValueError:
            status = 0
        if status < 200:
            raise LocalProtocolError(f"cannot send status {status} as a final response")
        if self._started:
            raise LocalProtocolError("response already started")
        self._started = True
        no_body = self._method == "HEAD" or status in (204, 304)
        self._response_no_body = no_body
        block = _head_block(headers.items())
        has_length = headers.get("content-length") is not None
        close = close or not self._keep_alive
        framing = b""
        if not no_body:
            if end_stream and not has_length:
                framing = b"content-length: 0\r\n"
            elif not has_length:
                if self._keep_alive:
                    framing = b"transfer-encoding: chunked\r\n"
                    self._response_chunked = True
                else:
                    close = True  # close-delimited body for an HTTP/1.0 client
        if close:
            framing += b"connection: close\r\n"
            self._response_close = True
        out = _status_line(status) + block + framing + b"\r\n"
        if end_stream:
            self._finish_response()
        return out

    def send_data(self, data: bytes, end_stream: bool = False) -> bytes:
        if not self._started or self._our_done:
            raise LocalProtocolError("no response in progress")
        out = b""
        if data and not self._response_no_body:
            out = _chunk(data) if self._response_chunked else data
        if end_stream:
            if self._response_chunked:
                out += b"0\r\n\r\n"
            self._finish_response()
        return out

    def send_trailers(self, trailers: HeaderMap) -> bytes:
        if not self._started or self._our_done:
            raise LocalProtocolError("no response in progress")
        out = _trailer_block(trailers) if self._response_chunked else b""
        self._finish_response()
        return out

    def _finish_response(self) -> None:
        self._our_done = True
        self.response_complete = True

    error_response = staticmethod(error_response)

    # -- connection state -----------------------------------------------------------------
    @property
    def response_started(self) -> bool:
        return self._started

    @property
    def keep_alive(self) -> bool:
        return (
            self._our_done and self._their_done and self._keep_alive and not self._response_close
        )

    def start_next_cycle(self) -> bool:
        if not self.keep_alive:
            return False
        self._cur += 1
        self._their_done = False
        self.request_complete = False
        self._reset_response()
        return True

    @property
    def has_buffered_data(self) -> bool:
        return bool(self._events)


class Http1ClientCodec:
    """The upstream side: serializes requests, parses responses."""

    __slots__ = (
        "_parser", "_events", "_headers", "_in_trailers", "_trailers", "_method",
        "_framed", "_headers_done", "_error", "_eof", "_keep_alive", "_max_header_bytes",
        "_head_bytes", "_request_chunked", "_request_done", "_stop_at_headers", "_end_at_headers",
        "bytes_received", "response_headers_received", "response_complete",
    )

    def __init__(self, *, max_response_headers_kb: int = DEFAULT_MAX_REQUEST_HEADERS_KB) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._events: deque[Any] = deque()
        self._max_header_bytes = max_response_headers_kb * 1024
        self._method = ""
        self._request_chunked = False
        self._request_done = False
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self.bytes_received = 0
        self._reset_message()

    def _reset_message(self) -> None:
        self._headers: list[tuple[str, str]] = []
        self._in_trailers = False
        self._trailers: list[tuple[str, str]] = []
        self._framed = False
        self._headers_done = False
        self._keep_alive = True
        self._head_bytes = 0
        self._stop_at_headers = False
        self._end_at_headers = False
        self.response_headers_received = False
        self.response_complete = False

    # -- sending --------------------------------------------------------------------------
    def send_request_headers(self, headers: HeaderMap, end_stream: bool) -> bytes:
        method = headers.get(":method") or "GET"
        self._method = method
        block = _head_block(headers.items())
        authority = headers.get(":authority") or ""
        if "\r" in authority or "\n" in authority:
            raise LocalProtocolError("illegal character in :authority")
        path = headers.get(":path") or "/"
        if " " in path or "\r" in path or "\n" in path:
            raise LocalProtocolError("illegal character in :path")
        te = b"te: trailers\r\n" if headers.get("te") is not None else b""
        has_length = headers.get("content-length") is not None
        framing = b""
        self._request_chunked = False
        if end_stream:
            if not has_length and method not in _BODILESS_METHODS:
                framing = b"content-length: 0\r\n"
            self._request_done = True
        elif not has_length:
            framing = b"transfer-encoding: chunked\r\n"
            self._request_chunked = True
        return (
            f"{method} {path} HTTP/1.1\r\nhost: {authority}\r\n".encode("latin-1")
            + block + te + framing + b"\r\n"
        )

    def send_data(self, data: bytes, end_stream: bool = False) -> bytes:
        out = b""
        if data:
            out = _chunk(data) if self._request_chunked else data
        if end_stream:
            if self._request_chunked:
                out += b"0\r\n\r\n"
            self._request_done = True
        return out

    def send_trailers(self, trailers: HeaderMap) -> bytes:
        self._request_done = True
        return _trailer_block(trailers) if self._request_chunked else b""

    # -- llhttp callbacks -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._reset_message()

    def on_status(self, status: bytes) -> None:
        pass

    def on_header(self, name: bytes, value: bytes) -> None:
        n = name.decode("latin-1").lower()
        if self._in_trailers:
            self._trailers.append((n, value.decode("latin-1")))
            return
        self._head_bytes += len(name) + len(value)
        if n == "content-length" or n == "transfer-encoding":
            self._framed = True
        self._headers.append((n, value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        p = self._parser
        status = p.get_status_code()
        self._in_trailers = True
        if self._head_bytes > self._max_header_bytes:
            self._error = RemoteProtocolError("response headers too large", status=502)
            raise _Stop()
        if status < 200:
            if status == 101:
                self._error = RemoteProtocolError("upgrade responses are not supported", status=502)
                raise _Stop()
            self._events.append(InformationalResponse(
                stream_id=H1_STREAM_ID,
                headers=HeaderMap([(":status", str(status)), *self._headers]),
            ))
            self._in_trailers = False
            return
        self._headers_done = True
        self.response_headers_received = True
        self._keep_alive = p.should_keep_alive()
        if self._method == "HEAD" or status in (204, 304):
            end_stream = True
        else:
            te = None
            cl = None
            for k, v in self._headers:
                if k == "transfer-encoding":
                    te = v
                elif k == "content-length":
                    cl = v
            if te is not None and te.strip().lower() != "chunked":
                self._error = RemoteProtocolError("unsupported transfer encoding", status=502)
                raise _Stop()
            end_stream = te is None and cl is not None and cl.strip() == "0"
        items = [(":status", str(status))]
        items += [kv for kv in self._headers if kv[0] not in _HOP_BY_HOP]
        self._events.append(ResponseHeaders(
            stream_id=H1_STREAM_ID,
            headers=HeaderMap(items),
            end_stream=end_stream,
            http_version=p.get_http_version(),
        ))
        self._end_at_headers = end_stream
        if self._method == "HEAD":
            # llhttp would wait for the Content-Length body a HEAD response never has.
            self._stop_at_headers = True
            raise _Stop()

    def on_body(self, body: bytes) -> None:
        if body:
            self._events.append(Data(stream_id=H1_STREAM_ID, data=body))

    def on_message_complete(self) -> None:
        if not self._headers_done:
            return  # a 1xx
        if self._end_at_headers:
            pass
        elif self._trailers:
            self._events.append(Trailers(stream_id=H1_STREAM_ID, trailers=HeaderMap(self._trailers)))
        else:
            self._events.append(EndOfStream(stream_id=H1_STREAM_ID))
        self._events.append(True)  # marks completion for state tracking

    # -- receiving ------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        self.bytes_received += len(data)
        if not data:
            self._eof = True
            return
        if self._error is not None or self.response_complete:
            if not self._error and self.response_complete:
                self._keep_alive = False  # bytes after the response: never reuse
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            if self._stop_at_headers:
                self._events.append(True)
                self._parser = httptools.HttpResponseParser(self)
        except httptools.HttpParserUpgrade:
            self._error = RemoteProtocolError("upgrade responses are not supported", status=502)
        except httptools.HttpParserError as exc:
            self._error = RemoteProtocolError(str(exc), status=502)
        if self._error is not None:
            self._events.append(self._error)

    def next_event(self) -> Event | None:
        events = self._events
        while events:
            ev = events.popleft()
            if ev is True:
                self.response_complete = True
                continue
            if isinstance(ev, RemoteProtocolError):
                raise ev
            if events and events[0] is True:
                events.popleft()  # this event ends the response: say so before returning it
                self.response_complete = True
            return ev  # type: ignore[no-any-return]
        if self._eof and not self.response_complete:
            if self._headers_done and not self._framed:
                # A close-delimited body ends at EOF.
                self.response_complete = True
                self._keep_alive = False
                return EndOfStream(stream_id=H1_STREAM_ID)
            return ConnectionClosed()
        return None

    @property
    def reusable(self) -> bool:
        return (
            self.response_complete and self._request_done and self._keep_alive and not self._eof
            and self._error is None and not self._events
        )

    def start_next_cycle(self) -> None:
        self._method = ""
        self._request_done = False
        self._request_chunked = False
        self.bytes_received = 0
        self._reset_message()


__all__ = ["Http1ClientCodec", "Http1ServerCodec"]
