"""Accept loop of one listener in one worker (Envoy's ActiveTcpListener).

Two nurseries per worker, as the drain agreement says: accept loops live in one, the
connections they start live in another, so a drain stops accepting at once while the
connections finish on their own deadline.
"""

from __future__ import annotations

import errno
import logging
import socket

import trio

from proxy.listener.active_tcp_socket import (
    ConnectionHandler,
    ListenerFilterManager,
    apply_accepted,
)
from proxy.listener.filter_chain_manager import ConnectionFacts
from proxy.listener.listener_config import ListenerConfig
from proxy.listener.listener_filter import AcceptedSocket
from proxy.network.connection import Connection
from proxy.server.worker_context import WorkerContext
from proxy.tls.ssl_socket import ListenerTlsStats, accept_tls

log = logging.getLogger("trioxy.listener")

# trio's serve_listeners backs off on these instead of dying; so do we.
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_BACKOFF_S = 0.1


class ActiveTcpListener:
    def __init__(self, config: ListenerConfig, sock: trio.socket.SocketType, worker: WorkerContext):
        self.config = config
        self.sock = sock
        self.worker = worker
        scope = worker.stats.scope(f"listener.{config.stat_prefix}.")
        self.cx_total = scope.counter("downstream_cx_total")
        self.cx_destroy = scope.counter("downstream_cx_destroy")
        self.cx_active = scope.gauge("downstream_cx_active")
        self.no_filter_chain_match = scope.counter("no_filter_chain_match")
        self.cx_overflow_errors = scope.counter("downstream_global_cx_overflow")
        self.tls_stats = ListenerTlsStats(scope)  # ssl.* and the handshake timeout (proxy.tls)
        # Listener filters and use_original_dst hand-off (proxy.listener.active_tcp_socket);
        # None without any: accepted sockets go straight to _serve.
        self.listener_filters = ListenerFilterManager(self) if config.listener_filters else None
        self.handler: ConnectionHandler | None = None  # the worker's listeners, for hand-off

    async def accept_loop(self, connections: trio.Nursery) -> None:
        """Accept until cancelled; each connection runs in ``connections``."""
        while True:
            try:
                raw, _ = await self.sock.accept()
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    self.cx_overflow_errors.inc()
                    log.warning("accept on %s: %s; backing off", self.config.address_string, exc)
                    await trio.sleep(_ACCEPT_BACKOFF_S)
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                if exc.errno == errno.EINVAL:  # shut down (admin /drain_listeners)
                    log.info("listener %s stopped", self.config.address_string)
                    return
                raise
            if self.listener_filters is None:
                connections.start_soon(self._serve, raw)
            else:
                connections.start_soon(self.listener_filters.serve, raw)

    async def _serve(self, raw: trio.socket.SocketType,
                     accepted: AcceptedSocket | None = None) -> None:
        """Serve a connection; ``accepted`` holds what listener filters learned, if any ran."""
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        stream = trio.SocketStream(raw)
        self.cx_total.inc()
        self.cx_active.inc()
        conn: Connection | None = None
        try:
            conn = Connection(stream, buffer_limit=self.config.per_connection_buffer_limit_bytes)
            if accepted is not None:
                apply_accepted(conn, accepted)
            facts = ConnectionFacts(
                destination_ip=conn.local_address[0],
                destination_port=conn.local_address[1],
                source_ip=conn.remote_address[0],
                source_port=conn.remote_address[1],
                server_name=conn.requested_server_name,
                transport_protocol=conn.transport_protocol,
                application_protocols=conn.application_protocols,
                direct_source_ip=None if accepted is None else accepted.direct_remote_address[0],
            )
            chain = self.config.filter_chains.find_filter_chain(facts)
            if chain is None:
                self.no_filter_chain_match.inc()
                return
            if chain.transport_socket is not None and not await accept_tls(
                    conn, chain, self.tls_stats):
                return
            await chain.terminal.serve_connection(conn, self.worker)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass
        except Exception:
            # One connection's bug must never stop the listener (FIELD-NOTES).
            log.exception("connection on %s failed", self.config.address_string)
        finally:
            self.cx_active.dec()
            self.cx_destroy.inc()
            with trio.CancelScope(shield=True):
                if conn is not None:
                    if not conn.closed:
                        await conn.aclose()
                else:
                    await stream.aclose()
