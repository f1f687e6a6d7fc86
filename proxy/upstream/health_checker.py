"""Active health checking, the pure part (Envoy's ``HealthCheckerImplBase`` and its checkers).

Theory of operation
-------------------
1. ``HealthCheckConfig.from_proto`` compiles one ``Cluster.health_checks`` entry: timers,
   thresholds and one of ``HttpCheck``, ``TcpCheck``, ``GrpcCheck``. The trio shell
   (``proxy.upstream.health_check_manager``) runs it in the epoch's main process, one
   checker per cluster, and tells the workers when a host's health changes.
2. A host under active health checking starts *failed* (Envoy's ``FAILED_ACTIVE_HC``, set on
   every host of a non-EDS cluster with a health checker, and on every host DNS adds later).
   Its very first successful check makes it healthy at once (``first_check``), so startup is
   fast; after that it takes ``healthy_threshold`` successes in a row.
3. A failure counts toward ``unhealthy_threshold`` when it is a network failure (connect
   error, reset, timeout) or a retriable one (an HTTP status in ``retriable_statuses``); any
   other failure (an unexpected HTTP status, a gRPC answer other than SERVING, a body that
   does not match ``receive``) marks the host failed at once. A response that carries
   ``x-envoy-immediate-health-check-fail`` with an unexpected status also fails it at once
   (Envoy excludes the host, ``EXCLUDED_VIA_IMMEDIATE_HC_FAIL``, even when the status is
   retriable). A passive failure (``set_unhealthy(PASSIVE)``) fails it at once too, without
   moving its timer.
4. The next check is due after (Envoy's ``HealthCheckerImplBase::interval``): with traffic,
   ``interval`` (healthy, settled), ``healthy_edge_interval`` (passing but not yet healthy:
   change pending), ``unhealthy_interval`` (failed), ``unhealthy_edge_interval`` (failing but
   not yet failed); without traffic, ``no_traffic_healthy_interval`` for a settled healthy
   host, ``no_traffic_interval`` otherwise. Then jitter: ``random % (interval_jitter_percent
   * base / 100)`` plus ``random % interval_jitter`` (both in ms, so the delay is in
   ``[base, base * (1 + pct/100) + interval_jitter)``), and at least 1 ms.
5. Every check counts ``attempt``, then ``success`` or ``failure`` (+ ``network_failure`` for
   network and timeout failures, ``passive_failure`` for passive ones); ``verify_cluster``
   counts HTTP checks that compared ``x-envoy-upstream-healthchecked-cluster`` with
   ``service_name_matcher``; the ``healthy`` gauge is the number of hosts passing. All under
   ``cluster.<name>.health_check.``.
"""

from __future__ import annotations

import enum
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.config.errors import ConfigError, not_supported
from proxy.config.protos import duration_s, positive_duration_s, wrapped
from proxy.http.headers import HeaderMap
from proxy.stats import Scope

__all__ = [
    "HEALTH_CHECK_COUNTERS",
    "HEALTH_CHECK_GAUGES",
    "IMMEDIATE_HC_FAIL_HEADER",
    "USER_AGENT",
    "CheckResult",
    "FailureType",
    "GrpcCheck",
    "HealthCheckConfig",
    "HealthCheckSession",
    "HealthCheckerPolicy",
    "HealthCheckerStats",
    "HttpCheck",
    "TcpCheck",
    "Transition",
    "decode_grpc_health_response",
    "encode_grpc_health_request",
    "evaluate_grpc_response",
    "evaluate_http_response",
    "payload_matches",
]

IMMEDIATE_HC_FAIL_HEADER = "x-envoy-immediate-health-check-fail"
HEALTHCHECKED_CLUSTER_HEADER = "x-envoy-upstream-healthchecked-cluster"
USER_AGENT = "Envoy/HC"  # Envoy's UserAgentValues.EnvoyHealthChecker
DEFAULT_NO_TRAFFIC_INTERVAL_S = 60.0
DEFAULT_RESPONSE_BUFFER_SIZE = 1024  # HttpHealthCheck.response_buffer_size (bytes)
GRPC_HEALTH_CHECK_PATH = "/grpc.health.v1.Health/Check"
GRPC_SERVING = 1  # grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING
RUNTIME_VERIFY_CLUSTER = "health_check.verify_cluster"
RUNTIME_MIN_INTERVAL = "health_check.min_interval"
RUNTIME_MAX_INTERVAL = "health_check.max_interval"

HEALTH_CHECK_COUNTERS = ("attempt", "success", "failure", "passive_failure", "network_failure",
                         "verify_cluster")
HEALTH_CHECK_GAUGES = ("healthy",)

_METHODS = {0: "GET", 1: "GET", 2: "HEAD", 3: "POST", 4: "PUT", 5: "DELETE", 7: "OPTIONS",
            8: "TRACE", 9: "PATCH"}
_BODILESS = frozenset({"GET", "HEAD", "DELETE", "TRACE"})
_CODEC_HTTP1, _CODEC_HTTP2 = 0, 1


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True, slots=True)
class HttpCheck:
    path: str
    host: str  # "" = the cluster's name (Envoy's getHostname without a per-endpoint one)
    method: str = "GET"
    send: bytes = b""
    receive: tuple[bytes, ...] = ()
    response_buffer_size: int = DEFAULT_RESPONSE_BUFFER_SIZE  # 0 = the whole body
    expected_statuses: tuple[tuple[int, int], ...] = ((200, 201),)  # [start, end)
    retriable_statuses: tuple[tuple[int, int], ...] = ()
    http2: bool = False  # codec_client_type HTTP2
    headers: Any = None  # the compiled request_headers_to_add / _to_remove (HeaderParser)
    service_name_matcher: Any = None  # proxy.common.matchers.StringMatcher

    def request_headers(self, cluster_name: str, tls: bool) -> HeaderMap:
        """The check's request headers, as Envoy's ``HttpActiveHealthCheckSession::onInterval``."""
        headers = HeaderMap([
            (":method", self.method), (":path", self.path),
            (":authority", self.host or cluster_name), (":scheme", "https" if tls else "http"),
            ("user-agent", USER_AGENT)])
        if self.send:
            headers.add("content-length", str(len(self.send)))
        if self.headers is not None:
            self.headers.evaluate(headers, None)
        return headers


@dataclass(frozen=True, slots=True)
class TcpCheck:
    send: bytes = b""
    receive: tuple[bytes, ...] = ()  # empty: connect-only


@dataclass(frozen=True, slots=True)
class GrpcCheck:
    service_name: str = ""
    authority: str = ""  # "" = the cluster's name
    metadata: Any = None  # the compiled initial_metadata (HeaderParser)

    def request_headers(self, cluster_name: str, tls: bool, timeout_s: float) -> HeaderMap:
        from proxy.http.grpc import to_grpc_timeout

        headers = HeaderMap([
            (":method", "POST"), (":path", GRPC_HEALTH_CHECK_PATH),
            (":authority", self.authority or cluster_name), (":scheme", "https" if tls else "http"),
            ("content-type", "application/grpc"), ("te", "trailers"),
            ("user-agent", USER_AGENT), ("grpc-timeout", to_grpc_timeout(timeout_s))])
        if self.metadata is not None:
            self.metadata.evaluate(headers, None)
        return headers


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """One compiled ``envoy.config.core.v3.HealthCheck`` (times in seconds)."""

    check: HttpCheck | TcpCheck | GrpcCheck
    timeout: float
    interval: float
    unhealthy_threshold: int
    healthy_threshold: int
    initial_jitter: float = 0.0
    interval_jitter: float = 0.0
    interval_jitter_percent: int = 0
    reuse_connection: bool = True
    no_traffic_interval: float = DEFAULT_NO_TRAFFIC_INTERVAL_S
    no_traffic_healthy_interval: float = DEFAULT_NO_TRAFFIC_INTERVAL_S
    unhealthy_interval: float = 0.0  # filled from interval when unset
    unhealthy_edge_interval: float = 0.0
    healthy_edge_interval: float = 0.0
    alpn_protocols: tuple[str, ...] | None = None  # tls_options.alpn_protocols
    min_interval_ms: int = 0  # runtime health_check.min_interval
    max_interval_ms: int | None = None  # runtime health_check.max_interval
    verify_cluster_pct: int = 100  # runtime health_check.verify_cluster

    @property
    def kind(self) -> str:
        """Envoy's ``healthCheckerType`` in lower case: ``http``, ``tcp``, ``grpc``."""
        return {HttpCheck: "http", TcpCheck: "tcp", GrpcCheck: "grpc"}[type(self.check)]

    @staticmethod
    def from_proto(msg: Any, path: str, runtime: Any = None) -> HealthCheckConfig:
        timeout = _required_duration(msg, "timeout", path)
        interval = _required_duration(msg, "interval", path)
        for name in ("unhealthy_threshold", "healthy_threshold"):
            if not msg.HasField(name):
                raise ConfigError(f"{path}.{name}", "value is required")
        unhealthy_interval = positive_duration_s(msg, "unhealthy_interval", path, interval)
        no_traffic = positive_duration_s(msg, "no_traffic_interval", path,
                                         DEFAULT_NO_TRAFFIC_INTERVAL_S)
        assert unhealthy_interval is not None and no_traffic is not None
        kind = msg.WhichOneof("health_checker")
        if kind is None:
            raise ConfigError(path, "one of http_health_check, tcp_health_check,"
                                    " grpc_health_check must be set")
        check: HttpCheck | TcpCheck | GrpcCheck
        if kind == "http_health_check":
            check = _http_check(msg.http_health_check, f"{path}.http_health_check")
        elif kind == "tcp_health_check":
            check = _tcp_check(msg.tcp_health_check, f"{path}.tcp_health_check")
        elif kind == "grpc_health_check":
            check = _grpc_check(msg.grpc_health_check, f"{path}.grpc_health_check")
        else:
            raise not_supported(f"{path}.{kind}", kind)
        alpn = None
        if msg.HasField("tls_options"):
            alpn = tuple(msg.tls_options.alpn_protocols) or None
        max_interval = None
        min_interval = 0
        verify_pct = 100
        if runtime is not None:
            min_interval = max(0, runtime.get_int(RUNTIME_MIN_INTERVAL, 0))
            if runtime.get(RUNTIME_MAX_INTERVAL) is not None:
                max_interval = max(0, runtime.get_int(RUNTIME_MAX_INTERVAL, 0))
            verify_pct = runtime.get_int(RUNTIME_VERIFY_CLUSTER, 100)
        return HealthCheckConfig(
            check=check,
            timeout=timeout,
            interval=interval,
            unhealthy_threshold=msg.unhealthy_threshold.value,
            healthy_threshold=msg.healthy_threshold.value,
            initial_jitter=_non_negative(msg, "initial_jitter", path),
            interval_jitter=_non_negative(msg, "interval_jitter", path),
            interval_jitter_percent=msg.interval_jitter_percent,
            reuse_connection=wrapped(msg, "reuse_connection", True),
            no_traffic_interval=no_traffic,
            no_traffic_healthy_interval=positive_duration_s(
                msg, "no_traffic_healthy_interval", path, no_traffic) or no_traffic,
            unhealthy_interval=unhealthy_interval,
            unhealthy_edge_interval=positive_duration_s(
                msg, "unhealthy_edge_interval", path, unhealthy_interval) or unhealthy_interval,
            healthy_edge_interval=positive_duration_s(
                msg, "healthy_edge_interval", path, interval) or interval,
            alpn_protocols=alpn,
            min_interval_ms=min_interval,
            max_interval_ms=max_interval,
            verify_cluster_pct=verify_pct,
        )


def _required_duration(msg: Any, name: str, path: str) -> float:
    if not msg.HasField(name):
        raise ConfigError(f"{path}.{name}", "value is required")
    v = positive_duration_s(msg, name, path, None)
    assert v is not None
    return v


def _non_negative(msg: Any, name: str, path: str) -> float:
    v = duration_s(msg, name)
    if v is None:
        return 0.0
    if v < 0:
        raise ConfigError(f"{path}.{name}", "must be greater than or equal to 0s")
    return v


def _payload(msg: Any, path: str) -> bytes:
    """``HealthCheck.Payload``: ``text`` (hex) or ``binary``."""
    kind = msg.WhichOneof("payload")
    if kind == "binary":
        if not msg.binary:
            raise ConfigError(f"{path}.binary", "value length must be at least 1 bytes")
        return bytes(msg.binary)
    if kind == "text":
        text = msg.text
        try:
            data = bytes.fromhex(text)
        except ValueError:
            data = b""
        if not data or len(text) % 2:
            raise ConfigError(f"{path}.text", f"invalid hex string '{text}'")
        return data
    raise ConfigError(path, "one of text, binary must be set")


def _payloads(msgs: Sequence[Any], path: str) -> tuple[bytes, ...]:
    return tuple(_payload(m, f"{path}[{i}]") for i, m in enumerate(msgs))


def _ranges(msgs: Sequence[Any], what: str, path: str) -> tuple[tuple[int, int], ...]:
    """Envoy's ``HttpStatusChecker``: [start, end) ranges within 100..600."""
    out = []
    for i, r in enumerate(msgs):
        rpath = f"{path}[{i}]"
        if r.start >= r.end:
            raise ConfigError(rpath, f"Invalid http {what} status range: expecting start < end,"
                                     f" but found start={r.start} and end={r.end}")
        if r.start < 100:
            raise ConfigError(rpath, f"Invalid http {what} status range: expecting start >= 100,"
                                     f" but found start={r.start}")
        if r.end > 600:
            raise ConfigError(rpath, f"Invalid http {what} status range: expecting end <= 600,"
                                     f" but found end={r.end}")
        out.append((int(r.start), int(r.end)))
    return tuple(out)


def _header_parser(add: Sequence[Any], remove: Sequence[str], path: str,
                   add_name: str = "request_headers_to_add") -> Any:
    """Compile header mutations with the router's parser (plain values only)."""
    from types import SimpleNamespace

    from proxy.router.config import _compile_header_parser

    for i, option in enumerate(add):
        if "%" in option.header.value:
            # Envoy evaluates them against the check's stream info (upstream host only).
            raise not_supported(f"{path}.{add_name}[{i}].header.value",
                                "format operators in health check headers")
    shim = SimpleNamespace(x_headers_to_add=add, x_headers_to_remove=remove)
    try:
        return _compile_header_parser(shim, "x", path)
    except ConfigError as exc:
        # Name the real fields, not the shim's.
        fixed = exc.path.replace("x_headers_to_add", add_name).replace(
            "x_headers_to_remove", "request_headers_to_remove")
        raise ConfigError(fixed, exc.message) from None


def _http_check(msg: Any, path: str) -> HttpCheck:
    from proxy.common.matchers import compile_string_matcher

    if not msg.path:
        raise ConfigError(f"{path}.path", "value length must be at least 1 characters")
    method = _METHODS.get(msg.method)
    if method is None:
        raise ConfigError(f"{path}.method", "value must not be in list [CONNECT]")
    if msg.codec_client_type not in (_CODEC_HTTP1, _CODEC_HTTP2):
        raise not_supported(f"{path}.codec_client_type", "HTTP3")
    send = b""
    if msg.HasField("send"):
        if method in _BODILESS:
            raise ConfigError(f"{path}.send",
                              f"HTTP health check cannot specify a request payload with method"
                              f" '{method}'. Only methods that support a request body (POST, PUT,"
                              " PATCH, OPTIONS) can be used with payload.")
        send = _payload(msg.send, f"{path}.send")
    receive = _payloads(msg.receive, f"{path}.receive")
    buffer_size = wrapped(msg, "response_buffer_size", DEFAULT_RESPONSE_BUFFER_SIZE)
    if buffer_size and sum(len(r) for r in receive) > buffer_size:
        raise ConfigError(f"{path}.receive",
                          f"The expected response length '{sum(len(r) for r in receive)}' is over"
                          f" than http health response buffer size '{buffer_size}'")
    headers = None
    if msg.request_headers_to_add or msg.request_headers_to_remove:
        headers = _header_parser(msg.request_headers_to_add, msg.request_headers_to_remove, path)
    matcher = None
    if msg.HasField("service_name_matcher"):
        matcher = compile_string_matcher(msg.service_name_matcher, f"{path}.service_name_matcher")
    return HttpCheck(
        path=msg.path, host=msg.host, method=method, send=send, receive=receive,
        response_buffer_size=buffer_size,
        expected_statuses=_ranges(msg.expected_statuses, "expected",
                                  f"{path}.expected_statuses") or ((200, 201),),
        retriable_statuses=_ranges(msg.retriable_statuses, "retriable",
                                   f"{path}.retriable_statuses"),
        http2=msg.codec_client_type == _CODEC_HTTP2, headers=headers,
        service_name_matcher=matcher)


def _tcp_check(msg: Any, path: str) -> TcpCheck:
    send = _payload(msg.send, f"{path}.send") if msg.HasField("send") else b""
    return TcpCheck(send=send, receive=_payloads(msg.receive, f"{path}.receive"))


def _grpc_check(msg: Any, path: str) -> GrpcCheck:
    metadata = None
    if msg.initial_metadata:
        metadata = _header_parser(msg.initial_metadata, (), path, "initial_metadata")
    return GrpcCheck(service_name=msg.service_name, authority=msg.authority, metadata=metadata)


# ----------------------------------------------------------------------------- results
class FailureType(enum.Enum):
    """``envoy.data.core.v3.HealthCheckFailureType``."""

    ACTIVE = "ACTIVE"
    PASSIVE = "PASSIVE"
    NETWORK = "NETWORK"
    NETWORK_TIMEOUT = "NETWORK_TIMEOUT"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What one check found: success, or a failure of some type."""

    success: bool
    failure: FailureType = FailureType.ACTIVE
    retriable: bool = False
    immediate: bool = False  # x-envoy-immediate-health-check-fail came with the failure
    detail: str = ""

    @staticmethod
    def ok() -> CheckResult:
        return _OK

    @staticmethod
    def failed(failure: FailureType = FailureType.ACTIVE, detail: str = "", *,
               retriable: bool = False, immediate: bool = False) -> CheckResult:
        return CheckResult(False, failure, retriable, immediate, detail)


_OK = CheckResult(True)


def payload_matches(expected: Sequence[bytes], data: bytes) -> bool:
    """Envoy's ``PayloadMatcher::match``: each segment found in order after the previous."""
    start = 0
    for segment in expected:
        i = data.find(segment, start)
        if i < 0:
            return False
        start = i + len(segment)
    return True


def _in_ranges(status: int, ranges: Sequence[tuple[int, int]]) -> bool:
    return any(lo <= status < hi for lo, hi in ranges)


def evaluate_http_response(check: HttpCheck, status: int, headers: HeaderMap, body: bytes,
                           verify_cluster: Callable[[], bool] | None = None,
                           stats: HealthCheckerStats | None = None) -> CheckResult:
    """Envoy's ``HttpActiveHealthCheckSession::healthCheckResult``.

    ``verify_cluster()`` says whether this check compares the healthchecked-cluster header
    (runtime ``health_check.verify_cluster``, default 100 %)."""
    immediate = headers.get(IMMEDIATE_HC_FAIL_HEADER) is not None
    if check.receive:
        window = body[:check.response_buffer_size] if check.response_buffer_size else body
        if not payload_matches(check.receive, window):
            return CheckResult.failed(detail="payload_mismatch", immediate=immediate)
    if not _in_ranges(status, check.expected_statuses):
        return CheckResult.failed(
            detail=f"unexpected_status {status}", immediate=immediate,
            retriable=_in_ranges(status, check.retriable_statuses))
    if check.service_name_matcher is not None and (verify_cluster is None or verify_cluster()):
        if stats is not None:
            stats.verify_cluster.inc()
        if not check.service_name_matcher.match(headers.get(HEALTHCHECKED_CLUSTER_HEADER) or ""):
            return CheckResult.failed(detail="service_name_mismatch")
    return CheckResult.ok()


def encode_grpc_health_request(service: str) -> bytes:
    """A gRPC frame holding ``grpc.health.v1.HealthCheckRequest{service}``."""
    raw = service.encode()
    msg = b"\x0a" + _varint(len(raw)) + raw if raw else b""
    return b"\x00" + struct.pack(">I", len(msg)) + msg


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def decode_grpc_health_response(frames: bytes) -> int | None:
    """The ``status`` of the one ``HealthCheckResponse`` in ``frames`` (0 when absent); None
    when the bytes are not exactly one uncompressed gRPC message that parses."""
    if len(frames) < 5 or frames[0] != 0:
        return None
    (length,) = struct.unpack(">I", frames[1:5])
    if len(frames) != 5 + length:
        return None
    msg = frames[5:]
    status = 0
    i = 0
    try:
        while i < len(msg):
            key, i = _read_varint(msg, i)
            field, wire = key >> 3, key & 7
            if wire == 0:
                value, i = _read_varint(msg, i)
                if field == 1:
                    status = value
            elif wire == 2:
                n, i = _read_varint(msg, i)
                i += n
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            else:
                return None
        if i != len(msg):
            return None
    except IndexError:
        return None
    return status


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def evaluate_grpc_response(http_status: int | None, grpc_status: int | None,
                           body: bytes) -> CheckResult:
    """Envoy's ``GrpcActiveHealthCheckSession::onRpcComplete``: healthy only for grpc-status 0
    with one SERVING response; anything else is an (immediate) active failure."""
    if http_status != 200 and grpc_status is None:
        return CheckResult.failed(detail=f"non-200 HTTP response {http_status}")
    if grpc_status is None:
        return CheckResult.failed(detail="invalid gRPC status")
    if grpc_status != 0:
        return CheckResult.failed(detail=f"grpc-status {grpc_status}")
    served = decode_grpc_health_response(body)
    if served is None:
        return CheckResult.failed(detail="invalid grpc.health.v1 RPC payload")
    if served != GRPC_SERVING:
        return CheckResult.failed(detail=f"serving status {served}")
    return CheckResult.ok()


# ----------------------------------------------------------------------------- state machine
class Transition(enum.Enum):
    """``HealthTransition``: did this result change the host's health?"""

    UNCHANGED = "Unchanged"
    CHANGED = "Changed"
    CHANGE_PENDING = "ChangePending"


class HealthCheckerStats:
    """``cluster.<name>.health_check.*`` (Envoy's ``ALL_HEALTH_CHECKER_STATS``)."""

    __slots__ = (*HEALTH_CHECK_COUNTERS, *HEALTH_CHECK_GAUGES)

    def __init__(self, scope: Scope) -> None:
        for name in HEALTH_CHECK_COUNTERS:
            setattr(self, name, scope.counter(f"health_check.{name}"))
        for name in HEALTH_CHECK_GAUGES:
            setattr(self, name, scope.gauge(f"health_check.{name}"))


class HealthCheckerPolicy:
    """What every host's session of one checker shares: config, stats, randomness, traffic."""

    def __init__(self, config: HealthCheckConfig, stats: HealthCheckerStats,
                 rng: random.Random | None = None,
                 traffic_seen: Callable[[], bool] = lambda: True) -> None:
        self.config = config
        self.stats = stats
        self.rng = rng if rng is not None else random.Random()
        self.traffic_seen = traffic_seen

    def interval(self, healthy: bool, transition: Transition) -> float:
        """Seconds to the next check after a result (Envoy's ``interval``)."""
        c = self.config
        pending = transition is Transition.CHANGE_PENDING
        if self.traffic_seen():
            if not healthy:
                base = c.unhealthy_edge_interval if pending else c.unhealthy_interval
            else:
                base = c.healthy_edge_interval if pending else c.interval
        else:
            base = (c.no_traffic_healthy_interval if healthy and not pending
                    else c.no_traffic_interval)
        return self.with_jitter(_ms(base), _ms(c.interval_jitter)) / 1000.0

    def initial_delay(self) -> float:
        """Seconds before a new host's first check (``initial_jitter``)."""
        jitter = _ms(self.config.initial_jitter)
        if jitter == 0:
            return 0.0
        return self.with_jitter(0, jitter) / 1000.0

    def with_jitter(self, base_ms: int, jitter_ms: int) -> int:
        """Envoy's ``intervalWithJitter`` in milliseconds."""
        c = self.config
        percent_mod = c.interval_jitter_percent * base_ms // 100
        if percent_mod > 0:
            base_ms += self._random() % percent_mod
        if jitter_ms > 0:
            base_ms += self._random() % jitter_ms
        if c.max_interval_ms is not None:
            base_ms = min(base_ms, c.max_interval_ms)
        return max(1, base_ms, c.min_interval_ms)

    def _random(self) -> int:
        return self.rng.getrandbits(64)

    def verify_cluster(self) -> bool:
        pct = self.config.verify_cluster_pct
        return pct >= 100 or (pct > 0 and self._random() % 100 < pct)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


class HealthCheckSession:
    """One host's active health state (``ActiveHealthCheckSession``), on the caller's clock.

    ``healthy`` is False while the host is ``FAILED_ACTIVE_HC``. After each result,
    ``next_delay`` is the time to the next check.
    """

    __slots__ = ("policy", "healthy", "num_healthy", "num_unhealthy", "first_check",
                 "next_delay", "removed")

    def __init__(self, policy: HealthCheckerPolicy, healthy: bool = False) -> None:
        self.policy = policy
        self.healthy = healthy
        self.num_healthy = 0
        self.num_unhealthy = 0
        self.first_check = True
        self.next_delay = policy.initial_delay()
        self.removed = False
        if healthy:
            policy.stats.healthy.inc()

    def on_attempt(self) -> None:
        """A check starts (``onIntervalBase``)."""
        self.policy.stats.attempt.inc()

    def record(self, result: CheckResult) -> Transition:
        if result.success:
            return self.handle_success()
        if result.immediate and not result.retriable:
            return self.handle_failure(result.failure)
        if result.immediate:
            # Envoy excludes the host at once (EXCLUDED_VIA_IMMEDIATE_HC_FAIL) even though a
            # retriable status would only count toward the threshold: fail it now.
            return self.handle_failure(result.failure, retriable=False)
        return self.handle_failure(result.failure, retriable=result.retriable)

    def handle_success(self) -> Transition:
        self.num_unhealthy = 0
        transition = Transition.UNCHANGED
        if not self.healthy:
            self.num_healthy += 1
            if self.first_check or self.num_healthy == self.policy.config.healthy_threshold:
                self.healthy = True
                self.policy.stats.healthy.inc()
                transition = Transition.CHANGED
            else:
                transition = Transition.CHANGE_PENDING
        self.policy.stats.success.inc()
        self.first_check = False
        self.next_delay = self.policy.interval(True, transition)
        return transition

    def set_unhealthy(self, failure: FailureType, retriable: bool = False) -> Transition:
        """Count a failure (``setUnhealthy``); the timer is the caller's."""
        self.num_healthy = 0
        transition = Transition.UNCHANGED
        network = failure in (FailureType.NETWORK, FailureType.NETWORK_TIMEOUT)
        if self.healthy:
            self.num_unhealthy += 1
            if ((not network and not retriable)
                    or self.num_unhealthy == self.policy.config.unhealthy_threshold):
                self.healthy = False
                self.policy.stats.healthy.dec()
                transition = Transition.CHANGED
            else:
                transition = Transition.CHANGE_PENDING
        stats = self.policy.stats
        stats.failure.inc()
        if network:
            stats.network_failure.inc()
        elif failure is FailureType.PASSIVE:
            stats.passive_failure.inc()
        self.first_check = False
        return transition

    def handle_failure(self, failure: FailureType, retriable: bool = False) -> Transition:
        transition = self.set_unhealthy(failure, retriable)
        self.next_delay = self.policy.interval(False, transition)
        return transition

    def remove(self) -> None:
        """The host left the cluster: its share of the ``healthy`` gauge goes with it."""
        if not self.removed:
            self.removed = True
            if self.healthy:
                self.policy.stats.healthy.dec()
