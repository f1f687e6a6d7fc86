"""``HttpConnectionManager`` compiled: everything a connection needs, fixed per snapshot.

Defaults are Envoy's (conn_manager_config / the v3 proto docs) unless a comment says why not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.config.errors import ConfigError, not_supported
from proxy.config.protos import duration_s, wrapped
from proxy.http.codec.h2 import Http2Options
from proxy.registry import http_filters
from proxy.stream_info import FLAG_SHORT

if TYPE_CHECKING:
    from proxy.config.context import FactoryContext
    from proxy.router.config import RouteTable
    from proxy.stats import Store

DEFAULT_STREAM_IDLE_TIMEOUT_S = 300.0  # Envoy: 5 min
DEFAULT_IDLE_TIMEOUT_S = 3600.0  # Envoy: 1 h for downstream HTTP connections
DEFAULT_DRAIN_TIMEOUT_S = 5.0
DEFAULT_DELAYED_CLOSE_TIMEOUT_S = 1.0
DEFAULT_MAX_REQUEST_HEADERS_KB = 60
MAX_MAX_REQUEST_HEADERS_KB = 8192
DEFAULT_MAX_HEADERS_COUNT = 100
# Envoy's server_name default is "envoy"; a config that sets it gets its value.
DEFAULT_SERVER_NAME = "envoy"

_CODEC_AUTO, _CODEC_HTTP1, _CODEC_HTTP2, _CODEC_HTTP3 = 0, 1, 2, 3
CODEC_AUTO, CODEC_HTTP1, CODEC_HTTP2 = _CODEC_AUTO, _CODEC_HTTP1, _CODEC_HTTP2
SERVER_OVERWRITE, SERVER_APPEND_IF_ABSENT, SERVER_PASS_THROUGH = 0, 1, 2


def _timeout(msg: Any, name: str, default: float | None) -> float | None:
    """A Duration where unset means ``default`` and 0 means disabled (None)."""
    v = duration_s(msg, name)
    if v is None:
        return default
    return v or None


class HcmStats:
    """``http.<stat_prefix>.*`` for one worker (Envoy's ConnectionManagerNamedStats)."""

    __slots__ = (
        "cx_total", "cx_active", "cx_http1_total", "cx_http2_total", "cx_http2_active",
        "rq_http2_total", "cx_destroy", "cx_protocol_error",
        "cx_idle_timeout", "cx_drain_close", "rq_total", "rq_http1_total", "rq_active",
        "rq_completed", "rq_xx", "rq_timeout", "rq_idle_timeout", "rq_header_timeout",
        "cx_length_ms", "rq_time_ms", "rq_rx_reset", "rq_tx_reset", "no_route", "no_cluster",
        "_scope", "_flag_counters",
    )

    def __init__(self, store: Store, prefix: str) -> None:
        s = store.scope(f"http.{prefix}.")
        self.cx_total = s.counter("downstream_cx_total")
        self.cx_active = s.gauge("downstream_cx_active")
        self.cx_http1_total = s.counter("downstream_cx_http1_total")
        self.cx_http2_total = s.counter("downstream_cx_http2_total")
        self.cx_http2_active = s.gauge("downstream_cx_http2_active")
        self.rq_http2_total = s.counter("downstream_rq_http2_total")
        self.cx_destroy = s.counter("downstream_cx_destroy")
        self.cx_protocol_error = s.counter("downstream_cx_protocol_error")
        self.cx_idle_timeout = s.counter("downstream_cx_idle_timeout")
        self.cx_drain_close = s.counter("downstream_cx_drain_close")
        self.rq_total = s.counter("downstream_rq_total")
        self.rq_http1_total = s.counter("downstream_rq_http1_total")
        self.rq_active = s.gauge("downstream_rq_active")
        self.rq_completed = s.counter("downstream_rq_completed")
        self.rq_xx = [s.counter(f"downstream_rq_{i}xx") for i in range(1, 6)]
        self.rq_timeout = s.counter("downstream_rq_timeout")
        self.rq_idle_timeout = s.counter("downstream_rq_idle_timeout")
        self.rq_header_timeout = s.counter("downstream_rq_header_timeout")
        self.rq_rx_reset = s.counter("downstream_rq_rx_reset")
        self.rq_tx_reset = s.counter("downstream_rq_tx_reset")
        self.cx_length_ms = s.histogram("downstream_cx_length_ms")
        self.rq_time_ms = s.histogram("downstream_rq_time")
        self.no_route = s.counter("no_route")
        self.no_cluster = s.counter("no_cluster")
        self._scope = s
        self._flag_counters: dict[int, list[Any]] = {}

    def on_response_code(self, code: int) -> None:
        if 100 <= code < 600:
            self.rq_xx[code // 100 - 1].inc()

    def on_response_flags(self, flags: int) -> None:
        """``http.<prefix>.response_flag.<FLAG>``: trioxy's counter per Envoy response flag
        (Prometheus: ``envoy_http_response_flag{envoy_response_flag="UH",...}``), so a
        dashboard sees UH / UF / UT / NR ... without parsing access logs."""
        counters = self._flag_counters.get(flags)
        if counters is None:
            counters = self._flag_counters[flags] = [
                self._scope.counter(f"response_flag.{short}")
                for flag, short in FLAG_SHORT if flags & flag]
        for c in counters:
            c.value += 1


@dataclass(eq=False)
class HttpConnectionManagerConfig:
    stat_prefix: str
    route_table: RouteTable
    filter_factories: tuple[Any, ...]  # config order; the router is last
    access_logs: tuple[Any, ...]
    request_headers_timeout: float | None
    request_timeout: float | None
    stream_idle_timeout: float | None
    idle_timeout: float | None
    max_connection_duration: float | None
    max_requests_per_connection: int | None
    max_request_headers_kb: int
    max_headers_count: int
    use_remote_address: bool
    xff_num_trusted_hops: int
    skip_xff_append: bool
    generate_request_id: bool
    preserve_external_request_id: bool
    always_set_request_id_in_response: bool
    server_name: str
    server_header_transformation: int
    via: str
    drain_timeout: float
    delayed_close_timeout: float | None
    codec_type: int = _CODEC_AUTO
    http2_options: Http2Options = field(default_factory=Http2Options)
    _stats: dict[int, HcmStats] = field(default_factory=dict, repr=False)

    def stats(self, store: Store) -> HcmStats:
        s = self._stats.get(id(store))
        if s is None:
            s = self._stats[id(store)] = HcmStats(store, self.stat_prefix)
        return s

    async def serve_connection(self, conn: Any, worker: Any) -> None:
        from proxy.http.conn_manager import HttpConnection

        # ALPN decides on TLS; on plaintext AUTO sniffs the HTTP/2 preface (prior
        # knowledge h2c) in the HTTP/1 connection's first read.
        alpn = getattr(conn, "negotiated_protocol", None)
        if self.codec_type == _CODEC_HTTP2 or (self.codec_type == _CODEC_AUTO and alpn == "h2"):
            from proxy.http.conn_manager_h2 import Http2Connection

            await Http2Connection(self, conn, worker).run()
            return
        await HttpConnection(self, conn, worker).run()

    @staticmethod
    def from_proto(msg: Any, ctx: FactoryContext, path: str) -> HttpConnectionManagerConfig:
        from proxy.router.config import RouteTable

        if not msg.stat_prefix:
            raise ConfigError(f"{path}.stat_prefix", "stat_prefix is required")
        if msg.codec_type == _CODEC_HTTP3:
            raise not_supported(f"{path}.codec_type", "codec_type HTTP3")
        if msg.codec_type not in (_CODEC_AUTO, _CODEC_HTTP1, _CODEC_HTTP2):
            raise not_supported(f"{path}.codec_type", f"codec_type {msg.codec_type}")
        if msg.WhichOneof("route_specifier") != "route_config":
            raise ConfigError(f"{path}.route_config", "a static route_config is required")
        route_table = RouteTable.from_proto(msg.route_config, ctx, f"{path}.route_config")

        factories: list[Any] = []
        if not msg.http_filters:
            raise ConfigError(
                f"{path}.http_filters", "http_filters must end with envoy.filters.http.router"
            )
        from proxy.config.bootstrap import unpack_any

        for i, hf in enumerate(msg.http_filters):
            fpath = f"{path}.http_filters[{i}]"
            if not hf.HasField("typed_config"):
                raise ConfigError(f"{fpath}.typed_config", "an HTTP filter needs a typed_config")
            ext = http_filters.lookup(hf.name, hf.typed_config.type_url, fpath)
            typed = unpack_any(hf.typed_config, f"{fpath}.typed_config")
            factories.append(ext.factory(typed, ctx, f"{fpath}.typed_config"))
        for i, f in enumerate(factories):
            terminal = getattr(f, "terminal", False)
            last = i == len(factories) - 1
            if terminal and not last:
                raise ConfigError(
                    f"{path}.http_filters[{i}]",
                    f"terminal filter {msg.http_filters[i].name!r} must be the last HTTP filter",
                )
            if last and not terminal:
                raise ConfigError(
                    f"{path}.http_filters[{i}]",
                    f"the last HTTP filter must be terminal (envoy.filters.http.router), "
                    f"not {msg.http_filters[i].name!r}",
                )

        access_logs: tuple[Any, ...] = ()
        if msg.access_log:
            from proxy.access_log.access_log import build_access_logs

            access_logs = tuple(build_access_logs(msg.access_log, ctx, f"{path}.access_log"))

        kb = wrapped(msg, "max_request_headers_kb", DEFAULT_MAX_REQUEST_HEADERS_KB)
        if not 0 < kb <= MAX_MAX_REQUEST_HEADERS_KB:
            raise ConfigError(
                f"{path}.max_request_headers_kb", f"must be in (0, {MAX_MAX_REQUEST_HEADERS_KB}]"
            )
        cho = msg.common_http_protocol_options
        max_headers = wrapped(cho, "max_headers_count", DEFAULT_MAX_HEADERS_COUNT)
        if max_headers < 1:
            raise ConfigError(
                f"{path}.common_http_protocol_options.max_headers_count", "must be at least 1"
            )
        max_rq = wrapped(cho, "max_requests_per_connection", 0) or None
        http2_options = Http2Options()
        if msg.HasField("http2_protocol_options"):
            if msg.codec_type == _CODEC_HTTP1:
                raise ConfigError(f"{path}.http2_protocol_options",
                                  "has no effect with codec_type HTTP1")
            http2_options = Http2Options.from_proto(
                msg.http2_protocol_options, f"{path}.http2_protocol_options")
        return HttpConnectionManagerConfig(
            stat_prefix=msg.stat_prefix,
            route_table=route_table,
            filter_factories=tuple(factories),
            access_logs=access_logs,
            request_headers_timeout=_timeout(msg, "request_headers_timeout", None),
            request_timeout=_timeout(msg, "request_timeout", None),
            stream_idle_timeout=_timeout(msg, "stream_idle_timeout", DEFAULT_STREAM_IDLE_TIMEOUT_S),
            idle_timeout=_timeout(cho, "idle_timeout", DEFAULT_IDLE_TIMEOUT_S),
            max_connection_duration=_timeout(cho, "max_connection_duration", None),
            max_requests_per_connection=max_rq,
            max_request_headers_kb=kb,
            max_headers_count=max_headers,
            use_remote_address=wrapped(msg, "use_remote_address", False),
            xff_num_trusted_hops=msg.xff_num_trusted_hops,
            skip_xff_append=msg.skip_xff_append,
            generate_request_id=wrapped(msg, "generate_request_id", True),
            preserve_external_request_id=msg.preserve_external_request_id,
            always_set_request_id_in_response=msg.always_set_request_id_in_response,
            server_name=msg.server_name or DEFAULT_SERVER_NAME,
            server_header_transformation=msg.server_header_transformation,
            via=msg.via,
            drain_timeout=duration_s(msg, "drain_timeout") or DEFAULT_DRAIN_TIMEOUT_S,
            delayed_close_timeout=_timeout(
                msg, "delayed_close_timeout", DEFAULT_DELAYED_CLOSE_TIMEOUT_S
            ),
            codec_type=msg.codec_type,
            http2_options=http2_options,
        )
