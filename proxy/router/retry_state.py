"""Retries (Envoy's ``RetryPolicyImpl`` + ``RetryStateImpl``), sans-IO.

Theory of operation
-------------------
1. ``RetryPolicy.from_proto`` compiles a route's (or its virtual host's) ``retry_policy``:
   ``retry_on`` (HTTP and gRPC conditions, comma-separated), ``num_retries`` (default 1),
   ``per_try_timeout``, ``retry_back_off`` (base 25 ms — runtime
   ``upstream.base_retry_backoff_ms`` — and max 10 × base), ``retriable_status_codes``,
   ``retriable_headers``, ``retriable_request_headers``, the ``previous_hosts`` host
   predicate and ``host_selection_retry_max_attempts``. An unknown ``retry_on`` value is
   refused.
2. ``RetryState.create`` (per request) returns None unless the policy or the request's
   ``x-envoy-retry-on`` / ``x-envoy-retry-grpc-on`` asks for retries (so a route without a
   policy pays one attribute check). Request headers merge in as Envoy's: the retry-on
   values are OR-ed into the policy's, ``x-envoy-max-retries`` replaces ``num_retries``,
   ``x-envoy-retriable-status-codes`` and ``x-envoy-retriable-header-names`` extend the
   lists. ``retriable_request_headers`` that do not match turn retries off. The router
   removes every retry header before the request goes upstream.
3. Each attempt's outcome asks ``should_retry_headers(status, headers)`` or
   ``should_retry_reset(reason, started)``: ``NO`` (done; when an earlier retry was
   pending this counts ``upstream_rq_retry_success``), ``NO_RETRY_LIMIT_EXCEEDED``
   (``upstream_rq_retry_limit_exceeded``; the router sets URX), ``NO_OVERFLOW`` (the
   ``max_retries`` / retry budget breaker is full: ``upstream_rq_retry_overflow``; the
   router sets UO) or ``YES``: ``upstream_rq_retry`` and ``upstream_rq_retry_backoff_
   exponential`` are counted, one ``retries`` slot of the breaker is held until the next
   decision or ``release()``, and ``backoff()`` says how long to wait first.
4. Backoff is Envoy's ``JitteredExponentialBackOffStrategy``: the n-th wait is uniform in
   ``[0, min(base * 2**n, max))`` milliseconds (full jitter); the ceiling stops at ``max``.
5. ``previous_hosts``: every host tried is remembered; on a retry the router asks
   ``should_select_another_host(host)`` and picks again, up to
   ``host_selection_retry_max_attempts`` more times (Envoy's ``chooseHost`` loop).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import Any

from proxy.common.matchers import HeaderMatcher, compile_header_matchers
from proxy.config.errors import ConfigError, not_supported
from proxy.config.protos import duration_s, wrapped

__all__ = [
    "RETRY_HEADERS",
    "BackOff",
    "RetryPolicy",
    "RetryState",
    "RetryStatus",
    "parse_retry_grpc_on",
    "parse_retry_on",
]

RETRY_ON_5XX = 1 << 0
RETRY_ON_GATEWAY_ERROR = 1 << 1
RETRY_ON_CONNECT_FAILURE = 1 << 2
RETRY_ON_RETRIABLE_4XX = 1 << 3
RETRY_ON_REFUSED_STREAM = 1 << 4
RETRY_ON_RETRIABLE_STATUS_CODES = 1 << 5
RETRY_ON_RESET = 1 << 6
RETRY_ON_RETRIABLE_HEADERS = 1 << 7
RETRY_ON_ENVOY_RATE_LIMITED = 1 << 8
RETRY_ON_RESET_BEFORE_REQUEST = 1 << 9
RETRY_ON_GRPC_CANCELLED = 1 << 10
RETRY_ON_GRPC_DEADLINE_EXCEEDED = 1 << 11
RETRY_ON_GRPC_RESOURCE_EXHAUSTED = 1 << 12
RETRY_ON_GRPC_UNAVAILABLE = 1 << 13
RETRY_ON_GRPC_INTERNAL = 1 << 14

_RETRY_ON = {
    "5xx": RETRY_ON_5XX,
    "gateway-error": RETRY_ON_GATEWAY_ERROR,
    "connect-failure": RETRY_ON_CONNECT_FAILURE,
    "envoy-ratelimited": RETRY_ON_ENVOY_RATE_LIMITED,
    "retriable-4xx": RETRY_ON_RETRIABLE_4XX,
    "refused-stream": RETRY_ON_REFUSED_STREAM,
    "retriable-status-codes": RETRY_ON_RETRIABLE_STATUS_CODES,
    "retriable-headers": RETRY_ON_RETRIABLE_HEADERS,
    "reset": RETRY_ON_RESET,
    "reset-before-request": RETRY_ON_RESET_BEFORE_REQUEST,
}
_RETRY_GRPC_ON = {
    "cancelled": RETRY_ON_GRPC_CANCELLED,
    "deadline-exceeded": RETRY_ON_GRPC_DEADLINE_EXCEEDED,
    "resource-exhausted": RETRY_ON_GRPC_RESOURCE_EXHAUSTED,
    "unavailable": RETRY_ON_GRPC_UNAVAILABLE,
    "internal": RETRY_ON_GRPC_INTERNAL,
}
_GRPC_STATUS_BITS = {1: RETRY_ON_GRPC_CANCELLED, 4: RETRY_ON_GRPC_DEADLINE_EXCEEDED,
                     8: RETRY_ON_GRPC_RESOURCE_EXHAUSTED, 14: RETRY_ON_GRPC_UNAVAILABLE,
                     13: RETRY_ON_GRPC_INTERNAL}
_GRPC_ANY = (RETRY_ON_GRPC_CANCELLED | RETRY_ON_GRPC_DEADLINE_EXCEEDED
             | RETRY_ON_GRPC_RESOURCE_EXHAUSTED | RETRY_ON_GRPC_UNAVAILABLE
             | RETRY_ON_GRPC_INTERNAL)

# Reset reasons (Envoy's StreamResetReason, as the pools spell them).
CONNECTION_FAILURE = "connection_failure"
CONNECTION_TIMEOUT = "connection_timeout"
OVERFLOW = "overflow"
REMOTE_REFUSED_STREAM_RESET = "remote_refused_stream_reset"
_CONNECT_FAILURES = frozenset({CONNECTION_FAILURE, CONNECTION_TIMEOUT})

# What Envoy consumes from the request (RetryStateImpl::create and the router's timeouts).
RETRY_HEADERS = frozenset({
    "x-envoy-retry-on", "x-envoy-retry-grpc-on", "x-envoy-max-retries",
    "x-envoy-hedge-on-per-try-timeout", "x-envoy-retriable-header-names",
    "x-envoy-retriable-status-codes", "x-envoy-upstream-rq-per-try-timeout-ms",
})

DEFAULT_BASE_INTERVAL_MS = 25
PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"


def parse_retry_on(value: str) -> tuple[int, bool]:
    """``x-envoy-retry-on`` / ``retry_on``: (bits, every token known)."""
    bits = 0
    valid = True
    for token in value.split(","):
        token = token.strip()
        if not token:
            continue
        bit = _RETRY_ON.get(token)
        if bit is None:
            valid = False
        else:
            bits |= bit
    return bits, valid


def parse_retry_grpc_on(value: str) -> tuple[int, bool]:
    bits = 0
    valid = True
    for token in value.split(","):
        token = token.strip()
        if not token:
            continue
        bit = _RETRY_GRPC_ON.get(token)
        if bit is None:
            valid = False
        else:
            bits |= bit
    return bits, valid


class RetryStatus(enum.Enum):
    NO = "no"
    YES = "yes"
    NO_OVERFLOW = "no_overflow"
    NO_RETRY_LIMIT_EXCEEDED = "no_retry_limit_exceeded"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A compiled ``envoy.config.route.v3.RetryPolicy``."""

    retry_on: int = 0
    num_retries: int = 1
    per_try_timeout: float | None = None
    base_interval_ms: int | None = None  # None: the runtime's, else 25 ms
    max_interval_ms: int | None = None  # None: 10 x base
    retriable_status_codes: tuple[int, ...] = ()
    retriable_headers: tuple[HeaderMatcher, ...] = ()
    retriable_request_headers: tuple[HeaderMatcher, ...] = ()
    previous_hosts: bool = False
    host_selection_max_attempts: int = 1

    @staticmethod
    def from_proto(msg: Any, path: str) -> RetryPolicy:
        retry_on = 0
        for token in msg.retry_on.split(","):
            token = token.strip()
            if not token:
                continue
            bit = _RETRY_ON.get(token) or _RETRY_GRPC_ON.get(token)
            if bit is None:
                raise ConfigError(f"{path}.retry_on", f"unknown retry_on value {token!r}"
                                  f" (supported: {', '.join([*_RETRY_ON, *_RETRY_GRPC_ON])})")
            retry_on |= bit
        per_try = duration_s(msg, "per_try_timeout")
        if per_try is not None and per_try < 0:
            raise ConfigError(f"{path}.per_try_timeout", "must not be negative")
        base_ms = max_ms = None
        if msg.HasField("retry_back_off"):
            bo = msg.retry_back_off
            bpath = f"{path}.retry_back_off"
            base = duration_s(bo, "base_interval")
            if base is None:
                raise ConfigError(f"{bpath}.base_interval", "value is required")
            if base < 0.001:
                raise ConfigError(f"{bpath}.base_interval", "value must be greater than 1ms")
            base_ms = int(base * 1000)
            mx = duration_s(bo, "max_interval")
            if mx is not None:
                if mx <= 0:
                    raise ConfigError(f"{bpath}.max_interval", "value must be greater than 0s")
                max_ms = int(mx * 1000)
                if max_ms < base_ms:
                    raise ConfigError(f"{bpath}.max_interval",
                                      "max_interval must be greater than or equal to the"
                                      " base_interval")
        previous_hosts = False
        for i, pred in enumerate(msg.retry_host_predicate):
            ppath = f"{path}.retry_host_predicate[{i}]"
            if pred.name != PREVIOUS_HOSTS:
                raise not_supported(f"{ppath}.name", f"retry host predicate {pred.name!r}"
                                    f" (supported: {PREVIOUS_HOSTS})")
            previous_hosts = True
        codes = tuple(msg.retriable_status_codes)
        for i, code in enumerate(codes):
            if not 100 <= code <= 599:
                raise ConfigError(f"{path}.retriable_status_codes[{i}]",
                                  f"not an HTTP status code: {code}")
        return RetryPolicy(
            retry_on=retry_on,
            num_retries=wrapped(msg, "num_retries", 1),
            per_try_timeout=per_try or None,
            base_interval_ms=base_ms,
            max_interval_ms=max_ms,
            retriable_status_codes=codes,
            retriable_headers=compile_header_matchers(msg.retriable_headers,
                                                      f"{path}.retriable_headers"),
            retriable_request_headers=compile_header_matchers(
                msg.retriable_request_headers, f"{path}.retriable_request_headers"),
            previous_hosts=previous_hosts,
            host_selection_max_attempts=msg.host_selection_retry_max_attempts or 1,
        )


EMPTY_POLICY = RetryPolicy()


class BackOff:
    """Envoy's ``JitteredExponentialBackOffStrategy`` (milliseconds in, seconds out)."""

    __slots__ = ("base_ms", "max_ms", "next_ms", "rng")

    def __init__(self, base_ms: int, max_ms: int, rng: random.Random) -> None:
        self.base_ms = base_ms
        self.max_ms = max_ms
        self.next_ms = base_ms
        self.rng = rng

    def next_backoff(self) -> float:
        ceiling = self.next_ms
        self.next_ms = ceiling * 2 if ceiling < self.max_ms // 2 else self.max_ms
        return min(self.rng.randrange(ceiling) if ceiling > 0 else 0, self.max_ms) / 1000.0

    def reset(self) -> None:
        self.next_ms = self.base_ms


class RetryState:
    """One request's retries."""

    __slots__ = ("retry_on", "remaining", "status_codes", "headers", "policy", "stats",
                 "retries", "holding", "backoff_strategy", "attempted", "per_try_timeout")

    def __init__(self, policy: RetryPolicy, retry_on: int, remaining: int,
                 status_codes: tuple[int, ...], headers: tuple[HeaderMatcher, ...],
                 stats: Any, retries: Any, rng: random.Random, base_ms: int) -> None:
        self.policy = policy
        self.retry_on = retry_on
        self.remaining = remaining
        self.status_codes = status_codes
        self.headers = headers
        self.stats = stats  # ClusterStats (upstream_rq_retry* counters)
        self.retries = retries  # the cluster's ResourceLimit for retries
        self.holding = False
        base = policy.base_interval_ms if policy.base_interval_ms is not None else base_ms
        mx = policy.max_interval_ms if policy.max_interval_ms is not None else base * 10
        self.backoff_strategy = BackOff(base, mx, rng)
        self.attempted: list[Any] = []
        self.per_try_timeout = policy.per_try_timeout

    @staticmethod
    def create(policy: RetryPolicy | None, request_headers: Any, stats: Any, retries: Any,
               rng: random.Random, base_ms: int = DEFAULT_BASE_INTERVAL_MS,
               envoy_headers: dict[str, str] | None = None) -> RetryState | None:
        """The request's retry state, or None when nothing asks for retries.

        ``envoy_headers`` holds the request's retry headers (``RETRY_HEADERS``) that are to
        be honoured; the caller has removed them from ``request_headers``.
        """
        if policy is None:
            policy = EMPTY_POLICY
        h = envoy_headers or {}
        retry_on = policy.retry_on
        if "x-envoy-retry-on" in h:
            retry_on |= parse_retry_on(h["x-envoy-retry-on"])[0]
        if "x-envoy-retry-grpc-on" in h:
            retry_on |= parse_retry_grpc_on(h["x-envoy-retry-grpc-on"])[0]
        if not retry_on:
            return None
        if policy.retriable_request_headers and not any(
                m.matches(request_headers) for m in policy.retriable_request_headers):
            return None
        remaining = policy.num_retries
        value = h.get("x-envoy-max-retries")
        if value is not None and value.strip().isdigit():
            remaining = int(value.strip())  # the header takes precedence
        codes = policy.retriable_status_codes
        value = h.get("x-envoy-retriable-status-codes")
        if value is not None:
            extra = [int(c) for c in (p.strip() for p in value.split(",")) if c.isdigit()]
            codes = (*codes, *extra)
        matchers = policy.retriable_headers
        value = h.get("x-envoy-retriable-header-names")
        if value is not None:
            names = [n.strip().lower() for n in value.split(",") if n.strip()]
            matchers = (*matchers, *(HeaderMatcher(n, None, True, False, False) for n in names))
        state = RetryState(policy, retry_on, remaining, codes, matchers, stats, retries, rng,
                           base_ms)
        value = h.get("x-envoy-upstream-rq-per-try-timeout-ms")
        if value is not None and value.strip().isdigit():
            state.per_try_timeout = int(value.strip()) / 1000 or None
        return state

    # -- decisions ------------------------------------------------------------------------
    def would_retry_headers(self, status: int, headers: Any) -> bool:
        retry_on = self.retry_on
        if headers.get("x-envoy-ratelimited") is not None:
            # An upstream Envoy rate limited it: retried only with envoy-ratelimited.
            return bool(retry_on & RETRY_ON_ENVOY_RATE_LIMITED)
        if retry_on & RETRY_ON_5XX and 500 <= status <= 599:
            return True
        if retry_on & RETRY_ON_GATEWAY_ERROR and 502 <= status <= 504:
            return True
        if retry_on & RETRY_ON_RETRIABLE_4XX and status == 409:
            return True
        if retry_on & RETRY_ON_RETRIABLE_STATUS_CODES and status in self.status_codes:
            return True
        if retry_on & RETRY_ON_RETRIABLE_HEADERS:
            for m in self.headers:
                if m.matches(headers):
                    return True
        if retry_on & _GRPC_ANY:
            value = headers.get("grpc-status")
            if value is not None and value.isdigit():
                bit = _GRPC_STATUS_BITS.get(int(value), 0)
                if retry_on & bit:
                    return True
        return False

    def would_retry_reset(self, reason: str, started: bool) -> bool:
        retry_on = self.retry_on
        if reason == OVERFLOW:
            return False
        if reason in _CONNECT_FAILURES and retry_on & RETRY_ON_CONNECT_FAILURE:
            return True
        if retry_on & RETRY_ON_RESET_BEFORE_REQUEST and not started:
            return True
        if retry_on & (RETRY_ON_RESET | RETRY_ON_5XX | RETRY_ON_GATEWAY_ERROR):
            return True
        return bool(retry_on & RETRY_ON_REFUSED_STREAM and reason == REMOTE_REFUSED_STREAM_RESET)

    def should_retry_headers(self, status: int, headers: Any) -> RetryStatus:
        return self._should_retry(self.would_retry_headers(status, headers))

    def should_retry_reset(self, reason: str, started: bool = True) -> RetryStatus:
        return self._should_retry(self.would_retry_reset(reason, started))

    def _should_retry(self, would_retry: bool) -> RetryStatus:
        stats = self.stats
        if self.holding and not would_retry:
            stats.upstream_rq_retry_success.inc()
        self.release()
        if not would_retry:
            return RetryStatus.NO
        if self.remaining == 0:
            stats.upstream_rq_retry_limit_exceeded.inc()
            return RetryStatus.NO_RETRY_LIMIT_EXCEEDED
        self.remaining -= 1
        if not self.retries.can_create():
            stats.upstream_rq_retry_overflow.inc()
            return RetryStatus.NO_OVERFLOW
        self.retries.inc()
        self.holding = True
        stats.upstream_rq_retry.inc()
        stats.upstream_rq_retry_backoff_exponential.inc()
        return RetryStatus.YES

    def backoff(self) -> float:
        """Seconds to wait before the retry just granted."""
        return self.backoff_strategy.next_backoff()

    def release(self) -> None:
        """Give back the retry slot held since the last YES (the request ended)."""
        if self.holding:
            self.holding = False
            self.retries.dec()

    # -- host selection -------------------------------------------------------------------
    def on_host_attempted(self, host: Any) -> None:
        if self.policy.previous_hosts:
            self.attempted.append(host)

    def should_select_another_host(self, host: Any) -> bool:
        return host in self.attempted

    @property
    def host_selection_max_attempts(self) -> int:
        return self.policy.host_selection_max_attempts
