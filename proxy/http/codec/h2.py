"""HTTP/2 codecs over the ``h2`` library (hyper-h2): server and client, sans-IO.

Same event vocabulary as the HTTP/1 codecs (``events.py``), with a stream id on every event,
plus ``StreamReset`` (RST_STREAM) and ``GoAway``. The shell feeds bytes with
``receive_data``, pops events with ``next_event`` and writes what ``data_to_send`` returns.

Theory of operation:
1. Inbound flow control is explicit: the window a peer may fill is handed back only when
   the shell calls ``acknowledge(stream_id, n)`` for bytes it has *consumed* (sent on, not
   merely queued). So a stream whose consumer is slow stops receiving once its window
   (``initial_stream_window_size``) is full, and a connection once the connection window
   is, and what is buffered for a peer is bounded by the windows we advertised. Padding is
   acknowledged at once: nobody consumes it.
2. Outbound DATA is queued per stream (``send_data``) and framed by ``pump()`` only as the
   peer's windows allow, one frame per stream per round (round robin), and at most
   ``budget`` bytes per call so the shell frames no more than it is about to write.
   ``pending(stream_id)`` is what a stream has queued and not yet framed: the shell's
   back-pressure watermark. Trailers and END_STREAM queue behind the data they follow.
   HEADERS are not flow controlled and are framed at once.
3. GOAWAY is graceful both ways. h2 treats a received GOAWAY as the end of the connection
   (it drops queued output and refuses further frames); HTTP/2 says streams up to the
   GOAWAY's last stream id still complete, as Envoy lets them. ``_H2Connection`` reports
   it and keeps the connection open; ``send_goaway`` writes the frame without closing h2's
   state machine, and the server refuses streams above the id it announced with
   REFUSED_STREAM.
4. Header maps: pseudo-headers first, names lowercase, values latin-1 ``str`` (as the HTTP/1
   codecs). Inbound: h2 validates the block (RFC 9113 8.2: no connection-specific
   headers, ``te`` only ``trailers``) and joins ``cookie`` crumbs; a ``host`` without
   ``:authority`` becomes ``:authority``. Outbound: hop-by-hop headers of HTTP/1.1
   (``connection``, ``keep-alive``, ``proxy-connection``, ``transfer-encoding``,
   ``upgrade``, ``host``) are dropped and ``te`` is kept only as ``trailers``.
5. A connection-level protocol error raises ``RemoteProtocolError`` from ``next_event``;
   h2 has already queued the GOAWAY to send before closing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.events as h2e
import h2.exceptions
import h2.settings
import hpack.hpack
import hpack.table
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from proxy.http.codec.events import (
    Data,
    EndOfStream,
    Event,
    GoAway,
    InformationalResponse,
    LocalProtocolError,
    RemoteProtocolError,
    RequestHeaders,
    ResponseHeaders,
    StreamReset,
    Trailers,
)
from proxy.http.headers import HeaderMap

__all__ = [
    "DEFAULT_HPACK_TABLE_SIZE",
    "DEFAULT_INITIAL_CONNECTION_WINDOW_SIZE",
    "DEFAULT_INITIAL_STREAM_WINDOW_SIZE",
    "DEFAULT_MAX_CONCURRENT_STREAMS",
    "H2_PREFACE",
    "Http2ClientCodec",
    "Http2Options",
    "Http2ServerCodec",
]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
NO_ERROR = 0
PROTOCOL_ERROR = 1
INTERNAL_ERROR = 2
REFUSED_STREAM = 7
CANCEL = 8
ENHANCE_YOUR_CALM = 11

# Envoy's defaults, except the windows: Envoy advertises 256 MiB per stream and per
# connection and relies on its watermark buffers; a peer may then send 256 MiB before it
# must wait, which a Python proxy must not buffer. 1 MiB per stream (Envoy's
# per_connection_buffer_limit_bytes default) and 4 MiB per connection keep a fast
# loopback transfer at full speed while bounding what a slow consumer can pile up.
DEFAULT_MAX_CONCURRENT_STREAMS = 2147483647
DEFAULT_INITIAL_STREAM_WINDOW_SIZE = 1 << 20
DEFAULT_INITIAL_CONNECTION_WINDOW_SIZE = 4 << 20
DEFAULT_HPACK_TABLE_SIZE = 4096
MIN_WINDOW_SIZE = 65535
MAX_WINDOW_SIZE = 2147483647
_SPEC_CONNECTION_WINDOW = 65535



class _NoLog:
    """hpack logs every header it codes at DEBUG (30 calls a request, ~15 µs even when
    DEBUG is off); its loggers get this instead."""

    def debug(self, *args: object, **kwargs: object) -> None:
        pass


hpack.hpack.log = _NoLog()  # type: ignore[assignment]
hpack.table.log = _NoLog()  # type: ignore[assignment]

_DROP_OUT = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host"}
)


@dataclass(frozen=True, slots=True)
class Http2Options:
    """The ``Http2ProtocolOptions`` fields trioxy implements, compiled (pure data)."""

    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS
    initial_stream_window_size: int = DEFAULT_INITIAL_STREAM_WINDOW_SIZE
    initial_connection_window_size: int = DEFAULT_INITIAL_CONNECTION_WINDOW_SIZE
    hpack_table_size: int = DEFAULT_HPACK_TABLE_SIZE

    @staticmethod
    def from_proto(msg: Any, path: str) -> Http2Options:
        """``envoy.config.core.v3.Http2ProtocolOptions`` with Envoy's ranges; the fields
        not implemented are refused by the allowlist (``proxy/config/supported.py``)."""
        from proxy.config.errors import ConfigError
        from proxy.config.protos import wrapped

        def ranged(name: str, default: int, lo: int, hi: int) -> int:
            v = int(wrapped(msg, name, default))
            if not lo <= v <= hi:
                raise ConfigError(f"{path}.{name}", f"value must be inside range [{lo}, {hi}]")
            return v

        return Http2Options(
            max_concurrent_streams=ranged(
                "max_concurrent_streams", DEFAULT_MAX_CONCURRENT_STREAMS, 1, MAX_WINDOW_SIZE),
            initial_stream_window_size=ranged(
                "initial_stream_window_size", DEFAULT_INITIAL_STREAM_WINDOW_SIZE,
                MIN_WINDOW_SIZE, MAX_WINDOW_SIZE),
            initial_connection_window_size=ranged(
                "initial_connection_window_size", DEFAULT_INITIAL_CONNECTION_WINDOW_SIZE,
                MIN_WINDOW_SIZE, MAX_WINDOW_SIZE),
            hpack_table_size=ranged(
                "hpack_table_size", DEFAULT_HPACK_TABLE_SIZE, 0, 4294967295),
        )


class _H2Connection(h2.connection.H2Connection):
    """h2 with a graceful GOAWAY (theory of operation, rule 3)."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Any], list[Any]]:
        ev = h2e.ConnectionTerminated()
        ev.error_code = frame.error_code
        ev.last_stream_id = frame.last_stream_id
        ev.additional_data = frame.additional_data or None
        return [], [ev]

    def send_goaway(self, last_stream_id: int, error_code: int = NO_ERROR) -> None:
        f = GoAwayFrame(0)
        f.last_stream_id = last_stream_id
        f.error_code = error_code
        self._data_to_send += f.serialize()


class _Out:
    """One stream's outbound DATA not yet framed, and what ends it."""

    __slots__ = ("chunks", "size", "end", "trailers")

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.end = False
        self.trailers: list[tuple[bytes, bytes]] | None = None


def _decode_headers(raw: Any) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]


def _encode_headers(headers: HeaderMap) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    for k, v in headers.items():
        if k in _DROP_OUT:
            continue
        if k == "te" and v.strip().lower() != "trailers":
            continue
        out.append((k.encode("latin-1"), v.encode("latin-1")))
    return out


class _Http2Codec:
    """What the server and client codecs share: settings, events, flow control, GOAWAY."""

    _client = False

    def __init__(self, options: Http2Options | None = None, *,
                 max_headers_count: int = 100, max_header_list_size: int = 60 * 1024) -> None:
        opts = options or Http2Options()
        self.options = opts
        self._max_headers_count = max_headers_count
        config = h2.config.H2Configuration(
            client_side=self._client,
            header_encoding=None,
            validate_outbound_headers=False,  # _encode_headers strips what h2 would refuse
            normalize_outbound_headers=False,
            validate_inbound_headers=True,
            normalize_inbound_headers=True,
        )
        conn = self._h2 = _H2Connection(config)
        initial: dict[Any, int] = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: opts.max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: opts.initial_stream_window_size,
            h2.settings.SettingCodes.HEADER_TABLE_SIZE: opts.hpack_table_size,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
        }
        if self._client:
            initial[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        conn.local_settings = h2.settings.Settings(client=self._client, initial_values=initial)
        conn.initiate_connection()
        extra = opts.initial_connection_window_size - _SPEC_CONNECTION_WINDOW
        if extra > 0:
            conn.increment_flow_control_window(extra)
        self._events: deque[Any] = deque()
        self._out: dict[int, _Out] = {}
        self._ended: set[int] = set()  # streams whose END_STREAM rode on headers or trailers
        self._dropped: set[int] = set()  # streams reset while their batch is translated
        self._eof = False
        self.goaway_received: GoAway | None = None
        self.settings_received = False  # the peer's first SETTINGS arrived
        self.bytes_received = 0

    # -- receiving ------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        self.bytes_received += len(data)
        if not data:
            self._eof = True
            return
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 queued a GOAWAY for the peer; everything after this is unusable.
            self._events.append(RemoteProtocolError(
                f"HTTP/2 protocol error: {exc}", status=400, details="http2.codec_error"))
            return
        push = self._events.append
        dropped = self._dropped
        for ev in events:
            t = type(ev)
            if dropped and getattr(ev, "stream_id", None) in dropped:
                # A stream we refused while translating this very batch: h2 counted its
                # DATA against the connection window, so hand that back; drop the rest.
                if t is h2e.DataReceived and ev.flow_controlled_length:
                    self._h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                continue
            if t is h2e.DataReceived:
                sid = ev.stream_id
                pad = ev.flow_controlled_length - len(ev.data)
                if pad:
                    self._h2.acknowledge_received_data(pad, sid)
                if ev.data:
                    push(Data(stream_id=sid, data=ev.data))
            elif t is h2e.StreamEnded:
                sid = ev.stream_id
                if sid in self._ended:
                    self._ended.discard(sid)
                else:
                    push(EndOfStream(stream_id=sid))
            elif t is h2e.RequestReceived or t is h2e.ResponseReceived:
                self._on_headers(ev)
            elif t is h2e.TrailersReceived:
                sid = ev.stream_id
                if ev.stream_ended is not None:
                    self._ended.add(sid)
                push(Trailers(stream_id=sid, trailers=HeaderMap(_decode_headers(ev.headers))))
            elif t is h2e.StreamReset:
                self._out.pop(ev.stream_id, None)
                self._ended.discard(ev.stream_id)
                push(StreamReset(stream_id=ev.stream_id, error_code=int(ev.error_code or 0),
                                 remote=bool(ev.remote_reset)))
            elif t is h2e.ConnectionTerminated:
                g = GoAway(last_stream_id=int(ev.last_stream_id or 0),
                           error_code=int(ev.error_code or 0))
                self.goaway_received = g
                push(g)
            elif t is h2e.RemoteSettingsChanged:
                self.settings_received = True
            elif t is h2e.InformationalResponseReceived:
                push(InformationalResponse(
                    stream_id=ev.stream_id, headers=HeaderMap(_decode_headers(ev.headers))))
            # WindowUpdated, RemoteSettingsChanged, pings, priorities: the shell pumps
            # after every receive, and h2 answers pings and settings itself.
        dropped.clear()  # later frames of those streams are h2's (closed by reset)

    def _on_headers(self, ev: Any) -> None:
        raise NotImplementedError

    def next_event(self) -> Event | None:
        events = self._events
        if events:
            ev = events.popleft()
            if isinstance(ev, RemoteProtocolError):
                events.clear()
                raise ev
            return ev  # type: ignore[no-any-return]
        return None

    @property
    def eof(self) -> bool:
        return self._eof

    def acknowledge(self, stream_id: int, size: int) -> None:
        """``size`` bytes of ``stream_id``'s DATA were consumed: open the windows again."""
        if size > 0:
            self._h2.acknowledge_received_data(size, stream_id)

    # -- sending --------------------------------------------------------------------------
    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Queue DATA for ``stream_id``; ``pump()`` frames it as the windows allow."""
        out = self._out.get(stream_id)
        if out is None:
            if stream_id not in self._h2.streams:
                return  # reset meanwhile: the bytes have nowhere to go
            out = self._out[stream_id] = _Out()
        if data:
            out.chunks.append(data)
            out.size += len(data)
        if end_stream:
            out.end = True

    def send_trailers(self, stream_id: int, trailers: HeaderMap) -> None:
        """Trailers end the stream, after the DATA queued before them."""
        items = _encode_headers(trailers)
        out = self._out.get(stream_id)
        if out is None:
            if not items:
                self.send_data(stream_id, b"", True)
                return
            self._send_headers(stream_id, items, True)
            return
        if items:
            out.trailers = items
        out.end = True

    def pending(self, stream_id: int) -> int:
        """Bytes ``stream_id`` has queued and not yet framed (0 when none or gone)."""
        out = self._out.get(stream_id)
        return out.size if out is not None else 0

    @property
    def has_pending(self) -> bool:
        return bool(self._out)

    def pump(self, budget: int = 256 * 1024) -> int:
        """Frame queued DATA, round robin, within the peer's windows and ``budget`` bytes.

        Returns the number of DATA bytes framed."""
        conn = self._h2
        outs = self._out
        framed = 0
        while outs and budget > 0:
            progressed = False
            for sid in list(outs):
                out = outs[sid]
                stream = conn.streams.get(sid)
                if stream is None or stream.closed:
                    del outs[sid]
                    continue
                if out.size:
                    window = conn.local_flow_control_window(sid)
                    n = min(window, conn.max_outbound_frame_size, budget, out.size)
                    if n <= 0:
                        continue
                    chunk = out.chunks[0]
                    if len(chunk) <= n:
                        out.chunks.popleft()
                        n = len(chunk)
                    else:
                        out.chunks[0] = chunk[n:]
                        chunk = chunk[:n]
                    out.size -= n
                    budget -= n
                    framed += n
                    progressed = True
                    last = out.size == 0 and out.end and out.trailers is None
                    try:
                        conn.send_data(sid, chunk, end_stream=last)
                    except h2.exceptions.H2Error:
                        del outs[sid]  # the stream closed under us: drop what it had
                        continue
                    if last:
                        del outs[sid]
                    continue
                # Nothing left to frame: end the stream if asked to, else stop tracking.
                del outs[sid]
                try:
                    if out.trailers is not None:
                        self._send_headers(sid, out.trailers, True)
                    elif out.end:
                        conn.send_data(sid, b"", end_stream=True)
                except h2.exceptions.H2Error:
                    pass
                progressed = True
            if not progressed:
                break
        return framed

    def _send_headers(self, stream_id: int, items: list[tuple[bytes, bytes]],
                      end_stream: bool) -> None:
        self._h2.send_headers(stream_id, items, end_stream=end_stream)

    def reset_stream(self, stream_id: int, error_code: int = NO_ERROR) -> None:
        """RST_STREAM ``stream_id`` (nothing when it is already closed)."""
        self._out.pop(stream_id, None)
        self._ended.discard(stream_id)
        stream = self._h2.streams.get(stream_id)
        if stream is None or stream.closed:
            return
        try:
            self._h2.reset_stream(stream_id, error_code)
        except h2.exceptions.H2Error:
            pass

    def stream_open(self, stream_id: int) -> bool:
        stream = self._h2.streams.get(stream_id)
        return stream is not None and not stream.closed

    def send_goaway(self, last_stream_id: int, error_code: int = NO_ERROR) -> None:
        self._h2.send_goaway(last_stream_id, error_code)

    def ping(self, opaque: bytes = b"trioxy!!") -> None:
        self._h2.ping(opaque)

    def data_to_send(self) -> bytes:
        return self._h2.data_to_send()

    @property
    def outbound_buffered(self) -> int:
        """Framed bytes waiting for the socket."""
        return len(self._h2._data_to_send)


class Http2ServerCodec(_Http2Codec):
    """The downstream side: requests in, responses out."""

    _client = False

    def __init__(self, options: Http2Options | None = None, *, max_headers_count: int = 100,
                 max_request_headers_kb: int = 60, scheme: str = "http") -> None:
        super().__init__(options, max_headers_count=max_headers_count,
                         max_header_list_size=max_request_headers_kb * 1024)
        self._max_header_bytes = max_request_headers_kb * 1024
        self._scheme = scheme
        self.last_stream_id = 0  # the highest stream the peer opened
        self.goaway_sent: int | None = None  # the last stream id our GOAWAY announced
        self.header_overflow = 0

    def _on_headers(self, ev: Any) -> None:
        sid = ev.stream_id
        if sid > self.last_stream_id:
            self.last_stream_id = sid
        if self.goaway_sent is not None and sid > self.goaway_sent:
            # Opened after our GOAWAY: not processed, so the client may retry it elsewhere.
            self.reset_stream(sid, REFUSED_STREAM)
            self._dropped.add(sid)
            return
        raw = ev.headers
        if len(raw) > self._max_headers_count or sum(len(k) + len(v) for k, v in raw) > (
            self._max_header_bytes
        ):
            # Envoy's http2.too_many_headers / header_overflow: the stream is reset and
            # never reaches the connection manager.
            self.header_overflow += 1
            self.reset_stream(sid, NO_ERROR)
            self._dropped.add(sid)
            return
        items = _decode_headers(raw)
        pseudo = [kv for kv in items if kv[0][0] == ":"]
        regular = [kv for kv in items if kv[0][0] != ":"]
        names = {k for k, _ in pseudo}
        if ":authority" not in names:
            for i, (k, v) in enumerate(regular):
                if k == "host":
                    pseudo.append((":authority", v))
                    del regular[i]
                    break
        else:
            regular = [kv for kv in regular if kv[0] != "host"]
        end = ev.stream_ended is not None
        if end:
            self._ended.add(sid)
        self._events.append(RequestHeaders(
            stream_id=sid, headers=HeaderMap(pseudo + regular), end_stream=end,
            http_version="2"))

    def send_headers(self, stream_id: int, headers: HeaderMap, end_stream: bool) -> bool:
        """Frame the response headers; False when the stream is already gone."""
        try:
            status = int(headers.get(":status") or 0)
        except ValueError:
            status = 0
        if status < 100:
            raise LocalProtocolError(f"cannot send status {status}")
        if not self.stream_open(stream_id):
            return False
        self._h2.send_headers(stream_id, _encode_headers(headers), end_stream=end_stream)
        return True

    def send_goaway(self, last_stream_id: int | None = None, error_code: int = NO_ERROR) -> None:
        """GOAWAY naming the last stream we process (default: the last one opened)."""
        last = self.last_stream_id if last_stream_id is None else last_stream_id
        self.goaway_sent = last
        super().send_goaway(last, error_code)


class Http2ClientCodec(_Http2Codec):
    """The upstream side: requests out, responses in."""

    _client = True

    def __init__(self, options: Http2Options | None = None, *, max_headers_count: int = 100,
                 max_response_headers_kb: int = 60) -> None:
        super().__init__(options, max_headers_count=max_headers_count,
                         max_header_list_size=max_response_headers_kb * 1024)
        self.streams_started = 0

    @property
    def peer_max_concurrent_streams(self) -> int:
        return int(self._h2.remote_settings.max_concurrent_streams)

    @property
    def open_streams(self) -> int:
        return int(self._h2.open_outbound_streams)

    def start_request(self, headers: HeaderMap, end_stream: bool) -> int:
        """Open a stream with ``headers``; returns its id."""
        items: list[tuple[bytes, bytes]] = []
        authority = None
        host = None
        for k, v in headers.items():
            if k == ":authority":
                authority = v
            elif k == "host":
                host = v
        if authority is None and host is not None:
            items.append((b":authority", host.encode("latin-1")))
        items += _encode_headers(headers)
        sid = self._h2.get_next_available_stream_id()
        try:
            self._h2.send_headers(sid, items, end_stream=end_stream)
        except h2.exceptions.TooManyStreamsError as exc:
            raise LocalProtocolError(str(exc)) from None
        self.streams_started += 1
        return sid

    def _on_headers(self, ev: Any) -> None:
        sid = ev.stream_id
        raw = ev.headers
        if len(raw) > self._max_headers_count:
            self.reset_stream(sid, NO_ERROR)
            self._dropped.add(sid)
            self._events.append(StreamReset(stream_id=sid, error_code=PROTOCOL_ERROR,
                                            remote=False))
            return
        end = ev.stream_ended is not None
        if end:
            self._ended.add(sid)
        self._events.append(ResponseHeaders(
            stream_id=sid, headers=HeaderMap(_decode_headers(raw)), end_stream=end,
            http_version="2"))


ERROR_NAMES = {int(c): c.name for c in ErrorCodes}
