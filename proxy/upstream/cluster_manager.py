"""The per-worker cluster manager (Envoy's ``ClusterManagerImpl`` + ``ThreadLocalClusterManager``).

Theory of operation
-------------------
1. One ``ClusterManager`` per worker process, built from the snapshot's ``ClusterConfig``s. Each
   cluster becomes a ``ThreadLocalCluster`` at once: STATIC clusters have their hosts from the
   start, DNS clusters start empty (a request before the first answer gets ``503 UH``).
2. ``run`` is the trio shell: one task per DNS name (a STRICT_DNS endpoint, or the one
   LOGICAL_DNS endpoint) resolves it with ``trio.socket.getaddrinfo``, off the request path.
   ``task_status.started()`` comes once every name's first resolution has succeeded or failed,
   so a worker serves with its DNS clusters warmed, as Envoy's cluster initialization does.
   Then each name is re-resolved every ``dns_refresh_rate`` (Envoy's fixed-rate strategy when
   ``dns_failure_refresh_rate`` is unset, which trioxy refuses).
3. Lookup families follow Envoy's c-ares resolver: AUTO asks IPv6 then IPv4 when IPv6 gave no
   address, V4_PREFERRED the reverse, ALL both at once. "No such name" / "no address" answers
   are a successful empty answer (a STRICT_DNS name then has no host); any other error, or no
   answer within ``DNS_RESOLVE_TIMEOUT_S``, is a failure that keeps the last good hosts.
   Every attempt counts ``update_attempt`` and then ``update_success`` or ``update_failure``.
4. STRICT_DNS: every address is a host (the endpoint's weight, priority and hostname, the
   endpoint's DNS name when it has no hostname). Hosts whose address stays keep their identity
   (counters, pooled connections); an answer with the same set of addresses changes nothing
   (``update_no_rebuild``). LOGICAL_DNS: one host at the first address of the answer; when the
   answer moves, the same host moves (``Host.set_address``), existing connections stay where
   they are; an empty answer is a failure (Envoy keeps the last address).
5. The balancer is rebuilt on every membership change; after changing ``host.healthy``, call
   ``ThreadLocalCluster.refresh_health()``.
6. ORIGINAL_DST clusters start empty; their balancer makes a host per original destination
   on demand, and ``run`` drops stale ones every ``cleanup_interval``
   (``proxy.upstream.original_dst_cluster``).
7. Active health checking runs in the epoch's main process
   (``proxy.upstream.health_check_manager``): the hosts of a cluster with ``health_checks``
   start failed (``healthy = False``, Envoy's FAILED_ACTIVE_HC) and take the main process's
   results through ``apply_health`` (the worker's spawn-time frame, then control ops).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import trio

from proxy.stats import Counter, Gauge, Histogram, Scope, Store
from proxy.upstream.cluster_config import (
    ClusterConfig,
    DiscoveryType,
    DnsLookupFamily,
    EndpointSpec,
)
from proxy.upstream.host import Host
from proxy.upstream.load_balancer import LoadBalancerContext, create_load_balancer
from proxy.upstream.original_dst_cluster import OriginalDstLoadBalancer
from proxy.upstream.outlier_detection import OutlierDetector
from proxy.upstream.resource_manager import DEFAULT, HIGH, CircuitBreakers, ResourceManager

__all__ = [
    "CLUSTER_COUNTERS",
    "CLUSTER_GAUGES",
    "DNS_RESOLVE_TIMEOUT_S",
    "ClusterManager",
    "ClusterStats",
    "DnsResolutionError",
    "ThreadLocalCluster",
    "resolve_name",
]

log = logging.getLogger("trioxy.upstream")

# A resolution that has not answered by then counts as failed (c-ares gives up after about
# as long with its default timeout and tries); the next refresh tries again.
DNS_RESOLVE_TIMEOUT_S = 5.0

# Envoy's cluster stats (ALL_CLUSTER_TRAFFIC_STATS, ALL_CLUSTER_CONFIG_UPDATE_STATS, membership),
# the ones the data path and the DNS refresh bump, under cluster.<name>.
CLUSTER_COUNTERS = (
    "upstream_cx_total",
    "upstream_cx_connect_fail",
    "upstream_cx_connect_timeout",
    "upstream_cx_connect_attempts_exceeded",
    "upstream_cx_destroy",
    "upstream_cx_destroy_local",
    "upstream_cx_destroy_remote",
    "upstream_cx_destroy_with_active_rq",
    "upstream_cx_destroy_local_with_active_rq",
    "upstream_cx_destroy_remote_with_active_rq",
    "upstream_cx_none_healthy",
    "upstream_cx_rx_bytes_total",
    "upstream_cx_tx_bytes_total",
    "upstream_rq_total",
    "upstream_rq_completed",
    "upstream_rq_timeout",
    "upstream_rq_retry",
    # resilience (issue #6): circuit breakers, retries, timeouts
    "upstream_cx_overflow",
    "upstream_cx_idle_timeout",
    "upstream_cx_max_duration_reached",
    "upstream_rq_pending_total",
    "upstream_rq_pending_overflow",
    "upstream_rq_per_try_timeout",
    "upstream_rq_retry_success",
    "upstream_rq_retry_overflow",
    "upstream_rq_retry_limit_exceeded",
    "upstream_rq_retry_backoff_exponential",
    "retry_or_shadow_abandoned",
    "lb_healthy_panic",
    "membership_change",
    "update_attempt",
    "update_success",
    "update_failure",
    "update_no_rebuild",
)
CLUSTER_GAUGES = (
    "upstream_cx_active",
    "upstream_rq_active",
    "upstream_rq_pending_active",
    "membership_total",
    "membership_healthy",
)


class ClusterStats:
    """Typed handles on ``cluster.<name>.*``: the same objects the Scope returns by name."""

    __slots__ = (*CLUSTER_COUNTERS, *CLUSTER_GAUGES, "upstream_rq_time")

    upstream_cx_total: Counter
    upstream_cx_connect_fail: Counter
    upstream_cx_connect_timeout: Counter
    upstream_cx_connect_attempts_exceeded: Counter
    upstream_cx_destroy: Counter
    upstream_cx_destroy_local: Counter
    upstream_cx_destroy_remote: Counter
    upstream_cx_destroy_with_active_rq: Counter
    upstream_cx_destroy_local_with_active_rq: Counter
    upstream_cx_destroy_remote_with_active_rq: Counter
    lb_healthy_panic: Counter
    upstream_rq_time: Histogram
    upstream_cx_none_healthy: Counter
    upstream_cx_rx_bytes_total: Counter
    upstream_cx_tx_bytes_total: Counter
    upstream_rq_total: Counter
    upstream_rq_completed: Counter
    upstream_rq_timeout: Counter
    upstream_rq_retry: Counter
    upstream_cx_overflow: Counter
    upstream_cx_idle_timeout: Counter
    upstream_cx_max_duration_reached: Counter
    upstream_rq_pending_total: Counter
    upstream_rq_pending_overflow: Counter
    upstream_rq_per_try_timeout: Counter
    upstream_rq_retry_success: Counter
    upstream_rq_retry_overflow: Counter
    upstream_rq_retry_limit_exceeded: Counter
    upstream_rq_retry_backoff_exponential: Counter
    retry_or_shadow_abandoned: Counter
    upstream_rq_pending_active: Gauge
    membership_change: Counter
    update_attempt: Counter
    update_success: Counter
    update_failure: Counter
    update_no_rebuild: Counter
    upstream_cx_active: Gauge
    upstream_rq_active: Gauge
    membership_total: Gauge
    membership_healthy: Gauge

    def __init__(self, scope: Scope) -> None:
        for name in CLUSTER_COUNTERS:
            setattr(self, name, scope.counter(name))
        for name in CLUSTER_GAUGES:
            setattr(self, name, scope.gauge(name))
        self.upstream_rq_time = scope.histogram("upstream_rq_time")


def _host_for(spec: EndpointSpec, address: str) -> Host:
    return Host(address, spec.port, spec.hostname, spec.weight, spec.priority,
                spec.locality_weight)


class ThreadLocalCluster:
    """One cluster as one worker sees it: hosts, balancer, stats, and the HTTP pools' slot."""

    def __init__(self, config: ClusterConfig, store: Store, rng: random.Random) -> None:
        self.config = config
        self.name = config.name
        self.stats: Scope = store.scope(f"cluster.{config.name}.")
        self.cluster_stats = ClusterStats(self.stats)
        # Owned by the HTTP connection pool, keyed as it likes (per host, per protocol...).
        self.pools: dict[Any, Any] = {}
        hosts: list[Host] = []
        if config.type is DiscoveryType.STATIC:
            hosts = [_host_for(e, e.address) for e in config.endpoints]
            if config.health_checks:
                # Envoy's FAILED_ACTIVE_HC until the main process's first check passes.
                for h in hosts:
                    h.healthy = False
        self.hosts: list[Host] = hosts
        # ORIGINAL_DST: hosts made per connection from its original destination.
        self.original_dst = config.type is DiscoveryType.ORIGINAL_DST
        self._lb: Any
        if self.original_dst:
            self._lb = OriginalDstLoadBalancer(
                config, self.update_hosts, self.stats.counter("original_dst_host_invalid"))
        else:
            self._lb = create_load_balancer(config, hosts, rng)
        self._lb.panic_counter = self.cluster_stats.lb_healthy_panic
        # Circuit breakers, one ResourceManager per routing priority (DEFAULT, HIGH).
        cb = config.circuit_breakers or CircuitBreakers()
        self.resources = (ResourceManager(cb.default, self.stats, DEFAULT),
                          ResourceManager(cb.high, self.stats, HIGH))
        # Outlier detection: sans-IO detector; ClusterManager.run calls on_interval.
        self.outlier: OutlierDetector | None = None
        if config.outlier_detection is not None:
            self.outlier = OutlierDetector(config.outlier_detection, self.stats,
                                           trio.current_time, rng,
                                           lambda host: self.refresh_health())
            self.outlier.set_hosts(hosts)
        self._set_membership_gauges()

    def choose_host(self, ctx: LoadBalancerContext | None = None) -> Host | None:
        """The host for one request or connection; None when the cluster has none."""
        return self._lb.choose_host(ctx)

    def update_hosts(self, hosts: Sequence[Host]) -> None:
        """Replace the membership (after DNS) and rebuild the balancer."""
        self.hosts = list(hosts)
        if self.outlier is not None:
            self.outlier.set_hosts(self.hosts)
        if self.pools:
            # Forget the pools of hosts that left and hold no connection (ORIGINAL_DST
            # cleanup, DNS changes); their idle connections closed on the idle timer.
            live = {id(h) for h in self.hosts}
            for key, pool in list(self.pools.items()):
                if id(pool.host) not in live and not (
                        getattr(pool, "cx_count", 0) or getattr(pool, "conns", None)):
                    del self.pools[key]
        self._lb.update_hosts(self.hosts)
        self.cluster_stats.membership_change.inc()
        self._set_membership_gauges()

    def refresh_health(self) -> None:
        """Rebuild the balancer after some ``host.healthy`` changed."""
        self._lb.update_hosts(self.hosts)
        self._set_membership_gauges()

    def apply_health(self, states: Iterable[Sequence[Any]]) -> int:
        """Active health check results from the main process: ``(address, port, healthy)``
        each; the balancer is rebuilt once if any host changed. Returns how many did."""
        by_key = {(h.address, h.port): h for h in self.hosts}
        changed = 0
        for address, port, healthy in states:
            host = by_key.get((address, int(port)))
            if host is not None and host.healthy != bool(healthy):
                host.healthy = bool(healthy)
                changed += 1
        if changed:
            self.refresh_health()
        return changed

    def _set_membership_gauges(self) -> None:
        self.cluster_stats.membership_total.set(len(self.hosts))
        self.cluster_stats.membership_healthy.set(
            sum(1 for h in self.hosts if h.healthy and not h.ejected))

    def __repr__(self) -> str:
        return f"<ThreadLocalCluster {self.name} {self.config.type} hosts={len(self.hosts)}>"


class DnsResolutionError(Exception):
    """A lookup that failed (not "no such name", which is an empty answer)."""


# getaddrinfo errors that mean "the name has no address (of this family)": an empty answer.
_NO_RECORDS = frozenset(
    getattr(trio.socket, n) for n in ("EAI_NONAME", "EAI_NODATA", "EAI_ADDRFAMILY")
    if hasattr(trio.socket, n)
)
_FAMILY_ORDER = {
    DnsLookupFamily.V4_ONLY: (trio.socket.AF_INET,),
    DnsLookupFamily.V6_ONLY: (trio.socket.AF_INET6,),
    DnsLookupFamily.AUTO: (trio.socket.AF_INET6, trio.socket.AF_INET),
    DnsLookupFamily.V4_PREFERRED: (trio.socket.AF_INET, trio.socket.AF_INET6),
    DnsLookupFamily.ALL: (trio.socket.AF_UNSPEC,),
}


async def resolve_name(name: str, family: DnsLookupFamily) -> list[str]:
    """The addresses of ``name`` in answer order, deduplicated; [] when it has none.

    Raises ``DnsResolutionError`` when every lookup failed (timeouts are the caller's).
    """
    answered = False
    error: BaseException | None = None
    for af in _FAMILY_ORDER[family]:
        try:
            infos = await trio.socket.getaddrinfo(name, None, family=af,
                                                  type=trio.socket.SOCK_STREAM)
        except trio.socket.gaierror as exc:
            if exc.errno in _NO_RECORDS:
                answered = True
            else:
                error = exc
            continue
        except OSError as exc:
            error = exc
            continue
        answered = True
        addresses = list(dict.fromkeys(
            str(info[4][0]) for info in infos
            if info[0] in (trio.socket.AF_INET, trio.socket.AF_INET6)))
        if addresses:
            return addresses
    if answered:
        return []
    raise DnsResolutionError(f"resolving {name!r} failed: {error}")


class _ResolveTarget:
    """One DNS name of a cluster and the hosts its last good answer produced."""

    __slots__ = ("cluster", "spec", "hosts", "failing")

    def __init__(self, cluster: ThreadLocalCluster, spec: EndpointSpec) -> None:
        self.cluster = cluster
        self.spec = spec
        self.hosts: list[Host] = []
        self.failing = False  # log a failure once, not on every refresh


class ClusterManager:
    """A worker's clusters by name, and the task that keeps the DNS ones resolved."""

    def __init__(self, clusters: Mapping[str, ClusterConfig], stats: Store,
                 rng: random.Random | None = None) -> None:
        self.stats = stats
        self._rng = rng if rng is not None else random.Random()
        self.clusters: dict[str, ThreadLocalCluster] = {
            name: ThreadLocalCluster(cfg, stats, self._rng) for name, cfg in clusters.items()
        }
        self._targets: dict[str, list[_ResolveTarget]] = {
            name: [_ResolveTarget(c, spec) for spec in c.config.endpoints]
            for name, c in self.clusters.items() if c.config.is_dns
        }

    def get(self, name: str) -> ThreadLocalCluster | None:
        return self.clusters.get(name)

    def __iter__(self) -> Iterator[ThreadLocalCluster]:
        return iter(self.clusters.values())

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Resolve the DNS clusters; ``started()`` once each name has had a first answer.

        ORIGINAL_DST clusters drop their stale hosts every ``cleanup_interval`` meanwhile.
        """
        cleanups = [c for c in self.clusters.values() if c.original_dst]
        detectors = [c for c in self.clusters.values() if c.outlier is not None]
        if not cleanups and not detectors:
            await self._resolve_dns(task_status=task_status)
            return
        async with trio.open_nursery() as nursery:
            for cluster in cleanups:
                nursery.start_soon(self._cleanup_loop, cluster)
            for cluster in detectors:
                nursery.start_soon(self._outlier_loop, cluster)
            await nursery.start(self._resolve_dns)
            task_status.started()

    @staticmethod
    async def _outlier_loop(cluster: ThreadLocalCluster) -> None:
        """Outlier detection's interval timer: unejections and success-rate analysis."""
        detector = cluster.outlier
        assert detector is not None
        while True:
            await trio.sleep(detector.config.interval)
            detector.on_interval()

    @staticmethod
    async def _cleanup_loop(cluster: ThreadLocalCluster) -> None:
        lb: OriginalDstLoadBalancer = cluster._lb
        while True:
            await trio.sleep(cluster.config.cleanup_interval)
            lb.cleanup()

    async def _resolve_dns(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        targets = [t for ts in self._targets.values() for t in ts]
        if not targets:
            task_status.started()
            return
        remaining = len(targets)
        warmed = trio.Event()

        def first_done() -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                warmed.set()

        async with trio.open_nursery() as nursery:
            for target in targets:
                nursery.start_soon(self._refresh_loop, target, first_done)
            await warmed.wait()
            task_status.started()

    async def _refresh_loop(self, target: _ResolveTarget, first_done: Any) -> None:
        await self._resolve_once(target)
        first_done()
        while True:
            await trio.sleep(target.cluster.config.dns_refresh_rate)
            await self._resolve_once(target)

    async def _resolve_once(self, target: _ResolveTarget) -> None:
        """One resolution of one name, applied to its cluster."""
        cluster = target.cluster
        cfg = cluster.config
        st = cluster.cluster_stats
        st.update_attempt.inc()
        name = target.spec.address
        addresses: list[str] | None = None
        error = f"resolving {name!r} timed out after {DNS_RESOLVE_TIMEOUT_S} s"
        with trio.move_on_after(DNS_RESOLVE_TIMEOUT_S):
            try:
                addresses = await resolve_name(name, cfg.dns_lookup_family)
            except DnsResolutionError as exc:
                error = str(exc)
        if addresses is None:
            st.update_failure.inc()
            level = logging.DEBUG if target.failing else logging.WARNING
            log.log(level, "cluster %s: %s; keeping %d host(s)", cluster.name, error,
                    len(target.hosts))
            target.failing = True
            return
        target.failing = False
        if cfg.type is DiscoveryType.LOGICAL_DNS:
            self._apply_logical(target, addresses)
        else:
            self._apply_strict(target, addresses)

    def _apply_logical(self, target: _ResolveTarget, addresses: list[str]) -> None:
        cluster = target.cluster
        st = cluster.cluster_stats
        if not addresses:
            # Envoy: an empty answer does not take the one logical host away.
            st.update_failure.inc()
            return
        st.update_success.inc()
        address = addresses[0]
        if not target.hosts:
            target.hosts = [_host_for(target.spec, address)]
            cluster.update_hosts(target.hosts)
        elif target.hosts[0].address != address:
            log.info("cluster %s: %s moved to %s", cluster.name, target.spec.address, address)
            target.hosts[0].set_address(address)
        else:
            st.update_no_rebuild.inc()

    def _apply_strict(self, target: _ResolveTarget, addresses: list[str]) -> None:
        cluster = target.cluster
        st = cluster.cluster_stats
        st.update_success.inc()
        current = {h.address: h for h in target.hosts}
        if set(addresses) == current.keys():
            st.update_no_rebuild.inc()
            return
        target.hosts = [current.get(a) or _host_for(target.spec, a) for a in addresses]
        cluster.update_hosts([h for t in self._targets[cluster.name] for h in t.hosts])
