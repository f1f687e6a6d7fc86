"""The health check filter (``envoy.filters.http.health_check``): the proxy answers its probes.

A load balancer in front of the proxy probes it; this filter decides what the probe sees, so
that the admin ``/healthcheck/fail`` takes the proxy out of rotation before a drain or restart.
Semantics are Envoy's (``source/extensions/filters/http/health_check/health_check.cc``).

Theory of operation:
1. A request that every ``headers`` matcher matches is a health check (an empty list matches
   every request). It is marked on its StreamInfo, so ``not_health_check_filter`` access logs
   skip it and the connection manager leaves it out of ``downstream_rq_completed`` and
   ``downstream_rq_<N>xx``, and it counts in ``http.<stat_prefix>.health_check.request_total``.
2. Without ``pass_through_mode`` the filter answers every health check itself. With it, the
   check goes on to the router unless the server is health-check failed or ``cache_time``
   holds a recent upstream answer; then the filter answers.
3. The filter answers once the request has been read in full, with no body: 503 and flag LH
   while the server is health-check failed (``DrainManager.health_check_failed``, set by the
   worker's control channel); otherwise the cached upstream status, or the verdict of
   ``cluster_min_healthy_percentages``, or 200.
4. Every response that passes the filter while the server is health-check failed carries
   ``x-envoy-immediate-health-check-fail: true``, normal traffic's too, so an Envoy in front
   stops sending at once; a health check's response also carries
   ``x-envoy-upstream-healthchecked-cluster: <node.cluster>``.
5. ``cache_time`` is Envoy's HealthCheckCacheManager: any health check response that passes
   the filter (the filter's own replies included) is remembered until the next tick of a
   ``cache_time`` period clock, and answers the health checks that arrive until then.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from proxy.http.filter_manager import CONTINUE, STOP_ITERATION, FilterStatus
from proxy.stream_info import Outcome, ResponseFlag

if TYPE_CHECKING:
    from proxy.common.matchers import HeaderMatcher
    from proxy.http.headers import HeaderMap
    from proxy.stats import Store

IMMEDIATE_HEALTH_CHECK_FAIL = "x-envoy-immediate-health-check-fail"
UPSTREAM_HEALTHCHECKED_CLUSTER = "x-envoy-upstream-healthchecked-cluster"
DEGRADED = "x-envoy-degraded"
CACHED_DETAILS = "health_check_cached"

# http.<stat_prefix>.health_check.* (Envoy's ALL_HEALTH_CHECK_FILTER_STATS).
STAT_NAMES = (
    "request_total", "failed", "ok", "cached_response", "failed_cluster_not_found",
    "failed_cluster_empty", "failed_cluster_unhealthy", "degraded",
)


class HealthCheckStats:
    """``http.<stat_prefix>.health_check.*`` for one worker."""

    __slots__ = STAT_NAMES

    def __init__(self, store: Store, stat_prefix: str) -> None:
        scope = store.scope(f"http.{stat_prefix}.health_check.")
        for name in STAT_NAMES:
            setattr(self, name, scope.counter(name))


class HealthCheckCache:
    """Envoy's HealthCheckCacheManager with its clear timer turned into a period clock.

    Envoy re-arms a ``cache_time`` timer from config load and each firing forgets the cached
    answer; the answer recorded in period ``n`` is used until period ``n + 1`` begins. The
    period index is computed from the clock, so no timer task is needed.
    """

    __slots__ = ("_clock", "_epoch", "_period", "_tick", "degraded", "status")

    def __init__(self, period_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._period = period_s
        self._clock = clock
        self._epoch = clock()
        self._tick = -1  # the period the cached answer belongs to; -1: none yet
        # Envoy starts from a zero status; only a check that arrived while the server was
        # health-check failed and finished after it recovered could read it, so say 200.
        self.status = 200
        self.degraded = False

    def _now_tick(self) -> int:
        return int((self._clock() - self._epoch) // self._period)

    def use_cached_response(self) -> bool:
        return self._tick == self._now_tick()

    def set_cached_response(self, status: int, degraded: bool) -> None:
        self.status = status
        self.degraded = degraded
        self._tick = self._now_tick()


class HealthCheckConfig:
    """The compiled ``HealthCheck`` message; the factory of one filter per stream."""

    def __init__(
        self,
        *,
        pass_through_mode: bool,
        headers: tuple[HeaderMatcher, ...],
        cache: HealthCheckCache | None = None,
        cluster_min_healthy_percentages: tuple[tuple[str, int], ...] = (),
        local_cluster_name: str = "",
    ) -> None:
        self.pass_through_mode = pass_through_mode
        self.headers = headers
        self.cache = cache
        self.cluster_min_healthy_percentages = cluster_min_healthy_percentages  # sorted by name
        self.local_cluster_name = local_cluster_name
        self._stats: dict[int, HealthCheckStats] = {}

    def matches(self, headers: HeaderMap) -> bool:
        for m in self.headers:
            if not m.matches(headers):
                return False
        return True

    def create_filter(self, callbacks: Any) -> HealthCheckFilter:
        store = callbacks.worker.stats
        stats = self._stats.get(id(store))
        if stats is None:
            # The stat prefix is the owning connection manager's, known only from its streams.
            stats = self._stats[id(store)] = HealthCheckStats(store, callbacks.config.stat_prefix)
        return HealthCheckFilter(self, callbacks, stats)


class HealthCheckFilter:
    __slots__ = ("cb", "config", "degraded", "handling", "health_check_request", "stats")

    def __init__(self, config: HealthCheckConfig, callbacks: Any, stats: HealthCheckStats) -> None:
        self.config = config
        self.cb = callbacks
        self.stats = stats
        self.health_check_request = False
        self.handling = False  # this filter answers the request
        self.degraded = False  # the cached answer it sends said x-envoy-degraded

    # -- request --------------------------------------------------------------------------
    async def decode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterStatus:
        config = self.config
        if not config.matches(headers):
            return CONTINUE
        cb = self.cb
        self.health_check_request = True
        cb.stream_info.health_check = True
        self.stats.request_total.inc()
        cache = config.cache
        if (
            not config.pass_through_mode
            or cb.worker.drain.health_check_failed
            or (cache is not None and cache.use_cached_response())
        ):
            self.handling = True
        if not self.handling:
            return CONTINUE
        if end_stream:
            await self._on_complete()
        return STOP_ITERATION

    async def decode_data(self, data: bytes, end_stream: bool) -> FilterStatus:
        if not self.handling:
            return CONTINUE
        if end_stream:
            await self._on_complete()
        return STOP_ITERATION

    async def decode_trailers(self, trailers: HeaderMap) -> FilterStatus:
        if not self.handling:
            return CONTINUE
        await self._on_complete()
        return STOP_ITERATION

    async def _on_complete(self) -> None:
        cb = self.cb
        stats = self.stats
        if cb.worker.drain.health_check_failed:
            stats.failed.inc()
            await cb.send_outcome(Outcome.HEALTH_CHECK_FAILED)
            return
        cache = self.config.cache
        if cache is not None:
            status = cache.status
            self.degraded = cache.degraded
            stats.cached_response.inc()
            if self.degraded:
                stats.degraded.inc()
            if 200 <= status < 300:
                stats.ok.inc()
            else:
                stats.failed.inc()
                cb.stream_info.set_response_flag(ResponseFlag.FAILED_LOCAL_HEALTH_CHECK)
            await cb.send_local_reply(status, b"", CACHED_DETAILS)
            return
        outcome = Outcome.HEALTH_CHECK_OK
        if self.config.cluster_min_healthy_percentages:
            outcome = self._cluster_verdict()
        if outcome in (Outcome.HEALTH_CHECK_OK, Outcome.HEALTH_CHECK_CLUSTER_HEALTHY):
            stats.ok.inc()
        else:
            stats.failed.inc()
        await cb.send_outcome(outcome)

    def _cluster_verdict(self) -> Outcome:
        """Healthy only if every listed cluster has its minimum share of healthy hosts."""
        stats = self.stats
        clusters = self.cb.worker.cluster_manager
        outcome = Outcome.HEALTH_CHECK_OK
        for name, min_percent in self.config.cluster_min_healthy_percentages:
            outcome = Outcome.HEALTH_CHECK_CLUSTER_HEALTHY
            cluster = clusters.get(name)
            if cluster is None:
                stats.failed_cluster_not_found.inc()
                return Outcome.HEALTH_CHECK_NO_CLUSTER
            total = cluster.cluster_stats.membership_total.value
            if total == 0:
                if min_percent == 0:
                    continue
                stats.failed_cluster_empty.inc()
                return Outcome.HEALTH_CHECK_CLUSTER_EMPTY
            # Integer math as Envoy's; trioxy has no degraded hosts to add to the healthy.
            if 100 * cluster.cluster_stats.membership_healthy.value < total * min_percent:
                stats.failed_cluster_unhealthy.inc()
                return Outcome.HEALTH_CHECK_CLUSTER_UNHEALTHY
        return outcome

    # -- response -------------------------------------------------------------------------
    async def encode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterStatus:
        if self.health_check_request:
            if self.degraded:
                headers.set(DEGRADED, "")
            cache = self.config.cache
            if cache is not None:
                cache.set_cached_response(headers.status or 0, DEGRADED in headers)
            headers.set(UPSTREAM_HEALTHCHECKED_CLUSTER, self.config.local_cluster_name)
        if self.cb.worker.drain.health_check_failed:
            headers.set(IMMEDIATE_HEALTH_CHECK_FAIL, "true")
        return CONTINUE

    async def encode_data(self, data: bytes, end_stream: bool) -> FilterStatus:
        return CONTINUE

    async def encode_trailers(self, trailers: HeaderMap) -> FilterStatus:
        return CONTINUE
