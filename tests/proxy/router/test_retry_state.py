"""Retries, sans-IO: the policy from the proto, the decisions, backoff and host predicates."""

from __future__ import annotations

import random

import pytest
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from proxy.config.errors import ConfigError
from proxy.http.headers import HeaderMap
from proxy.router.retry_state import (
    RETRY_ON_5XX,
    RETRY_ON_CONNECT_FAILURE,
    RETRY_ON_GATEWAY_ERROR,
    BackOff,
    RetryPolicy,
    RetryState,
    RetryStatus,
    parse_retry_on,
)
from proxy.stats import Store
from proxy.upstream.cluster_manager import ClusterStats
from proxy.upstream.resource_manager import ResourceManager, Thresholds

PATH = "routes[0].route.retry_policy"


def policy(d: dict) -> RetryPolicy:
    msg = json_format.ParseDict(d, route_components_pb2.RetryPolicy())
    return RetryPolicy.from_proto(msg, PATH)


class Env:
    def __init__(self, max_retries: int = 3) -> None:
        self.store = Store()
        scope = self.store.scope("cluster.c.")
        self.stats = ClusterStats(scope)
        self.rm = ResourceManager(Thresholds(max_retries=max_retries), scope)

    def state(self, p: RetryPolicy | None, headers: dict[str, str] | None = None,
              request: HeaderMap | None = None) -> RetryState | None:
        return RetryState.create(p, request or HeaderMap(), self.stats, self.rm.retries,
                                 random.Random(1), envoy_headers=headers)

    def c(self, name: str) -> int:
        return self.store.counters[f"cluster.c.{name}"].value


def test_parse_retry_on() -> None:
    assert parse_retry_on("5xx, connect-failure") == (RETRY_ON_5XX | RETRY_ON_CONNECT_FAILURE,
                                                       True)
    assert parse_retry_on("5xx,bogus") == (RETRY_ON_5XX, False)


def test_policy_from_proto() -> None:
    p = policy({"retry_on": "gateway-error,unavailable", "num_retries": 4,
                "per_try_timeout": "0.5s",
                "retry_back_off": {"base_interval": "0.01s", "max_interval": "1s"},
                "retriable_status_codes": [418],
                "retry_host_predicate": [{
                    "name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host."
                                     "previous_hosts.v3.PreviousHostsPredicate"}}],
                "host_selection_retry_max_attempts": 3})
    assert p.retry_on & RETRY_ON_GATEWAY_ERROR
    assert p.num_retries == 4 and p.per_try_timeout == 0.5
    assert (p.base_interval_ms, p.max_interval_ms) == (10, 1000)
    assert p.previous_hosts and p.host_selection_max_attempts == 3
    assert policy({}).num_retries == 1  # Envoy's default


@pytest.mark.parametrize(("d", "path"), [
    ({"retry_on": "5xx,sometimes"}, f"{PATH}.retry_on"),
    ({"retry_back_off": {"max_interval": "1s"}}, f"{PATH}.retry_back_off.base_interval"),
    ({"retry_back_off": {"base_interval": "1s", "max_interval": "0.5s"}},
     f"{PATH}.retry_back_off.max_interval"),
    ({"retry_host_predicate": [{"name": "envoy.retry_host_predicates.omit_canary_hosts"}]},
     f"{PATH}.retry_host_predicate[0].name"),
    ({"retriable_status_codes": [1000]}, f"{PATH}.retriable_status_codes[0]"),
])
def test_policy_refusals(d: dict, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        policy(d)
    assert info.value.path == path


def test_no_state_without_retry_on() -> None:
    env = Env()
    assert env.state(None) is None
    assert env.state(policy({"num_retries": 3})) is None
    assert env.state(None, {"x-envoy-retry-on": "5xx"}) is not None


@pytest.mark.parametrize(("retry_on", "status", "expect"), [
    ("5xx", 503, True), ("5xx", 500, True), ("5xx", 409, False),
    ("gateway-error", 500, False), ("gateway-error", 502, True), ("gateway-error", 504, True),
    ("retriable-4xx", 409, True), ("retriable-4xx", 404, False),
    ("retriable-status-codes", 418, True), ("retriable-status-codes", 417, False),
    ("connect-failure", 503, False), ("reset", 503, False),
])
def test_would_retry_headers(retry_on: str, status: int, expect: bool) -> None:
    s = Env().state(policy({"retry_on": retry_on, "retriable_status_codes": [418]}))
    assert s is not None
    assert s.would_retry_headers(status, HeaderMap([(":status", str(status))])) is expect


def test_retriable_headers_and_grpc_status() -> None:
    s = Env().state(policy({"retry_on": "retriable-headers,unavailable",
                            "retriable_headers": [{"name": "x-upstream-retry"}]}))
    assert s is not None
    assert s.would_retry_headers(200, HeaderMap([("x-upstream-retry", "1")]))
    assert s.would_retry_headers(200, HeaderMap([("grpc-status", "14")]))
    assert not s.would_retry_headers(200, HeaderMap([("grpc-status", "13")]))


@pytest.mark.parametrize(("retry_on", "reason", "started", "expect"), [
    ("connect-failure", "connection_failure", False, True),
    ("connect-failure", "connection_timeout", False, True),
    ("connect-failure", "connection_termination", True, False),
    ("5xx", "connection_failure", False, True),
    ("5xx", "local_reset", True, True),
    ("gateway-error", "remote_reset", True, True),
    ("reset", "connection_termination", True, True),
    ("refused-stream", "remote_refused_stream_reset", True, True),
    ("refused-stream", "remote_reset", True, False),
    ("reset-before-request", "connection_termination", False, True),
    ("reset-before-request", "connection_termination", True, False),
    ("5xx", "overflow", False, False),
])
def test_would_retry_reset(retry_on: str, reason: str, started: bool, expect: bool) -> None:
    s = Env().state(policy({"retry_on": retry_on}))
    assert s is not None
    assert s.would_retry_reset(reason, started) is expect


def test_limit_success_and_overflow_are_counted() -> None:
    env = Env(max_retries=1)
    s = env.state(policy({"retry_on": "5xx", "num_retries": 2}))
    assert s is not None
    h503 = HeaderMap([(":status", "503")])
    assert s.should_retry_headers(503, h503) is RetryStatus.YES
    assert env.rm.retries.count == 1  # held until the next decision
    assert s.should_retry_headers(200, HeaderMap()) is RetryStatus.NO
    assert env.rm.retries.count == 0
    assert env.c("upstream_rq_retry") == 1 and env.c("upstream_rq_retry_success") == 1
    # A second request exhausts its two retries; the breaker allows one at a time.
    s2 = env.state(policy({"retry_on": "5xx", "num_retries": 2}))
    other = env.state(policy({"retry_on": "5xx"}))
    assert s2 is not None and other is not None
    assert other.should_retry_reset("connection_termination") is RetryStatus.YES
    assert s2.should_retry_headers(503, h503) is RetryStatus.NO_OVERFLOW
    assert env.c("upstream_rq_retry_overflow") == 1
    other.release()
    assert s2.should_retry_headers(503, h503) is RetryStatus.YES
    assert s2.should_retry_headers(503, h503) is RetryStatus.NO_RETRY_LIMIT_EXCEEDED
    assert env.c("upstream_rq_retry_limit_exceeded") == 1
    assert env.rm.retries.count == 0


def test_request_headers_merge_as_envoy() -> None:
    env = Env()
    s = env.state(policy({"retry_on": "connect-failure", "num_retries": 1}),
                  {"x-envoy-retry-on": "5xx", "x-envoy-max-retries": "5",
                   "x-envoy-retriable-status-codes": "418,bad",
                   "x-envoy-upstream-rq-per-try-timeout-ms": "250"})
    assert s is not None
    assert s.retry_on & RETRY_ON_5XX and s.retry_on & RETRY_ON_CONNECT_FAILURE
    assert s.remaining == 5 and 418 in s.status_codes
    assert s.per_try_timeout == 0.25
    # x-envoy-max-retries alone does not enable retries.
    assert env.state(None, {"x-envoy-max-retries": "5"}) is None


def test_retriable_request_headers_gate_retries() -> None:
    p = policy({"retry_on": "5xx",
                "retriable_request_headers": [{"name": ":method", "exact_match": "GET"}]})
    env = Env()
    assert env.state(p, request=HeaderMap([(":method", "GET")])) is not None
    assert env.state(p, request=HeaderMap([(":method", "POST")])) is None


def test_previous_hosts_predicate() -> None:
    s = Env().state(policy({"retry_on": "5xx", "retry_host_predicate": [
        {"name": "envoy.retry_host_predicates.previous_hosts"}]}))
    assert s is not None
    s.on_host_attempted("a")
    assert s.should_select_another_host("a") and not s.should_select_another_host("b")


@given(st.integers(1, 500), st.integers(1, 20), st.integers(0, 2**32))
def test_backoff_is_full_jitter_under_a_doubling_ceiling(base: int, factor: int,
                                                         seed: int) -> None:
    maximum = base * factor
    b = BackOff(base, maximum, random.Random(seed))
    ceiling = base
    for _ in range(12):
        wait_ms = b.next_backoff() * 1000
        assert 0 <= wait_ms < max(ceiling, 1) or wait_ms <= maximum
        assert wait_ms < ceiling + 1e-6 or ceiling == 0
        ceiling = ceiling * 2 if ceiling < maximum // 2 else maximum


def test_default_backoff_is_25ms_base_and_10x_max() -> None:
    s = Env().state(policy({"retry_on": "5xx"}))
    assert s is not None
    assert (s.backoff_strategy.base_ms, s.backoff_strategy.max_ms) == (25, 250)
    waits = [s.backoff() for _ in range(10)]
    assert all(0 <= w < 0.25 for w in waits)
