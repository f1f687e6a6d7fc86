"""Listener filters (Envoy's ``Network::ListenerFilter`` and ``ActiveTcpSocket``), sans-IO.

Theory of operation
-------------------
1. Listener filters run on an accepted socket after accept and before filter chain matching,
   in ``listener_filters`` order (then the ``original_dst`` filter that
   ``use_original_dst: true`` appends, as Envoy's ``buildOriginalDstListenerFilter`` does).
   They fill in the facts filter chain matching reads: the restored destination
   (``original_dst``, PROXY protocol), the real source (PROXY protocol), the server name,
   transport protocol and application protocols (``tls_inspector``, ``http_inspector``).
2. A filter config is compiled once (a factory registered under its Envoy name in
   ``proxy.registry.listener_filters``); ``bind(store)`` gives the per-worker factory that
   owns the filter's stats; ``new_filter()`` makes one filter per socket.
3. ``on_accept(socket)`` returns ``CONTINUE`` (done) or ``STOP_ITERATION`` (it wants bytes:
   ``max_read_bytes`` > 0). ``on_data(buffer, socket)`` sees every byte queued on the socket
   from the current read position (``buffer.data``: peeked, not consumed) and returns
   ``CONTINUE`` or ``STOP_ITERATION`` (more bytes, up to ``max_read_bytes``, which a filter may
   raise as it learns more). A filter closes the connection with ``socket.close(reason)``; a
   filter that consumes what it read (the PROXY protocol header) calls ``buffer.drain(n)``.
4. ``ListenerFilterChain`` drives the filters. ``start()`` and ``on_data(buffer)`` return
   ``NEED_DATA`` (peek more, then ``on_data``), ``DONE`` (match a filter chain, or hand the
   socket off) or ``CLOSE``. A filter that starts waiting is first shown the bytes earlier
   filters already peeked (``has_unseen``), as Envoy re-activates the read event.
5. The trio shell (``proxy.listener.active_tcp_socket``) owns the socket, the peeking and the
   ``listener_filters_timeout``; nothing here does I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from proxy.config.errors import ConfigError

__all__ = [
    "Action",
    "AcceptedSocket",
    "FilterStatus",
    "ListenerFilter",
    "ListenerFilterBuffer",
    "ListenerFilterChain",
    "RAW_BUFFER",
]

RAW_BUFFER = "raw_buffer"  # the transport protocol when no listener filter detected one
Address = tuple[str, int]


class FilterStatus(enum.Enum):
    CONTINUE = "continue"
    STOP_ITERATION = "stop_iteration"


class Action(enum.Enum):
    NEED_DATA = "need_data"
    DONE = "done"
    CLOSE = "close"


def _no_original_destination() -> Address | None:
    return None


class AcceptedSocket:
    """What the listener filters know of an accepted socket (Envoy's ``ConnectionSocket``).

    ``original_destination`` is the shell's ``SO_ORIGINAL_DST`` lookup (None when the kernel
    has none); filters call it rather than doing the I/O themselves.
    """

    __slots__ = (
        "local_address", "remote_address", "direct_remote_address", "local_address_restored",
        "requested_server_name", "detected_transport_protocol", "requested_application_protocols",
        "closed", "close_reason", "original_destination",
    )

    def __init__(self, local_address: Address, remote_address: Address,
                 original_destination: Callable[[], Address | None] = _no_original_destination,
                 ) -> None:
        self.local_address = local_address
        self.remote_address = remote_address
        self.direct_remote_address = remote_address  # the socket peer, whatever PROXY says
        self.local_address_restored = False
        self.requested_server_name: str | None = None
        self.detected_transport_protocol = ""  # "" until a filter detects one: raw_buffer
        self.requested_application_protocols: tuple[str, ...] = ()
        self.closed = False
        self.close_reason = ""
        self.original_destination = original_destination

    def restore_local_address(self, address: Address) -> None:
        """The connection's real destination (``SO_ORIGINAL_DST``, a PROXY header)."""
        self.local_address = address
        self.local_address_restored = True

    def close(self, reason: str) -> None:
        self.closed = True
        self.close_reason = reason

    @property
    def transport_protocol(self) -> str:
        return self.detected_transport_protocol or RAW_BUFFER


class ListenerFilterBuffer(Protocol):
    """Bytes queued on the socket from the current read position (``data``), not consumed."""

    data: bytes

    def drain(self, n: int) -> bool:
        """Consume the first ``n`` bytes (they were peeked); False when the socket failed."""
        ...


class ListenerFilter:
    """One listener filter on one socket; subclasses override what they need."""

    __slots__ = ()
    max_read_bytes = 0  # bytes this filter may want to see; 0: it never reads

    def on_accept(self, sock: AcceptedSocket) -> FilterStatus:
        return FilterStatus.CONTINUE

    def on_data(self, buffer: ListenerFilterBuffer, sock: AcceptedSocket) -> FilterStatus:
        return FilterStatus.CONTINUE


class ListenerFilterChain:
    """Runs one socket's filters in order (Envoy's ``ActiveTcpSocket::continueFilterChain``)."""

    __slots__ = ("filters", "sock", "_index", "_seen")

    def __init__(self, filters: Sequence[ListenerFilter], sock: AcceptedSocket) -> None:
        self.filters = filters
        self.sock = sock
        self._index = -1
        self._seen = 0  # bytes of the buffer the current filter has been shown

    @property
    def current(self) -> ListenerFilter:
        return self.filters[self._index]

    @property
    def max_read_bytes(self) -> int:
        """How many bytes the shell should peek for the current filter."""
        return self.current.max_read_bytes

    def has_unseen(self, buffer: ListenerFilterBuffer) -> bool:
        """Whether the buffer holds bytes the current filter has not been shown yet."""
        return len(buffer.data) > self._seen

    def start(self) -> Action:
        return self._continue_from(0)

    def on_data(self, buffer: ListenerFilterBuffer) -> Action:
        status = self.current.on_data(buffer, self.sock)
        self._seen = len(buffer.data)
        if self.sock.closed:
            return Action.CLOSE
        if status is FilterStatus.CONTINUE:
            return self._continue_from(self._index + 1)
        if self._seen >= self.current.max_read_bytes:
            # It has all it asked for and still wants more: it could never be satisfied.
            self.sock.close(f"listener filter {type(self.current).__name__} stalled")
            return Action.CLOSE
        return Action.NEED_DATA

    def _continue_from(self, index: int) -> Action:
        for i in range(index, len(self.filters)):
            self._index = i
            self._seen = 0
            status = self.filters[i].on_accept(self.sock)
            if self.sock.closed:
                return Action.CLOSE
            if status is FilterStatus.STOP_ITERATION:
                if self.filters[i].max_read_bytes <= 0:
                    # Only filters that read may wait (no asynchronous callbacks here).
                    self.sock.close(f"listener filter {type(self.filters[i]).__name__} stalled")
                    return Action.CLOSE
                return Action.NEED_DATA
        return Action.DONE



# --------------------------------------------------------------------------------------------
# Config: Listener.listener_filters and the fields that go with them
# --------------------------------------------------------------------------------------------

DEFAULT_LISTENER_FILTERS_TIMEOUT_S = 15.0  # Envoy's listener_filters_timeout default


class ListenerFilterFactory(Protocol):
    """A compiled listener filter config: ``bind(store)`` per worker, then per socket."""

    def bind(self, store: Any) -> Any: ...


def build_listener_filters(listener: Any, ctx: Any, path: str) -> tuple[Any, ...]:
    """The compiled ``listener_filters`` of a ``Listener``, then the ``original_dst`` filter
    that ``use_original_dst: true`` appends (Envoy's ``buildOriginalDstListenerFilter``)."""
    from proxy.config.bootstrap import unpack_any
    from proxy.registry import listener_filters

    built: list[Any] = []
    for i, f in enumerate(listener.listener_filters):
        fpath = f"{path}.listener_filters[{i}]"
        if f.HasField("config_discovery"):
            raise ConfigError(f"{fpath}.config_discovery", "config_discovery is not supported")
        if f.HasField("filter_disabled"):
            raise ConfigError(f"{fpath}.filter_disabled", "filter_disabled is not supported")
        if not f.HasField("typed_config"):
            raise ConfigError(f"{fpath}.typed_config", "a listener filter needs a typed_config")
        ext = listener_filters.lookup(f.name, f.typed_config.type_url, fpath)
        msg = unpack_any(f.typed_config, f"{fpath}.typed_config")
        built.append(ext.factory(msg, ctx, f"{fpath}.typed_config"))
    if listener.HasField("use_original_dst") and listener.use_original_dst.value:
        from proxy.extensions.filters.listener.original_dst.original_dst import OriginalDstConfig

        built.append(OriginalDstConfig())
    return tuple(built)


def listener_filters_timeout_s(listener: Any, path: str) -> float | None:
    """``listener_filters_timeout`` in seconds (default 15 s); None when 0 disables it."""
    if not listener.HasField("listener_filters_timeout"):
        return DEFAULT_LISTENER_FILTERS_TIMEOUT_S
    d = listener.listener_filters_timeout
    if d.seconds < 0 or d.nanos < 0:
        raise ConfigError(f"{path}.listener_filters_timeout", "must not be negative")
    seconds = d.seconds + d.nanos / 1e9
    return seconds or None
