"""The router filter (``envoy.filters.http.router``): the last HTTP filter of every chain.

It turns the route the connection manager found into an upstream exchange: pick the
cluster and a host, take an HTTP/1.1 connection from the host's pool, stream the request
up and the response down through the encoder filters, and answer locally when any step
fails, with Envoy's status, response flag and details (``stream_info.LOCAL_REPLIES``).

Theory of operation:
1. A bodiless request (the common case) is served inline in ``decode_headers``: no task is
   spawned. A request with a body starts a response task in the stream's nursery, so the
   response can arrive (and be relayed) while the body is still going up.
2. The route timeout (Envoy's default 15 s; ``x-envoy-upstream-rq-timeout-ms`` overrides
   it) runs from the end of the downstream request to the end of the response, as in
   Envoy, through pending waits, retries and their backoff: a worker timer
   (``timer_wheel``, cheaper than a cancel scope per request). When it fires it wakes the
   upstream read (``notify_closing``) or cancels the wait in progress; before response
   headers that becomes a local 504 (UT); after, the downstream is reset, because a
   half-sent response cannot be replaced. ``retry_policy.per_try_timeout`` (or
   ``x-envoy-upstream-rq-per-try-timeout-ms``; ignored when not below the route timeout)
   bounds one attempt from the moment its request is fully sent: 504 UT
   (``upstream_per_try_timeout``) unless the attempt is retried.
3. Circuit breakers (``proxy.upstream.resource_manager``, the route's ``priority``): the
   pool refuses a pending request beyond ``max_pending_requests``, the router an attempt
   beyond ``max_requests``; either is a local 503 UO with ``x-envoy-overloaded: true``
   (``upstream_rq_pending_overflow``), never queued.
4. Retries (``proxy.router.retry_state``): an attempt ends in a response, or in a reset
   with Envoy's reason (connect failure or timeout, connection termination, protocol
   error, per-try timeout). Before any response byte went downstream the retry state
   decides: YES → the attempt is abandoned, a backoff wait, a host chosen again (the
   ``previous_hosts`` predicate), and the request replayed from its buffered body; NO →
   the response is relayed or the reset answered, with URX (retries exhausted) or UO
   (retry breaker full) added to the flags. The request body is buffered for replay only
   up to ``per_request_buffer_limit_bytes`` (else the listener's buffer limit, 1 MiB):
   beyond it retries are abandoned (``retry_or_shadow_abandoned``), and a request caught
   waiting for its retry gets 507.
5. Outlier detection hears about every attempt (``host.outlier``): connect success or
   failure, resets, timeouts, and the response code.
6. A reused keep-alive connection that closes before any response byte is the race every
   HTTP/1.1 proxy meets (the upstream's keep-alive timer fired as we wrote). A request
   that can be replayed (nothing but headers was sent) is replayed once on a new
   connection; that is not an Envoy retry and is not counted as one.
7. A route without a retry policy and a cluster without outlier detection pay a scan of the
   request header names for ``x-envoy-`` ones, the requests breaker's two counts and a few
   attribute checks.
"""

from __future__ import annotations

import ipaddress
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
from proxy.router.retry_state import RETRY_HEADERS, RetryState, RetryStatus
from proxy.stream_info import LOCAL_REPLIES, Outcome, ResponseFlag
from proxy.upstream.conn_pool import UpstreamConnection, UpstreamOverflow, pool_for
from proxy.upstream.connect import UpstreamConnectError
from proxy.upstream.load_balancer import LoadBalancerContext
from proxy.upstream.original_dst_cluster import downstream_context
from proxy.upstream.outlier_detection import CONNECT_FAILED, CONNECT_SUCCESS, TIMEOUT

if TYPE_CHECKING:
    from proxy.http.headers import HeaderMap

_RECV = 65536
_NO_HASH = LoadBalancerContext(hash_key=None)
_OVERLOADED = (("x-envoy-overloaded", "true"),)
_RQ_TIMEOUT_HEADER = "x-envoy-upstream-rq-timeout-ms"
_HONOURED = RETRY_HEADERS | {_RQ_TIMEOUT_HEADER}

# Reset reasons (Envoy's StreamResetReason) of the outcomes an attempt can end in.
_REASONS = {
    Outcome.UPSTREAM_CONNECT_FAILURE: "connection_failure",
    Outcome.UPSTREAM_CONNECT_TIMEOUT: "connection_timeout",
    Outcome.UPSTREAM_RESET_BEFORE_RESPONSE: "connection_termination",
    Outcome.UPSTREAM_PROTOCOL_ERROR: "protocol_error",
    Outcome.UPSTREAM_PER_TRY_TIMEOUT: "local_reset",
    Outcome.UPSTREAM_OVERFLOW: "overflow",
    Outcome.UPSTREAM_REMOTE_RESET: "remote_reset",
    Outcome.UPSTREAM_REFUSED_STREAM: "remote_refused_stream_reset",
}


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


def _learned(cluster: Any, host: Any) -> str | None:
    from proxy.upstream.conn_pool_h2 import learned_protocol

    return learned_protocol(cluster, host)


def _is_internal(ip: str) -> bool:
    """Envoy's ``isInternalAddress``: RFC 1918, loopback, IPv6 unique-local."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return addr.is_private or addr.is_loopback


def take_envoy_headers(headers: HeaderMap, honour: bool) -> dict[str, str] | None:
    """Remove the retry and timeout ``x-envoy-*`` request headers; return them when they are
    to be honoured (Envoy strips them from an edge request before the router sees them)."""
    found: dict[str, str] | None = None
    for name, value in headers.items():
        if name in _HONOURED:
            if found is None:
                found = {}
            found.setdefault(name, value)
    if found is None:
        return None
    headers.remove_if(_HONOURED)
    return found if honour else None


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
    """An attempt failed before (or while) relaying a response; ``outcome`` says how."""

    def __init__(self, outcome: Outcome, detail: str = "", *, retriable: bool = True,
                 remote: bool = True) -> None:
        super().__init__(outcome.value)
        self.outcome = outcome
        self.detail = detail
        self.reason = _REASONS.get(outcome, "local_reset")
        self.retriable = retriable
        self.remote = remote


class _RetryResponse(Exception):
    """The response headers asked for a retry (the retry state said YES)."""


class RouterFilter:
    __slots__ = (
        "config", "cb", "uc", "pool", "cluster", "host", "timeout", "timer", "timed_out",
        "idle_timer", "stream_idle", "timeout_outcome",
        "request_done_at", "request_sent_all", "response_started", "response_done",
        "body_sent", "sent_at", "_headers", "h2",
        "resources", "rq_held", "retry", "per_try", "per_try_timer", "per_try_timed_out",
        "failure", "buffer", "buffered", "buffer_limit", "trailers", "request_complete",
        "replaying", "wait_scope", "buffer_overflowed", "action", "lb_context",
        "attempt_started",
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
        self.resources: Any = None  # the cluster's circuit breakers for the route's priority
        self.rq_held = False  # one count of the requests breaker is ours
        self.retry: RetryState | None = None
        self.per_try: float | None = None
        self.per_try_timer: Any = None
        self.per_try_timed_out = False
        self.failure: _UpstreamReset | None = None  # why the current attempt has no connection
        self.buffer: list[bytes] | None = None  # request body kept for retries
        self.buffered = 0
        self.buffer_limit = 0
        self.trailers: HeaderMap | None = None
        self.request_complete = False  # the downstream request has ended
        self.replaying = False
        self.wait_scope: trio.CancelScope | None = None
        self.buffer_overflowed = False
        self.action: Any = None
        self.lb_context: Any = None
        self.attempt_started = False  # request bytes went upstream in this attempt

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
        action = self.action = route.route_action
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
        self.lb_context = lb_context
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
        envoy = None
        for item in headers.items():
            if item[0].startswith("x-envoy-"):
                envoy = self._envoy_headers(headers)
                break
        policy = action.retry_policy
        if policy is not None or envoy:
            self._setup_retries(policy, envoy, headers, cluster)
        if not self.config.suppress_envoy_headers:
            if headers.get(":path") != original_path and original_path is not None:
                headers.set("x-envoy-original-path", original_path)
            expected = self.per_try or self.timeout
            if expected is not None:
                headers.set("x-envoy-expected-rq-timeout-ms", str(int(expected * 1000)))
        self._headers = headers
        self.resources = cluster.resources[action.priority]

        stats = cluster.cluster_stats
        stats.upstream_rq_total.inc()
        stats.upstream_rq_active.inc()
        host.rq_active += 1  # given back in on_destroy, however the stream ends
        host.rq_total += 1
        self.request_complete = end_stream
        if end_stream:
            self.request_done_at = trio.current_time()
            self._arm_timeout()
        protocol = cluster.config.upstream_protocol
        if protocol != "http1" and (protocol == "http2" or _learned(cluster, host) != "http1"):
            from proxy.router.upstream_h2 import H2UpstreamRequest

            self.h2 = H2UpstreamRequest(self)
            status = await self.h2.decode_headers(headers, end_stream)
            if status is not None:
                return status
            self.h2 = None  # auto_config: ALPN chose HTTP/1.1; the connection waits there
        await self._send_headers(headers, end_stream)
        if end_stream:
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

    def _envoy_headers(self, headers: HeaderMap) -> dict[str, str] | None:
        """The retry / timeout headers, consumed (Envoy's HCM drops them from an edge
        request: with use_remote_address and a client outside the internal ranges)."""
        cb = self.cb
        honour = not cb.config.use_remote_address or _is_internal(cb.source_ip)
        envoy = take_envoy_headers(headers, honour)
        if envoy is not None:
            value = envoy.get(_RQ_TIMEOUT_HEADER)
            if value is not None and value.strip().isdigit():
                self.timeout = int(value.strip()) / 1000 or None
        return envoy

    def _setup_retries(self, policy: Any, envoy: dict[str, str] | None, headers: HeaderMap,
                       cluster: Any) -> None:
        cb = self.cb
        runtime = cb.worker.snapshot.runtime
        base_ms = 25 if runtime is None else runtime.get_int("upstream.base_retry_backoff_ms", 25)
        resources = cluster.resources[self.action.priority]
        retry = self.retry = RetryState.create(policy, headers, cluster.cluster_stats,
                                               resources.retries, cb.worker.rng, base_ms,
                                               envoy)
        per_try = policy.per_try_timeout if policy is not None else None
        if envoy:
            value = envoy.get("x-envoy-upstream-rq-per-try-timeout-ms")
            if value is not None and value.strip().isdigit():
                per_try = int(value.strip()) / 1000 or None
        if retry is not None:
            retry.per_try_timeout = per_try
        if per_try is not None and self.timeout is not None and per_try >= self.timeout:
            per_try = None  # Envoy: a per-try timeout not below the route timeout is ignored
        self.per_try = per_try
        if retry is not None:
            limit = self.action.retry_buffer_limit
            self.buffer_limit = limit if limit is not None else cb.hc.conn.buffer_limit
            self.buffer = []

    async def decode_data(self, data: bytes, end_stream: bool) -> FilterStatus:
        if self.h2 is not None:
            return await self.h2.decode_data(data, end_stream)  # type: ignore[no-any-return]
        if end_stream:
            self.request_complete = True
        if self.buffer is not None and not self._buffer_body(data):
            return STOP_ITERATION
        uc = self.uc
        if uc is None or self.response_done or self.replaying:
            if end_stream:
                self._mark_request_done()
            return STOP_ITERATION
        self.body_sent = True
        self.attempt_started = True
        try:
            out = uc.codec.send_data(data, end_stream)
            await send_all(uc.sock, out)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the response task sees the reset and answers
        if end_stream:
            self._mark_request_done()
        return STOP_ITERATION

    def _buffer_body(self, data: bytes) -> bool:
        """Keep ``data`` for a replay; False once it no longer fits and nothing is in flight."""
        assert self.buffer is not None
        if self.buffered + len(data) > self.buffer_limit:
            # Envoy: give up on retries; a request caught between attempts cannot go on.
            self.cluster.cluster_stats.retry_or_shadow_abandoned.inc()
            if self.retry is not None:
                self.retry.release()
                self.retry = None
            if self.replaying:  # the replay in progress sends it, then drops the buffer
                self.buffer.append(data)
                return True
            self.buffer = None
            if self.uc is None and self.h2 is None or (
                    self.h2 is not None and self.h2.stream is None):
                self.buffer_overflowed = True
                if self.wait_scope is not None:
                    self.wait_scope.cancel()
                return False
            return True
        if data:
            self.buffer.append(data)
            self.buffered += len(data)
        return True

    async def decode_trailers(self, trailers: HeaderMap) -> FilterStatus:
        if self.h2 is not None:
            return await self.h2.decode_trailers(trailers)  # type: ignore[no-any-return]
        self.request_complete = True
        self.trailers = trailers
        uc = self.uc
        if uc is not None and not self.response_done and not self.replaying:
            try:
                await send_all(uc.sock, uc.codec.send_trailers(trailers))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        self._mark_request_done()
        return STOP_ITERATION

    def _mark_request_done(self) -> None:
        self.request_complete = True
        self.cb.stream_info.last_upstream_tx_byte = time.monotonic()
        self.request_done_at = trio.current_time()
        self._arm_timeout()
        if self.uc is not None and not self.replaying or (
                self.h2 is not None and self.h2.stream is not None):
            self.request_sent_all = True
            self._arm_per_try()

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
        self._wake()

    def _wake(self) -> None:
        if self.uc is not None:
            trio.lowlevel.notify_closing(self.uc.sock)  # wakes the upstream read
        elif self.h2 is not None:
            self.h2.wake()
        if self.wait_scope is not None:
            self.wait_scope.cancel()  # a pending connection, or a retry's backoff

    def _arm_per_try(self) -> None:
        if self.per_try is not None and self.per_try_timer is None and not self.response_done:
            self.per_try_timer = self.cb.worker.timers.call_later(self.per_try,
                                                                  self._on_per_try_timeout)

    def _on_per_try_timeout(self) -> None:
        self.per_try_timer = None
        if self.response_done:
            return
        self.per_try_timed_out = True
        self._wake()

    def _cancel_per_try(self) -> None:
        if self.per_try_timer is not None:
            self.per_try_timer.cancel()
            self.per_try_timer = None
        self.per_try_timed_out = False

    def _on_stream_idle(self) -> None:
        self.idle_timer = None
        if self.response_done or self.timed_out:
            return
        self.timeout_outcome = Outcome.STREAM_IDLE_TIMEOUT
        self._on_timeout()

    def _per_try_timeout_failure(self) -> _UpstreamReset:
        """Count a per-try timeout (Envoy's onPerTryTimeout) and describe it."""
        self.cluster.cluster_stats.upstream_rq_per_try_timeout.inc()
        host = self.host
        if host is not None:
            host.rq_timeout += 1
            if host.outlier is not None:
                host.outlier.put_result(TIMEOUT)
        return _UpstreamReset(Outcome.UPSTREAM_PER_TRY_TIMEOUT, remote=False)

    async def _acquire(self, pool: Any) -> UpstreamConnection | None:
        """Wait for a connection (pending request); None when the route timeout fired."""
        with trio.CancelScope() as scope:
            self.wait_scope = scope
            try:
                return await pool.acquire(self.resources)  # type: ignore[no-any-return]
            finally:
                self.wait_scope = None
        return None

    def _connect_failed(self, exc: UpstreamConnectError) -> None:
        """No connection for the attempt (either protocol): UF / connect timeout."""
        self.cb.stream_info.upstream_transport_failure_reason = str(exc)
        outcome = (
            Outcome.UPSTREAM_CONNECT_TIMEOUT
            if exc.reason == "connection_timeout"
            else Outcome.UPSTREAM_CONNECT_FAILURE
        )
        host = self.host
        if host is not None and host.outlier is not None:
            host.outlier.put_result(CONNECT_FAILED)
        self.failure = _UpstreamReset(outcome, remote=False)

    async def _send_headers(self, headers: HeaderMap, end_stream: bool) -> bool:
        """Take a connection and write the request head (and the buffered body of a retry);
        False when the attempt failed: ``self.failure`` says how."""
        cb = self.cb
        info = cb.stream_info
        host = self.host
        cluster = self.cluster
        pool = self.pool = pool_for(cluster, host, cb.worker.timers)
        allow_replay = True
        self.attempt_started = False
        info.attempt_count += 1
        while True:
            uc = pool.acquire_ready()
            if uc is None:
                try:
                    uc = await self._acquire(pool)
                except UpstreamOverflow:
                    self.failure = _UpstreamReset(Outcome.UPSTREAM_OVERFLOW)
                    return False
                except UpstreamConnectError as exc:
                    self._connect_failed(exc)
                    return False
                if uc is None:  # the route timeout fired while we waited
                    self.failure = None
                    return False
            requests = self.resources.requests
            if requests.count >= requests.max:
                # Envoy's "max streams overflow" (attachStreamToClient).
                pool.put_back(uc)
                cluster.cluster_stats.upstream_rq_pending_overflow.inc()
                self.failure = _UpstreamReset(Outcome.UPSTREAM_OVERFLOW)
                return False
            requests.inc()
            self.rq_held = True
            if host.outlier is not None:
                host.outlier.put_result(CONNECT_SUCCESS)
            self.uc = uc
            info.upstream_local_address = uc.local_address
            info.upstream_ssl = uc.ssl_info
            if self.action.include_attempt_count:
                headers.set("x-envoy-attempt-count", str(info.attempt_count))
            replay = self.buffer is not None and (self.buffer or self.request_complete) and (
                not end_stream)
            try:
                out = uc.codec.send_request_headers(headers, end_stream)
            except LocalProtocolError as exc:
                # We cannot write this request (a header no HTTP/1.1 peer may see): the
                # proxy resets the upstream stream itself, Envoy's LR.
                self._release_upstream_slot()
                pool.discard(uc)
                self.uc = None
                info.upstream_transport_failure_reason = str(exc)
                self.failure = _UpstreamReset(Outcome.UPSTREAM_LOCAL_RESET, retriable=False)
                return False
            try:
                self.sent_at = time.monotonic()
                if info.first_upstream_tx_byte is None:
                    info.first_upstream_tx_byte = self.sent_at
                self.attempt_started = True
                await send_all(uc.sock, out)
                if end_stream:
                    self.request_sent_all = True
                    info.last_upstream_tx_byte = time.monotonic()
                    self._arm_per_try()
                elif replay:
                    await self._replay_body(uc)
                return True
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self._release_upstream_slot()
                pool.discard(uc)
                self.uc = None
                if uc.reused and allow_replay and not self.body_sent:
                    allow_replay = False
                    continue
                if host.outlier is not None:
                    host.outlier.put_result(CONNECT_FAILED)
                self.failure = _UpstreamReset(Outcome.UPSTREAM_RESET_BEFORE_RESPONSE)
                return False

    async def _replay_body(self, uc: UpstreamConnection) -> None:
        """Send a retry's buffered body (and the end of the request, if it came)."""
        self.replaying = True
        try:
            buffer = self.buffer
            i = 0
            while buffer is not None and i < len(buffer):
                await send_all(uc.sock, uc.codec.send_data(buffer[i], False))
                self.body_sent = True
                i += 1
                buffer = self.buffer
            if self.request_complete:
                if self.trailers is not None:
                    await send_all(uc.sock, uc.codec.send_trailers(self.trailers))
                else:
                    await send_all(uc.sock, uc.codec.send_data(b"", True))
                self.request_sent_all = True
                self.cb.stream_info.last_upstream_tx_byte = time.monotonic()
                self._arm_per_try()
        finally:
            self.replaying = False
            if self.retry is None:
                self.buffer = None  # retries were abandoned meanwhile

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
        h2 = self.h2  # HTTP/2 (upstream_h2.py) shares this loop; HTTP/1 tests it, no call
        try:
            while True:
                try:
                    if (self.uc if h2 is None else h2.stream) is None:
                        if self.buffer_overflowed and not self.timed_out:
                            self.response_done = True
                            await self.cb.send_outcome(Outcome.RETRY_BUFFER_OVERFLOW)
                            break
                        if self.timed_out or self.failure is None:
                            raise _RouteTimeout
                        raise self.failure
                    if h2 is None:
                        await self._relay_response()
                    else:
                        await h2.relay()
                    break
                except (_UpstreamReset, _RetryResponse) as failure:
                    if self.timed_out:
                        raise _RouteTimeout from None
                    if await self._retry(failure):
                        continue
                    assert isinstance(failure, _UpstreamReset)
                    await self._on_reset(failure)
                    break
        except _RouteTimeout:
            await self._on_route_timeout()
        finally:
            self.response_done = True
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self._cancel_per_try()

    async def _retry(self, failure: Exception) -> bool:
        """Envoy's maybeRetryReset / the retry of a response: True when a new attempt is
        under way (or the request was answered meanwhile)."""
        retry = self.retry
        if isinstance(failure, _RetryResponse):
            self._drop_upstream(remote=False)
        else:
            assert isinstance(failure, _UpstreamReset)
            if retry is None or self.response_started or not failure.retriable:
                return False
            if self.host is not None:
                retry.on_host_attempted(self.host)
            status = retry.should_retry_reset(failure.reason, self.attempt_started)
            if status is not RetryStatus.YES:
                self._retry_refused(status)
                return False
            self._drop_upstream(remote=failure.remote)
            if self.host is not None:
                self.host.rq_error += 1
        assert retry is not None
        self._release_upstream_slot()
        self._cancel_per_try()
        return await self._next_attempt(retry)

    def _retry_refused(self, status: RetryStatus) -> None:
        info = self.cb.stream_info
        if status is RetryStatus.NO_OVERFLOW:
            info.set_response_flag(ResponseFlag.UPSTREAM_OVERFLOW)
        elif status is RetryStatus.NO_RETRY_LIMIT_EXCEEDED:
            info.set_response_flag(ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED)

    async def _backoff(self, retry: RetryState) -> bool:
        """Wait out the retry's backoff; False when the route timeout fired or the body
        outgrew the buffer meanwhile (the request was answered)."""
        with trio.CancelScope() as scope:
            self.wait_scope = scope
            try:
                await trio.sleep(retry.backoff())
            finally:
                self.wait_scope = None
        if self.timed_out:
            raise _RouteTimeout
        return not self.buffer_overflowed  # the loop answers 507

    def _choose_retry_host(self, retry: RetryState) -> Any:
        """Envoy's chooseHost loop with the retry host predicates."""
        cluster = self.cluster
        host = cluster.choose_host(self.lb_context)
        if retry.policy.previous_hosts:
            for _ in range(retry.host_selection_max_attempts):
                if host is None or not retry.should_select_another_host(host):
                    break
                host = cluster.choose_host(self.lb_context)
        return host

    async def _next_attempt(self, retry: RetryState) -> bool:
        cb = self.cb
        if not await self._backoff(retry):
            return True
        host = self._choose_retry_host(retry)
        if host is None:
            self.cluster.cluster_stats.upstream_cx_none_healthy.inc()
            self.response_done = True
            await cb.send_outcome(Outcome.NO_HEALTHY_UPSTREAM)
            return True
        old = self.host
        if old is not None:
            old.rq_active -= 1
        host.rq_active += 1
        host.rq_total += 1
        self.host = host
        info = cb.stream_info
        info.upstream_host = host.address_string
        info.upstream_host_name = host.hostname or None
        self.cluster.cluster_stats.upstream_rq_total.inc()
        headers = self._headers
        assert headers is not None
        if not self.config.suppress_envoy_headers and self.per_try is None and (
                self.timeout is not None and self.request_done_at is not None):
            left = self.request_done_at + self.timeout - trio.current_time()
            headers.set("x-envoy-expected-rq-timeout-ms", str(max(1, int(left * 1000))))
        self.request_sent_all = False
        self.body_sent = False
        if self.h2 is not None:
            return await self.h2.next_attempt()  # type: ignore[no-any-return]
        bodiless = self.request_complete and not self.buffer and self.trailers is None
        await self._send_headers(headers, bodiless)
        return True

    async def _on_route_timeout(self) -> None:
        cb = self.cb
        self.response_done = True
        outcome = self.timeout_outcome
        if outcome is Outcome.UPSTREAM_REQUEST_TIMEOUT:
            self.cluster.cluster_stats.upstream_rq_timeout.inc()
            host = self.host
            if host is not None:
                host.rq_timeout += 1
                attempt = self.uc if self.h2 is None else self.h2.stream
                if host.outlier is not None and attempt is not None:
                    host.outlier.put_result(TIMEOUT)
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
                    if self.per_try_timed_out:
                        raise self._per_try_timeout_failure()
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
                        if self.per_try_timed_out:
                            raise self._per_try_timeout_failure() from None
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
                raise _UpstreamReset(Outcome.UPSTREAM_PROTOCOL_ERROR, str(exc),
                                     remote=False) from None
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
                    self._release_upstream_slot()
                    self.pool.discard(uc)
                    self.uc = None
                    self._cancel_per_try()
                    info.attempt_count -= 1  # the same attempt, not an Envoy retry
                    if not await self._send_headers(self._headers, True):  # type: ignore[arg-type]
                        if self.failure is None:
                            raise _RouteTimeout
                        raise self.failure
                    continue
                host = self.host
                if host is not None and host.outlier is not None:
                    host.outlier.put_result(CONNECT_FAILED)
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
        status = int(headers.get(":status") or 0)
        host = self.host
        if host is not None and "x-envoy-immediate-health-check-fail" in headers:
            cb.worker.immediate_health_check_fail(self.cluster, host)  # h1 and h2 paths
        if host is not None and host.outlier is not None:
            host.outlier.put_http_response_code(status)
        retry = self.retry
        if retry is not None:
            if host is not None:
                retry.on_host_attempted(host)
            decision = retry.should_retry_headers(status, headers)
            if decision is RetryStatus.YES:
                if host is not None:
                    host.rq_error += 1
                _count_response_code(self.cluster, status)
                raise _RetryResponse
            self._retry_refused(decision)
            retry.release()
            self.retry = None
            self.buffer = None
        self.response_started = True
        _count_response_code(self.cluster, status)
        if host is not None:
            if status >= 500:
                host.rq_error += 1
            else:
                host.rq_success += 1
        if not self.config.suppress_envoy_headers:
            ms = int((time.monotonic() - self.sent_at) * 1000)
            headers.add("x-envoy-upstream-service-time", str(ms))
        if self.action.include_attempt_count_in_response:
            headers.set("x-envoy-attempt-count", str(cb.stream_info.attempt_count))
        cb.stream_info.upstream_service_time_ms = int((time.monotonic() - self.sent_at) * 1000)
        await cb.encode_headers(headers, ev.end_stream)

    async def _on_reset(self, reset: _UpstreamReset) -> None:
        cb = self.cb
        outcome = reset.outcome
        if (self.host is not None and not self.response_started
                and outcome is not Outcome.UPSTREAM_PER_TRY_TIMEOUT
                and outcome is not Outcome.UPSTREAM_OVERFLOW):
            self.host.rq_error += 1
        # The upstream closed or reset, or sent what cannot be parsed (we close: local).
        self._drop_upstream(remote=reset.remote)
        self.response_done = True
        if reset.detail:
            cb.stream_info.upstream_transport_failure_reason = reset.detail
        if self.response_started:
            flag = LOCAL_REPLIES[outcome].flag
            if outcome is Outcome.UPSTREAM_RESET_BEFORE_RESPONSE:
                flag = ResponseFlag.UPSTREAM_CONNECTION_TERMINATION
            cb.stream_info.set_response_flag(flag)
            cb.reset_stream("upstream_reset_after_response_started" if self.h2 is None
                            else f"upstream_reset_after_response_started{{{reset.reason}}}")
        elif outcome is Outcome.UPSTREAM_OVERFLOW and not self.config.suppress_envoy_headers:
            await cb.send_outcome(outcome, _OVERLOADED)
        else:
            await cb.send_outcome(outcome)

    def _release_upstream_slot(self) -> None:
        """The attempt no longer holds a count of the requests breaker."""
        if self.rq_held:
            self.rq_held = False
            self.resources.requests.dec()

    def _release_upstream(self) -> None:
        self._release_upstream_slot()
        uc, self.uc = self.uc, None
        if uc is None:
            return
        if self.request_sent_all:
            self.pool.release(uc)
        else:
            self.pool.discard(uc)

    def _drop_upstream(self, remote: bool = False) -> None:
        """Close the upstream connection with the request still in flight on it."""
        self._release_upstream_slot()
        if self.h2 is not None:
            self.h2.drop()
            return
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
        if self.per_try_timer is not None:
            self.per_try_timer.cancel()
            self.per_try_timer = None
        if self.retry is not None:
            self.retry.release()
        self._finish_request_stats()
        if self.uc is not None:
            self._drop_upstream()
        self._release_upstream_slot()
        if self.h2 is not None:
            self.h2.on_destroy()
