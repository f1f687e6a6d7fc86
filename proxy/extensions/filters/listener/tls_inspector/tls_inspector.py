"""``envoy.filters.listener.tls_inspector``: TLS or not, SNI and ALPN, from a peeked ClientHello.

Envoy's ``TlsInspector::Filter``, sans-IO (the shell peeks, this decides):

1. A ClientHello (``client_hello.parse_client_hello``) sets the transport protocol ``tls``,
   the requested server name and the application protocols, and counts ``tls_found``,
   ``sni_found`` / ``sni_not_found``, ``alpn_found`` / ``alpn_not_found`` and the
   ``bytes_processed`` histogram, under ``tls_inspector.`` at the root of the stats.
2. Bytes that are not a ClientHello count ``tls_not_found`` and leave the transport protocol
   to default (``raw_buffer``), unless ``close_connection_on_client_hello_parsing_errors``,
   which closes the connection instead.
3. A hello still incomplete after ``max_client_hello_size`` bytes (default and ceiling 16 KiB,
   BoringSSL's ``SSL3_RT_MAX_PLAIN_LENGTH``) counts ``client_hello_too_large`` and closes.
4. The peek starts at ``initial_read_buffer_size`` (default: the maximum) and doubles up to
   the maximum while the hello is incomplete, as Envoy's ``requested_read_bytes_``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from proxy.config.errors import ConfigError
from proxy.config.protos import wrapped
from proxy.extensions.filters.listener.tls_inspector.client_hello import (
    ClientHello,
    NeedMore,
    parse_client_hello,
)
from proxy.listener.listener_filter import (
    AcceptedSocket,
    FilterStatus,
    ListenerFilter,
    ListenerFilterBuffer,
)
from proxy.stats import Store

TLS_MAX_CLIENT_HELLO = 16 * 1024  # Envoy: SSL3_RT_MAX_PLAIN_LENGTH
TLS_INSPECTOR_COUNTERS = (
    "client_hello_too_large", "tls_found", "tls_not_found", "alpn_found", "alpn_not_found",
    "sni_found", "sni_not_found",
)


class TlsInspectorStats:
    __slots__ = (*TLS_INSPECTOR_COUNTERS, "bytes_processed")

    def __init__(self, store: Store) -> None:
        scope = store.scope("tls_inspector.")
        for name in TLS_INSPECTOR_COUNTERS:
            setattr(self, name, scope.counter(name))
        self.bytes_processed = scope.histogram("bytes_processed")


@dataclass(frozen=True)
class TlsInspectorConfig:
    max_client_hello_size: int = TLS_MAX_CLIENT_HELLO
    initial_read_buffer_size: int = TLS_MAX_CLIENT_HELLO
    close_connection_on_client_hello_parsing_errors: bool = False
    _stats: weakref.WeakKeyDictionary[Store, TlsInspectorStats] = field(
        default_factory=weakref.WeakKeyDictionary, init=False, repr=False, compare=False)

    @staticmethod
    def from_proto(msg: Any, path: str) -> TlsInspectorConfig:
        max_size = wrapped(msg, "max_client_hello_size", TLS_MAX_CLIENT_HELLO)
        if max_size > TLS_MAX_CLIENT_HELLO:
            raise ConfigError(f"{path}.max_client_hello_size",
                              f"max_client_hello_size of {max_size} is greater than maximum of "
                              f"{TLS_MAX_CLIENT_HELLO}.")
        if max_size < 1:
            raise ConfigError(f"{path}.max_client_hello_size", "must be at least 1")
        initial = wrapped(msg, "initial_read_buffer_size", max_size)
        if initial < 1:
            raise ConfigError(f"{path}.initial_read_buffer_size", "must be at least 1")
        return TlsInspectorConfig(
            max_client_hello_size=max_size,
            initial_read_buffer_size=min(initial, max_size),
            close_connection_on_client_hello_parsing_errors=(
                msg.close_connection_on_client_hello_parsing_errors),
        )

    def bind(self, store: Store) -> _Factory:
        stats = self._stats.get(store)
        if stats is None:
            stats = self._stats[store] = TlsInspectorStats(store)
        return _Factory(self, stats)


@dataclass(frozen=True, slots=True)
class _Factory:
    config: TlsInspectorConfig
    stats: TlsInspectorStats

    def new_filter(self) -> TlsInspectorFilter:
        return TlsInspectorFilter(self.config, self.stats)


class TlsInspectorFilter(ListenerFilter):
    __slots__ = ("config", "stats", "max_read_bytes")

    def __init__(self, config: TlsInspectorConfig, stats: TlsInspectorStats) -> None:
        self.config = config
        self.stats = stats
        self.max_read_bytes = min(config.initial_read_buffer_size, config.max_client_hello_size)

    def on_accept(self, sock: AcceptedSocket) -> FilterStatus:
        return FilterStatus.STOP_ITERATION

    def on_data(self, buffer: ListenerFilterBuffer, sock: AcceptedSocket) -> FilterStatus:
        data = buffer.data
        result = parse_client_hello(data)
        st = self.stats
        limit = self.config.max_client_hello_size
        if isinstance(result, NeedMore):
            if len(data) >= limit:
                st.client_hello_too_large.inc()
                st.bytes_processed.record(len(data))
                sock.close("tls_inspector: client hello too large")
                return FilterStatus.STOP_ITERATION
            if len(data) >= self.max_read_bytes:
                self.max_read_bytes = min(2 * len(data), limit)
            return FilterStatus.STOP_ITERATION
        if isinstance(result, ClientHello):
            st.tls_found.inc()
            (st.alpn_found if result.alpn else st.alpn_not_found).inc()
            if result.server_name:
                st.sni_found.inc()
                sock.requested_server_name = result.server_name
            else:
                st.sni_not_found.inc()
            if result.alpn:
                sock.requested_application_protocols = result.alpn
            sock.detected_transport_protocol = "tls"
            st.bytes_processed.record(result.size)
            return FilterStatus.CONTINUE
        if self.config.close_connection_on_client_hello_parsing_errors:
            if len(data) >= limit:
                st.client_hello_too_large.inc()
            st.bytes_processed.record(len(data))
            sock.close(f"tls_inspector: {result.reason}")
            return FilterStatus.STOP_ITERATION
        st.tls_not_found.inc()
        st.bytes_processed.record(len(data))
        return FilterStatus.CONTINUE
