"""Open a TCP connection to one upstream host (Envoy's ``ClientConnectionImpl::connect``).

A host's address is an IP literal (DNS clusters resolve before a host exists), so there is one
address to try: no resolution and no happy eyeballs. ``connect_timeout`` is a ``fail_after``
scope around the connect. The stream is a ``trio.SocketStream``, which sets ``TCP_NODELAY``
(the proxy writes whole messages; Nagle would only add latency).

Failures raise ``UpstreamConnectError`` with ``reason`` ``"connection_failure"`` (refused,
unreachable, reset, no socket...) or ``"connection_timeout"``; its ``str`` is Envoy's
transport failure reason (``delayed connect error: Connection refused``), for
``%UPSTREAM_TRANSPORT_FAILURE_REASON%``.

TLS (the cluster's ``transport_socket``, an ``UpstreamTlsContext``): the handshake runs inside
the same ``connect_timeout`` (Envoy's connect timer covers it: the connection is "connected"
once the transport socket is), and a failed handshake is a connect failure like any other
(``connection_failure``, response flag ``UF``, ``upstream_cx_connect_fail``) whose reason is
Envoy's ``TLS_error:|...:TLS_error_end`` text; it is counted in ``cluster.<name>.ssl.*``. The
stream is then a ``proxy.tls.ssl_socket.TlsStream``: use ``io_socket(stream)`` for ``fast_io``
and ``negotiated_protocol(stream)`` for the ALPN result.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from proxy.upstream.host import Host

if TYPE_CHECKING:
    from proxy.tls.ssl_socket import TlsStream

__all__ = [
    "CONNECTION_FAILURE",
    "CONNECTION_TIMEOUT",
    "UpstreamConnectError",
    "connect_upstream",
    "io_socket",
    "negotiated_protocol",
]

CONNECTION_FAILURE = "connection_failure"
CONNECTION_TIMEOUT = "connection_timeout"


class UpstreamConnectError(Exception):
    """The upstream connection could not be established (response flag ``UF``)."""

    def __init__(self, reason: str, details: str = "", *, tls: bool = False) -> None:
        self.reason = reason  # CONNECTION_FAILURE or CONNECTION_TIMEOUT
        self.details = details or reason  # Envoy's transport failure reason
        self.tls = tls  # the TLS handshake (or the peer checks) failed
        super().__init__(self.details)


async def connect_upstream(
    host: Host, connect_timeout: float, *, cluster: Any = None,
    alpn_protocols: Sequence[str] | None = None,
) -> trio.SocketStream | TlsStream:
    """A connected stream to ``host``, or ``UpstreamConnectError``.

    ``cluster`` (a ``ThreadLocalCluster``) brings its TLS context and ``ssl.*`` stats; without
    one, or for a plaintext cluster, the stream is a ``trio.SocketStream``. ``alpn_protocols``
    overrides the context's ALPN list for this connection (``["h2", "http/1.1"]``); it is
    ignored for plaintext.
    """
    tls = None if cluster is None else cluster.config.transport_socket
    family = trio.socket.AF_INET6 if ":" in host.address else trio.socket.AF_INET
    try:
        sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    except OSError as exc:  # EMFILE, ENOBUFS...: nothing was attempted, still a failure
        raise UpstreamConnectError(CONNECTION_FAILURE, _os_error_text(exc)) from None
    try:
        with trio.fail_after(connect_timeout):
            await sock.connect((host.address, host.port))
            if tls is not None:
                return await _tls_handshake(sock, tls, cluster, alpn_protocols)
    except trio.TooSlowError:
        sock.close()
        raise UpstreamConnectError(
            CONNECTION_TIMEOUT,
            f"connect timeout: no connection to {host.address_string} within"
            f" {connect_timeout:g} s") from None
    except _TlsFailure as exc:
        sock.close()
        raise UpstreamConnectError(CONNECTION_FAILURE, str(exc), tls=True) from None
    except OSError as exc:
        sock.close()
        raise UpstreamConnectError(
            CONNECTION_FAILURE, f"delayed connect error: {_os_error_text(exc)}") from None
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def _os_error_text(exc: OSError) -> str:
    # strerror only, as Envoy's errorDetails(): trio's message adds the address, which the
    # access log already has in %UPSTREAM_HOST%.
    if exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


class _TlsFailure(Exception):
    pass


async def _tls_handshake(sock: Any, tls: Any, cluster: Any,
                         alpn_protocols: Sequence[str] | None) -> TlsStream:
    from proxy.tls.ssl_socket import SslStats, TlsHandshakeError, client_handshake

    stats = SslStats(cluster.stats)
    try:
        return await client_handshake(sock._sock, trio.SocketStream(sock), tls, alpn_protocols,
                                      stats)
    except TlsHandshakeError as exc:
        raise _TlsFailure(exc.reason) from None


def io_socket(stream: Any) -> Any:
    """What ``proxy.network.fast_io`` reads and writes for a stream from ``connect_upstream``:
    the stdlib socket of a plaintext stream, the ``TlsSocket`` of a TLS one (never the raw
    socket under TLS: bytes written there would skip encryption)."""
    tls_socket = getattr(stream, "tls_socket", None)
    if tls_socket is not None:
        return tls_socket
    return stream.socket._sock


def negotiated_protocol(stream: Any) -> str | None:
    """The ALPN protocol the upstream chose ("h2", "http/1.1"); None for plaintext or none."""
    return getattr(stream, "negotiated_protocol", None)
