"""Circuit breakers, sans-IO: thresholds from the proto, counts, and Envoy's gauges."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import circuit_breaker_pb2
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from proxy.config.errors import ConfigError
from proxy.stats import Store
from proxy.upstream.resource_manager import (
    DEFAULT,
    HIGH,
    CircuitBreakers,
    ResourceManager,
    Thresholds,
)

PATH = "static_resources.clusters[0].circuit_breakers"


def compile_cb(d: dict) -> CircuitBreakers:
    msg = json_format.ParseDict(d, circuit_breaker_pb2.CircuitBreakers())
    return CircuitBreakers.from_proto(msg, PATH)


def test_defaults_are_envoys() -> None:
    cb = compile_cb({})
    assert cb.default == Thresholds(1024, 1024, 1024, 3, None, False)
    assert cb.high == cb.default


def test_first_thresholds_per_priority_win_and_missing_fields_default() -> None:
    cb = compile_cb({"thresholds": [
        {"max_connections": 1, "max_pending_requests": 2},
        {"priority": "HIGH", "max_requests": 7, "track_remaining": True},
        {"max_connections": 99},
    ]})
    assert cb.default.max_connections == 1
    assert cb.default.max_pending_requests == 2
    assert cb.default.max_requests == 1024
    assert cb.high.max_requests == 7 and cb.high.track_remaining
    assert cb.for_priority(HIGH) is cb.high and cb.for_priority(DEFAULT) is cb.default


@pytest.mark.parametrize(("d", "path"), [
    ({"per_host_thresholds": [{"max_connections": 1}]}, f"{PATH}.per_host_thresholds"),
    ({"thresholds": [{"max_connection_pools": 1}]}, f"{PATH}.thresholds[0].max_connection_pools"),
    ({"thresholds": [{"retry_budget": {"budget_percent": {"value": 101}}}]},
     f"{PATH}.thresholds[0].retry_budget.budget_percent.value"),
])
def test_refusals_name_the_field(d: dict, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_cb(d)
    assert info.value.path == path


def test_counts_gauges_and_remaining() -> None:
    store = Store()
    rm = ResourceManager(Thresholds(max_connections=2, track_remaining=True),
                         store.scope("cluster.c."))
    g = store.gauges
    cx = rm.connections
    assert g["cluster.c.circuit_breakers.default.remaining_cx"].value == 2
    assert cx.can_create()
    cx.inc()
    assert g["cluster.c.circuit_breakers.default.cx_open"].value == 0
    assert g["cluster.c.circuit_breakers.default.remaining_cx"].value == 1
    cx.inc()
    assert not cx.can_create()
    assert g["cluster.c.circuit_breakers.default.cx_open"].value == 1
    assert g["cluster.c.circuit_breakers.default.remaining_cx"].value == 0
    cx.dec()
    assert cx.can_create()
    assert g["cluster.c.circuit_breakers.default.cx_open"].value == 0
    # Without track_remaining there is no remaining_* gauge at all.
    assert "cluster.c.circuit_breakers.default.remaining_rq" in g
    store2 = Store()
    ResourceManager(Thresholds(), store2.scope("cluster.c."), HIGH)
    assert "cluster.c.circuit_breakers.high.rq_pending_open" in store2.gauges
    assert not any("remaining" in n for n in store2.gauges)


def test_zero_limit_refuses_everything() -> None:
    rm = ResourceManager(Thresholds(max_pending_requests=0), Store().scope("x."))
    assert not rm.pending_requests.can_create()


def test_retry_budget_follows_active_requests() -> None:
    cb = compile_cb({"thresholds": [{"retry_budget": {}}]})
    assert cb.default.retry_budget == (20.0, 3)
    rm = ResourceManager(cb.default, Store().scope("x."))
    for _ in range(3):
        assert rm.retries.can_create()
        rm.retries.inc()
    assert not rm.retries.can_create()  # min_retry_concurrency 3 with nothing active
    for _ in range(20):
        rm.requests.inc()
    for _ in range(5):
        rm.pending_requests.inc()
    assert rm.retries.can_create()  # 20 % of 25 = 5
    rm.retries.inc()
    rm.retries.inc()
    assert not rm.retries.can_create()


@given(st.lists(st.booleans(), max_size=200), st.integers(0, 10))
def test_count_never_passes_the_limit_when_callers_ask_first(ops: list[bool], limit: int) -> None:
    store = Store()
    rm = ResourceManager(Thresholds(max_requests=limit), store.scope("x."))
    rq = rm.requests
    held = 0
    for take in ops:
        if take and rq.can_create():
            rq.inc()
            held += 1
        elif not take and held:
            rq.dec()
            held -= 1
        assert rq.count == held <= limit
        assert store.gauges["x.circuit_breakers.default.rq_open"].value == (held >= limit)
