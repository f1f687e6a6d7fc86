"""HTTP/1.1 upstream connection pool: one request at a time per connection, kept alive.

One pool per (worker, cluster, host), stored in ``ThreadLocalCluster.pools`` keyed by the
host's address. Idle connections are reused newest first (LIFO keeps the working set small
and warm, and lets the oldest ones reach their idle timeout and close).

Theory of operation:
1. ``acquire_ready`` (no await) pops an idle connection that is younger than the idle
   timeout and still open (a non-blocking ``MSG_PEEK`` tells EOF apart from "nothing to
   read" in one syscall). Most requests end there.
2. Otherwise ``acquire`` makes the request *pending* (Envoy's pending request, counted
   against ``max_pending_requests``: beyond it ``UpstreamOverflow`` at once, and
   ``upstream_rq_pending_overflow``) until it has a connection: a new one when the cluster's
   ``max_connections`` allows (or when this host has no connection at all, as Envoy does so
   a host never waits on the others' connections), else it waits for one of this host's
   connections to be released (handed over directly, first come first served) or for a
   connection slot of the cluster to free up (``upstream_cx_overflow`` each time it could
   not connect). The cluster's ``connections`` count covers connecting and open ones.
3. ``release`` returns a connection whose request and response both completed cleanly
   (h11 says DONE on both sides), which has not reached max_requests_per_connection nor
   max_connection_duration; anything else is closed (``discard``). A released connection
   goes to the first waiter, else to the idle list.
4. Idle connections are closed by a sweep on the worker's timer wheel when their
   ``idle_timeout`` (``upstream_cx_idle_timeout``) or ``max_connection_duration``
   (``upstream_cx_max_duration_reached``) is reached, so an idle pool holds no socket for
   long (and an ORIGINAL_DST host with nothing open can be cleaned up). One timer per pool,
   armed only when the pool goes from no idle connection to one.
5. A reused connection can still race with the upstream closing it (its keep-alive timer
   firing as we write). The router retries such a request once on a fresh connection when
   no response byte arrived and the request could be replayed; that is why the idle
   timeout defaults below common upstream keep-alive timeouts (cluster_config).
"""

from __future__ import annotations

import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import trio

from proxy.http.codec.h1_fast import Http1ClientCodec
from proxy.upstream.connect import connect_upstream, io_socket

if TYPE_CHECKING:
    from proxy.upstream.cluster_manager import ThreadLocalCluster
    from proxy.upstream.host import Host
    from proxy.upstream.resource_manager import ResourceManager

_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT
# Upstreams close keep-alive connections on timers of seconds (nginx 75 s, Node 5 s) or
# announce it (Connection: close); a connection idle for less than this is not worth the
# peek syscall, and the router's one-shot replay covers the rare miss.
_TRUST_IDLE_S = 0.5
_HTTP1_ALPN = ("http/1.1",)


class UpstreamOverflow(Exception):
    """A circuit breaker refused the request (Envoy's PoolFailureReason::Overflow: 503 UO)."""


class UpstreamConnection:
    __slots__ = (
        "stream", "sock", "codec", "host", "requests", "idle_since", "reused", "pool",
        "_local_address", "ssl_info", "created", "resources",
    )

    def __init__(self, stream: trio.SocketStream, host: Host, pool: Http1ConnPool) -> None:
        self.stream = stream
        # The stdlib socket under trio's (a non-blocking MSG_PEEK needs no trio machinery), or
        # for a TLS cluster the TlsSocket, which answers the same calls (proxy.tls.ssl_socket).
        self.sock: socket.socket = io_socket(stream)
        # TLS: what the handshake negotiated (proxy.tls.connection_info); None for plaintext.
        self.ssl_info = getattr(stream, "info", None)
        self.codec = Http1ClientCodec()
        self.host = host
        self.pool = pool
        self.requests = 0
        self.idle_since = 0.0
        self.created = time.monotonic()
        self.reused = False
        self._local_address: str | None = None
        self.resources: Any = None  # the ResourceManager its connection slot is counted in

    @property
    def local_address(self) -> str:
        if self._local_address is None:
            try:
                host, port = self.sock.getsockname()[:2]
            except OSError:
                return "-"
            self._local_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self._local_address

    def still_open(self) -> bool:
        """False when the upstream closed (or sent something unasked) while we were idle."""
        try:
            data = self.sock.recv(1, _PEEK_FLAGS)
        except BlockingIOError:
            return True
        except OSError:
            return False
        del data  # b"" is EOF; bytes nobody asked for mean a confused upstream: both unusable
        return False

    def close(self) -> None:
        """Close now, without waiting (the socket is ours alone)."""
        try:
            self.sock.close()
        except OSError:
            pass


class _Waiter:
    """A pending request waiting for a released connection or a free connection slot."""

    __slots__ = ("event", "uc")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.uc: UpstreamConnection | None = None


class Http1ConnPool:
    __slots__ = ("host", "cluster", "idle", "idle_timeout", "max_requests", "connect_timeout",
                 "max_duration", "timers", "waiters", "cx_count", "_sweep", "alpn")

    def __init__(self, host: Host, cluster: ThreadLocalCluster, timers: Any = None) -> None:
        cfg = cluster.config
        self.host = host
        self.cluster = cluster
        self.idle: list[UpstreamConnection] = []
        self.idle_timeout: float | None = cfg.idle_timeout
        self.max_requests: int | None = cfg.max_requests_per_connection
        self.connect_timeout: float = cfg.connect_timeout
        self.max_duration: float | None = getattr(cfg, "max_connection_duration", None)
        # auto_config: this pool serves the hosts ALPN put on HTTP/1.1; offer only that.
        self.alpn: tuple[str, ...] | None = (
            _HTTP1_ALPN if getattr(cfg, "upstream_protocol", "http1") == "auto" else None)
        self.timers = timers  # the worker's TimerWheel (None: idle connections age lazily)
        self.waiters: deque[_Waiter] = deque()
        self.cx_count = 0  # this host's connections, connecting or open
        self._sweep: Any = None

    # -- taking a connection --------------------------------------------------------------
    def acquire_ready(self) -> UpstreamConnection | None:
        """An idle connection still fit for a request, or None (no await: the fast path)."""
        idle = self.idle
        if not idle:
            return None
        now = time.monotonic()
        timeout = self.idle_timeout
        while idle:
            uc = idle.pop()
            idle_for = now - uc.idle_since
            expired = timeout is not None and idle_for >= timeout
            if not expired and (idle_for < _TRUST_IDLE_S or uc.still_open()):
                uc.reused = True
                return uc
            self._destroy(uc, remote=not expired)
        return None

    async def acquire(self, resources: ResourceManager | None = None) -> UpstreamConnection:
        """A ready connection. Raises ``UpstreamOverflow`` when the pending-requests breaker
        is full and ``UpstreamConnectError`` when a new connection cannot be made."""
        uc = self.acquire_ready()
        if uc is not None:
            return uc
        if resources is None:
            resources = self.cluster.resources[0]
        stats = self.cluster.cluster_stats
        pending = resources.pending_requests
        if not pending.can_create():
            stats.upstream_rq_pending_overflow.inc()
            raise UpstreamOverflow
        pending.inc()
        stats.upstream_rq_pending_total.inc()
        stats.upstream_rq_pending_active.inc()
        try:
            while True:
                connections = resources.connections
                can_connect = connections.can_create()
                if not can_connect:
                    stats.upstream_cx_overflow.inc()
                if can_connect or self.cx_count == 0:
                    return await self.connect(resources)
                waiter = _Waiter()
                self.waiters.append(waiter)
                try:
                    await waiter.event.wait()
                except BaseException:
                    if waiter.uc is not None:
                        self._give(waiter.uc)  # handed over as we were cancelled: pass it on
                    else:
                        try:
                            self.waiters.remove(waiter)
                        except ValueError:
                            pass
                    raise
                if waiter.uc is not None:
                    waiter.uc.reused = True
                    return waiter.uc
                uc = self.acquire_ready()  # woken because a slot freed up
                if uc is not None:
                    return uc
        finally:
            pending.dec()
            stats.upstream_rq_pending_active.dec()

    async def connect(self, resources: ResourceManager | None = None) -> UpstreamConnection:
        if resources is None:
            resources = self.cluster.resources[0]
        stats = self.cluster.cluster_stats
        stats.upstream_cx_total.inc()
        self.host.cx_total += 1
        resources.connections.inc()
        self.cx_count += 1
        try:
            stream = await connect_upstream(self.host, self.connect_timeout, cluster=self.cluster,
                                            alpn_protocols=self.alpn)
        except BaseException as exc:
            resources.connections.dec()
            self.cx_count -= 1
            self._slot_freed()
            reason = getattr(exc, "reason", None)
            if reason == "connection_timeout":
                stats.upstream_cx_connect_timeout.inc()
            if reason is not None:
                stats.upstream_cx_connect_fail.inc()
                self.host.cx_connect_fail += 1
            raise
        stats.upstream_cx_active.inc()
        if self.alpn is not None:
            self.cluster.stats.counter("upstream_cx_http1_total").inc()
        self.host.cx_active += 1
        uc = UpstreamConnection(stream, self.host, self)
        uc.resources = resources
        return uc

    def adopt(self, stream: Any, resources: ResourceManager) -> None:
        """auto_config: a connection the HTTP/2 pool opened (its ``upstream_cx_total`` and
        connection slot already counted) on which ALPN chose HTTP/1.1."""
        self.cx_count += 1
        self.cluster.cluster_stats.upstream_cx_active.inc()
        self.cluster.stats.counter("upstream_cx_http1_total").inc()
        self.host.cx_active += 1
        uc = UpstreamConnection(stream, self.host, self)
        uc.resources = resources
        self._give(uc)

    # -- giving it back -------------------------------------------------------------------
    def release(self, uc: UpstreamConnection) -> None:
        """The exchange finished: keep the connection for the next request, or close it."""
        uc.requests += 1
        codec = uc.codec
        if self.max_requests is not None and uc.requests >= self.max_requests:
            self.cluster.stats.counter("upstream_cx_max_requests").inc()
            self._destroy(uc)
            return
        if not codec.reusable:
            self._destroy(uc)
            return
        if self.max_duration is not None and time.monotonic() - uc.created >= self.max_duration:
            self.cluster.cluster_stats.upstream_cx_max_duration_reached.inc()
            self._destroy(uc)
            return
        codec.start_next_cycle()
        self._give(uc)

    def put_back(self, uc: UpstreamConnection) -> None:
        """Return a connection that carried no request (the requests breaker refused it)."""
        self._give(uc)

    def _give(self, uc: UpstreamConnection) -> None:
        waiters = self.waiters
        if waiters:
            waiter = waiters.popleft()
            waiter.uc = uc
            waiter.event.set()
            return
        uc.idle_since = time.monotonic()
        self.idle.append(uc)
        if self._sweep is None and self.timers is not None and (
                self.idle_timeout is not None or self.max_duration is not None):
            self._arm_sweep(uc)

    def discard(self, uc: UpstreamConnection, *, remote: bool = False,
                active_rq: bool = False) -> None:
        """Close ``uc``: ``remote`` when the upstream closed or reset it, ``active_rq`` when
        a request was still in flight on it (Envoy's upstream_cx_destroy_* stats)."""
        uc.requests += 1
        self._destroy(uc, remote=remote, active_rq=active_rq)

    def _destroy(self, uc: UpstreamConnection, *, remote: bool = False,
                 active_rq: bool = False) -> None:
        uc.close()
        self.host.cx_active -= 1
        self.cx_count -= 1
        cluster = self.cluster
        (uc.resources or cluster.resources[0]).connections.dec()
        stats = cluster.cluster_stats
        stats.upstream_cx_active.dec()
        stats.upstream_cx_destroy.inc()
        if remote:
            stats.upstream_cx_destroy_remote.inc()
            if active_rq:
                stats.upstream_cx_destroy_remote_with_active_rq.inc()
        else:
            stats.upstream_cx_destroy_local.inc()
            if active_rq:
                stats.upstream_cx_destroy_local_with_active_rq.inc()
        if active_rq:
            stats.upstream_cx_destroy_with_active_rq.inc()
        self._slot_freed()

    def _slot_freed(self) -> None:
        """A connection of the cluster went away: a waiter may connect now."""
        if self.waiters:
            waiter = self.waiters.popleft()
            waiter.event.set()
            return
        if any(r.pending_requests.count for r in self.cluster.resources):
            for pool in self.cluster.pools.values():
                waiters = getattr(pool, "waiters", None)
                if waiters:
                    waiters.popleft().event.set()
                    return

    # -- idle sweep -----------------------------------------------------------------------
    def _arm_sweep(self, uc: UpstreamConnection) -> None:
        due = self._due(uc)
        if due is not None:
            self._sweep = self.timers.schedule(trio.current_time() + due, self._on_sweep)

    def _due(self, uc: UpstreamConnection) -> float | None:
        """Seconds from now until ``uc`` must close while idle."""
        now = time.monotonic()
        due = None
        if self.idle_timeout is not None:
            due = uc.idle_since + self.idle_timeout - now
        if self.max_duration is not None:
            d = uc.created + self.max_duration - now
            due = d if due is None else min(due, d)
        return None if due is None else max(due, 0.0)

    def _on_sweep(self) -> None:
        self._sweep = None
        now = time.monotonic()
        keep: list[UpstreamConnection] = []
        stats = self.cluster.cluster_stats
        for uc in self.idle:
            if self.idle_timeout is not None and now - uc.idle_since >= self.idle_timeout:
                stats.upstream_cx_idle_timeout.inc()
                self._destroy(uc)
            elif self.max_duration is not None and now - uc.created >= self.max_duration:
                stats.upstream_cx_max_duration_reached.inc()
                self._destroy(uc)
            else:
                keep.append(uc)
        self.idle = keep
        if keep:
            soonest = min(keep, key=lambda c: self._due(c) or 0.0)
            self._arm_sweep(soonest)


def pool_for(cluster: ThreadLocalCluster, host: Host, timers: Any = None) -> Http1ConnPool:
    key = (host.address, host.port)
    pool = cluster.pools.get(key)
    if pool is None:
        pool = cluster.pools[key] = Http1ConnPool(host, cluster, timers)
    return pool
