"""Per-request (or per-connection) facts shared by the data path, access logs and stats.

Envoy's ``StreamInfo``: who the peers were, what the proxy decided, how it ended. It is
filled in by the connection manager, router and tcp_proxy as the request moves, and read
by access-log formatters and stats once it is done. Sans-IO: plain data, no trio.

The one table of local outcomes lives here too (``LOCAL_REPLIES``): every local reply and
upstream failure maps to an Envoy response flag, an HTTP status and a response code detail,
so that access logs, stats and the wire agree.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.http.headers import HeaderMap


class ResponseFlag(enum.IntFlag):
    """Envoy's response flags; ``short`` is what %RESPONSE_FLAGS% prints."""

    FAILED_LOCAL_HEALTH_CHECK = 1 << 0  # LH
    NO_HEALTHY_UPSTREAM = 1 << 1  # UH
    UPSTREAM_REQUEST_TIMEOUT = 1 << 2  # UT
    LOCAL_RESET = 1 << 3  # LR
    UPSTREAM_REMOTE_RESET = 1 << 4  # UR
    UPSTREAM_CONNECTION_FAILURE = 1 << 5  # UF
    UPSTREAM_CONNECTION_TERMINATION = 1 << 6  # UC
    UPSTREAM_OVERFLOW = 1 << 7  # UO
    NO_ROUTE_FOUND = 1 << 8  # NR
    DELAY_INJECTED = 1 << 9  # DI
    FAULT_INJECTED = 1 << 10  # FI
    RATE_LIMITED = 1 << 11  # RL
    UNAUTHORIZED_EXTERNAL_SERVICE = 1 << 12  # UAEX
    RATELIMIT_SERVICE_ERROR = 1 << 13  # RLSE
    DOWNSTREAM_CONNECTION_TERMINATION = 1 << 14  # DC
    UPSTREAM_RETRY_LIMIT_EXCEEDED = 1 << 15  # URX
    STREAM_IDLE_TIMEOUT = 1 << 16  # SI
    INVALID_ENVOY_REQUEST_HEADERS = 1 << 17  # IH
    DOWNSTREAM_PROTOCOL_ERROR = 1 << 18  # DPE
    UPSTREAM_MAX_STREAM_DURATION_REACHED = 1 << 19  # UMSDR
    RESPONSE_FROM_CACHE_FILTER = 1 << 20  # RFCF
    NO_FILTER_CONFIG_FOUND = 1 << 21  # NFCF
    DURATION_TIMEOUT = 1 << 22  # DT
    UPSTREAM_PROTOCOL_ERROR = 1 << 23  # UPE
    NO_CLUSTER_FOUND = 1 << 24  # NC
    OVERLOAD_MANAGER = 1 << 25  # OM
    DNS_RESOLUTION_FAILURE = 1 << 26  # DF
    DROP_OVERLOAD = 1 << 27  # DO
    DOWNSTREAM_REMOTE_RESET = 1 << 28  # DR


# Envoy prints flags in this order, joined by commas (ResponseFlagUtils::toShortString).
FLAG_SHORT: tuple[tuple[ResponseFlag, str], ...] = (
    (ResponseFlag.FAILED_LOCAL_HEALTH_CHECK, "LH"),
    (ResponseFlag.NO_HEALTHY_UPSTREAM, "UH"),
    (ResponseFlag.UPSTREAM_REQUEST_TIMEOUT, "UT"),
    (ResponseFlag.LOCAL_RESET, "LR"),
    (ResponseFlag.UPSTREAM_REMOTE_RESET, "UR"),
    (ResponseFlag.UPSTREAM_CONNECTION_FAILURE, "UF"),
    (ResponseFlag.UPSTREAM_CONNECTION_TERMINATION, "UC"),
    (ResponseFlag.UPSTREAM_OVERFLOW, "UO"),
    (ResponseFlag.NO_ROUTE_FOUND, "NR"),
    (ResponseFlag.DELAY_INJECTED, "DI"),
    (ResponseFlag.FAULT_INJECTED, "FI"),
    (ResponseFlag.RATE_LIMITED, "RL"),
    (ResponseFlag.UNAUTHORIZED_EXTERNAL_SERVICE, "UAEX"),
    (ResponseFlag.RATELIMIT_SERVICE_ERROR, "RLSE"),
    (ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION, "DC"),
    (ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED, "URX"),
    (ResponseFlag.STREAM_IDLE_TIMEOUT, "SI"),
    (ResponseFlag.INVALID_ENVOY_REQUEST_HEADERS, "IH"),
    (ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR, "DPE"),
    (ResponseFlag.UPSTREAM_MAX_STREAM_DURATION_REACHED, "UMSDR"),
    (ResponseFlag.RESPONSE_FROM_CACHE_FILTER, "RFCF"),
    (ResponseFlag.NO_FILTER_CONFIG_FOUND, "NFCF"),
    (ResponseFlag.DURATION_TIMEOUT, "DT"),
    (ResponseFlag.UPSTREAM_PROTOCOL_ERROR, "UPE"),
    (ResponseFlag.NO_CLUSTER_FOUND, "NC"),
    (ResponseFlag.OVERLOAD_MANAGER, "OM"),
    (ResponseFlag.DNS_RESOLUTION_FAILURE, "DF"),
    (ResponseFlag.DROP_OVERLOAD, "DO"),
    (ResponseFlag.DOWNSTREAM_REMOTE_RESET, "DR"),
)
SHORT_TO_FLAG: dict[str, ResponseFlag] = {short: flag for flag, short in FLAG_SHORT}


def flags_to_short_string(flags: int) -> str:
    """Envoy's ``%RESPONSE_FLAGS%``: comma-joined short codes, ``-`` when none."""
    if not flags:
        return "-"
    return ",".join(short for flag, short in FLAG_SHORT if flags & flag)


@dataclass(frozen=True, slots=True)
class LocalReply:
    """One row of the outcome table: what the proxy answers and how it is logged."""

    status: int
    flag: ResponseFlag
    details: str
    body: str


class Outcome(enum.Enum):
    """Every way a request can end locally; each maps to exactly one ``LocalReply``."""

    NO_ROUTE = "no_route"
    NO_CLUSTER = "no_cluster"
    NO_HEALTHY_UPSTREAM = "no_healthy_upstream"
    UPSTREAM_CONNECT_FAILURE = "upstream_connect_failure"
    UPSTREAM_CONNECT_TIMEOUT = "upstream_connect_timeout"
    UPSTREAM_RESET_BEFORE_RESPONSE = "upstream_reset_before_response"
    UPSTREAM_PROTOCOL_ERROR = "upstream_protocol_error"
    UPSTREAM_REQUEST_TIMEOUT = "upstream_request_timeout"
    UPSTREAM_PER_TRY_TIMEOUT = "upstream_per_try_timeout"  # retry_policy.per_try_timeout
    RETRY_BUFFER_OVERFLOW = "retry_buffer_overflow"  # body over the retry buffer, no attempt
    UPSTREAM_OVERFLOW = "upstream_overflow"
    UPSTREAM_LOCAL_RESET = "upstream_local_reset"
    UPSTREAM_REMOTE_RESET = "upstream_remote_reset"  # HTTP/2 RST_STREAM from the upstream
    UPSTREAM_REFUSED_STREAM = "upstream_refused_stream"  # RST_STREAM REFUSED_STREAM, GOAWAY
    DOWNSTREAM_PROTOCOL_ERROR = "downstream_protocol_error"
    REQUEST_HEADERS_TOO_LARGE = "request_headers_too_large"
    REQUEST_HEADERS_TIMEOUT = "request_headers_timeout"
    REQUEST_OVERALL_TIMEOUT = "request_overall_timeout"
    STREAM_IDLE_TIMEOUT = "stream_idle_timeout"
    DOWNSTREAM_DISCONNECT = "downstream_disconnect"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    # envoy.filters.http.health_check answering a health check itself.
    HEALTH_CHECK_OK = "health_check_ok"
    HEALTH_CHECK_FAILED = "health_check_failed"
    HEALTH_CHECK_CLUSTER_HEALTHY = "health_check_cluster_healthy"
    HEALTH_CHECK_NO_CLUSTER = "health_check_no_cluster"
    HEALTH_CHECK_CLUSTER_EMPTY = "health_check_cluster_empty"
    HEALTH_CHECK_CLUSTER_UNHEALTHY = "health_check_cluster_unhealthy"


# Status, flag and response-code-details strings are Envoy's (StreamInfo::ResponseCodeDetails).
LOCAL_REPLIES: dict[Outcome, LocalReply] = {
    Outcome.NO_ROUTE: LocalReply(404, ResponseFlag.NO_ROUTE_FOUND, "route_not_found", ""),
    Outcome.NO_CLUSTER: LocalReply(
        503, ResponseFlag.NO_CLUSTER_FOUND, "cluster_not_found", ""
    ),
    Outcome.NO_HEALTHY_UPSTREAM: LocalReply(
        503, ResponseFlag.NO_HEALTHY_UPSTREAM, "no_healthy_upstream", "no healthy upstream"
    ),
    Outcome.UPSTREAM_CONNECT_FAILURE: LocalReply(
        503,
        ResponseFlag.UPSTREAM_CONNECTION_FAILURE,
        "upstream_reset_before_response_started{connection_failure}",
        "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
    ),
    Outcome.UPSTREAM_CONNECT_TIMEOUT: LocalReply(
        503,
        ResponseFlag.UPSTREAM_CONNECTION_FAILURE,
        "upstream_reset_before_response_started{connection_timeout}",
        "upstream connect error or disconnect/reset before headers. reset reason: connection timeout",
    ),
    Outcome.UPSTREAM_RESET_BEFORE_RESPONSE: LocalReply(
        503,
        ResponseFlag.UPSTREAM_CONNECTION_TERMINATION,
        "upstream_reset_before_response_started{connection_termination}",
        "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
    ),
    Outcome.UPSTREAM_PROTOCOL_ERROR: LocalReply(
        502,
        ResponseFlag.UPSTREAM_PROTOCOL_ERROR,
        "upstream_reset_before_response_started{protocol_error}",
        "upstream connect error or disconnect/reset before headers. reset reason: protocol error",
    ),
    Outcome.UPSTREAM_REQUEST_TIMEOUT: LocalReply(
        504, ResponseFlag.UPSTREAM_REQUEST_TIMEOUT, "upstream_response_timeout", "upstream request timeout"
    ),
    Outcome.UPSTREAM_PER_TRY_TIMEOUT: LocalReply(
        504, ResponseFlag.UPSTREAM_REQUEST_TIMEOUT, "upstream_per_try_timeout",
        "upstream request timeout"
    ),
    Outcome.RETRY_BUFFER_OVERFLOW: LocalReply(
        507, ResponseFlag(0), "request_payload_exceeded_retry_buffer_limit",
        "exceeded request buffer limit while retrying upstream"
    ),
    Outcome.UPSTREAM_OVERFLOW: LocalReply(
        503, ResponseFlag.UPSTREAM_OVERFLOW, "upstream_reset_before_response_started{overflow}",
        "upstream connect error or disconnect/reset before headers. reset reason: overflow",
    ),
    Outcome.UPSTREAM_REMOTE_RESET: LocalReply(
        503, ResponseFlag.UPSTREAM_REMOTE_RESET,
        "upstream_reset_before_response_started{remote_reset}",
        "upstream connect error or disconnect/reset before headers. reset reason: remote reset",
    ),
    Outcome.UPSTREAM_REFUSED_STREAM: LocalReply(
        503, ResponseFlag.UPSTREAM_REMOTE_RESET,
        "upstream_reset_before_response_started{remote_refused_stream_reset}",
        "upstream connect error or disconnect/reset before headers."
        " reset reason: remote refused stream reset",
    ),
    Outcome.UPSTREAM_LOCAL_RESET: LocalReply(
        503, ResponseFlag.LOCAL_RESET, "upstream_reset_before_response_started{local_reset}",
        "upstream connect error or disconnect/reset before headers. reset reason: local reset",
    ),
    Outcome.DOWNSTREAM_PROTOCOL_ERROR: LocalReply(
        400, ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR, "http1.codec_error", "Bad Request"
    ),
    Outcome.REQUEST_HEADERS_TOO_LARGE: LocalReply(
        431, ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR, "http1.headers_too_large", "Request Header Fields Too Large"
    ),
    Outcome.REQUEST_HEADERS_TIMEOUT: LocalReply(
        408, ResponseFlag.STREAM_IDLE_TIMEOUT, "request_header_timeout", "request header timeout"
    ),
    Outcome.REQUEST_OVERALL_TIMEOUT: LocalReply(
        408, ResponseFlag.STREAM_IDLE_TIMEOUT, "request_overall_timeout", "request timeout"
    ),
    Outcome.STREAM_IDLE_TIMEOUT: LocalReply(
        408, ResponseFlag.STREAM_IDLE_TIMEOUT, "stream_idle_timeout", "stream timeout"
    ),
    Outcome.DOWNSTREAM_DISCONNECT: LocalReply(
        0, ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION, "downstream_remote_disconnect", ""
    ),
    Outcome.PAYLOAD_TOO_LARGE: LocalReply(
        413, ResponseFlag(0), "request_payload_too_large", "Payload Too Large"
    ),
    # The health check filter's replies have no body (Envoy's HealthCheckFilter::onComplete).
    Outcome.HEALTH_CHECK_OK: LocalReply(200, ResponseFlag(0), "health_check_ok", ""),
    Outcome.HEALTH_CHECK_FAILED: LocalReply(
        503, ResponseFlag.FAILED_LOCAL_HEALTH_CHECK, "health_check_failed", ""
    ),
    Outcome.HEALTH_CHECK_CLUSTER_HEALTHY: LocalReply(
        200, ResponseFlag(0), "health_check_ok_cluster_healthy", ""
    ),
    Outcome.HEALTH_CHECK_NO_CLUSTER: LocalReply(
        503, ResponseFlag.FAILED_LOCAL_HEALTH_CHECK, "health_check_failed_no_cluster_found", ""
    ),
    Outcome.HEALTH_CHECK_CLUSTER_EMPTY: LocalReply(
        503, ResponseFlag.FAILED_LOCAL_HEALTH_CHECK, "health_check_failed_cluster_empty", ""
    ),
    Outcome.HEALTH_CHECK_CLUSTER_UNHEALTHY: LocalReply(
        503, ResponseFlag.FAILED_LOCAL_HEALTH_CHECK, "health_check_failed_cluster_unhealthy", ""
    ),
}


def _now_monotonic() -> float:
    return time.monotonic()


@dataclass(slots=True)
class StreamInfo:
    """Facts about one HTTP stream or one TCP connection; read by access logs and stats."""

    start_time: float = field(default_factory=time.time)  # wall clock, for %START_TIME%
    start_monotonic: float = field(default_factory=_now_monotonic)
    end_monotonic: float | None = None  # set once the stream is done: %DURATION%
    # Milestones (monotonic seconds) for %RESPONSE_DURATION% etc.; None when not reached.
    first_upstream_tx_byte: float | None = None
    last_downstream_rx_byte: float | None = None
    first_upstream_rx_byte: float | None = None
    last_upstream_tx_byte: float | None = None
    last_downstream_tx_byte: float | None = None
    protocol: str | None = None  # "HTTP/1.1", "HTTP/2"; None for tcp_proxy
    response_code: int | None = None
    response_flags: int = 0
    response_code_details: str | None = None
    connection_termination_details: str | None = None
    upstream_transport_failure_reason: str | None = None
    bytes_received: int = 0
    bytes_sent: int = 0
    upstream_host: str | None = None  # "ip:port"
    upstream_host_name: str | None = None  # the endpoint's hostname, when it has one
    upstream_cluster: str | None = None
    upstream_local_address: str | None = None
    downstream_local_address: str | None = None  # "ip:port"
    downstream_remote_address: str | None = None  # "ip:port", after XFF handling
    downstream_direct_remote_address: str | None = None  # the socket peer
    # A listener filter (original_dst, proxy_protocol) restored downstream_local_address:
    # it is the connection's original destination (ORIGINAL_DST clusters connect to it).
    downstream_local_address_restored: bool = False
    requested_server_name: str | None = None
    # TLS facts (proxy.tls.connection_info.SslConnectionInfo) of the downstream connection and
    # of the upstream one; None for plaintext. Read by the %DOWNSTREAM_TLS_*% / %*_SAN% operators.
    downstream_ssl: Any = None
    upstream_ssl: Any = None
    route_name: str | None = None
    virtual_cluster_name: str | None = None
    request_headers: HeaderMap | None = None
    response_headers: HeaderMap | None = None
    response_trailers: HeaderMap | None = None
    upstream_service_time_ms: int | None = None
    attempt_count: int = 0
    connection_id: int = 0
    # A health check request (envoy.filters.http.health_check matched it): not counted in the
    # HCM's downstream_rq_completed / downstream_rq_<N>xx, skipped by not_health_check_filter.
    health_check: bool = False

    def set_response_flag(self, flag: ResponseFlag) -> None:
        self.response_flags |= flag

    def has_response_flag(self, flag: ResponseFlag) -> bool:
        return bool(self.response_flags & flag)

    def apply_local_reply(self, reply: LocalReply) -> None:
        """Record a local outcome: flag, status and details as one unit."""
        if reply.flag:
            self.response_flags |= reply.flag
        if reply.status:
            self.response_code = reply.status
        self.response_code_details = reply.details

    def on_complete(self) -> None:
        if self.end_monotonic is None:
            self.end_monotonic = time.monotonic()

    @property
    def duration(self) -> float | None:
        """Seconds from the first byte to the end; None while still in flight."""
        if self.end_monotonic is None:
            return None
        return self.end_monotonic - self.start_monotonic
