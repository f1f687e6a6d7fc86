"""TLS over a connected socket: the handshake, and the socket calls the request path makes.

Theory of operation
-------------------
1. ``TlsSocket`` wraps one non-blocking stdlib socket with an ``ssl.SSLObject`` over two
   ``MemoryBIO``s: OpenSSL never touches the socket. Ciphertext moves with plain ``recv`` /
   ``send`` syscalls, and waits are trio's ``wait_readable`` / ``wait_writable``, exactly as
   for plaintext (``proxy.network.fast_io``).
2. ``TlsSocket`` speaks the non-blocking socket contract ``fast_io`` relies on, so the request
   path (``fast_io.receive_some(sock)`` / ``fast_io.send_all(sock)``) runs unchanged over TLS:
   ``recv(n)`` returns plaintext, ``b""`` at the end (a ``close_notify`` and a bare TCP FIN
   alike, as Envoy), or raises ``BlockingIOError`` when it needs ciphertext the kernel does not
   have yet; ``send(data)`` returns how many plaintext bytes it took.
3. The one twist is ``send``: it encrypts before it knows whether the kernel takes the
   ciphertext. What the kernel refused waits in a backlog and ``send`` raises
   ``BlockingIOError``; once the backlog is out, the next ``send`` (with the same bytes, as
   ``fast_io.send_all`` retries) reports them as sent. So one writer at a time, as for any
   stream.
4. Reads can produce ciphertext (TLS 1.3 key updates): it is sent at once, or queued after
   the backlog, in order.
5. Plaintext OpenSSL already holds is invisible to readiness: never wait for readability
   before ``recv`` on a ``TlsSocket`` (``TlsConnection`` ignores ``wait_first``).
6. ``close`` sends ``close_notify`` when the handshake completed (best effort, never blocks),
   as Envoy does; ``TlsStream.send_eof`` sends ``close_notify`` and shuts down the TCP write
   side. TLS 1.3 (and OpenSSL with TLS 1.2) keep reading after it, so half-close works.
7. ``handshake`` runs the handshake and Envoy's post-handshake checks (``CertValidator``),
   counts Envoy's ``ssl.*`` stats and returns the ``SslConnectionInfo``; a failure raises
   ``TlsHandshakeError`` whose ``reason`` is Envoy's transport failure reason shape:
   ``TLS_error:|SSL routines:CERTIFICATE_VERIFY_FAILED:<detail>:TLS_error_end`` (Envoy also
   prints OpenSSL's packed error number, which Python's ``ssl`` does not expose).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import ssl
from collections.abc import Iterable
from typing import Any

import trio

from proxy.network import fast_io
from proxy.tls.connection_info import SslConnectionInfo
from proxy.tls.context import TlsContext

log = logging.getLogger("trioxy.tls")

__all__ = [
    "SSL_STATS",
    "ListenerTlsStats",
    "SslStats",
    "TlsHandshakeError",
    "TlsSocket",
    "TlsStream",
    "accept_tls",
    "client_handshake",
    "handshake",
]

_RECV_SIZE = 256 * 1024  # ciphertext per raw read
_WANT_READ = ssl.SSLWantReadError
_EOF_ERRORS = (ssl.SSLZeroReturnError, ssl.SSLEOFError)

# Envoy's ALL_SSL_STATS counters we can tell apart (OCSP stapling and key-usage ones aside).
SSL_STATS = ("connection_error", "handshake", "session_reused", "no_certificate",
             "fail_verify_no_cert", "fail_verify_error", "fail_verify_san", "fail_verify_cert_hash")


class SslStats:
    """``<scope>ssl.*``: a listener's (``listener.<addr>.ssl.``) or a cluster's."""

    __slots__ = ("scope", *SSL_STATS)

    def __init__(self, scope: Any) -> None:
        self.scope = scope
        for name in SSL_STATS:
            setattr(self, name, scope.counter(f"ssl.{name}"))

    def count(self, name: str) -> None:
        getattr(self, name).inc()

    def on_handshake(self, info: SslConnectionInfo, server: bool) -> None:
        self.handshake.inc()  # type: ignore[attr-defined]
        if info.session_reused:
            self.session_reused.inc()  # type: ignore[attr-defined]
        self.scope.counter(f"ssl.ciphers.{info.cipher}").inc()
        self.scope.counter(f"ssl.versions.{info.tls_version}").inc()
        if info.peer_der is None:
            self.no_certificate.inc()  # type: ignore[attr-defined]


class TlsHandshakeError(Exception):
    """The handshake or the peer checks failed; ``reason`` is Envoy's failure reason text."""

    def __init__(self, reason: str, stat: str | None = None) -> None:
        self.reason = reason
        self.stat = stat  # the ssl.* counter it was counted in, if any
        super().__init__(reason)


def failure_reason(exc: ssl.SSLError) -> str:
    lib = getattr(exc, "library", None)
    reason = getattr(exc, "reason", None)
    if reason is None:
        return f"TLS_error:|{exc.strerror or exc}:TLS_error_end"
    text = f"TLS_error:|{lib} routines:{reason}" if lib else f"TLS_error:|{reason}"
    verify = getattr(exc, "verify_message", None)
    if verify:
        text += f":verify cert failed: X509_verify_cert: certificate verification error: {verify}"
    return text + ":TLS_error_end"


def _stat_for(exc: ssl.SSLError) -> str | None:
    if isinstance(exc, ssl.SSLEOFError):
        return None  # the peer went away: Envoy counts nothing (SSL_ERROR_SYSCALL, empty queue)
    reason = getattr(exc, "reason", None)
    if isinstance(exc, ssl.SSLCertVerificationError) or reason == "CERTIFICATE_VERIFY_FAILED":
        return "fail_verify_error"
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "fail_verify_no_cert"
    return "connection_error"


class TlsSocket:
    """A TLS connection over a connected non-blocking socket, with socket-like calls (rules 2-6)."""

    __slots__ = ("raw", "server_side", "_obj", "_in", "_out", "_backlog", "_unconfirmed",
                 "_peeked", "handshake_done", "_closed", "_eof_sent", "context", "_ssl_context")

    def __init__(self, raw: socket.socket, context: TlsContext, *, server_side: bool,
                 ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 initial: bytes = b"") -> None:
        self.raw = raw
        self.server_side = server_side
        self.context = context
        self._ssl_context = ssl_context or context.ssl_context
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        session = None if server_side else context.session_for(self._ssl_context)
        self._obj = self._ssl_context.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname,
            session=session)
        if initial:  # bytes a listener filter read before the chain was chosen
            self._in.write(initial)
        self._backlog = b""  # ciphertext the kernel has not taken yet (rule 3)
        self._unconfirmed = 0  # plaintext bytes in the backlog not yet reported as sent
        self._peeked = b""
        self.handshake_done = False
        self._closed = False
        self._eof_sent = False

    # -- socket-like ---------------------------------------------------------------------
    def fileno(self) -> int:
        return self.raw.fileno()

    def getsockname(self) -> Any:
        return self.raw.getsockname()

    def getpeername(self) -> Any:
        return self.raw.getpeername()

    def setsockopt(self, *args: Any) -> None:
        self.raw.setsockopt(*args)

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._obj

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Plaintext, ``b""`` at the end, or ``BlockingIOError`` (rule 2)."""
        if flags:
            return self._peek()
        if self._peeked:
            data, self._peeked = self._peeked[:bufsize], self._peeked[bufsize:]
            return data
        obj = self._obj
        while True:
            try:
                data = obj.read(bufsize)
                break
            except _WANT_READ:
                if self._out.pending:
                    self._push_out()
                chunk = self.raw.recv(_RECV_SIZE)  # BlockingIOError: the caller waits
                if chunk:
                    self._in.write(chunk)
                else:
                    self._in.write_eof()
            except _EOF_ERRORS:
                return b""
        # One SSL_read returns one record: collect what is already decrypted or buffered.
        if data and len(data) < bufsize and (obj.pending() or self._in.pending):
            parts = [data]
            n = len(data)
            while n < bufsize:
                try:
                    more = obj.read(bufsize - n)
                except (_WANT_READ, *_EOF_ERRORS):
                    break
                if not more:
                    break
                parts.append(more)
                n += len(more)
            data = b"".join(parts)
        if self._out.pending:
            self._push_out()
        return data

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Plaintext bytes taken; ``BlockingIOError`` while ciphertext waits (rule 3)."""
        if self._backlog:
            self._flush_backlog()  # raises BlockingIOError while some is left
            if self._unconfirmed:
                n, self._unconfirmed = self._unconfirmed, 0
                return n
        n = len(data)
        if not n:
            return 0
        self._obj.write(data)
        out = self._out.read()
        try:
            sent = self.raw.send(out)
        except BlockingIOError:
            sent = 0
        if sent < len(out):
            self._backlog = out[sent:]
            self._unconfirmed = n
            raise BlockingIOError(errno.EAGAIN, "TLS records wait for the socket")
        return n

    def _flush_backlog(self) -> None:
        sent = self.raw.send(self._backlog)  # BlockingIOError propagates
        self._backlog = self._backlog[sent:]
        if self._backlog:
            raise BlockingIOError(errno.EAGAIN, "TLS records wait for the socket")

    def _push_out(self) -> None:
        """Send ciphertext a read produced, never blocking; queue the rest in order (rule 4)."""
        out = self._out.read()
        if self._backlog:
            self._backlog += out
            return
        try:
            sent = self.raw.send(out)
        except BlockingIOError:
            sent = 0
        if sent < len(out):
            self._backlog = out[sent:]

    def _peek(self) -> bytes:
        """``recv(1, MSG_PEEK | MSG_DONTWAIT)``: is there plaintext, EOF, or nothing yet?"""
        if not self._peeked:
            data = self.recv(_RECV_SIZE)  # BlockingIOError: nothing yet
            if not data:
                return b""
            self._peeked = data
        return self._peeked[:1]

    def close(self) -> None:
        """Send ``close_notify`` if we can without waiting, then close the socket (rule 6)."""
        if self._closed:
            return
        self._closed = True
        if self.raw.fileno() == -1:
            return
        self.close_notify_nowait()
        try:
            trio.lowlevel.notify_closing(self.raw)
        except RuntimeError:  # outside trio
            pass
        self.raw.close()

    def close_notify_nowait(self) -> None:
        """Send ``close_notify`` (once, after a completed handshake) if the kernel takes it now."""
        if not self.handshake_done or self._eof_sent or self.raw.fileno() == -1:
            return
        self._eof_sent = True
        if not self.server_side:
            session = self._obj.session  # TLS 1.3: the tickets read since the handshake
            if session is not None and session.has_ticket:
                self.context.remember_session(self._ssl_context, session)
        try:
            self._obj.unwrap()
        except (ssl.SSLError, ValueError):
            pass  # WANT_READ: ours is sent, the peer's has not arrived (we do not wait)
        out = self._backlog + self._out.read()
        self._backlog = b""
        if out:
            try:
                self.raw.send(out)
            except OSError:
                pass

    # -- async ----------------------------------------------------------------------------
    async def do_handshake(self) -> None:
        obj = self._obj
        while True:
            try:
                obj.do_handshake()
                break
            except _WANT_READ:
                await self._send_pending()
                await self._receive_more()
            except ssl.SSLError:
                try:  # the alert, so the peer learns why
                    out = self._out.read()
                    if out:
                        self.raw.send(out)
                except OSError:
                    pass
                raise
        await self._send_pending()
        self.handshake_done = True

    async def _send_pending(self) -> None:
        out = self._out.read()
        if out:
            await fast_io.send_all(self.raw, out)

    async def _receive_more(self) -> None:
        raw = self.raw
        while True:
            try:
                chunk = raw.recv(_RECV_SIZE)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(raw)
        if chunk:
            self._in.write(chunk)
        else:
            self._in.write_eof()

    async def send_eof(self) -> None:
        """``close_notify``, then shut the TCP write side; reading goes on (rule 6)."""
        if self._eof_sent:
            return
        while self._backlog:
            await trio.lowlevel.wait_writable(self.raw)
            try:
                self._flush_backlog()
            except BlockingIOError:
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
        self._unconfirmed = 0
        self._eof_sent = True
        try:
            self._obj.unwrap()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        await self._send_pending()
        try:
            self.raw.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc


class TlsStream(trio.abc.HalfCloseableStream):
    """A trio stream over a ``TlsSocket`` (what relays and ``Connection.stream`` use for TLS).

    It has no ``.socket``: code that reaches for the raw socket of a stream must not find one
    here and write plaintext past the TLS layer. ``tls_socket`` is what ``fast_io`` takes.
    """

    def __init__(self, transport_stream: trio.SocketStream, tls_socket: TlsSocket,
                 info: SslConnectionInfo) -> None:
        self.transport_stream = transport_stream
        self.tls_socket = tls_socket
        self.info = info

    @property
    def negotiated_protocol(self) -> str | None:
        return self.info.alpn

    def getsockname(self) -> Any:
        return self.tls_socket.getsockname()

    def fileno(self) -> int:
        return self.tls_socket.fileno()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await fast_io.receive_some(self.tls_socket, max_bytes or 65536)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await fast_io.send_all(self.tls_socket, data)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.tls_socket.raw)

    async def send_eof(self) -> None:
        await self.tls_socket.send_eof()

    async def aclose(self) -> None:
        self.tls_socket.close_notify_nowait()
        await self.transport_stream.aclose()  # trio closes the socket (and wakes its waiters)


async def handshake(tls: TlsSocket, stats: SslStats | None) -> SslConnectionInfo:
    """Handshake and check the peer (rule 7); the caller bounds it with a deadline."""
    context = tls.context
    try:
        await tls.do_handshake()
    except ssl.SSLError as exc:
        stat = _stat_for(exc)
        if stat is not None and stats is not None:
            stats.count(stat)
        raise TlsHandshakeError(failure_reason(exc), stat) from None
    except (OSError, trio.BrokenResourceError) as exc:
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
        text = os.strerror(cause.errno) if isinstance(cause, OSError) and cause.errno else str(exc)
        raise TlsHandshakeError(f"TLS_error:|system library:{text}:TLS_error_end") from None
    obj = tls.ssl_object
    peer = obj.getpeercert(binary_form=True)
    failed = context.validator.verify(peer)
    if failed is not None:
        stat, detail = failed
        if stats is not None:
            stats.count(stat)
        raise TlsHandshakeError(
            f"TLS_error:|SSL routines:CERTIFICATE_VERIFY_FAILED:{detail}:TLS_error_end", stat)
    cipher = obj.cipher()
    session = obj.session
    info = SslConnectionInfo(
        tls_version=obj.version() or "",
        cipher=cipher[0] if cipher else "",
        alpn=obj.selected_alpn_protocol(),
        sni=getattr(obj, "trioxy_sni", None) if tls.server_side else context.sni,
        session_id=session.id if session is not None else b"",
        session_reused=obj.session_reused,
        peer_der=peer,
        local=context.local,
    )
    if not tls.server_side and info.tls_version != "TLSv1.3":
        context.remember_session(tls._ssl_context, session)  # TLS 1.3 tickets come later
    if stats is not None:
        stats.on_handshake(info, tls.server_side)
    return info


async def client_handshake(raw: socket.socket, transport: trio.SocketStream, context: TlsContext,
                           alpn: Iterable[str] | None, stats: SslStats | None) -> TlsStream:
    """The upstream side: SNI from the context, ALPN from the caller or the context."""
    ssl_context = context.ssl_context_for(alpn)
    tls = TlsSocket(raw, context, server_side=False, ssl_context=ssl_context,
                    server_hostname=context.sni)
    info = await handshake(tls, stats)
    return TlsStream(transport, tls, info)


class ListenerTlsStats:
    """A listener's TLS stats: ``listener.<addr>.ssl.*`` (made on the first TLS connection) and
    ``downstream_cx_transport_socket_connect_timeout``."""

    __slots__ = ("scope", "_ssl", "_timeout")

    def __init__(self, scope: Any) -> None:
        self.scope = scope
        self._ssl: SslStats | None = None
        self._timeout: Any = None

    @property
    def ssl(self) -> SslStats:
        if self._ssl is None:
            self._ssl = SslStats(self.scope)
        return self._ssl

    def handshake_timed_out(self) -> None:
        if self._timeout is None:
            self._timeout = self.scope.counter("downstream_cx_transport_socket_connect_timeout")
        self._timeout.inc()


async def accept_tls(conn: Any, chain: Any, stats: ListenerTlsStats) -> bool:
    """The server handshake of a chain with a TLS transport socket, bounded by the chain's
    ``transport_socket_connect_timeout``. False: the connection failed and is to be closed
    (counted; the reason is logged at debug, as Envoy does)."""
    with trio.move_on_after(chain.transport_socket_connect_timeout or math.inf) as scope:
        try:
            await conn.start_tls(chain.transport_socket, stats.ssl)
            return True
        except TlsHandshakeError as exc:
            log.debug("TLS handshake from %s failed: %s", conn.stream_info.downstream_remote_address,
                      exc.reason)
            return False
    if scope.cancelled_caught:
        stats.handshake_timed_out()
    return False
