"""The router's upstream request over HTTP/2 (Envoy's UpstreamRequest on an h2 pool).

``RouterFilter`` hands a request here when its cluster speaks HTTP/2; everything that is
not about the wire (host choice, header finalization, stats, local replies, the route and
stream-idle timers) stays the router's, so both protocols answer, log and count alike.

Theory of operation:
1. The request headers open a stream on the host's ``Http2ConnPool``; body DATA is queued
   on it and ``decode_data`` returns only once the stream's unframed bytes are below the
   pool's watermark, so the downstream's window reopens at the upstream's pace.
2. Response DATA is acknowledged upstream only after ``flush()`` handed it downstream:
   a slow client holds the upstream stream at one window.
3. Resets map to Envoy's response flags: RST_STREAM → UR (``remote_reset``, or
   ``remote_refused_stream_reset`` for REFUSED_STREAM), the connection closing → UC, an
   unparseable frame → UPE; 503 (502 for UPE) before the response started, a downstream
   reset after.
4. A stream refused by the upstream's GOAWAY (above its last stream id) or by
   REFUSED_STREAM was never processed: a request that was only headers is replayed once on
   a fresh stream (like the HTTP/1 keep-alive race, this is not an Envoy retry and is not
   counted as one).
5. The route timeout and stream idle timer are the router's timers; firing wakes the
   stream's wait (``H2UpstreamStream.wake``) instead of closing a socket.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

from proxy.http.codec.events import (
    Data,
    EndOfStream,
    InformationalResponse,
    ResponseHeaders,
    Trailers,
)
from proxy.http.filter_manager import STOP_ITERATION, FilterStatus
from proxy.stream_info import LOCAL_REPLIES, Outcome
from proxy.upstream.conn_pool_h2 import (
    CONNECTION_TERMINATION,
    PROTOCOL_ERROR,
    REMOTE_REFUSED_STREAM_RESET,
    REMOTE_RESET,
    H2UpstreamStream,
    UpstreamStreamReset,
    h2_pool_for,
)
from proxy.upstream.connect import UpstreamConnectError

if TYPE_CHECKING:
    from proxy.http.headers import HeaderMap
    from proxy.router.router import RouterFilter

_OUTCOMES = {
    CONNECTION_TERMINATION: Outcome.UPSTREAM_RESET_BEFORE_RESPONSE,
    REMOTE_RESET: Outcome.UPSTREAM_REMOTE_RESET,
    REMOTE_REFUSED_STREAM_RESET: Outcome.UPSTREAM_REFUSED_STREAM,
    PROTOCOL_ERROR: Outcome.UPSTREAM_PROTOCOL_ERROR,
}


class _RouteTimeout(Exception):
    pass


class H2UpstreamRequest:
    """One request of a RouterFilter on an HTTP/2 upstream."""

    __slots__ = ("r", "stream", "pool", "replayable", "replayed")

    def __init__(self, router: RouterFilter) -> None:
        self.r = router
        self.stream: H2UpstreamStream | None = None
        self.pool: Any = None
        self.replayable = False
        self.replayed = False

    def wake(self) -> None:
        if self.stream is not None:
            self.stream.wake()

    # -- request --------------------------------------------------------------------------
    async def decode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterStatus:
        r = self.r
        cb = r.cb
        if not await self._open(headers, end_stream):
            return STOP_ITERATION
        self.replayable = end_stream
        if end_stream:
            r.request_done_at = trio.current_time()
            await self.run_response()
        else:
            cb.start_task(self.run_response)
        return STOP_ITERATION

    async def _open(self, headers: HeaderMap, end_stream: bool) -> bool:
        r = self.r
        cb = r.cb
        info = cb.stream_info
        self.pool = h2_pool_for(r.cluster, r.host, cb.worker.timers)
        try:
            st = await self.pool.new_stream(headers, end_stream)
        except UpstreamConnectError as exc:
            info.upstream_transport_failure_reason = str(exc)
            outcome = (
                Outcome.UPSTREAM_CONNECT_TIMEOUT
                if exc.reason == "connection_timeout"
                else Outcome.UPSTREAM_CONNECT_FAILURE
            )
            r.response_done = True
            await cb.send_outcome(outcome)
            return False
        self.stream = st
        info.upstream_local_address = st.local_address
        if st.ssl_info is not None:
            info.upstream_ssl = st.ssl_info
        info.attempt_count += 1
        r.sent_at = time.monotonic()
        if info.first_upstream_tx_byte is None:
            info.first_upstream_tx_byte = r.sent_at
        if end_stream:
            r.request_sent_all = True
            info.last_upstream_tx_byte = time.monotonic()
        return True

    async def decode_data(self, data: bytes, end_stream: bool) -> FilterStatus:
        r = self.r
        st = self.stream
        if st is None or r.response_done or st.closed:
            if end_stream:
                r._mark_request_done()
            return STOP_ITERATION
        r.body_sent = True
        st.send_data(data, end_stream)
        if end_stream:
            r._mark_request_done()
        await st.wait_framed()
        return STOP_ITERATION

    async def decode_trailers(self, trailers: HeaderMap) -> FilterStatus:
        st = self.stream
        if st is not None and not self.r.response_done:
            st.send_trailers(trailers)
        self.r._mark_request_done()
        return STOP_ITERATION

    # -- response -------------------------------------------------------------------------
    async def run_response(self) -> None:
        r = self.r
        if r.request_done_at is not None:
            r._arm_timeout()
        idle = r.cb.config.stream_idle_timeout
        if idle is not None and (r.timeout is None or r.timeout > idle):
            r.stream_idle = idle
        try:
            await self._relay()
        except _RouteTimeout:
            await self._on_route_timeout()
        except UpstreamStreamReset as reset:
            if r.timed_out:
                await self._on_route_timeout()
            else:
                await self._on_reset(reset)
        finally:
            r.response_done = True
            if r.timer is not None:
                r.timer.cancel()
                r.timer = None

    async def _relay(self) -> None:
        r = self.r
        cb = r.cb
        info = cb.stream_info
        timers = cb.worker.timers
        while True:
            st = self.stream
            assert st is not None
            if not st.events:
                await cb.flush()
                if r.timed_out:
                    raise _RouteTimeout
                if r.stream_idle is not None:
                    r.idle_timer = timers.call_later(r.stream_idle, r._on_stream_idle)
                try:
                    ev = await st.next_event()
                except UpstreamStreamReset as reset:
                    if (reset.reason == REMOTE_REFUSED_STREAM_RESET and self.replayable
                            and not self.replayed and not r.response_started):
                        # Never processed upstream: replay once on a fresh stream.
                        self.replayed = True
                        st.reset_stream()
                        self.stream = None
                        assert r._headers is not None
                        if not await self._open(r._headers, True):
                            return
                        continue
                    raise
                finally:
                    if r.idle_timer is not None:
                        r.idle_timer.cancel()
                        r.idle_timer = None
            else:
                ev = await st.next_event()
            if ev is None:  # a timer woke us
                if r.timed_out:
                    raise _RouteTimeout
                continue
            if info.first_upstream_rx_byte is None:
                info.first_upstream_rx_byte = time.monotonic()
            t = type(ev)
            if t is Data:
                n = len(ev.data)
                await cb.encode_data(ev.data, False)
                await cb.flush()
                st.acknowledge(n)  # theory of operation, rule 2
                continue
            if t is ResponseHeaders:
                await r._on_response_headers(ev)
                if ev.end_stream:
                    break
                continue
            if t is EndOfStream:
                await cb.encode_data(b"", True)
                break
            if t is Trailers:
                await cb.encode_trailers(ev.trailers)
                break
            if t is InformationalResponse:
                continue
        r.response_done = True
        if r.cluster is not None:
            r.cluster.cluster_stats.upstream_rq_time.record((time.monotonic() - r.sent_at) * 1000)
        await cb.flush()
        st = self.stream
        if st is not None:
            if r.request_sent_all:
                st.release()
            else:
                st.reset_stream()  # the response ended first: stop the request (Envoy)

    async def _on_route_timeout(self) -> None:
        r = self.r
        cb = r.cb
        r.response_done = True
        outcome = r.timeout_outcome
        if outcome is Outcome.UPSTREAM_REQUEST_TIMEOUT:
            r.cluster.cluster_stats.upstream_rq_timeout.inc()
            if r.host is not None:
                r.host.rq_timeout += 1
        else:
            cb.hcm_stats.rq_idle_timeout.inc()
        if self.stream is not None:
            self.stream.reset_stream()
        if r.response_started:
            cb.stream_info.set_response_flag(LOCAL_REPLIES[outcome].flag)
            cb.reset_stream(LOCAL_REPLIES[outcome].details)
        else:
            await cb.send_outcome(outcome)

    async def _on_reset(self, reset: UpstreamStreamReset) -> None:
        r = self.r
        cb = r.cb
        if r.host is not None and not r.response_started:
            r.host.rq_error += 1
        if self.stream is not None:
            self.stream.reset_stream()
        r.response_done = True
        outcome = _OUTCOMES.get(reset.reason, Outcome.UPSTREAM_RESET_BEFORE_RESPONSE)
        if reset.detail:
            cb.stream_info.upstream_transport_failure_reason = reset.detail
        if r.response_started:
            cb.stream_info.set_response_flag(LOCAL_REPLIES[outcome].flag)
            cb.reset_stream(f"upstream_reset_after_response_started{{{reset.reason}}}")
        else:
            await cb.send_outcome(outcome)

    def on_destroy(self) -> None:
        st = self.stream
        if st is not None and not st.closed:
            st.reset_stream()  # the downstream went away (or we did): cancel it upstream
        self.stream = None


__all__ = ["H2UpstreamRequest"]
