"""``envoy.filters.listener.http_inspector``: HTTP/1.x or h2c, from the first peeked bytes.

Envoy's ``HttpInspector::Filter``, sans-IO:

1. Skipped (no stats) when an earlier filter detected a transport protocol other than
   ``raw_buffer`` (``tls_inspector`` found TLS).
2. ``preface.parse_http_preface`` decides: ``http/1.0``, ``http/1.1`` or ``h2c`` becomes the
   connection's only application protocol (``http10_found`` / ``http11_found`` /
   ``http2_found``); anything else counts ``http_not_found`` and the connection continues
   without one. Counters live under ``http_inspector.`` at the root of the stats.
3. Still undecided after 64 KiB (``MAX_INSPECT_SIZE``): ``read_error`` and the connection is
   closed. The peek starts at 8 KiB and doubles, as Envoy's ``requested_read_bytes_``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from proxy.extensions.filters.listener.http_inspector.preface import (
    H2C,
    HTTP10,
    HTTP11,
    NeedMore,
    NotHttp,
    parse_http_preface,
)
from proxy.listener.listener_filter import (
    RAW_BUFFER,
    AcceptedSocket,
    FilterStatus,
    ListenerFilter,
    ListenerFilterBuffer,
)
from proxy.stats import Store

DEFAULT_INITIAL_BUFFER_SIZE = 8 * 1024
MAX_INSPECT_SIZE = 64 * 1024
HTTP_INSPECTOR_COUNTERS = ("read_error", "http10_found", "http11_found", "http2_found",
                           "http_not_found")
_FOUND = {HTTP10: "http10_found", HTTP11: "http11_found", H2C: "http2_found"}


class HttpInspectorStats:
    __slots__ = HTTP_INSPECTOR_COUNTERS

    def __init__(self, store: Store) -> None:
        scope = store.scope("http_inspector.")
        for name in HTTP_INSPECTOR_COUNTERS:
            setattr(self, name, scope.counter(name))


@dataclass(frozen=True)
class HttpInspectorConfig:
    _stats: weakref.WeakKeyDictionary[Store, HttpInspectorStats] = field(
        default_factory=weakref.WeakKeyDictionary, init=False, repr=False, compare=False)

    def bind(self, store: Store) -> _Factory:
        stats = self._stats.get(store)
        if stats is None:
            stats = self._stats[store] = HttpInspectorStats(store)
        return _Factory(stats)


@dataclass(frozen=True, slots=True)
class _Factory:
    stats: HttpInspectorStats

    def new_filter(self) -> HttpInspectorFilter:
        return HttpInspectorFilter(self.stats)


class HttpInspectorFilter(ListenerFilter):
    __slots__ = ("stats", "max_read_bytes")

    def __init__(self, stats: HttpInspectorStats) -> None:
        self.stats = stats
        self.max_read_bytes = DEFAULT_INITIAL_BUFFER_SIZE

    def on_accept(self, sock: AcceptedSocket) -> FilterStatus:
        transport = sock.detected_transport_protocol
        if transport and transport != RAW_BUFFER:
            return FilterStatus.CONTINUE
        return FilterStatus.STOP_ITERATION

    def on_data(self, buffer: ListenerFilterBuffer, sock: AcceptedSocket) -> FilterStatus:
        data = buffer.data
        result = parse_http_preface(data)
        if isinstance(result, NeedMore):
            if len(data) >= MAX_INSPECT_SIZE:
                self.stats.read_error.inc()
                sock.close("http_inspector: no HTTP version within 64 KiB")
                return FilterStatus.STOP_ITERATION
            if len(data) >= self.max_read_bytes:
                self.max_read_bytes = min(2 * self.max_read_bytes, MAX_INSPECT_SIZE)
            return FilterStatus.STOP_ITERATION
        if isinstance(result, NotHttp):
            self.stats.http_not_found.inc()
            return FilterStatus.CONTINUE
        getattr(self.stats, _FOUND[result]).inc()
        sock.requested_application_protocols = (result,)
        return FilterStatus.CONTINUE
