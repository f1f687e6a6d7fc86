"""Envoy's ``envoy.filters.network.tcp_proxy``: a terminal network filter that relays bytes.

Theory of operation
-------------------
1. One ``TcpProxyConfig`` per filter config (compiled once, immutable); ``serve_connection``
   runs one session per downstream connection, in the worker that accepted it.
2. Connecting (Envoy's ``establishUpstreamConnection``): each attempt picks the cluster
   (``cluster`` or a weighted pick) and a host, then connects with the cluster's
   ``connect_timeout``. Missing cluster → ``NC``; the cluster's ``max_connections`` circuit
   breaker full → ``UO`` (``upstream_cx_overflow``); no host → ``UH``; a failed attempt → ``UF``
   and, while ``max_connect_attempts`` allows, another attempt with a fresh pick; out of
   attempts → ``URX``. Every such end closes the downstream connection with the connection
   termination details ``tcp_initializion_failure:<reason>`` (Envoy's spelling and numbers).
3. Relaying (``proxy.tcp_proxy.relay``): both directions at once with half-close. Any byte
   either way moves the ``idle_timeout`` deadline (default 1 h, 0 disables); expiry closes
   both sides (``idle_timeout`` stat, details ``tcp_session_idle_timeout``).
   ``max_downstream_connection_duration`` bounds the whole session (``DT``).
4. The access logs run once per connection, after both sockets are closed, with
   ``bytes_received`` (from downstream), ``bytes_sent`` (to downstream), the upstream host and
   cluster, the flags and the duration.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from proxy.config.errors import ConfigError, not_supported
from proxy.config.protos import duration_s
from proxy.network.connection import format_address
from proxy.stats import Counter, Gauge, Store
from proxy.stream_info import FLAG_SHORT, ResponseFlag, StreamInfo
from proxy.tcp_proxy import relay as relay_mod

if TYPE_CHECKING:
    from proxy.config.context import FactoryContext
    from proxy.network.connection import Connection
    from proxy.server.worker_context import WorkerContext

DEFAULT_IDLE_TIMEOUT_S = 3600.0  # Envoy: 1 hour when idle_timeout is unset

# StreamInfo::LocalCloseReasons (Envoy's spelling, typo included) and the numbers of
# TcpProxy::UpstreamFailureReason.
INIT_FAILURE_DETAILS = "tcp_initializion_failure:"
CONNECT_FAILED, NO_HEALTHY_UPSTREAM, RESOURCE_LIMIT_EXCEEDED, NO_ROUTE = range(4)
IDLE_TIMEOUT_DETAILS = "tcp_session_idle_timeout"
MAX_DURATION_DETAILS = "max_connection_duration_reached"

# Fields of the TcpProxy message that this filter implements; any other set field is refused.
_SUPPORTED_FIELDS = frozenset(
    {
        "stat_prefix",
        "cluster",
        "weighted_clusters",
        "idle_timeout",
        "access_log",
        "max_connect_attempts",
        "max_downstream_connection_duration",
    }
)
_SUPPORTED_CLUSTER_WEIGHT_FIELDS = frozenset({"name", "weight"})

# Stats declared beside their owner (Envoy's ALL_TCP_PROXY_STATS, the ones we keep).
TCP_PROXY_COUNTERS = (
    "downstream_cx_total",
    "downstream_cx_no_route",
    "downstream_cx_rx_bytes_total",
    "downstream_cx_tx_bytes_total",
    "idle_timeout",
    "max_downstream_connection_duration",
    "upstream_flush_total",  # stays 0: no drainer, see _close
)
TCP_PROXY_GAUGES = ("downstream_cx_rx_bytes_buffered", "downstream_cx_tx_bytes_buffered",
                    "upstream_flush_active")
CLUSTER_COUNTERS = (
    "upstream_cx_total",
    "upstream_cx_connect_fail",
    "upstream_cx_connect_timeout",
    "upstream_cx_none_healthy",
    "upstream_cx_connect_attempts_exceeded",
    "upstream_cx_destroy",
    "upstream_cx_rx_bytes_total",
    "upstream_cx_tx_bytes_total",
)
CLUSTER_GAUGES = ("upstream_cx_active",)


@dataclass(frozen=True, slots=True)
class ClusterWeight:
    name: str
    weight: int


class TcpProxyStats:
    """``tcp.<stat_prefix>.*`` of one worker's store."""

    __slots__ = ("counters", "gauges", "scope")

    def __init__(self, store: Store, stat_prefix: str) -> None:
        scope = store.scope(f"tcp.{stat_prefix}.")
        self.scope = scope
        self.counters: dict[str, Counter] = {n: scope.counter(n) for n in TCP_PROXY_COUNTERS}
        self.gauges: dict[str, Gauge] = {n: scope.gauge(n) for n in TCP_PROXY_GAUGES}

    def on_response_flags(self, flags: int) -> None:
        """``tcp.<prefix>.response_flag.<FLAG>`` (as ``http.<prefix>.response_flag.*``)."""
        for flag, short in FLAG_SHORT:
            if flags & flag:
                self.scope.counter(f"response_flag.{short}").inc()


@dataclass(frozen=True)
class TcpProxyConfig:
    """A compiled ``TcpProxy``; ``serve_connection`` is the terminal filter."""

    stat_prefix: str
    cluster: str | None
    weighted_clusters: tuple[ClusterWeight, ...]
    idle_timeout: float | None  # seconds; None: disabled
    max_connect_attempts: int
    max_downstream_connection_duration: float | None
    access_logs: tuple[Any, ...]
    relay_engine: str = relay_mod.DEFAULT_ENGINE
    # Per-worker stats, created on a worker's first connection (one Store per worker).
    _stats: weakref.WeakKeyDictionary[Store, TcpProxyStats] = field(
        default_factory=weakref.WeakKeyDictionary, init=False, repr=False, compare=False
    )

    @property
    def total_weight(self) -> int:
        return sum(c.weight for c in self.weighted_clusters)

    @staticmethod
    def from_proto(msg: Any, ctx: FactoryContext, path: str) -> TcpProxyConfig:
        for fd, _ in msg.ListFields():
            if fd.name not in _SUPPORTED_FIELDS:
                raise not_supported(f"{path}.{fd.name}", fd.name)
        if not msg.stat_prefix:
            raise ConfigError(f"{path}.stat_prefix", "must not be empty")
        known = ctx.cluster_names
        specifier = msg.WhichOneof("cluster_specifier")
        cluster: str | None = None
        weighted: list[ClusterWeight] = []
        if specifier == "cluster":
            cluster = msg.cluster
            if not cluster:
                raise ConfigError(f"{path}.cluster", "must not be empty")
            if known and cluster not in known:
                raise ConfigError(f"{path}.cluster", f"unknown cluster {cluster!r}")
        elif specifier == "weighted_clusters":
            wpath = f"{path}.weighted_clusters.clusters"
            if not msg.weighted_clusters.clusters:
                raise ConfigError(wpath, "at least one cluster is required")
            for i, cw in enumerate(msg.weighted_clusters.clusters):
                cpath = f"{wpath}[{i}]"
                for fd, _ in cw.ListFields():
                    if fd.name not in _SUPPORTED_CLUSTER_WEIGHT_FIELDS:
                        raise not_supported(f"{cpath}.{fd.name}", fd.name)
                if not cw.name:
                    raise ConfigError(f"{cpath}.name", "must not be empty")
                if known and cw.name not in known:
                    raise ConfigError(f"{cpath}.name", f"unknown cluster {cw.name!r}")
                if cw.weight < 1:
                    raise ConfigError(f"{cpath}.weight", "must be at least 1")
                weighted.append(ClusterWeight(cw.name, cw.weight))
        else:
            raise ConfigError(path, "one of cluster or weighted_clusters is required")

        idle = duration_s(msg, "idle_timeout")
        if idle is not None and idle < 0:
            raise ConfigError(f"{path}.idle_timeout", "must not be negative")
        idle_timeout = DEFAULT_IDLE_TIMEOUT_S if idle is None else (idle or None)
        attempts = msg.max_connect_attempts.value if msg.HasField("max_connect_attempts") else 1
        if attempts < 1:
            raise ConfigError(f"{path}.max_connect_attempts", "must be at least 1")
        max_duration = duration_s(msg, "max_downstream_connection_duration")
        if max_duration is not None and max_duration < 0.001:
            raise ConfigError(
                f"{path}.max_downstream_connection_duration", "must be at least 1ms"
            )
        access_logs: tuple[Any, ...] = ()
        if msg.access_log:
            # Imported on use: only configs with access logs need the access-log package.
            from proxy.access_log.access_log import build_access_logs

            access_logs = tuple(build_access_logs(msg.access_log, ctx, f"{path}.access_log"))
        return TcpProxyConfig(
            stat_prefix=msg.stat_prefix,
            cluster=cluster,
            weighted_clusters=tuple(weighted),
            idle_timeout=idle_timeout,
            max_connect_attempts=attempts,
            max_downstream_connection_duration=max_duration,
            access_logs=access_logs,
        )

    # ----------------------------------------------------------------------------------------

    def pick_cluster(self, rng: Any) -> str:
        """The cluster for one attempt (Envoy's ``WeightedClusterUtil::pickCluster``)."""
        if self.cluster is not None:
            return self.cluster
        selected = rng.randrange(self.total_weight)
        for cw in self.weighted_clusters:
            if selected < cw.weight:
                return cw.name
            selected -= cw.weight
        return self.weighted_clusters[-1].name  # unreachable: weights sum to the total

    def stats(self, store: Store) -> TcpProxyStats:
        st = self._stats.get(store)
        if st is None:
            st = self._stats[store] = TcpProxyStats(store, self.stat_prefix)
        return st

    async def serve_connection(self, conn: Connection, worker: WorkerContext) -> None:
        await _Session(self, conn, worker).run()


class _Session:
    """One downstream connection's life in tcp_proxy (Envoy's ``TcpProxy::Filter``)."""

    def __init__(self, config: TcpProxyConfig, conn: Connection, worker: WorkerContext):
        self.config = config
        self.conn = conn
        self.worker = worker
        self.info: StreamInfo = conn.stream_info
        self.stats = config.stats(worker.stats)
        self.upstream: trio.SocketStream | None = None
        self.cluster: Any = None
        self.host: Any = None

    async def run(self) -> None:
        cfg, info = self.config, self.info
        self.stats.counters["downstream_cx_total"].inc()
        if self.conn.requested_server_name:
            info.requested_server_name = self.conn.requested_server_name
        deadline = math.inf
        if cfg.max_downstream_connection_duration is not None:
            deadline = trio.current_time() + cfg.max_downstream_connection_duration
        try:
            with trio.CancelScope(deadline=deadline) as duration_scope:
                if await self._establish_upstream_connection():
                    await self._relay()
            if duration_scope.cancelled_caught:
                info.set_response_flag(ResponseFlag.DURATION_TIMEOUT)
                info.connection_termination_details = MAX_DURATION_DETAILS
                self.stats.counters["max_downstream_connection_duration"].inc()
        finally:
            with trio.CancelScope(shield=True):
                await self._close()
            info.on_complete()
            if info.response_flags:
                self.stats.on_response_flags(info.response_flags)
            for log in cfg.access_logs:
                log.log(info)

    # ----------------------------------------------------------------------------------------

    async def _establish_upstream_connection(self) -> bool:
        """Connect, retrying per max_connect_attempts; False (downstream to close) on failure."""
        # Imported on use so that compiling a config (--mode validate) loads no I/O code.
        from proxy.upstream import outlier_detection as outlier
        from proxy.upstream.connect import UpstreamConnectError, connect_upstream
        from proxy.upstream.original_dst_cluster import downstream_context

        cfg, info, worker = self.config, self.info, self.worker
        attempts = 0
        while True:
            name = cfg.pick_cluster(worker.rng)
            cluster = worker.cluster_manager.get(name)
            if cluster is None:
                self.stats.counters["downstream_cx_no_route"].inc()
                info.set_response_flag(ResponseFlag.NO_CLUSTER_FOUND)
                return self._init_failure(NO_ROUTE)
            info.upstream_cluster = name
            cstats = cluster.stats
            if attempts >= cfg.max_connect_attempts:
                info.set_response_flag(ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED)
                cstats.counter("upstream_cx_connect_attempts_exceeded").inc()
                return self._init_failure(CONNECT_FAILED)
            # Envoy: the cluster's max_connections breaker (DEFAULT priority) is checked first.
            connections = cluster.resources[0].connections
            if not connections.can_create():
                cluster.cluster_stats.upstream_cx_overflow.inc()
                info.set_response_flag(ResponseFlag.UPSTREAM_OVERFLOW)
                return self._init_failure(RESOURCE_LIMIT_EXCEEDED)
            host = cluster.choose_host(
                downstream_context(self.conn) if cluster.original_dst else None)
            if host is None:
                cstats.counter("upstream_cx_none_healthy").inc()
                info.set_response_flag(ResponseFlag.NO_HEALTHY_UPSTREAM)
                return self._init_failure(NO_HEALTHY_UPSTREAM)
            attempts += 1
            info.attempt_count = attempts
            info.upstream_host = host.address_string
            cstats.counter("upstream_cx_total").inc()
            connections.inc()
            try:
                upstream = await connect_upstream(
                    host, cluster.config.connect_timeout, cluster=cluster)
            except BaseException as exc:
                connections.dec()
                if not isinstance(exc, UpstreamConnectError):
                    raise
                if host.outlier is not None:
                    host.outlier.put_result(outlier.CONNECT_FAILED)
                reason = getattr(exc, "reason", "connection_failure")
                cstats.counter("upstream_cx_connect_fail").inc()
                if reason == "connection_timeout":
                    cstats.counter("upstream_cx_connect_timeout").inc()
                info.set_response_flag(ResponseFlag.UPSTREAM_CONNECTION_FAILURE)
                # A TLS failure keeps Envoy's detailed reason (TLS_error:|...).
                info.upstream_transport_failure_reason = exc.details if exc.tls else reason
                continue
            self.upstream, self.cluster, self.host = upstream, cluster, host
            if host.outlier is not None:
                host.outlier.put_result(outlier.CONNECT_SUCCESS_FINAL)
            cstats.gauge("upstream_cx_active").inc()
            host.cx_active += 1
            try:
                info.upstream_ssl = getattr(upstream, "info", None)  # TLS: SslConnectionInfo
                local = (upstream.getsockname() if not isinstance(upstream, trio.SocketStream)
                         else upstream.socket.getsockname())
                info.upstream_local_address = format_address((str(local[0]), int(local[1])))
            except OSError:
                pass
            return True

    def _init_failure(self, reason: int) -> bool:
        self.info.connection_termination_details = f"{INIT_FAILURE_DETAILS}{reason}"
        return False

    async def _relay(self) -> None:
        assert self.upstream is not None
        cfg, info = self.config, self.info
        counters = self.stats.counters
        rx_total = counters["downstream_cx_rx_bytes_total"]
        tx_total = counters["downstream_cx_tx_bytes_total"]
        cstats = self.cluster.stats
        up_tx = cstats.counter("upstream_cx_tx_bytes_total")
        up_rx = cstats.counter("upstream_cx_rx_bytes_total")
        idle_timeout = cfg.idle_timeout
        idle_scope = trio.CancelScope()
        if idle_timeout is not None:
            idle_scope.deadline = trio.current_time() + idle_timeout
        current_time = trio.current_time

        def on_downstream_bytes(n: int) -> None:
            info.bytes_received += n
            rx_total.value += n
            up_tx.value += n
            if idle_timeout is not None:
                idle_scope.deadline = current_time() + idle_timeout

        def on_upstream_bytes(n: int) -> None:
            if info.first_upstream_rx_byte is None:
                info.first_upstream_rx_byte = time.monotonic()  # StreamInfo's clock
            info.bytes_sent += n
            tx_total.value += n
            up_rx.value += n
            if idle_timeout is not None:
                idle_scope.deadline = current_time() + idle_timeout

        with idle_scope:
            await relay_mod.relay(
                self.conn,
                self.upstream,
                on_downstream_bytes=on_downstream_bytes,
                on_upstream_bytes=on_upstream_bytes,
                engine=cfg.relay_engine,
            )
        if idle_scope.cancelled_caught:
            counters["idle_timeout"].inc()
            info.connection_termination_details = IDLE_TIMEOUT_DETAILS

    async def _close(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            try:
                await upstream.aclose()
            finally:
                self.cluster.stats.gauge("upstream_cx_active").dec()
                self.cluster.stats.counter("upstream_cx_destroy").inc()
                self.cluster.resources[0].connections.dec()
                self.host.cx_active -= 1
        if not self.conn.closed:
            await self.conn.aclose()
