"""An accepted socket while its listener filters run (Envoy's ``ActiveTcpSocket``): trio shell.

Theory of operation
-------------------
1. A listener with listener filters (``use_original_dst: true`` adds ``original_dst``) hands
   each accepted socket to its ``ListenerFilterManager``; a listener without any goes straight
   to ``ActiveTcpListener._serve`` and pays nothing for this module.
2. The decisions are sans-IO (``proxy.listener.listener_filter``); this shell only peeks.
   Inspecting filters read with ``MSG_PEEK``: the bytes stay in the kernel, so whatever serves
   the connection next (a TLS handshake included) reads them as if nobody had looked. To wait
   for *more* bytes than are queued, ``SO_RCVLOWAT`` is raised to one more than what was
   peeked (readiness is level-triggered: with bytes queued the socket is always readable);
   a wake-up with nothing new is the peer's FIN (confirmed with ``TCP_INFO``). The PROXY
   protocol filter consumes its header (``drain``), as Envoy's does. ``SO_RCVLOWAT`` is
   reset to 1 before the connection is served.
3. ``listener_filters_timeout`` (default 15 s, 0 disables) bounds the filters of one listener.
   On expiry ``downstream_pre_cx_timeout`` counts; with ``continue_on_listener_filters_timeout``
   the connection goes on with what the filters learned, otherwise it is closed.
4. A peer that closes while the filters wait counts ``downstream_listener_filter_remote_close``;
   a socket error ``downstream_listener_filter_error``; a filter that rejects the connection
   (malformed PROXY header, ClientHello too large...) counts its own stats. All three close.
5. Then Envoy's ``newConnection``: with ``use_original_dst`` and a restored local address,
   the socket goes to the worker's listener of that address (``ConnectionHandler.find``: the
   exact address, else ``0.0.0.0`` / ``[::]`` with that port; ``bind_to_port: false``
   listeners included), which runs its own listener filters and never hands off again;
   otherwise (or when no listener has that address) this listener's filter chains serve it.
"""

from __future__ import annotations

import logging
import math
import socket
import struct
from typing import TYPE_CHECKING, Any

import trio

from proxy.listener.listener_filter import AcceptedSocket, Action, ListenerFilterChain
from proxy.network.connection import format_address

if TYPE_CHECKING:
    from proxy.listener.active_tcp_listener import ActiveTcpListener
    from proxy.network.connection import Connection
    from proxy.server.worker_context import WorkerContext

log = logging.getLogger("trioxy.listener")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
_SOL_IP = getattr(socket, "SOL_IP", 0)
_SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
_TCP_ESTABLISHED = 1  # tcp_info.tcpi_state

_DONE, _CLOSE, _REMOTE_CLOSE = "done", "close", "remote_close"


def original_destination(sock: socket.socket, local: tuple[str, int]) -> tuple[str, int] | None:
    """``SO_ORIGINAL_DST`` (``IP6T_SO_ORIGINAL_DST`` on IPv6): None when the kernel has none."""
    try:
        if ":" in local[0] and not (local[0].startswith("::ffff:") and "." in local[0]):
            raw = sock.getsockopt(_SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port = struct.unpack_from("!H", raw, 2)[0]
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
        raw = sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    except (OSError, ValueError, struct.error):
        return None


class PeekBuffer:
    """The bytes queued on the socket, peeked (``ListenerFilterBuffer``); see rule 2."""

    __slots__ = ("sock", "data", "_lowat")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""
        self._lowat = 1

    async def peek_more(self, max_bytes: int) -> bool:
        """Wait until more than ``len(data)`` bytes are queued; False when the peer closed."""
        sock = self.sock
        have = len(self.data)
        waited = False
        while True:
            try:
                got: bytes | None = sock.recv(max_bytes, socket.MSG_PEEK)
            except BlockingIOError:
                got = None
            if got is not None:
                if len(got) > have:
                    self.data = got
                    return True
                if not got:
                    return False  # FIN and nothing queued
                if waited and self._peer_closed():
                    return False  # FIN behind bytes that will never be completed
            if have + 1 != self._lowat:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, have + 1)
                self._lowat = have + 1
            await trio.lowlevel.wait_readable(sock)
            waited = True

    def _peer_closed(self) -> bool:
        try:
            return self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != _TCP_ESTABLISHED
        except OSError:
            return True

    def drain(self, n: int) -> bool:
        """Consume ``n`` bytes that were peeked (they are queued: no waiting)."""
        try:
            while n > 0:
                got = self.sock.recv(n)
                if not got:
                    return False
                n -= len(got)
                self.data = self.data[len(got):]
        except OSError:
            return False
        return True

    def reset(self) -> None:
        if self._lowat != 1:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            self._lowat = 1


class ListenerFilterManager:
    """One listener's listener filters in one worker, and its pre-connection stats."""

    def __init__(self, listener: ActiveTcpListener) -> None:
        self.listener = listener
        cfg = listener.config
        store = listener.worker.stats
        self.factories = tuple(f.bind(store) for f in cfg.listener_filters)
        self.timeout = cfg.listener_filters_timeout
        self.continue_on_timeout = cfg.continue_on_listener_filters_timeout
        scope = store.scope(f"listener.{cfg.stat_prefix}.")
        self.pre_cx_active = scope.gauge("downstream_pre_cx_active")
        self.pre_cx_timeout = scope.counter("downstream_pre_cx_timeout")
        self.remote_close = scope.counter("downstream_listener_filter_remote_close")
        self.filter_error = scope.counter("downstream_listener_filter_error")

    async def serve(self, raw: trio.socket.SocketType, accepted: AcceptedSocket | None = None,
                    hand_off: bool = True) -> None:
        """Run the filters on ``raw`` (accepted here, or handed off), then serve it."""
        listener = self.listener
        sock: socket.socket = raw._sock  # type: ignore[attr-defined]
        handed_on = False
        try:
            if accepted is None:
                try:
                    local = _address(sock.getsockname())
                    remote = _address(sock.getpeername())
                except OSError:
                    return  # the peer is already gone
                accepted = AcceptedSocket(
                    local, remote, lambda: original_destination(sock, local))
            outcome = await self._run_filters(accepted, PeekBuffer(sock))
            if outcome is not _DONE:
                if accepted.close_reason:
                    log.debug("listener %s: %s", listener.config.name, accepted.close_reason)
                return
            target: ActiveTcpListener = listener
            if hand_off and accepted.local_address_restored and listener.config.use_original_dst:
                found = listener.handler.find(accepted.local_address) if listener.handler else None
                if found is not None:
                    target = found
                    if found.listener_filters is not None:
                        handed_on = True
                        await found.listener_filters.serve(raw, accepted, hand_off=False)
                        return
            handed_on = True
            await target._serve(raw, accepted)
        finally:
            if not handed_on:
                raw.close()

    async def _run_filters(self, accepted: AcceptedSocket, buffer: PeekBuffer) -> str:
        chain = ListenerFilterChain([f.new_filter() for f in self.factories], accepted)
        self.pre_cx_active.inc()
        outcome = _CLOSE
        try:
            deadline = math.inf if self.timeout is None else trio.current_time() + self.timeout
            with trio.CancelScope(deadline=deadline) as listener_filters_timeout:
                action = chain.start()
                while action is Action.NEED_DATA:
                    if not chain.has_unseen(buffer) and not await buffer.peek_more(
                            chain.max_read_bytes):
                        self.remote_close.inc()
                        return _REMOTE_CLOSE
                    action = chain.on_data(buffer)
                outcome = _DONE if action is Action.DONE else _CLOSE
            if listener_filters_timeout.cancelled_caught:
                self.pre_cx_timeout.inc()
                outcome = _DONE if self.continue_on_timeout else _CLOSE
        except OSError:
            self.filter_error.inc()
            outcome = _CLOSE
        finally:
            self.pre_cx_active.dec()
        if outcome is _DONE:
            try:
                buffer.reset()
            except OSError:
                self.filter_error.inc()
                outcome = _CLOSE
        return outcome


def apply_accepted(conn: Connection, accepted: AcceptedSocket) -> None:
    """What the listener filters learned, onto the connection and its StreamInfo."""
    conn.local_address = accepted.local_address
    conn.remote_address = accepted.remote_address
    conn.requested_server_name = accepted.requested_server_name
    conn.transport_protocol = accepted.transport_protocol
    conn.application_protocols = accepted.requested_application_protocols
    info = conn.stream_info
    info.downstream_local_address = format_address(accepted.local_address)
    info.downstream_remote_address = format_address(accepted.remote_address)
    info.downstream_direct_remote_address = format_address(accepted.direct_remote_address)
    info.downstream_local_address_restored = accepted.local_address_restored
    if accepted.requested_server_name:
        info.requested_server_name = accepted.requested_server_name


class ConnectionHandler:
    """A worker's TCP listeners by address, for ``use_original_dst`` hand-off (Envoy's
    ``ConnectionHandlerImpl::getBalancedHandlerByAddress``)."""

    def __init__(self, listeners: list[ActiveTcpListener]) -> None:
        self.by_address = {al.config.address: al for al in listeners}

    def find(self, address: tuple[str, int]) -> ActiveTcpListener | None:
        hit = self.by_address.get(address)
        if hit is None:
            ip, port = address
            hit = self.by_address.get(("::" if ":" in ip else "0.0.0.0", port))
        return hit


def attach_connection_handler(listeners: list[ActiveTcpListener], unbound: Any,
                              worker: WorkerContext) -> ConnectionHandler:
    """Give a worker's listeners, and its ``bind_to_port: false`` ones, a shared handler."""
    from proxy.listener.active_tcp_listener import ActiveTcpListener

    extra = [ActiveTcpListener(lc, None, worker) for lc in unbound]
    handler = ConnectionHandler([*listeners, *extra])
    for al in (*listeners, *extra):
        al.handler = handler
    return handler


def _address(addr: Any) -> tuple[str, int]:
    return str(addr[0]), int(addr[1])
