"""A downstream connection as network filters see it (Envoy's ``Network::Connection``).

It wraps the accepted trio stream with the facts filter-chain matching and access logs
need, and replays bytes that listener filters peeked at before the chain was chosen.
"""

from __future__ import annotations

import itertools
import socket
from typing import Any

import trio

from proxy.network import fast_io
from proxy.stream_info import StreamInfo

_ids = itertools.count(1)

DEFAULT_BUFFER_LIMIT = 1024 * 1024  # Envoy's per_connection_buffer_limit_bytes default


def _sockaddr(addr: Any) -> tuple[str, int]:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(addr[0]), int(addr[1])
    return (str(addr), 0)


def format_address(addr: tuple[str, int]) -> str:
    host, port = addr
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class Connection:
    """One accepted downstream connection."""

    __slots__ = (
        "stream",
        "socket",
        "raw",
        "id",
        "local_address",
        "remote_address",
        "requested_server_name",
        "transport_protocol",
        "application_protocols",
        "buffer_limit",
        "stream_info",
        "negotiated_protocol",
        "_prebuffer",
        "_closed",
    )
    # True once start_tls() has run (the instance is then a TlsConnection).
    tls = False

    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        connection_id: int | None = None,
    ) -> None:
        self.stream = stream
        self.socket = stream.socket
        # The stdlib socket under trio's, for proxy.network.fast_io on the request path.
        self.raw: socket.socket = stream.socket._sock  # type: ignore[attr-defined]
        self.id = connection_id if connection_id is not None else next(_ids)
        self.local_address = _sockaddr(self.socket.getsockname())
        try:
            self.remote_address = _sockaddr(self.socket.getpeername())
        except OSError:
            self.remote_address = ("0.0.0.0", 0)
        self.requested_server_name: str | None = None
        self.transport_protocol = "raw_buffer"
        self.application_protocols: tuple[str, ...] = ()
        self.buffer_limit = buffer_limit
        self.stream_info = StreamInfo(
            downstream_local_address=format_address(self.local_address),
            downstream_remote_address=format_address(self.remote_address),
            downstream_direct_remote_address=format_address(self.remote_address),
            connection_id=self.id,
        )
        # The ALPN protocol the TLS handshake chose ("h2", "http/1.1"); None for plaintext
        # or when the client offered none we accept.
        self.negotiated_protocol: str | None = None
        self._prebuffer = b""
        self._closed = False

    def unread(self, data: bytes) -> None:
        """Give back bytes a listener filter peeked at; the next receive returns them first."""
        self._prebuffer = data + self._prebuffer

    async def receive_some(self, max_bytes: int = 65536, wait_first: bool = False) -> bytes:
        if self._prebuffer:
            data, self._prebuffer = self._prebuffer, b""
            return data
        return await fast_io.receive_some(self.raw, max_bytes, wait_first)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await fast_io.send_all(self.raw, data)

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def start_tls(self, context: Any, stats: Any = None) -> None:
        """Run the server TLS handshake with ``context`` (a ``proxy.tls.context.TlsContext``).

        On success the connection reads and writes through TLS from then on (same API;
        ``tls`` is True, ``negotiated_protocol`` and ``stream_info.downstream_ssl`` are set,
        the SNI fills ``requested_server_name`` unless a listener filter set it); on failure
        it raises ``proxy.tls.ssl_socket.TlsHandshakeError`` (or trio's errors) and the
        caller closes it. The caller bounds it with a deadline.
        """
        from proxy.tls.ssl_socket import TlsSocket, TlsStream, handshake

        tls = TlsSocket(self.raw, context, server_side=True, initial=self._prebuffer)
        self._prebuffer = b""
        info = await handshake(tls, stats)
        self.raw = tls  # type: ignore[assignment]  (socket-like: what fast_io reads and writes)
        self.stream = TlsStream(self.stream, tls, info)  # type: ignore[assignment]
        self.negotiated_protocol = info.alpn
        if info.sni and not self.requested_server_name:
            self.requested_server_name = info.sni
        if info.sni and not self.stream_info.requested_server_name:
            self.stream_info.requested_server_name = info.sni
        self.stream_info.downstream_ssl = info
        # Plaintext OpenSSL holds is invisible to readiness waits: from now on, reads must
        # not wait first (TlsConnection.receive_some). Swapping the class keeps that check off
        # the plaintext path.
        self.__class__ = TlsConnection

    def fileno(self) -> int:
        return self.socket.fileno()

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self.stream.aclose()

    def abort(self) -> None:
        """Close with RST (SO_LINGER 0), as Envoy does on a protocol error reset."""
        if self._closed:
            return
        self._closed = True
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
        self.socket.close()


class TlsConnection(Connection):
    """A ``Connection`` after ``start_tls``: ``raw`` is a ``proxy.tls.ssl_socket.TlsSocket``."""

    __slots__ = ()
    tls = True

    async def receive_some(self, max_bytes: int = 65536, wait_first: bool = False) -> bytes:
        # wait_first is ignored: a record already read may hold more than was asked for.
        if self._prebuffer:
            data, self._prebuffer = self._prebuffer, b""
            return data
        return await fast_io.receive_some(self.raw, max_bytes)
