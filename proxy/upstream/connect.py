"""Open a TCP connection to one upstream host (Envoy's ``ClientConnectionImpl::connect``).

A host's address is an IP literal (DNS clusters resolve before a host exists), so there is one
address to try: no resolution and no happy eyeballs. ``connect_timeout`` is a ``fail_after``
scope around the connect. The stream is a ``trio.SocketStream``, which sets ``TCP_NODELAY``
(the proxy writes whole messages; Nagle would only add latency).

Failures raise ``UpstreamConnectError`` with ``reason`` ``"connection_failure"`` (refused,
unreachable, reset, no socket...) or ``"connection_timeout"``; its ``str`` is Envoy's
transport failure reason (``delayed connect error: Connection refused``), for
``%UPSTREAM_TRANSPORT_FAILURE_REASON%``.
"""

from __future__ import annotations

import os

import trio

from proxy.upstream.host import Host

__all__ = ["CONNECTION_FAILURE", "CONNECTION_TIMEOUT", "UpstreamConnectError", "connect_upstream"]

CONNECTION_FAILURE = "connection_failure"
CONNECTION_TIMEOUT = "connection_timeout"


class UpstreamConnectError(Exception):
    """The upstream connection could not be established (response flag ``UF``)."""

    def __init__(self, reason: str, details: str = "") -> None:
        self.reason = reason  # CONNECTION_FAILURE or CONNECTION_TIMEOUT
        self.details = details or reason  # Envoy's transport failure reason
        super().__init__(self.details)


async def connect_upstream(host: Host, connect_timeout: float) -> trio.SocketStream:
    """A connected stream to ``host``, or ``UpstreamConnectError``."""
    family = trio.socket.AF_INET6 if ":" in host.address else trio.socket.AF_INET
    try:
        sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    except OSError as exc:  # EMFILE, ENOBUFS...: nothing was attempted, still a failure
        raise UpstreamConnectError(CONNECTION_FAILURE, _os_error_text(exc)) from None
    try:
        with trio.fail_after(connect_timeout):
            await sock.connect((host.address, host.port))
    except trio.TooSlowError:
        sock.close()
        raise UpstreamConnectError(
            CONNECTION_TIMEOUT,
            f"connect timeout: no connection to {host.address_string} within"
            f" {connect_timeout:g} s") from None
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
