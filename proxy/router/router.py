"""The router filter (``envoy.filters.http.router``): the last HTTP filter of every chain.

It turns the route the connection manager found into an upstream exchange: pick the
cluster and a host, take an HTTP/1.1 connection from the host's pool, stream the request
up and the response down through the encoder filters, and answer locally when any step
fails, with Envoy's status, response flag and details (``stream_info.LOCAL_REPLIES``).

Theory of operation:
1. A bodiless request (the common case) is served inline in ``decode_headers``: no task is
   spawned. A request with a body starts a response task in the stream's nursery, so the
   response can arrive (and be relayed) while the body is still going up.
2. The route timeout (Envoy's default 15 s) runs from the end of the downstream request to
   the end of the response, as in Envoy: a worker timer (``timer_wheel``, cheaper than a
   cancel scope per request) armed when the last request byte has been sent up. When it
   fires it wakes the upstream read (``notify_closing``); before response headers that
   becomes a local 504 (UT); after, the downstream is reset, because a half-sent response
   cannot be replaced.
3. A reused keep-alive connection that closes before any response byte is the race every
   HTTP/1.1 proxy meets (the upstream's keep-alive timer fired as we wrote). A request
   that can be replayed (nothing but headers was sent) is retried once on a new connection;
   that is not an Envoy retry (retry_policy is issue #6) and is not counted as one.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

from proxy.http.codec.events import (
    CodecError,
    ConnectionClosed,
    Data,
    EndOfStream,
    InformationalResponse,
    LocalProtocolError,
    ResponseHeaders,
    Trailers,
)
from proxy.http.filter_manager import STOP_ITERATION, FilterStatus
from proxy.http.grpc import grpc_timeout_s, is_grpc_request, to_grpc_timeout
from proxy.network.fast_io import receive_some, send_all
from proxy.stream_info import LOCAL_REPLIES, Outcome, ResponseFlag
from proxy.upstream.conn_pool import UpstreamConnection, pool_for
from proxy.upstream.connect import UpstreamConnectError
from proxy.upstream.load_balancer import LoadBalancerContext
from proxy.upstream.original_dst_cluster import downstream_context

if TYPE_CHECKING:
    from proxy.http.headers import HeaderMap

_RECV = 65536
_NO_HASH = LoadBalancerContext(hash_key=None)


def _count_response_code(cluster: Any, status: int) -> None:
    """``cluster.<name>.upstream_rq_<code>`` and ``upstream_rq_<N>xx`` (Envoy's dynamic stats)."""
    counters = cluster.__dict__.get("_rq_code_counters")
    if counters is None:
        counters = cluster._rq_code_counters = {}
    pair = counters.get(status)
    if pair is None:
        pair = counters[status] = (
            cluster.stats.counter(f"upstream_rq_{status}"),
            cluster.stats.counter(f"upstream_rq_{status // 100}xx"),
        )
    pair[0].value += 1
    pair[1].value += 1


class RouterConfig:
    """The compiled ``Router`` message; the factory of one RouterFilter per stream."""

    terminal = True

    def __init__(self, suppress_envoy_headers: bool = False) -> None:
        self.suppress_envoy_headers = suppress_envoy_headers

    def create_filter(self, callbacks: Any) -> RouterFilter:
        return RouterFilter(self, callbacks)


class _RouteTimeout(Exception):
    """The route timeout fired while the response was awaited."""


class _UpstreamReset(Exception):
    """The upstream connection failed mid-exchange; ``outcome`` says how."""

    def __init__(self, outcome: Outcome, detail: str = "") -> None:
        super().__init__(outcome.value)
        self.outcome = outcome
        self.detail = detail


class RouterFilter:
    __slots__ = (
        "config", "cb", "uc", "pool", "cluster", "host", "timeout", "timer", "timed_out",
        "idle_timer", "stream_idle", "timeout_outcome",
        "request_done_at", "request_sent_all", "response_started", "response_done",
        "body_sent", "sent_at", "_headers", "h2",
    )

    def __init__(self, config: RouterConfig, callbacks: Any) -> None:
        self.config = config
        self.cb = callbacks
        self.uc: UpstreamConnection | None = None
        self.pool: Any = None
        self.cluster: Any = None
        self.host: Any = None
        self.timeout: float | None = None
        self.timer: Any = None
        self.timed_out = False
        self.idle_timer: Any = None
        self.stream_idle: float | None = None
        self.timeout_outcome = Outcome.UPSTREAM_REQUEST_TIMEOUT
        self.request_done_at: float | None = None  # trio clock, when the request ended
        self.request_sent_all = False
        self.response_started = False
        self.response_done = False
        self.body_sent = False
        self.sent_at = 0.0
        self._headers: HeaderMap | None = None
        self.h2: Any = None  # an H2UpstreamRequest when the cluster speaks HTTP/2

    # -- request --------------------------------------------------------------------------
    async def decode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterStatus:
        cb = self.cb
        info = cb.stream_info
        route = cb.route
        if route is None:
            cb.hcm_stats.no_route.inc()
            await cb.send_outcome(Outcome.NO_ROUTE)
            return STOP_ITERATION
        if route.direct_response is not None:
            dr = route.direct_response
            info.response_code_details = "direct_response"
            await cb.send_local_reply(dr.status, dr.body, details="direct_response")
            return STOP_ITERATION
        if route.redirect is not None:
            rd = route.redirect
            await cb.send_local_reply(
                rd.status, b"", details="direct_response", location=rd.location(headers)
            )
            return STOP_ITERATION
        action = route.route_action
        worker = cb.worker
        name = action.cluster_name(headers, worker.rng)
        cluster = worker.cluster_manager.get(name) if name else None
        if cluster is None:
            cb.hcm_stats.no_cluster.inc()
            await cb.send_outcome(Outcome.NO_CLUSTER)
            return STOP_ITERATION
        self.cluster = cluster
        info.upstream_cluster = cluster.name
        hash_key = action.hash_key(headers, cb.source_ip)
        if cluster.original_dst:  # the connection's original destination, or the header's
            lb_context = downstream_context(cb.hc.conn, headers, hash_key)
        else:
            lb_context = _NO_HASH if hash_key is None else LoadBalancerContext(hash_key)
        host = cluster.choose_host(lb_context)
        if host is None:
            cluster.cluster_stats.upstream_cx_none_healthy.inc()
            await cb.send_outcome(Outcome.NO_HEALTHY_UPSTREAM)
            return STOP_ITERATION
        self.host = host
        info.upstream_host = host.address_string
        info.upstream_host_name = host.hostname or None

        original_path = headers.get(":path")
        route.finalize_request_headers(headers, info)
        action.rewrite_request(headers)
        if action.auto_host_rewrite and host.hostname:
            headers.set(":authority", host.hostname)
        self.timeout = action.timeout
        if action.grpc_timeout_header_max is not None:
            self._grpc_timeout(headers, action)
        if not self.config.suppress_envoy_headers:
            if headers.get(":path") != original_path and original_path is not None:
                headers.set("x-envoy-original-path", original_path)
            if self.timeout is not None:
                headers.set("x-envoy-expected-rq-timeout-ms", str(int(self.timeout * 1000)))
        self._headers = headers

        stats = cluster.cluster_stats
        stats.upstream_rq_total.inc()
        stats.upstream_rq_active.inc()
        host.rq_active += 1  # given back in on_destroy, however the stream ends
        host.rq_total += 1
        if cluster.config.upstream_protocol == "http2":
            from proxy.router.upstream_h2 import H2UpstreamRequest

            self.h2 = H2UpstreamRequest(self)
            return await self.h2.decode_headers(headers, end_stream)
        if not await self._send_headers(headers, end_stream, allow_retry=True):
            return STOP_ITERATION
        if end_stream:
            self.request_done_at = trio.current_time()
            await self._run_response()
        else:
            cb.start_task(self._run_response)
        return STOP_ITERATION

    def _grpc_timeout(self, headers: HeaderMap, action: Any) -> None:
        """Envoy's FilterUtility::finalTimeout for a route with grpc_timeout_header_max: a
        gRPC request's ``grpc-timeout`` (capped by the max unless 0, less the offset) is the
        route timeout, and the header going upstream says what is left of it."""
        if not is_grpc_request(headers):
            return
        grpc_timeout = grpc_timeout_s(headers) or 0.0  # absent: no timeout but the cap
        cap = action.grpc_timeout_header_max
        if cap and (grpc_timeout == 0 or grpc_timeout > cap):
            grpc_timeout = cap
        offset = action.grpc_timeout_header_offset
        if offset and grpc_timeout > offset:
            grpc_timeout -= offset
        self.timeout = grpc_timeout or None  # grpc-timeout 0: no timeout, as Envoy
        if self.timeout is not None:
            headers.set("grpc-timeout", to_grpc_timeout(self.timeout))

    async def decode_data(self, data: bytes, end_stream: bool) -> FilterStatus:
        if self.h2 is not None:
            return await self.h2.decode_data(data, end_stream)  # type: ignore[no-any-return]
        uc = self.uc
        if uc is None or self.response_done:
            if end_stream:
                self._mark_request_done()
            return STOP_ITERATION
        self.body_sent = True
        try:
            out = uc.codec.send_data(data, end_stream)
            await send_all(uc.sock, out)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the response task sees the reset and answers
        if end_stream:
            self._mark_request_done()
        return STOP_ITERATION

    async def decode_trailers(self, trailers: HeaderMap) -> FilterStatus:
        if self.h2 is not None:
            return await self.h2.decode_trailers(trailers)  # type: ignore[no-any-return]
        uc = self.uc
        if uc is not None and not self.response_done:
            try:
                await send_all(uc.sock, uc.codec.send_trailers(trailers))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        self._mark_request_done()
        return STOP_ITERATION

    def _mark_request_done(self) -> None:
        self.request_sent_all = True
        self.cb.stream_info.last_upstream_tx_byte = time.monotonic()
        self.request_done_at = trio.current_time()
        self._arm_timeout()

    def _arm_timeout(self) -> None:
        if self.timeout is not None and self.timer is None and not self.response_done:
            assert self.request_done_at is not None
            self.timer = self.cb.worker.timers.schedule(
                self.request_done_at + self.timeout, self._on_timeout
            )

    def _on_timeout(self) -> None:
        self.timer = None
        if self.response_done:
            return
        self.timed_out = True
        if self.uc is not None:
            trio.lowlevel.notify_closing(self.uc.sock)  # wakes the upstream read
        elif self.h2 is not None:
            self.h2.wake()

    def _on_stream_idle(self) -> None:
        self.idle_timer = None
        if self.response_done or self.timed_out:
            return
        self.timeout_outcome = Outcome.STREAM_IDLE_TIMEOUT
        self._on_timeout()

    async def _send_headers(self, headers: HeaderMap, end_stream: bool, allow_retry: bool) -> bool:
        """Take a connection and write the request head; False when a local reply was sent."""
        cb = self.cb
        info = cb.stream_info
        pool = self.pool = pool_for(self.cluster, self.host)
        while True:
            try:
                uc = await pool.acquire()
            except UpstreamConnectError as exc:
                info.upstream_transport_failure_reason = str(exc)
                outcome = (
                    Outcome.UPSTREAM_CONNECT_TIMEOUT
                    if exc.reason == "connection_timeout"
                    else Outcome.UPSTREAM_CONNECT_FAILURE
                )
                self.response_done = True
                await cb.send_outcome(outcome)
                return False
            self.uc = uc
            info.upstream_local_address = uc.local_address
            info.upstream_ssl = uc.ssl_info
            info.attempt_count += 1
            try:
                out = uc.codec.send_request_headers(headers, end_stream)
            except LocalProtocolError as exc:
                # We cannot write this request (a header no HTTP/1.1 peer may see): the
                # proxy resets the upstream stream itself, Envoy's LR.
                pool.discard(uc)
                self.uc = None
                info.upstream_transport_failure_reason = str(exc)
                self.response_done = True
                await cb.send_outcome(Outcome.UPSTREAM_LOCAL_RESET)
                return False
            try:
                self.sent_at = time.monotonic()
                if info.first_upstream_tx_byte is None:
                    info.first_upstream_tx_byte = self.sent_at
                await send_all(uc.sock, out)
                if end_stream:
                    self.request_sent_all = True
                    info.last_upstream_tx_byte = time.monotonic()
                return True
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pool.discard(uc)
                self.uc = None
                if uc.reused and allow_retry:
                    allow_retry = False
                    continue
                self.response_done = True
                await cb.send_outcome(Outcome.UPSTREAM_RESET_BEFORE_RESPONSE)
                return False

    # -- response -------------------------------------------------------------------------
    async def _run_response(self) -> None:
        if self.request_done_at is not None:
            self._arm_timeout()
        # The HCM's stream_idle_timeout bounds each wait for upstream bytes; with Envoy's
        # defaults (15 s route timeout, 5 min idle) the route timeout comes first, and no
        # idle timer is armed at all.
        idle = self.cb.config.stream_idle_timeout
        if idle is not None and (self.timeout is None or self.timeout > idle):
            self.stream_idle = idle
        try:
            await self._relay_response()
        except _RouteTimeout:
            await self._on_route_timeout()
        except _UpstreamReset as reset:
            if self.timed_out:
                await self._on_route_timeout()
            else:
                await self._on_reset(reset)
        finally:
            self.response_done = True
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

    async def _on_route_timeout(self) -> None:
        cb = self.cb
        self.response_done = True
        outcome = self.timeout_outcome
        if outcome is Outcome.UPSTREAM_REQUEST_TIMEOUT:
            self.cluster.cluster_stats.upstream_rq_timeout.inc()
            if self.host is not None:
                self.host.rq_timeout += 1
        else:
            cb.hcm_stats.rq_idle_timeout.inc()
        self._drop_upstream(remote=False)
        if self.response_started:
            cb.stream_info.set_response_flag(LOCAL_REPLIES[outcome].flag)
            cb.reset_stream(LOCAL_REPLIES[outcome].details)
        else:
            await cb.send_outcome(outcome)

    async def _relay_response(self) -> None:
        cb = self.cb
        info = cb.stream_info
        wait_first = True  # the request just left: its response cannot be here yet
        while True:
            uc = self.uc
            assert uc is not None
            codec = uc.codec
            try:
                ev = codec.next_event()
                while ev is None:
                    await cb.flush()  # before waiting: what we have goes out now
                    if self.timed_out:
                        raise _RouteTimeout
                    if self.stream_idle is not None:
                        self.idle_timer = cb.worker.timers.call_later(
                            self.stream_idle, self._on_stream_idle
                        )
                    try:
                        data = await receive_some(uc.sock, _RECV, wait_first)
                        wait_first = False
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        if self.timed_out:
                            raise _RouteTimeout from None
                        data = b""
                    finally:
                        if self.idle_timer is not None:
                            self.idle_timer.cancel()
                            self.idle_timer = None
                    if data and info.first_upstream_rx_byte is None:
                        info.first_upstream_rx_byte = time.monotonic()
                    codec.receive_data(data)
                    ev = codec.next_event()
                    if ev is None and not data:
                        ev = ConnectionClosed()
            except CodecError as exc:
                raise _UpstreamReset(Outcome.UPSTREAM_PROTOCOL_ERROR, str(exc)) from None
            t = type(ev)
            if t is Data:
                await cb.encode_data(ev.data, False)  # type: ignore[union-attr]
                continue
            if t is ResponseHeaders:
                await self._on_response_headers(ev)  # type: ignore[arg-type]
                if ev.end_stream:  # type: ignore[union-attr]
                    break
                continue
            if t is EndOfStream:
                await cb.encode_data(b"", True)
                break
            if t is Trailers:
                await cb.encode_trailers(ev.trailers)  # type: ignore[union-attr]
                break
            if t is InformationalResponse:
                continue  # 1xx are not proxied (Envoy: proxy_100_continue is off)
            if t is ConnectionClosed:
                if (
                    not self.response_started
                    and codec.bytes_received == 0
                    and uc.reused
                    and not self.body_sent
                    and self.request_sent_all
                ):
                    # The keep-alive race: replay once on a fresh connection.
                    self.pool.discard(uc)
                    self.uc = None
                    if not await self._send_headers(self._headers, True, allow_retry=False):  # type: ignore[arg-type]
                        self.response_done = True
                        return
                    continue
                raise _UpstreamReset(Outcome.UPSTREAM_RESET_BEFORE_RESPONSE)
        self.response_done = True
        cluster = self.cluster
        if cluster is not None:
            cluster.cluster_stats.upstream_rq_time.record((time.monotonic() - self.sent_at) * 1000)
        await cb.flush()
        self._release_upstream()

    async def _on_response_headers(self, ev: ResponseHeaders) -> None:
        cb = self.cb
        headers = ev.headers
        self.response_started = True
        status = int(headers.get(":status") or 0)
        _count_response_code(self.cluster, status)
        host = self.host
        if host is not None:
            if status >= 500:
                host.rq_error += 1
            else:
                host.rq_success += 1
        if not self.config.suppress_envoy_headers:
            ms = int((time.monotonic() - self.sent_at) * 1000)
            headers.add("x-envoy-upstream-service-time", str(ms))
        cb.stream_info.upstream_service_time_ms = int((time.monotonic() - self.sent_at) * 1000)
        await cb.encode_headers(headers, ev.end_stream)

    async def _on_reset(self, reset: _UpstreamReset) -> None:
        cb = self.cb
        if self.host is not None and not self.response_started:
            self.host.rq_error += 1
        # The upstream closed or reset, or sent what cannot be parsed (we close: local).
        self._drop_upstream(remote=reset.outcome is not Outcome.UPSTREAM_PROTOCOL_ERROR)
        self.response_done = True
        if reset.detail:
            cb.stream_info.upstream_transport_failure_reason = reset.detail
        if self.response_started:
            flag = (
                ResponseFlag.UPSTREAM_PROTOCOL_ERROR
                if reset.outcome is Outcome.UPSTREAM_PROTOCOL_ERROR
                else ResponseFlag.UPSTREAM_CONNECTION_TERMINATION
            )
            cb.stream_info.set_response_flag(flag)
            cb.reset_stream("upstream_reset_after_response_started")
        else:
            await cb.send_outcome(reset.outcome)

    def _release_upstream(self) -> None:
        uc, self.uc = self.uc, None
        if uc is None:
            return
        if self.request_sent_all:
            self.pool.release(uc)
        else:
            self.pool.discard(uc)

    def _drop_upstream(self, remote: bool = False) -> None:
        """Close the upstream connection with the request still in flight on it."""
        uc, self.uc = self.uc, None
        if uc is not None:
            self.pool.discard(uc, remote=remote, active_rq=True)

    def _finish_request_stats(self) -> None:
        host = self.host
        if host is not None and self.cluster is not None:
            host.rq_active -= 1
            stats = self.cluster.cluster_stats
            stats.upstream_rq_active.dec()
            stats.upstream_rq_completed.inc()
            self.host = None

    def on_destroy(self) -> None:
        """The stream ended (normally, by reset or by cancellation): give everything back."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._finish_request_stats()
        if self.uc is not None:
            self._drop_upstream()
        if self.h2 is not None:
            self.h2.on_destroy()
