"""Outlier detection, sans-IO, on a virtual clock: ejection, return, success rate."""

from __future__ import annotations

import random

import pytest
from envoy.config.cluster.v3 import outlier_detection_pb2
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from proxy.config.errors import ConfigError
from proxy.stats import Store
from proxy.upstream.host import Host
from proxy.upstream.outlier_detection import (
    CONNECT_FAILED,
    CONNECT_SUCCESS,
    TIMEOUT,
    OutlierDetectionConfig,
    OutlierDetector,
)

PATH = "static_resources.clusters[0].outlier_detection"


def cfg(**d: object) -> OutlierDetectionConfig:
    msg = json_format.ParseDict(d, outlier_detection_pb2.OutlierDetection())
    return OutlierDetectionConfig.from_proto(msg, PATH)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class World:
    def __init__(self, config: OutlierDetectionConfig, n: int = 3) -> None:
        self.clock = Clock()
        self.store = Store()
        self.changes: list[Host] = []
        self.hosts = [Host(f"10.0.0.{i}", 80) for i in range(n)]
        self.det = OutlierDetector(config, self.store.scope("cluster.c."), self.clock,
                                   random.Random(0), self.changes.append)
        self.det.set_hosts(self.hosts)

    def tick(self, seconds: float | None = None) -> None:
        """Advance one interval (or ``seconds``) and run the interval timer."""
        self.clock.now += self.det.config.interval if seconds is None else seconds
        self.det.on_interval()

    def c(self, name: str) -> int:
        return self.store.counters[f"cluster.c.outlier_detection.{name}"].value

    def active(self) -> int:
        return self.store.gauges["cluster.c.outlier_detection.ejections_active"].value


def fail(host: Host, n: int, code: int = 500) -> None:
    for _ in range(n):
        host.outlier.put_http_response_code(code)


def test_defaults_are_envoys() -> None:
    c = cfg()
    assert (c.interval, c.base_ejection_time, c.max_ejection_time) == (10.0, 30.0, 300.0)
    assert (c.consecutive_5xx, c.max_ejection_percent, c.enforcing_consecutive_5xx) == (5, 10, 100)
    assert c.enforcing_consecutive_gateway_failure == 0
    assert cfg(base_ejection_time="400s").max_ejection_time == 400.0


@pytest.mark.parametrize(("d", "path"), [
    ({"base_ejection_time": "10s", "max_ejection_time": "5s"}, f"{PATH}.max_ejection_time"),
    ({"max_ejection_percent": 101}, f"{PATH}.max_ejection_percent.value"),
    ({"interval": "0s"}, f"{PATH}.interval"),
    ({"monitors": [{"name": "x"}]}, f"{PATH}.monitors"),
])
def test_refusals(d: dict, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg(**d)
    assert info.value.path == path


def test_consecutive_5xx_ejects_and_durations_grow_per_ejection() -> None:
    w = World(cfg(consecutive_5xx=3, max_ejection_percent=100, interval="1s",
                  base_ejection_time="10s"))
    h = w.hosts[0]
    fail(h, 2)
    h.outlier.put_http_response_code(200)  # a success resets the count
    fail(h, 2)
    assert not h.ejected
    fail(h, 1)
    assert h.ejected and w.changes == [h]
    assert w.c("ejections_enforced_consecutive_5xx") == 1 and w.active() == 1
    # First ejection: base_ejection_time (10 s), returned on the first interval after it.
    for _ in range(9):
        w.tick()
        assert h.ejected
    w.tick()
    assert not h.ejected and w.active() == 0
    # Ejected again at once: 2 x base, then 3 x base (Envoy's multiplier).
    fail(h, 3)
    t0 = w.clock.now
    while h.ejected:
        w.tick()
    assert w.clock.now - t0 == pytest.approx(20.0)
    fail(h, 3)
    t0 = w.clock.now
    while h.ejected:
        w.tick()
    assert w.clock.now - t0 == pytest.approx(30.0)


def test_max_ejection_time_caps_and_good_behaviour_lowers_the_multiplier() -> None:
    w = World(cfg(consecutive_5xx=1, max_ejection_percent=100, interval="1s",
                  base_ejection_time="10s", max_ejection_time="25s"))
    h = w.hosts[0]
    times = []
    for _ in range(5):
        fail(h, 1)
        t0 = w.clock.now
        while h.ejected:
            w.tick()
        times.append(w.clock.now - t0)
    assert times == pytest.approx([10, 20, 25, 25, 25])
    for _ in range(60):  # healthy for a while: the multiplier comes back down
        w.tick()
    fail(h, 1)
    t0 = w.clock.now
    while h.ejected:
        w.tick()
    assert w.clock.now - t0 == pytest.approx(10.0)


def test_max_ejection_percent_is_strict() -> None:
    w = World(cfg(consecutive_5xx=1, max_ejection_percent=50), n=3)
    for h in w.hosts:
        fail(h, 1)
    assert sum(h.ejected for h in w.hosts) == 1  # 2 of 3 would be 66 % > 50 %
    assert w.c("ejections_overflow") == 2


def test_always_eject_one_host() -> None:
    w = World(cfg(consecutive_5xx=1, max_ejection_percent=0, always_eject_one_host=True), n=3)
    for h in w.hosts:
        fail(h, 1)
    assert sum(h.ejected for h in w.hosts) == 1


def test_gateway_failure_detected_but_not_enforced_by_default() -> None:
    w = World(cfg(consecutive_gateway_failure=2, consecutive_5xx=100,
                  max_ejection_percent=100))
    h = w.hosts[0]
    fail(h, 2, 503)
    assert not h.ejected
    assert w.c("ejections_detected_consecutive_gateway_failure") == 1
    assert w.c("ejections_enforced_total") == 0
    w2 = World(cfg(consecutive_gateway_failure=2, consecutive_5xx=100,
                   max_ejection_percent=100, enforcing_consecutive_gateway_failure=100))
    fail(w2.hosts[0], 1, 500)  # not a gateway error: resets the gateway count
    fail(w2.hosts[0], 1, 502)
    assert not w2.hosts[0].ejected
    fail(w2.hosts[0], 1, 504)
    assert w2.hosts[0].ejected


def test_local_origin_errors_map_to_5xx_without_the_split() -> None:
    w = World(cfg(consecutive_5xx=2, max_ejection_percent=100))
    h = w.hosts[0]
    h.outlier.put_result(CONNECT_SUCCESS)  # not reported without the split
    h.outlier.put_result(CONNECT_FAILED)
    h.outlier.put_result(TIMEOUT)
    assert h.ejected


def test_split_external_local_origin_errors() -> None:
    w = World(cfg(split_external_local_origin_errors=True, consecutive_local_origin_failure=2,
                  consecutive_5xx=2, max_ejection_percent=100))
    h = w.hosts[0]
    h.outlier.put_result(CONNECT_FAILED)
    h.outlier.put_result(CONNECT_SUCCESS)  # resets the local-origin count
    h.outlier.put_result(CONNECT_FAILED)
    fail(h, 1)  # a 5xx counts apart
    assert not h.ejected
    h.outlier.put_result(TIMEOUT)
    assert h.ejected
    assert w.c("ejections_enforced_consecutive_local_origin_failure") == 1


def test_success_rate_ejects_below_mean_minus_stdev_factor() -> None:
    w = World(cfg(success_rate_minimum_hosts=5, success_rate_request_volume=10,
                  success_rate_stdev_factor=1000, max_ejection_percent=100,
                  consecutive_5xx=1000), n=5)
    for i, h in enumerate(w.hosts):
        for j in range(100):
            h.outlier.put_http_response_code(500 if (i == 0 and j % 2) else 200)
    w.tick()  # this interval's buckets become the judged ones
    assert w.hosts[0].ejected and not any(h.ejected for h in w.hosts[1:])
    assert w.c("ejections_enforced_success_rate") == 1


def test_success_rate_needs_enough_hosts_with_volume() -> None:
    w = World(cfg(success_rate_minimum_hosts=5, success_rate_request_volume=100,
                  max_ejection_percent=100, consecutive_5xx=1000), n=5)
    for i, h in enumerate(w.hosts):
        for _ in range(99 if i else 100):
            h.outlier.put_http_response_code(500 if i == 0 else 200)
    w.tick()
    assert not w.hosts[0].ejected


def test_failure_percentage() -> None:
    w = World(cfg(failure_percentage_minimum_hosts=3, failure_percentage_request_volume=10,
                  failure_percentage_threshold=50, enforcing_failure_percentage=100,
                  max_ejection_percent=100, consecutive_5xx=1000), n=3)
    for i, h in enumerate(w.hosts):
        for j in range(10):
            h.outlier.put_http_response_code(500 if i == 1 and j < 6 else 200)
    w.tick()
    assert [h.ejected for h in w.hosts] == [False, True, False]
    assert w.c("ejections_enforced_failure_percentage") == 1


def test_membership_changes_keep_the_count_right() -> None:
    w = World(cfg(consecutive_5xx=1, max_ejection_percent=100))
    fail(w.hosts[0], 1)
    assert w.active() == 1
    w.det.set_hosts(w.hosts[1:])
    assert w.active() == 0 and w.hosts[0].outlier is None and not w.hosts[0].ejected


def test_health_check_success_unejects() -> None:
    w = World(cfg(consecutive_5xx=1, max_ejection_percent=100))
    fail(w.hosts[0], 1)
    w.det.on_health_check_success(w.hosts[0])
    assert not w.hosts[0].ejected


@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from([200, 500, 503])), max_size=300),
       st.integers(0, 100))
def test_ejections_never_exceed_max_ejection_percent(events: list[tuple[int, int]],
                                                     percent: int) -> None:
    w = World(cfg(consecutive_5xx=2, max_ejection_percent=percent,
                  enforcing_consecutive_gateway_failure=100, consecutive_gateway_failure=2), n=6)
    for i, code in events:
        w.hosts[i].outlier.put_http_response_code(code)
        if code == 200 and i == 0:
            w.tick()
        ejected = sum(h.ejected for h in w.hosts)
        assert ejected * 100 <= percent * 6
        assert ejected == w.active()
