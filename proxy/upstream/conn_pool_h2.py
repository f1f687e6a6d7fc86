"""HTTP/2 upstream connection pool: multiplexed connections, per worker, cluster and host.

The router asks ``Http2ConnPool.new_stream(headers, end_stream)`` for an
``H2UpstreamStream`` and reads its events (``next_event``) as it reads an HTTP/1.1 codec's;
the connection under it is shared by every stream the pool puts on it.

Theory of operation:
1. One connection carries up to ``min(max_concurrent_streams, the server's
   SETTINGS_MAX_CONCURRENT_STREAMS)`` streams. A stream goes on the newest connection with
   room; when none has room a new connection is opened, as Envoy's pool does (it has no
   queue of its own: a connection being established takes the streams that arrive
   meanwhile, up to its assumed capacity, so a burst opens one connection, not one each).
2. A connection's reader and writer are trio *system* tasks: the connection outlives
   the streams (and the request tasks) that use it, and the worker owns no nursery the
   pool could borrow. They catch everything, so a failing connection only fails its
   streams. Connecting happens there too: a waiter cancelled mid-connect (its client went
   away) does not fail the other waiters.
3. Flow control mirrors the downstream side: response DATA is acknowledged (the window
   reopened) only once the router has passed it downstream (``acknowledge``), so a slow
   client stops the upstream after one window; request DATA is queued and the router
   waits (``wait_framed``) while more than ``HIGH_WATERMARK`` is unframed.
4. GOAWAY from the upstream: the connection takes no new stream (the next one opens a
   new connection); streams above its last stream id were never processed and get a
   ``StreamReset`` with REFUSED_STREAM (the router may replay them); the others finish,
   then the connection closes. EOF or a protocol error resets every stream still on it.
5. A stream the router abandons is reset with NO_ERROR (Envoy's LocalReset). An idle
   connection (no stream) closes after the cluster's idle_timeout; max_requests_per_connection
   drains it after that many streams.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import trio

from proxy.http.codec.events import CodecError, Data, GoAway, LocalProtocolError, StreamReset
from proxy.http.codec.h2 import NO_ERROR, REFUSED_STREAM, Http2ClientCodec, Http2Options
from proxy.network import fast_io
from proxy.upstream.conn_pool import UpstreamOverflow
from proxy.upstream.connect import (
    UpstreamConnectError,
    connect_upstream,
    io_socket,
    negotiated_protocol,
)

if TYPE_CHECKING:
    from proxy.http.headers import HeaderMap
    from proxy.upstream.cluster_manager import ThreadLocalCluster
    from proxy.upstream.host import Host

log = logging.getLogger("trioxy.upstream.h2")

_RECV = 65536
HIGH_WATERMARK = 64 * 1024
_WRITE_BUDGET = 256 * 1024

# Reset reasons (Envoy's StreamResetReason) carried to the router.
CONNECTION_TERMINATION = "connection_termination"
REMOTE_RESET = "remote_reset"
REMOTE_REFUSED_STREAM_RESET = "remote_refused_stream_reset"
PROTOCOL_ERROR = "protocol_error"

# auto_config (Envoy's mixed pool): what a TLS context without alpn_protocols offers.
AUTO_ALPN = ("h2", "http/1.1")


class UseHttp1(UpstreamConnectError):
    """auto_config: the host did not negotiate h2; its connection went to the HTTP/1.1 pool
    (``learned_protocol`` now says "http1") and the request should follow it there."""


def learned_protocol(cluster: ThreadLocalCluster, host: Host) -> str | None:
    """auto_config: what ALPN chose on the host's last connection ("http2" / "http1"),
    None before its first (Envoy caches the protocol per host the same way)."""
    return cluster.pools.get(("alpn", host.address, host.port))  # type: ignore[no-any-return]


class UpstreamStreamReset(Exception):
    """The upstream stream ended without a complete response; ``reason`` is Envoy's."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class H2UpstreamStream:
    """One request/response on a multiplexed upstream connection."""

    __slots__ = ("uc", "stream_id", "events", "_event", "reset", "closed", "bytes_received")

    def __init__(self, uc: H2UpstreamConnection, stream_id: int) -> None:
        self.uc = uc
        self.stream_id = stream_id
        self.events: deque[Any] = deque()
        self._event: trio.Event | None = None
        self.reset: UpstreamStreamReset | None = None  # set when the stream failed
        self.closed = False  # released or reset: no longer on the connection
        self.bytes_received = 0

    @property
    def local_address(self) -> str:
        return self.uc.local_address

    @property
    def ssl_info(self) -> Any:
        return self.uc.ssl_info

    # -- from the connection --------------------------------------------------------------
    def _push(self, ev: Any) -> None:
        self.events.append(ev)
        if self._event is not None:
            self._event.set()

    def _fail(self, reset: UpstreamStreamReset) -> None:
        if self.reset is None:
            self.reset = reset
        if self._event is not None:
            self._event.set()

    # -- for the router -------------------------------------------------------------------
    async def next_event(self) -> Any:
        """The next response event; raises ``UpstreamStreamReset`` when the stream failed."""
        while not self.events:
            if self.reset is not None:
                raise self.reset
            ev = self._event = trio.Event()
            try:
                await ev.wait()
            finally:
                self._event = None
        ev = self.events.popleft()
        if type(ev) is Data:
            self.bytes_received += len(ev.data)
        return ev

    def wake(self) -> None:
        """Wake ``next_event`` (a timer fired): it returns None once."""
        self.events.append(None)
        if self._event is not None:
            self._event.set()

    def acknowledge(self, n: int) -> None:
        """``n`` response bytes went downstream: let the upstream send as much again."""
        uc = self.uc
        if not uc.closed:
            uc.codec.acknowledge(self.stream_id, n)
            uc.wake()

    def send_data(self, data: bytes, end_stream: bool) -> None:
        if self.closed or self.uc.closed:
            return
        self.uc.codec.send_data(self.stream_id, data, end_stream)
        self.uc.wake()

    def send_trailers(self, trailers: HeaderMap) -> None:
        if self.closed or self.uc.closed:
            return
        self.uc.codec.send_trailers(self.stream_id, trailers)
        self.uc.wake()

    async def wait_framed(self) -> None:
        """Until the request bytes queued are mostly framed (back-pressure on the client)."""
        await self.uc.wait_framed(self.stream_id, HIGH_WATERMARK)

    def release(self) -> None:
        """The exchange finished cleanly."""
        if not self.closed:
            self.closed = True
            self.uc.stream_closed(self)

    def reset_stream(self) -> None:
        """Abandon the stream (RST_STREAM NO_ERROR, Envoy's LocalReset)."""
        if not self.closed:
            self.closed = True
            uc = self.uc
            if not uc.closed:
                uc.codec.reset_stream(self.stream_id, NO_ERROR)
                uc.wake()
            uc.stream_closed(self, reset=True)


class H2UpstreamConnection:
    """One multiplexed upstream connection and its reader and writer."""

    def __init__(self, pool: Http2ConnPool) -> None:
        self.pool = pool
        self.host = pool.host
        cfg = pool.cluster.config
        self.codec = Http2ClientCodec(pool.options)
        self.stream: Any = None
        self.sock: Any = None
        self.streams: dict[int, H2UpstreamStream] = {}
        # Connected and the server's SETTINGS known (its stream limit), or failed (``error``).
        self.ready = trio.Event()
        self.error: UpstreamConnectError | None = None
        self.draining = False  # GOAWAY received, or max requests reached: no new streams
        self.closed = False
        self.remote_close = False
        self.started = 0
        self.max_requests: int | None = cfg.max_requests_per_connection
        self.local_address = "-"
        self.ssl_info: Any = None
        self._wake = trio.Event()
        self._done = trio.Event()
        self._waiters: dict[int, tuple[int, trio.Event]] = {}
        self._idle_timer: Any = None
        self._settings_event: trio.Event | None = None
        self.resources: Any = None  # the ResourceManager its connection slot is counted in

    # -- capacity -------------------------------------------------------------------------
    def capacity(self) -> int:
        if self.draining or self.closed or self.error is not None:
            return 0
        limit = self.pool.options.max_concurrent_streams
        if self.ready.is_set():
            limit = min(limit, self.codec.peer_max_concurrent_streams)
        if self.max_requests is not None:
            limit = min(limit, self.max_requests - self.started + len(self.streams))
        return limit - len(self.streams)

    # -- lifetime (a system task) ---------------------------------------------------------
    async def run(self) -> None:
        pool = self.pool
        try:
            try:
                self.stream = await connect_upstream(
                    self.host, pool.connect_timeout, cluster=pool.cluster, alpn_protocols=pool.alpn)
            except UpstreamConnectError as exc:
                self.error = exc
                pool.on_connect_failed(self, exc)
                self.ready.set()
                return
            if pool.alpn is not None and not pool.on_alpn(self):
                return  # HTTP/1.1: handed to that pool
            self.sock = io_socket(self.stream)
            self.ssl_info = getattr(self.stream, "info", None)
            try:
                host, port = self.stream.socket.getsockname()[:2]
                self.local_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            except (OSError, AttributeError):
                pass
            pool.on_connected(self)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                nursery.start_soon(self._reader)
                self.wake()
                # Streams wait for the server's SETTINGS (one round trip, once per
                # connection): a stream over its limit would be refused or, with some
                # servers, end the connection.
                with trio.move_on_after(pool.connect_timeout):
                    while not self.codec.settings_received and not self.closed:
                        self._settings_event = trio.Event()
                        await self._settings_event.wait()
                self.ready.set()
                await self._done.wait()
                nursery.cancel_scope.cancel()
        except Exception:  # a bug here must not take the worker down (system task)
            log.exception("HTTP/2 upstream connection to %s failed", self.host.address_string)
        finally:
            self._shutdown(CONNECTION_TERMINATION)
            if self.stream is not None:
                try:
                    self.stream.socket.close()
                except (OSError, AttributeError):
                    pass

    def close(self) -> None:
        """Close once the last frames are out (idle, or drained and empty)."""
        self._done.set()

    def _shutdown(self, reason: str, detail: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self.ready.set()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        active = [s for s in self.streams.values() if not s.closed]
        for st in active:
            st._fail(UpstreamStreamReset(reason, detail))
        for _, ev in self._waiters.values():
            ev.set()
        self._waiters.clear()
        if self._settings_event is not None:
            self._settings_event.set()
        self._done.set()
        if self.error is None:
            self.pool.on_closed(self, remote=self.remote_close, active_rq=bool(active))

    async def _reader(self) -> None:
        codec = self.codec
        while True:
            try:
                data = await fast_io.receive_some(self.sock, _RECV)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                self.remote_close = True
                self._shutdown(CONNECTION_TERMINATION)
                return
            self.pool.cluster.cluster_stats.upstream_cx_rx_bytes_total.inc(len(data))
            codec.receive_data(data)
            if self._settings_event is not None and codec.settings_received:
                self._settings_event.set()
            try:
                self._dispatch()
            except CodecError as exc:
                self._shutdown(PROTOCOL_ERROR, str(exc))
                return
            self.wake()

    def _dispatch(self) -> None:
        codec = self.codec
        streams = self.streams
        while True:
            ev = codec.next_event()
            if ev is None:
                return
            t = type(ev)
            if t is StreamReset:
                st = streams.get(ev.stream_id)
                if st is not None:
                    if ev.remote:
                        reason = (REMOTE_REFUSED_STREAM_RESET if ev.error_code == REFUSED_STREAM
                                  else REMOTE_RESET)
                    else:
                        reason = PROTOCOL_ERROR
                    st._fail(UpstreamStreamReset(reason))
            elif t is GoAway:
                self.draining = True
                self.pool.stats_goaway.inc()
                for sid, st in list(streams.items()):
                    if sid > ev.last_stream_id:
                        # Never processed: safe to replay elsewhere (Envoy: refused stream).
                        st._fail(UpstreamStreamReset(REMOTE_REFUSED_STREAM_RESET, "goaway"))
                if not streams:
                    self.close()
            else:
                st = streams.get(ev.stream_id)
                if st is None:
                    if t is Data:
                        codec.acknowledge(ev.stream_id, len(ev.data))
                    continue
                st._push(ev)

    async def _writer(self) -> None:
        codec = self.codec
        stats = self.pool.cluster.cluster_stats
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while True:
                    codec.pump(_WRITE_BUDGET)
                    if self._waiters:
                        self._notify_waiters()
                    data = codec.data_to_send()
                    if not data:
                        break
                    stats.upstream_cx_tx_bytes_total.inc(len(data))
                    await fast_io.send_all(self.sock, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.remote_close = True
            self._shutdown(CONNECTION_TERMINATION)

    def wake(self) -> None:
        self._wake.set()

    def _notify_waiters(self) -> None:
        codec = self.codec
        for sid, (limit, ev) in list(self._waiters.items()):
            if codec.pending(sid) <= limit:
                del self._waiters[sid]
                ev.set()

    async def wait_framed(self, stream_id: int, limit: int) -> None:
        codec = self.codec
        while codec.pending(stream_id) > limit and not self.closed:
            ev = trio.Event()
            self._waiters[stream_id] = (limit, ev)
            self.wake()
            await ev.wait()

    # -- streams --------------------------------------------------------------------------
    def open_stream(self, headers: HeaderMap, end_stream: bool) -> H2UpstreamStream:
        sid = self.codec.start_request(headers, end_stream)  # LocalProtocolError: no room
        st = H2UpstreamStream(self, sid)
        self.streams[sid] = st
        self.started += 1
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self.max_requests is not None and self.started >= self.max_requests:
            self.draining = True
            self.pool.cluster.stats.counter("upstream_cx_max_requests").inc()
        self.wake()
        return st

    def stream_closed(self, st: H2UpstreamStream, reset: bool = False) -> None:
        self.streams.pop(st.stream_id, None)
        if self.pool._room is not None:
            self.pool._has_room()
        self._waiters.pop(st.stream_id, None)
        # Response bytes the router never consumed still hold the connection window.
        unread = sum(len(ev.data) for ev in st.events if type(ev) is Data)
        st.events.clear()
        if unread and not self.closed:
            self.codec.acknowledge(st.stream_id, unread)
            self.wake()
        if self.closed or self.streams:
            return
        if self.draining:
            self.close()
            return
        timeout = self.pool.idle_timeout
        if timeout is not None:
            self._idle_timer = self.pool.timers.call_later(timeout, self._on_idle)

    def _on_idle(self) -> None:
        self._idle_timer = None
        if not self.streams and not self.closed:
            self.close()


class Http2ConnPool:
    """The HTTP/2 connections of one (worker, cluster, host)."""

    def __init__(self, host: Host, cluster: ThreadLocalCluster, timers: Any) -> None:
        cfg = cluster.config
        self.host = host
        self.cluster = cluster
        self.timers = timers
        self.options: Http2Options = cfg.http2_options or Http2Options()
        self.idle_timeout: float | None = cfg.idle_timeout
        self.connect_timeout: float = cfg.connect_timeout
        # auto_config: offer h2 and http/1.1 (the TLS context's own list if it has one);
        # the first connection's ALPN result decides this host's protocol.
        self.alpn: tuple[str, ...] | None = None
        if cfg.upstream_protocol == "auto":
            self.alpn = tuple(getattr(cfg.transport_socket, "alpn_protocols", ())) or AUTO_ALPN
        self.conns: list[H2UpstreamConnection] = []
        self.stats_cx_http2_total = cluster.stats.counter("upstream_cx_http2_total")
        self._room: trio.Event | None = None  # set when streams waiting for room may retry
        self.stats_goaway = cluster.stats.counter("upstream_cx_close_notify")

    async def new_stream(self, headers: HeaderMap, end_stream: bool,
                         resources: Any = None) -> H2UpstreamStream:
        """A stream with ``headers`` sent; raises ``UpstreamConnectError`` when no
        connection can be made and ``UpstreamOverflow`` when a circuit breaker refuses.

        Circuit breakers as Envoy's pool: a stream with no ready connection to go on is
        pending (``max_pending_requests``); a new connection needs a ``max_connections``
        slot unless the host has none at all (else ``upstream_cx_overflow`` and the stream
        waits for room); opening the stream needs a ``max_requests`` slot (the router
        takes it once the stream is open).
        """
        if resources is None:
            resources = self.cluster.resources[0]
        stats = self.cluster.cluster_stats
        pending = None
        try:
            for _ in range(64):
                uc = self._pick()
                if uc is None or not uc.ready.is_set():
                    if pending is None:
                        if not resources.pending_requests.can_create():
                            stats.upstream_rq_pending_overflow.inc()
                            raise UpstreamOverflow
                        pending = resources.pending_requests
                        pending.inc()
                        stats.upstream_rq_pending_total.inc()
                        stats.upstream_rq_pending_active.inc()
                    if uc is None:
                        can_connect = resources.connections.can_create()
                        if not can_connect:
                            stats.upstream_cx_overflow.inc()
                        if not can_connect and self.conns:
                            room = self._room = self._room or trio.Event()
                            await room.wait()
                            continue
                        uc = self._connect(resources)
                    await uc.ready.wait()
                if uc.error is not None:
                    raise uc.error
                if uc.closed or uc.capacity() <= 0:
                    continue
                if not resources.requests.can_create():
                    stats.upstream_rq_pending_overflow.inc()  # Envoy's max streams overflow
                    raise UpstreamOverflow
                try:
                    return uc.open_stream(headers, end_stream)
                except LocalProtocolError:
                    # The server lowered its limit: this connection is full after all.
                    uc.draining = uc.draining or not uc.streams
                    continue
            raise UpstreamConnectError("connection_failure", "no HTTP/2 connection with room")
        finally:
            if pending is not None:
                pending.dec()
                stats.upstream_rq_pending_active.dec()

    def _has_room(self) -> None:
        """A stream or a connection ended: streams waiting for room try again."""
        room, self._room = self._room, None
        if room is not None:
            room.set()

    def _pick(self) -> H2UpstreamConnection | None:
        for uc in reversed(self.conns):
            if uc.capacity() > 0:
                return uc
        return None

    def _connect(self, resources: Any) -> H2UpstreamConnection:
        uc = H2UpstreamConnection(self)
        uc.resources = resources
        resources.connections.inc()
        self.conns.append(uc)
        stats = self.cluster.cluster_stats
        stats.upstream_cx_total.inc()
        if self.alpn is None:
            self.stats_cx_http2_total.inc()  # auto_config: once ALPN said h2 (on_alpn)
        self.host.cx_total += 1
        trio.lowlevel.spawn_system_task(uc.run, name=f"h2 upstream {self.host.address_string}")
        return uc

    # -- connection events ----------------------------------------------------------------
    def on_alpn(self, uc: H2UpstreamConnection) -> bool:
        """auto_config: True when the upstream chose h2; otherwise (http/1.1, or no ALPN:
        Envoy falls back to HTTP/1.1) the connected stream, with its connection slot, goes
        to the host's HTTP/1.1 pool and the streams waiting on ``uc`` get ``UseHttp1``."""
        cluster = self.cluster
        key = ("alpn", self.host.address, self.host.port)
        if negotiated_protocol(uc.stream) == "h2":
            cluster.pools[key] = "http2"
            self.stats_cx_http2_total.inc()
            return True
        from proxy.upstream.conn_pool import pool_for

        cluster.pools[key] = "http1"
        if uc in self.conns:
            self.conns.remove(uc)
        stream, uc.stream = uc.stream, None
        pool_for(cluster, self.host, self.timers).adopt(stream, uc.resources)
        uc.error = UseHttp1("connection_failure", "ALPN chose http/1.1", tls=False)
        uc.ready.set()
        self._has_room()
        return False

    def on_connected(self, uc: H2UpstreamConnection) -> None:
        self.cluster.cluster_stats.upstream_cx_active.inc()
        self.host.cx_active += 1

    def on_connect_failed(self, uc: H2UpstreamConnection, exc: UpstreamConnectError) -> None:
        stats = self.cluster.cluster_stats
        if exc.reason == "connection_timeout":
            stats.upstream_cx_connect_timeout.inc()
        stats.upstream_cx_connect_fail.inc()
        self.host.cx_connect_fail += 1
        if uc in self.conns:
            self.conns.remove(uc)
        uc.resources.connections.dec()
        self._has_room()

    def on_closed(self, uc: H2UpstreamConnection, *, remote: bool, active_rq: bool) -> None:
        if uc in self.conns:
            self.conns.remove(uc)
        uc.resources.connections.dec()
        self._has_room()
        stats = self.cluster.cluster_stats
        self.host.cx_active -= 1
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


def h2_pool_for(cluster: ThreadLocalCluster, host: Host, timers: Any) -> Http2ConnPool:
    key = ("h2", host.address, host.port)
    pool = cluster.pools.get(key)
    if pool is None:
        pool = cluster.pools[key] = Http2ConnPool(host, cluster, timers)
    return pool


__all__ = [
    "AUTO_ALPN",
    "CONNECTION_TERMINATION",
    "PROTOCOL_ERROR",
    "REMOTE_REFUSED_STREAM_RESET",
    "REMOTE_RESET",
    "H2UpstreamConnection",
    "H2UpstreamStream",
    "Http2ConnPool",
    "UpstreamStreamReset",
    "UseHttp1",
    "h2_pool_for",
    "learned_protocol",
]
