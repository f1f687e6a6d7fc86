"""HTTP/1.1 upstream connection pool: one request at a time per connection, kept alive.

One pool per (worker, cluster, host), stored in ``ThreadLocalCluster.pools`` keyed by the
host's address. Idle connections are reused newest first (LIFO keeps the working set small
and warm, and lets the oldest ones reach their idle timeout and close).

Theory of operation:
1. ``acquire`` pops an idle connection that is younger than the idle timeout and still
   open (a non-blocking ``MSG_PEEK`` tells EOF apart from "nothing to read" in one syscall),
   or connects a new one.
2. ``release`` returns a connection whose request and response both completed cleanly
   (h11 says DONE on both sides) and which has not reached max_requests_per_connection;
   anything else is closed (``discard``).
3. A reused connection can still race with the upstream closing it (its keep-alive timer
   firing as we write). The router retries such a request once on a fresh connection when
   no response byte arrived and the request could be replayed; that is why the idle
   timeout defaults below common upstream keep-alive timeouts (cluster_config).
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

import trio

from proxy.http.codec.h1_fast import Http1ClientCodec
from proxy.upstream.connect import connect_upstream, io_socket

if TYPE_CHECKING:
    from proxy.upstream.cluster_manager import ThreadLocalCluster
    from proxy.upstream.host import Host

_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT
# Upstreams close keep-alive connections on timers of seconds (nginx 75 s, Node 5 s) or
# announce it (Connection: close); a connection idle for less than this is not worth the
# peek syscall, and the router's one-shot replay covers the rare miss.
_TRUST_IDLE_S = 0.5


class UpstreamConnection:
    __slots__ = (
        "stream", "sock", "codec", "host", "requests", "idle_since", "reused", "pool",
        "_local_address", "ssl_info",
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
        self.reused = False
        self._local_address: str | None = None

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


class Http1ConnPool:
    __slots__ = ("host", "cluster", "idle", "idle_timeout", "max_requests", "connect_timeout")

    def __init__(self, host: Host, cluster: ThreadLocalCluster) -> None:
        cfg = cluster.config
        self.host = host
        self.cluster = cluster
        self.idle: list[UpstreamConnection] = []
        self.idle_timeout: float | None = cfg.idle_timeout
        self.max_requests: int | None = cfg.max_requests_per_connection
        self.connect_timeout: float = cfg.connect_timeout

    async def acquire(self) -> UpstreamConnection:
        """A ready connection; raises ``UpstreamConnectError`` when a new one cannot be made."""
        idle = self.idle
        if idle:
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
        return await self.connect()

    async def connect(self) -> UpstreamConnection:
        stats = self.cluster.cluster_stats
        stats.upstream_cx_total.inc()
        self.host.cx_total += 1
        try:
            stream = await connect_upstream(self.host, self.connect_timeout, cluster=self.cluster)
        except BaseException as exc:
            reason = getattr(exc, "reason", None)
            if reason == "connection_timeout":
                stats.upstream_cx_connect_timeout.inc()
            if reason is not None:
                stats.upstream_cx_connect_fail.inc()
                self.host.cx_connect_fail += 1
            raise
        stats.upstream_cx_active.inc()
        self.host.cx_active += 1
        return UpstreamConnection(stream, self.host, self)

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
        codec.start_next_cycle()
        uc.idle_since = time.monotonic()
        self.idle.append(uc)

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
        stats = self.cluster.cluster_stats
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


def pool_for(cluster: ThreadLocalCluster, host: Host) -> Http1ConnPool:
    key = (host.address, host.port)
    pool = cluster.pools.get(key)
    if pool is None:
        pool = cluster.pools[key] = Http1ConnPool(host, cluster)
    return pool
