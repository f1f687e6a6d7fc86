"""The gRPC statistics filter (``envoy.filters.http.grpc_stats``), Envoy's GrpcStatsFilter.

Counts gRPC calls per cluster, optionally per service and method, and the messages each
direction carries, in Envoy's names:
``cluster.<cluster>.grpc[.<service>.<method>].{success,failure,total,request_message_count,
response_message_count,upstream_rq_time}``.

Theory of operation:
1. Only gRPC requests (content-type application/grpc[+...]) are looked at; the filter
   passes everything on unchanged and never stops iteration.
2. The cluster is the one the router picked (``stream_info.upstream_cluster``); a request
   that reached no cluster (no route, local reply before routing) is not counted.
3. Names come from ``:path`` (``/package.Service/Method``) when ``stats_for_all_methods``
   is set or the method is on the allowlist; otherwise the stats have no service/method
   part. ``replace_dots_in_grpc_service_name`` turns the service's dots into underscores.
4. Messages are counted at their 5-byte prefix across DATA chunks of any size.
5. The call is charged once, from ``grpc-status``: in trailers, or in the headers of a
   trailers-only response. 0 is success, anything else failure; both count in ``total``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from proxy.http.filter_manager import CONTINUE, FilterStatus
from proxy.http.grpc import MessageCounter, is_grpc_request, resolve_service_and_method

if TYPE_CHECKING:
    from proxy.http.headers import HeaderMap


class GrpcStatsConfig:
    def __init__(self, *, stats_for_all_methods: bool, allowlist: dict[str, frozenset[str]] | None,
                 enable_upstream_stats: bool, replace_dots_in_grpc_service_name: bool) -> None:
        self.stats_for_all_methods = stats_for_all_methods
        self.allowlist = allowlist
        self.enable_upstream_stats = enable_upstream_stats
        self.replace_dots = replace_dots_in_grpc_service_name

    def create_filter(self, callbacks: Any) -> GrpcStatsFilter:
        return GrpcStatsFilter(self, callbacks)

    def stat_prefix(self, cluster: str, path: str | None) -> str:
        """``cluster.<cluster>.grpc.`` plus ``<service>.<method>.`` when they are named."""
        names = resolve_service_and_method(path)
        if names is not None:
            service, method = names
            allowed = self.stats_for_all_methods or (
                self.allowlist is not None and method in self.allowlist.get(service, ()))
            if allowed:
                if self.replace_dots:
                    service = service.replace(".", "_")
                return f"cluster.{cluster}.grpc.{service}.{method}."
        return f"cluster.{cluster}.grpc."


class GrpcStatsFilter:
    __slots__ = ("config", "cb", "active", "requests", "responses", "charged", "_prefix")

    def __init__(self, config: GrpcStatsConfig, callbacks: Any) -> None:
        self.config = config
        self.cb = callbacks
        self.active = False
        self.requests: MessageCounter | None = None
        self.responses: MessageCounter | None = None
        self.charged = False
        self._prefix: str | None = None

    def _stats_prefix(self) -> str | None:
        if self._prefix is None:
            cluster = self.cb.stream_info.upstream_cluster
            if cluster is None:
                return None
            self._prefix = self.config.stat_prefix(cluster, self.cb.request_headers.get(":path"))
        return self._prefix

    def _count(self, name: str, n: int = 1) -> None:
        prefix = self._stats_prefix()
        if prefix is not None:
            self.cb.worker.stats.counter(prefix + name).inc(n)

    def _charge(self, headers: HeaderMap) -> None:
        status = headers.get("grpc-status")
        if status is None or self.charged:
            return
        self.charged = True
        prefix = self._stats_prefix()
        if prefix is None:
            return
        stats = self.cb.worker.stats
        stats.counter(prefix + ("success" if status.strip() == "0" else "failure")).inc()
        stats.counter(prefix + "total").inc()
        if self.config.enable_upstream_stats:
            sent = self.cb.stream_info.first_upstream_tx_byte
            if sent is not None:
                stats.histogram(prefix + "upstream_rq_time").record(
                    (time.monotonic() - sent) * 1000)

    # -- request --------------------------------------------------------------------------
    async def decode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterStatus:
        if is_grpc_request(headers):
            self.active = True
            self.requests = MessageCounter()
            self.responses = MessageCounter()
        return CONTINUE

    async def decode_data(self, data: bytes, end_stream: bool) -> FilterStatus:
        if self.active and data:
            n = self.requests.inspect(data)  # type: ignore[union-attr]
            if n:
                self._count("request_message_count", n)
        return CONTINUE

    async def decode_trailers(self, trailers: HeaderMap) -> FilterStatus:
        return CONTINUE

    # -- response -------------------------------------------------------------------------
    async def encode_headers(self, headers: HeaderMap, end_stream: bool) -> FilterStatus:
        if self.active and end_stream:
            self._charge(headers)  # trailers-only
        return CONTINUE

    async def encode_data(self, data: bytes, end_stream: bool) -> FilterStatus:
        if self.active and data:
            n = self.responses.inspect(data)  # type: ignore[union-attr]
            if n:
                self._count("response_message_count", n)
        return CONTINUE

    async def encode_trailers(self, trailers: HeaderMap) -> FilterStatus:
        if self.active:
            self._charge(trailers)
        return CONTINUE
