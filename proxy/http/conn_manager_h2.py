"""The HTTP connection manager's HTTP/2 connection: many streams at once on one socket.

``Http2Connection`` is to HTTP/2 what ``HttpConnection`` is to HTTP/1.1: the codec is
``Http2ServerCodec`` and every stream is an ``H2ActiveStream``, the HTTP/1 ``ActiveStream``
(same filters, router, stream info, access log and stats) with an HTTP/2 sink, body source
and reset. The HTTP/1 path is not touched: it pays nothing for HTTP/2.

Theory of operation:
1. Three kinds of task share the connection's nursery: one reader (bytes → codec →
   events dispatched to streams), one writer (the only task that writes the socket, so a
   cancelled stream can never leave half a frame behind), and one task per stream.
2. Request bodies: the reader queues a stream's DATA; the stream task hands each chunk to
   the filters and only then acknowledges it, which is what opens the peer's window again.
   A slow upstream therefore stops the client after one window, per stream and per
   connection, and nothing is buffered beyond what the windows allowed.
3. Responses: sinks queue DATA in the codec; ``flush()`` wakes the writer and waits while
   the stream has more than ``HIGH_WATERMARK`` bytes not yet framed (its window is
   exhausted or the socket is slow), so the router stops reading its upstream. The last
   flush of a response waits for everything to be framed. The writer frames at most
   ``_WRITE_BUDGET`` bytes per write, round robin across streams.
4. A stream ends when its response is complete; a request still being received is then
   reset (RST_STREAM NO_ERROR, Envoy's doEndStream). A peer RST_STREAM cancels the stream
   (flag DR, ``downstream_rq_rx_reset``) and, through the router's on_destroy, its upstream
   request. A reset we send uses NO_ERROR, as Envoy does.
5. Drain (the worker's drain sequence, a response's ``drain_close()``,
   max_requests_per_connection, the idle timeout): GOAWAY naming the last stream opened;
   those streams finish, newer ones are refused (REFUSED_STREAM) by the codec, and the
   connection closes once no stream is left. EOF or a protocol error ends the connection
   at once and resets the streams still running (DC).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import trio

from proxy.http.codec.events import (
    CodecError,
    Data,
    EndOfStream,
    GoAway,
    RequestHeaders,
    Trailers,
)
from proxy.http.codec.events import (
    StreamReset as H2StreamReset,
)
from proxy.http.codec.h2 import NO_ERROR, REFUSED_STREAM, Http2ServerCodec
from proxy.http.conn_manager import ActiveStream, StreamReset
from proxy.stream_info import LOCAL_REPLIES, Outcome, ResponseFlag

if TYPE_CHECKING:
    from proxy.http.conn_manager_config import HcmStats, HttpConnectionManagerConfig
    from proxy.http.headers import HeaderMap
    from proxy.network.connection import Connection
    from proxy.server.worker_context import WorkerContext

log = logging.getLogger("trioxy.http2")

_RECV = 65536
HIGH_WATERMARK = 64 * 1024  # per stream: response bytes queued and not yet framed
_WRITE_BUDGET = 256 * 1024  # DATA framed per socket write
_OUTBOUND_LIMIT = 1 << 20  # framed bytes the socket has not taken: stop reading the peer
_FINAL_FLUSH_S = 1.0


class Http2Connection:
    """One downstream HTTP/2 connection."""

    __slots__ = (
        "config", "conn", "worker", "codec", "stats", "streams", "requests", "draining",
        "nursery", "peer_eof", "write_failed", "_wake", "_drained", "_writing", "_done",
        "_waiters", "idle_timer", "abort", "close_after", "out",
    )

    def __init__(self, config: HttpConnectionManagerConfig, conn: Connection,
                 worker: WorkerContext) -> None:
        self.config = config
        self.conn = conn
        self.worker = worker
        self.codec = Http2ServerCodec(
            config.http2_options,
            max_headers_count=config.max_headers_count,
            max_request_headers_kb=config.max_request_headers_kb,
        )
        self.stats: HcmStats = config.stats(worker.stats)
        self.streams: dict[int, H2ActiveStream] = {}
        self.requests = 0
        self.draining = False
        self.nursery: trio.Nursery | None = None
        self.peer_eof = False
        self.write_failed = False
        self._wake = trio.Event()
        self._drained: trio.Event | None = None
        self._writing = False
        self._done = trio.Event()
        self._waiters: dict[int, tuple[int, trio.Event]] = {}
        self.idle_timer: Any = None
        # What HttpConnection's callers look at; an HTTP/2 connection never sets them.
        self.abort = False
        self.close_after = False
        self.out = bytearray()

    # -- the connection -------------------------------------------------------------------
    async def run(self) -> None:
        """Serve a connection whose protocol was chosen up front (ALPN h2, codec HTTP2)."""
        stats = self.stats
        stats.cx_total.inc()
        stats.cx_active.inc()
        started = time.monotonic()
        try:
            deadline = self.config.max_connection_duration
            with trio.CancelScope(
                deadline=trio.current_time() + deadline if deadline else float("inf")
            ):
                await self.serve(b"")
        finally:
            stats.cx_active.dec()
            stats.cx_destroy.inc()
            stats.cx_length_ms.record((time.monotonic() - started) * 1000)
            with trio.CancelScope(shield=True):
                await self._close()

    async def serve(self, initial: bytes) -> None:
        """The HTTP/2 session; ``initial`` holds bytes already read (the sniffed preface)."""
        stats = self.stats
        stats.cx_http2_total.inc()
        stats.cx_http2_active.inc()
        worker = self.worker
        worker.idle_connections.add(self)  # a drain reaches us through on_drain()
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._writer)
                nursery.start_soon(self._reader, initial)
                self._arm_idle_timer()
                if worker.drain.draining:
                    self.on_drain()
                await self._done.wait()
                for st in list(self.streams.values()):
                    st.on_connection_closed()
                with trio.move_on_after(_FINAL_FLUSH_S):
                    await self._output_drained()
                nursery.cancel_scope.cancel()
        finally:
            worker.idle_connections.discard(self)
            stats.cx_http2_active.dec()
            if self.idle_timer is not None:
                self.idle_timer.cancel()
                self.idle_timer = None

    async def _close(self) -> None:
        conn = self.conn
        if conn.closed:
            return
        try:
            await conn.send_eof()
            delay = self.config.delayed_close_timeout
            if delay and not self.peer_eof:
                with trio.move_on_after(delay):
                    while await conn.receive_some(_RECV):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        await conn.aclose()

    def _finish(self) -> None:
        self._done.set()

    # -- reading --------------------------------------------------------------------------
    async def _reader(self, initial: bytes) -> None:
        conn = self.conn
        codec = self.codec
        if initial and not self._on_bytes(initial):
            return
        while not self._done.is_set():
            try:
                data = await conn.receive_some(_RECV)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                self.peer_eof = True
                self._finish()
                return
            if not self._on_bytes(data):
                return
            if codec.outbound_buffered > _OUTBOUND_LIMIT:
                # The peer sends (pings, settings...) faster than it reads our answers.
                await self._output_drained()

    def _on_bytes(self, data: bytes) -> bool:
        """Feed the codec and dispatch its events; False once the connection is over."""
        codec = self.codec
        codec.receive_data(data)
        streams = self.streams
        try:
            while True:
                ev = codec.next_event()
                if ev is None:
                    break
                t = type(ev)
                if t is Data:
                    st = streams.get(ev.stream_id)  # type: ignore[union-attr]
                    if st is None:
                        codec.acknowledge(ev.stream_id, len(ev.data))  # type: ignore[union-attr]
                    else:
                        st.on_event(ev)
                elif t is RequestHeaders:
                    self._new_stream(ev)  # type: ignore[arg-type]
                elif t is EndOfStream or t is Trailers:
                    st = streams.get(ev.stream_id)  # type: ignore[union-attr]
                    if st is not None:
                        st.on_event(ev)
                elif t is H2StreamReset:
                    st = streams.get(ev.stream_id)  # type: ignore[union-attr]
                    if st is not None and ev.remote:  # type: ignore[union-attr]
                        st.on_remote_reset(ev.error_code)  # type: ignore[union-attr]
                elif t is GoAway:
                    # The client opens no more streams: close once those running end.
                    self.draining = True
                    if not streams:
                        self._finish()
        except CodecError:
            self.stats.cx_protocol_error.inc()
            self.wake()  # the GOAWAY h2 queued
            self._finish()
            return False
        self.wake()
        return True

    def _new_stream(self, ev: RequestHeaders) -> None:
        if self.draining and self.codec.goaway_sent is None:
            # The peer's GOAWAY said it would open no more; refuse what it opens anyway.
            self.codec.reset_stream(ev.stream_id, REFUSED_STREAM)
            return
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.requests += 1
        st = H2ActiveStream(self, ev)
        self.streams[ev.stream_id] = st
        assert self.nursery is not None
        self.nursery.start_soon(st.run)
        mrq = self.config.max_requests_per_connection
        if mrq is not None and self.requests >= mrq:
            self.start_drain()

    def stream_done(self, st: H2ActiveStream) -> None:
        self.streams.pop(st.stream_id, None)
        self._waiters.pop(st.stream_id, None)
        unconsumed = st.unconsumed()
        if unconsumed:
            self.codec.acknowledge(st.stream_id, unconsumed)  # the connection window
        if not st.request_complete or not st.response_complete:
            self.codec.reset_stream(st.stream_id, NO_ERROR)
        self.wake()
        if not self.streams:
            if self.draining:
                self._finish()
            else:
                self._arm_idle_timer()

    # -- idle and drain -------------------------------------------------------------------
    def _arm_idle_timer(self) -> None:
        timeout = self.config.idle_timeout
        if timeout is not None and self.idle_timer is None and not self.streams:
            self.idle_timer = self.worker.timers.call_later(timeout, self._on_idle_timeout)

    def _on_idle_timeout(self) -> None:
        self.idle_timer = None
        if self.streams or self._done.is_set():
            return
        self.stats.cx_idle_timeout.inc()
        self.start_drain(count=False)

    def on_drain(self) -> None:
        """The worker started draining: GOAWAY now; in-flight streams finish."""
        self.start_drain()

    def start_drain(self, count: bool = True) -> None:
        if self.codec.goaway_sent is not None:
            return
        if count:
            self.stats.cx_drain_close.inc()
        self.draining = True
        self.codec.send_goaway()
        self.wake()
        if not self.streams:
            self._finish()

    # -- writing --------------------------------------------------------------------------
    def wake(self) -> None:
        """Ask the writer to frame and write whatever is pending."""
        self._wake.set()

    async def _writer(self) -> None:
        codec = self.codec
        conn = self.conn
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                self._writing = True
                while True:
                    codec.pump(_WRITE_BUDGET)
                    if self._waiters:
                        self._notify_waiters()
                    data = codec.data_to_send()
                    if not data:
                        break
                    await conn.send_all(data)
                self._writing = False
                if self._drained is not None:
                    self._drained.set()
                    self._drained = None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._writing = False
            self.write_failed = True
            for _, ev in self._waiters.values():
                ev.set()
            self._waiters.clear()
            if self._drained is not None:
                self._drained.set()
            self._finish()

    def _notify_waiters(self) -> None:
        codec = self.codec
        for sid, (limit, ev) in list(self._waiters.items()):
            if codec.pending(sid) <= limit:
                del self._waiters[sid]
                ev.set()

    async def wait_framed(self, stream_id: int, limit: int) -> None:
        """Until ``stream_id`` has at most ``limit`` bytes queued and not yet framed."""
        codec = self.codec
        while codec.pending(stream_id) > limit and not self.write_failed:
            ev = trio.Event()
            self._waiters[stream_id] = (limit, ev)
            self.wake()
            await ev.wait()
        if self.write_failed:
            raise StreamReset("downstream write failed")

    async def _output_drained(self) -> None:
        """Until everything framed has been written (or the socket failed)."""
        codec = self.codec
        while not self.write_failed and (
            self._writing or codec.outbound_buffered or codec.has_pending
        ):
            ev = self._drained = trio.Event()
            self.wake()
            await ev.wait()


class H2ActiveStream(ActiveStream):
    """One HTTP/2 stream: the HTTP/1 ActiveStream with an HTTP/2 sink and body source."""

    __slots__ = ("stream_id", "inbound", "inbound_event", "scope", "was_reset")

    hc: Http2Connection  # type: ignore[assignment]

    def __init__(self, hc: Http2Connection, ev: RequestHeaders) -> None:
        super().__init__(hc, ev)  # type: ignore[arg-type]
        self.stream_info.protocol = "HTTP/2"
        self.stream_id = ev.stream_id
        self.inbound: deque[Any] = deque()
        self.inbound_event: trio.Event | None = None
        self.scope: trio.CancelScope | None = None
        self.was_reset = False

    # -- events from the reader ---------------------------------------------------------
    def on_event(self, ev: Any) -> None:
        self.inbound.append(ev)
        if self.inbound_event is not None:
            self.inbound_event.set()

    def unconsumed(self) -> int:
        n = sum(len(ev.data) for ev in self.inbound if type(ev) is Data)
        self.inbound.clear()
        return n

    def on_remote_reset(self, error_code: int) -> None:
        """The client sent RST_STREAM: abandon the stream (and its upstream request)."""
        info = self.stream_info
        info.set_response_flag(ResponseFlag.DOWNSTREAM_REMOTE_RESET)
        if info.response_code_details is None or not self.response_complete:
            info.response_code_details = (
                "http2.remote_refuse" if error_code == REFUSED_STREAM else "http2.remote_reset")
        self.hcm_stats.rq_rx_reset.inc()
        self._abandon()

    def on_connection_closed(self) -> None:
        """The connection ends under the stream (EOF, protocol error, write failure)."""
        if not self.response_complete:
            self.stream_info.set_response_flag(ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION)
            if self.stream_info.response_code_details is None:
                self.stream_info.response_code_details = "downstream_remote_disconnect"
        self._abandon()

    def _abandon(self) -> None:
        self.was_reset = True
        self.response_complete = True
        if self.scope is not None:
            self.scope.cancel()
        if self.inbound_event is not None:
            self.inbound_event.set()

    # -- the stream -----------------------------------------------------------------------
    async def run(self) -> None:
        """ActiveStream.run (stats, route, filters, access logs) under the stream's cancel
        scope, which a reset from the client cancels."""
        try:
            with trio.CancelScope() as scope:
                self.scope = scope
                if self.was_reset:
                    scope.cancel()
                await super().run()
        finally:
            self.hc.stream_done(self)

    def _on_stream_reset(self) -> None:
        # The writer failed: the connection is going; the client's own resets are counted
        # in on_remote_reset.
        self.stream_info.set_response_flag(ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION)

    async def _run_filters(self, headers: HeaderMap) -> None:
        fm = self.fm
        if self.end_stream:
            await fm.decode_headers(headers, True)
        else:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                await fm.decode_headers(headers, False)
                await self._decode_body()
        if not self.response_complete and not self.was_reset:
            await self.send_outcome(Outcome.UPSTREAM_RESET_BEFORE_RESPONSE)

    async def _decode_body(self) -> None:
        hc = self.hc
        codec = hc.codec
        sid = self.stream_id
        info = self.stream_info
        fm = self.fm
        inbound = self.inbound
        idle = self.config.stream_idle_timeout
        overall = self.config.request_timeout
        with trio.CancelScope() as scope:
            self._read_scope = scope
            if overall is not None:
                scope.deadline = trio.current_time() + overall
            while True:
                while not inbound:
                    if self.was_reset:
                        return
                    ev = self.inbound_event = trio.Event()
                    with trio.move_on_after(idle if idle is not None else float("inf")) as w:
                        await ev.wait()
                    self.inbound_event = None
                    if w.cancelled_caught:
                        await self._request_timeout(Outcome.STREAM_IDLE_TIMEOUT)
                        return
                item = inbound.popleft()
                t = type(item)
                if t is Data:
                    n = len(item.data)
                    info.bytes_received += n
                    await fm.decode_data(item.data, False)
                    # Consumed: only now may the client send more (theory, rule 2).
                    codec.acknowledge(sid, n)
                    hc.wake()
                elif t is EndOfStream:
                    self.request_complete = True
                    info.last_downstream_rx_byte = time.monotonic()
                    await fm.decode_data(b"", True)
                    return
                elif t is Trailers:
                    self.request_complete = True
                    info.last_downstream_rx_byte = time.monotonic()
                    await fm.decode_trailers(item.trailers)
                    return
        if scope.cancelled_caught and not self.response_complete:
            await self._request_timeout(Outcome.REQUEST_OVERALL_TIMEOUT)

    async def _request_timeout(self, outcome: Outcome) -> None:
        stats = self.hcm_stats
        if outcome is Outcome.STREAM_IDLE_TIMEOUT:
            stats.rq_idle_timeout.inc()
        else:
            stats.rq_timeout.inc()
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()
        if self.response_started:
            self.stream_info.set_response_flag(LOCAL_REPLIES[outcome].flag)
            self.reset_stream(LOCAL_REPLIES[outcome].details)
        else:
            await self.send_outcome(outcome)

    # -- callbacks for filters ------------------------------------------------------------
    def reset_stream(self, details: str) -> None:
        """Abandon the stream: RST_STREAM (NO_ERROR, as Envoy's LocalReset) to the client."""
        if self.stream_info.connection_termination_details is None:
            self.stream_info.connection_termination_details = details
        self.response_complete = True
        self.was_reset = True
        self.hc.codec.reset_stream(self.stream_id, NO_ERROR)
        self.hc.wake()
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()
        self.hcm_stats.rq_tx_reset.inc()

    async def flush(self) -> None:
        hc = self.hc
        if hc.write_failed:
            raise StreamReset("downstream write failed")
        codec = hc.codec
        if not hc._writing and codec.outbound_buffered < _WRITE_BUDGET:
            # Frame now (sans-IO, no socket): a response that fits the windows needs no
            # round trip through the writer before the stream can end.
            codec.pump(_WRITE_BUDGET)
        hc.wake()
        done = self.response_complete
        limit = 0 if done else HIGH_WATERMARK
        if codec.pending(self.stream_id) > limit:
            idle = self.config.stream_idle_timeout
            with trio.move_on_after(idle if idle is not None else float("inf")) as w:
                await hc.wait_framed(self.stream_id, limit)
            if w.cancelled_caught:
                # The client opened no window for a whole stream idle timeout.
                self.hcm_stats.rq_idle_timeout.inc()
                self.stream_info.set_response_flag(ResponseFlag.STREAM_IDLE_TIMEOUT)
                self.reset_stream(LOCAL_REPLIES[Outcome.STREAM_IDLE_TIMEOUT].details)
                return
        if done and not self.was_reset:
            info = self.stream_info
            if info.last_downstream_tx_byte is None:
                info.last_downstream_tx_byte = time.monotonic()
            if not self.request_complete and self._read_scope is not None:
                self._read_scope.cancel()  # stream_done resets the rest of the request

    # -- the encoder chain's sink ---------------------------------------------------------
    multiplexed = True  # ActiveStream.sink_headers finalizes, then calls the method below

    def _send_response_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        hc = self.hc
        if not hc.draining and self.worker.drain.drain_close():
            hc.start_drain()
        if not hc.codec.send_headers(self.stream_id, headers, end_stream):
            self.was_reset = True
        if end_stream:
            self.response_complete = True

    def sink_data(self, data: bytes, end_stream: bool) -> None:
        self.stream_info.bytes_sent += len(data)
        self.hc.codec.send_data(self.stream_id, data, end_stream)
        if end_stream:
            self.response_complete = True

    def sink_trailers(self, trailers: HeaderMap) -> None:
        self.stream_info.response_trailers = trailers
        self.hc.codec.send_trailers(self.stream_id, trailers)
        self.response_complete = True
