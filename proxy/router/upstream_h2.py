"""The router's upstream request over HTTP/2 (Envoy's UpstreamRequest on an h2 pool).

``RouterFilter`` hands a request here when its cluster speaks HTTP/2; everything that is
not about the wire (host choice, header finalization, stats, local replies, timers,
retries, circuit breakers, outlier reports) stays the router's, so both protocols answer,
log, count and retry alike.

Theory of operation:
1. The request headers open a stream on the host's ``Http2ConnPool`` (which applies the
   cluster's pending-requests, requests and connections breakers); body DATA is queued on
   it and ``decode_data`` returns only once the stream's unframed bytes are below the
   pool's watermark, so the downstream's window reopens at the upstream's pace.
2. Response DATA is acknowledged upstream only after ``flush()`` handed it downstream:
   a slow client holds the upstream stream at one window.
3. Resets map to Envoy's response flags: RST_STREAM → UR (``remote_reset``, or
   ``remote_refused_stream_reset`` for REFUSED_STREAM), the connection closing → UC, an
   unparseable frame → UPE; 503 (502 for UPE) before the response started, a downstream
   reset after. Before the response started the router's retry state may retry instead
   (``next_attempt``: a new stream, the buffered body replayed; queuing on h2 streams is
   synchronous, so a replay cannot interleave with new body DATA).
4. A stream refused by the upstream's GOAWAY (above its last stream id) or by
   REFUSED_STREAM was never processed: a request that was only headers is replayed once on
   a fresh stream (like the HTTP/1 keep-alive race, this is not an Envoy retry and is not
   counted as one).
5. The route, per-try and stream idle timers are the router's; firing wakes the stream's
   wait (``H2UpstreamStream.wake``) instead of closing a socket.
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
from proxy.stream_info import Outcome
from proxy.upstream.conn_pool import UpstreamOverflow
from proxy.upstream.conn_pool_h2 import (
    CONNECTION_TERMINATION,
    PROTOCOL_ERROR,
    REMOTE_REFUSED_STREAM_RESET,
    REMOTE_RESET,
    H2UpstreamStream,
    UpstreamStreamReset,
    UseHttp1,
    h2_pool_for,
)
from proxy.upstream.connect import UpstreamConnectError
from proxy.upstream.outlier_detection import CONNECT_FAILED, CONNECT_SUCCESS

if TYPE_CHECKING:
    from proxy.http.headers import HeaderMap
    from proxy.router.router import RouterFilter

_OUTCOMES = {
    CONNECTION_TERMINATION: Outcome.UPSTREAM_RESET_BEFORE_RESPONSE,
    REMOTE_RESET: Outcome.UPSTREAM_REMOTE_RESET,
    REMOTE_REFUSED_STREAM_RESET: Outcome.UPSTREAM_REFUSED_STREAM,
    PROTOCOL_ERROR: Outcome.UPSTREAM_PROTOCOL_ERROR,
}


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
    async def decode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterStatus | None:
        """None: auto_config's ALPN put the host on HTTP/1.1 (the router takes it there)."""
        r = self.r
        cb = r.cb
        if await self._open(headers, end_stream, first=True) is None:
            return None
        self.replayable = end_stream
        if end_stream:
            await r._run_response()
        else:
            cb.start_task(r._run_response)
        return STOP_ITERATION

    async def _new_stream(self, headers: HeaderMap, end_stream: bool) -> H2UpstreamStream | None:
        r = self.r
        with trio.CancelScope() as scope:
            r.wait_scope = scope
            try:
                return await self.pool.new_stream(  # type: ignore[no-any-return]
                    headers, end_stream, r.resources)
            finally:
                r.wait_scope = None
        return None

    async def _open(self, headers: HeaderMap, end_stream: bool, first: bool = False) -> bool | None:
        """Open the attempt's stream; False when it failed (``r.failure`` says how), None
        when the first attempt's host turned out to speak HTTP/1.1 (auto_config; a retry's
        attempt then fails as a connect failure: the request stays on HTTP/2)."""
        r = self.r
        cb = r.cb
        info = cb.stream_info
        host = r.host
        r.attempt_started = False
        info.attempt_count += 1
        if r.action.include_attempt_count:
            headers.set("x-envoy-attempt-count", str(info.attempt_count))
        self.pool = h2_pool_for(r.cluster, host, cb.worker.timers)
        from proxy.router.router import _UpstreamReset

        try:
            st = await self._new_stream(headers, end_stream)
        except UpstreamOverflow:
            r.failure = _UpstreamReset(Outcome.UPSTREAM_OVERFLOW)
            return False
        except UpstreamConnectError as exc:
            if first and isinstance(exc, UseHttp1):
                info.attempt_count -= 1  # the HTTP/1.1 path counts this attempt
                return None
            r._connect_failed(exc)
            return False
        if st is None:  # the route timeout fired while we waited
            r.failure = None
            return False
        r.resources.requests.inc()
        r.rq_held = True
        if host.outlier is not None:
            host.outlier.put_result(CONNECT_SUCCESS)
        self.stream = st
        r.attempt_started = True
        info.upstream_local_address = st.local_address
        if st.ssl_info is not None:
            info.upstream_ssl = st.ssl_info
        r.sent_at = time.monotonic()
        if info.first_upstream_tx_byte is None:
            info.first_upstream_tx_byte = r.sent_at
        if end_stream:
            r.request_sent_all = True
            info.last_upstream_tx_byte = time.monotonic()
            r._arm_per_try()
        return True

    def _replay(self) -> None:
        """A retry's buffered body (and the end of the request, if it came) on the new stream."""
        r = self.r
        st = self.stream
        assert st is not None
        for chunk in r.buffer or ():
            st.send_data(chunk, False)
            r.body_sent = True
        if r.request_complete:
            if r.trailers is not None:
                st.send_trailers(r.trailers)
            else:
                st.send_data(b"", True)
            r.request_sent_all = True
            r.cb.stream_info.last_upstream_tx_byte = time.monotonic()
            r._arm_per_try()
        if r.retry is None:
            r.buffer = None

    async def next_attempt(self) -> bool:
        """The router granted a retry and chose the host: open the new attempt."""
        r = self.r
        assert r._headers is not None
        bodiless = r.request_complete and not r.buffer and r.trailers is None
        self.replayable = bodiless
        self.replayed = False
        if await self._open(r._headers, bodiless) and not bodiless:
            self._replay()
        return True

    async def decode_data(self, data: bytes, end_stream: bool) -> FilterStatus:
        r = self.r
        if end_stream:
            r.request_complete = True
        if r.buffer is not None and not r._buffer_body(data):
            return STOP_ITERATION
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
        r = self.r
        r.request_complete = True
        r.trailers = trailers
        st = self.stream
        if st is not None and not r.response_done:
            st.send_trailers(trailers)
        r._mark_request_done()
        return STOP_ITERATION

    # -- response -------------------------------------------------------------------------
    async def relay(self) -> None:
        """The router's response loop (``RouterFilter._run_response``) relays through this:
        the attempt's response, its resets mapped to the router's ``_UpstreamReset``."""
        from proxy.router.router import _RouteTimeout, _UpstreamReset

        r = self.r
        try:
            await self._relay()
        except UpstreamStreamReset as reset:
            if r.timed_out:
                raise _RouteTimeout from None
            host = r.host
            if host is not None and host.outlier is not None:
                host.outlier.put_result(CONNECT_FAILED)
            outcome = _OUTCOMES.get(reset.reason, Outcome.UPSTREAM_RESET_BEFORE_RESPONSE)
            raise _UpstreamReset(outcome, reset.detail,
                                 remote=reset.reason != PROTOCOL_ERROR) from None

    async def _relay(self) -> None:
        from proxy.router.router import _RouteTimeout

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
                if r.per_try_timed_out:
                    raise r._per_try_timeout_failure()
                if r.stream_idle is not None:
                    r.idle_timer = timers.call_later(r.stream_idle, r._on_stream_idle)
                try:
                    ev = await st.next_event()
                except UpstreamStreamReset as reset:
                    if (reset.reason == REMOTE_REFUSED_STREAM_RESET and self.replayable
                            and not self.replayed and not r.response_started):
                        # Never processed upstream: replay once on a fresh stream.
                        self.replayed = True
                        self.drop()
                        assert r._headers is not None
                        info.attempt_count -= 1  # the same attempt, as the HTTP/1 race
                        if not await self._open(r._headers, True):
                            raise r.failure or _RouteTimeout() from None
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
                if r.per_try_timed_out:
                    raise r._per_try_timeout_failure()
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
        r._release_upstream_slot()
        st = self.stream
        if st is not None:
            if r.request_sent_all:
                st.release()
            else:
                st.reset_stream()  # the response ended first: stop the request (Envoy)

    def drop(self) -> None:
        """Abandon the attempt's stream (RST_STREAM NO_ERROR)."""
        self.r._release_upstream_slot()
        st, self.stream = self.stream, None
        if st is not None:
            st.reset_stream()

    def on_destroy(self) -> None:
        st = self.stream
        if st is not None and not st.closed:
            st.reset_stream()  # the downstream went away (or we did): cancel it upstream
        self.stream = None


__all__ = ["H2UpstreamRequest"]
