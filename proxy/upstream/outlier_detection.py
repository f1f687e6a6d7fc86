"""Outlier detection (Envoy's ``Outlier::DetectorImpl``), sans-IO: eject misbehaving hosts.

Theory of operation
-------------------
1. One ``OutlierDetector`` per cluster per worker (Envoy runs one per cluster on the main
   thread, fed by every worker; trioxy's workers are processes, so each worker detects and
   ejects from what it saw itself). Each host gets a ``HostMonitor`` (``host.outlier``); the
   router reports to it: ``put_http_response_code(code)`` for every upstream response, and
   ``put_result(result)`` for what happened locally (connect success or failure, timeout,
   reset).
2. Consecutive errors: a 5xx counts toward ``consecutive_5xx``, a 502/503/504 also toward
   ``consecutive_gateway_failure``; any other response resets both. Without
   ``split_external_local_origin_errors`` local results are mapped to HTTP codes first
   (connect failure or reset → 503, timeout → 504, connect success → nothing). With it they
   feed ``consecutive_local_origin_failure`` (and the local-origin success rate) instead.
   Reaching a threshold (exactly, as Envoy's ``==``) ejects at once, unless the host is
   already ejected; the counter that fired is reset.
3. Ejection (``_eject``): allowed while ``100 * (ejected + 1) / hosts <= max_ejection_percent``
   (strict: 3 hosts at 50 % eject at most 1), or for the first one with
   ``always_eject_one_host``; else ``ejections_overflow``. Then ``enforcing_<type>`` percent of
   the time it is enforced: ``host.ejected`` is set, the balancer is rebuilt (``on_change``),
   the host's ejection multiplier grows by one while ``multiplier * base <= max + base``.
4. Every ``interval`` (``on_interval``): an ejected host whose ``min(base * multiplier, max) +
   jitter`` has passed since its ejection is returned (counters reset); success rate and
   failure percentage are judged over the last interval's buckets (hosts with
   ``*_request_volume`` requests, at least ``*_minimum_hosts`` of them; success rate ejects
   below ``mean - stdev_factor/1000 * stdev``, failure percentage at or above the
   threshold); then the multiplier of every host not ejected for a whole interval goes down
   by one. So a host ejected again soon stays out base, 2 × base, 3 × base ... up to
   ``max_ejection_time``; one that behaves comes back to base.
5. Time is the caller's (``clock``); the trio shell (``cluster_manager``) calls
   ``on_interval`` every ``interval``. Tests drive it with a fake clock.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from proxy.config.errors import ConfigError, not_supported
from proxy.config.protos import duration_s, wrapped

__all__ = [
    "CONNECT_FAILED",
    "CONNECT_SUCCESS",
    "CONNECT_SUCCESS_FINAL",
    "EXT_ORIGIN_REQUEST_FAILED",
    "EXT_ORIGIN_REQUEST_SUCCESS",
    "OUTLIER_COUNTERS",
    "TIMEOUT",
    "HostMonitor",
    "OutlierDetectionConfig",
    "OutlierDetector",
]

# Outlier::Result
CONNECT_SUCCESS = 0  # LocalOriginConnectSuccess
CONNECT_SUCCESS_FINAL = 1  # LocalOriginConnectSuccessFinal
TIMEOUT = 2  # LocalOriginTimeout
CONNECT_FAILED = 3  # LocalOriginConnectFailed
EXT_ORIGIN_REQUEST_FAILED = 4
EXT_ORIGIN_REQUEST_SUCCESS = 5

# Result -> HTTP code without the external/local split (resultToHttpCode); None: not reported.
_RESULT_CODES: dict[int, int | None] = {
    CONNECT_SUCCESS: None, CONNECT_SUCCESS_FINAL: 200, TIMEOUT: 504, CONNECT_FAILED: 503,
    EXT_ORIGIN_REQUEST_FAILED: 500, EXT_ORIGIN_REQUEST_SUCCESS: 200,
}

# Ejection types (envoy.data.cluster.v3.OutlierEjectionType) by stat suffix.
CONSECUTIVE_5XX = "consecutive_5xx"
SUCCESS_RATE = "success_rate"
CONSECUTIVE_GATEWAY_FAILURE = "consecutive_gateway_failure"
CONSECUTIVE_LOCAL_ORIGIN_FAILURE = "consecutive_local_origin_failure"
LOCAL_ORIGIN_SUCCESS_RATE = "local_origin_success_rate"
FAILURE_PERCENTAGE = "failure_percentage"
LOCAL_ORIGIN_FAILURE_PERCENTAGE = "local_origin_failure_percentage"
_TYPES = (CONSECUTIVE_5XX, SUCCESS_RATE, CONSECUTIVE_GATEWAY_FAILURE,
          CONSECUTIVE_LOCAL_ORIGIN_FAILURE, LOCAL_ORIGIN_SUCCESS_RATE, FAILURE_PERCENTAGE,
          LOCAL_ORIGIN_FAILURE_PERCENTAGE)

# Envoy's ALL_OUTLIER_DETECTION_STATS under cluster.<name>.outlier_detection.
OUTLIER_COUNTERS = (
    "ejections_enforced_total", "ejections_overflow", "ejections_total",
    "ejections_consecutive_5xx", "ejections_success_rate",
    *(f"ejections_enforced_{t}" for t in _TYPES), *(f"ejections_detected_{t}" for t in _TYPES),
)


@dataclass(frozen=True, slots=True)
class OutlierDetectionConfig:
    """``Cluster.outlier_detection`` compiled; times in seconds, Envoy's defaults."""

    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_time_jitter: float = 0.0
    max_ejection_percent: int = 10
    always_eject_one_host: bool = False
    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    consecutive_local_origin_failure: int = 5
    split_external_local_origin_errors: bool = False
    enforcing_consecutive_5xx: int = 100
    enforcing_consecutive_gateway_failure: int = 0
    enforcing_consecutive_local_origin_failure: int = 100
    enforcing_success_rate: int = 100
    enforcing_local_origin_success_rate: int = 100
    enforcing_failure_percentage: int = 0
    enforcing_failure_percentage_local_origin: int = 0
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100
    success_rate_stdev_factor: int = 1900
    failure_percentage_threshold: int = 85
    failure_percentage_minimum_hosts: int = 5
    failure_percentage_request_volume: int = 50
    successful_active_health_check_uneject_host: bool = True

    @staticmethod
    def from_proto(msg: Any, path: str) -> OutlierDetectionConfig:
        if msg.monitors:
            raise not_supported(f"{path}.monitors", "outlier detection monitor extensions")
        d = OutlierDetectionConfig()
        values: dict[str, Any] = {}
        for name in ("interval", "base_ejection_time", "max_ejection_time_jitter"):
            v = duration_s(msg, name)
            if v is not None:
                if v < 0 or (v == 0 and name != "max_ejection_time_jitter"):
                    raise ConfigError(f"{path}.{name}", "value must be greater than 0s")
                values[name] = v
        base = values.get("base_ejection_time", d.base_ejection_time)
        max_time = duration_s(msg, "max_ejection_time")
        if max_time is None:
            max_time = max(d.max_ejection_time, base)
        elif max_time <= 0:
            raise ConfigError(f"{path}.max_ejection_time", "value must be greater than 0s")
        if max_time < base:
            raise ConfigError(f"{path}.max_ejection_time",
                              "outlier detector's max_ejection_time cannot be smaller than"
                              " base_ejection_time")
        values["max_ejection_time"] = max_time
        percents = ("max_ejection_percent", "enforcing_consecutive_5xx",
                    "enforcing_consecutive_gateway_failure",
                    "enforcing_consecutive_local_origin_failure", "enforcing_success_rate",
                    "enforcing_local_origin_success_rate", "enforcing_failure_percentage",
                    "enforcing_failure_percentage_local_origin",
                    "failure_percentage_threshold")
        counts = ("consecutive_5xx", "consecutive_gateway_failure",
                  "consecutive_local_origin_failure", "success_rate_minimum_hosts",
                  "success_rate_request_volume", "success_rate_stdev_factor",
                  "failure_percentage_minimum_hosts", "failure_percentage_request_volume")
        for name in (*percents, *counts):
            v = wrapped(msg, name, None)
            if v is None:
                continue
            if name in percents and v > 100:
                raise ConfigError(f"{path}.{name}.value",
                                  "value must be less than or equal to 100")
            values[name] = v
        for name in ("always_eject_one_host", "successful_active_health_check_uneject_host"):
            v = wrapped(msg, name, None)
            if v is not None:
                values[name] = bool(v)
        values["split_external_local_origin_errors"] = msg.split_external_local_origin_errors
        return OutlierDetectionConfig(**values)


class HostMonitor:
    """One host's counters (Envoy's ``DetectorHostMonitorImpl``); ``host.outlier``."""

    __slots__ = (
        "detector", "host", "consecutive_5xx", "consecutive_gateway_failure",
        "consecutive_local_origin_failure", "ext_success", "ext_total", "ext_prev",
        "local_success", "local_total", "local_prev", "num_ejections", "backoff",
        "last_ejection_time", "last_unejection_time", "jitter", "success_rate",
        "local_success_rate",
    )

    def __init__(self, detector: OutlierDetector, host: Any) -> None:
        self.detector = detector
        self.host = host
        self.consecutive_5xx = 0
        self.consecutive_gateway_failure = 0
        self.consecutive_local_origin_failure = 0
        # Success-rate buckets: the one being written, and the last interval's (success, total).
        self.ext_success = 0
        self.ext_total = 0
        self.ext_prev: tuple[int, int] = (0, 0)
        self.local_success = 0
        self.local_total = 0
        self.local_prev: tuple[int, int] = (0, 0)
        self.num_ejections = 0
        self.backoff = 0  # the ejection time multiplier
        self.last_ejection_time: float | None = None
        self.last_unejection_time: float | None = None
        self.jitter = 0.0
        self.success_rate = -1.0  # last interval's, for admin; -1: not enough data
        self.local_success_rate = -1.0

    # -- what the router reports ----------------------------------------------------------
    def put_http_response_code(self, code: int) -> None:
        self.ext_total += 1
        if code >= 500:
            det = self.detector
            cfg = det.config
            if code in (502, 503, 504):
                self.consecutive_gateway_failure += 1
                if self.consecutive_gateway_failure == cfg.consecutive_gateway_failure:
                    det._on_consecutive(self, CONSECUTIVE_GATEWAY_FAILURE)
            else:
                self.consecutive_gateway_failure = 0
            self.consecutive_5xx += 1
            if self.consecutive_5xx == cfg.consecutive_5xx:
                det._on_consecutive(self, CONSECUTIVE_5XX)
        else:
            self.ext_success += 1
            self.consecutive_5xx = 0
            self.consecutive_gateway_failure = 0

    def put_result(self, result: int, code: int | None = None) -> None:
        if not self.detector.config.split_external_local_origin_errors:
            if code is None:
                code = _RESULT_CODES[result]
            if code is not None:
                self.put_http_response_code(code)
            return
        if result == CONNECT_SUCCESS or result == CONNECT_SUCCESS_FINAL:
            self._local_no_failure()
        elif result == TIMEOUT or result == CONNECT_FAILED:
            self._local_failure()
        elif result == EXT_ORIGIN_REQUEST_FAILED:
            self.put_http_response_code(503)
        else:
            self.put_http_response_code(200)
            self._local_no_failure()

    def _local_failure(self) -> None:
        self.local_total += 1
        self.consecutive_local_origin_failure += 1
        det = self.detector
        if self.consecutive_local_origin_failure == det.config.consecutive_local_origin_failure:
            det._on_consecutive(self, CONSECUTIVE_LOCAL_ORIGIN_FAILURE)

    def _local_no_failure(self) -> None:
        self.local_total += 1
        self.local_success += 1
        self.consecutive_local_origin_failure = 0

    def _swap_buckets(self) -> None:
        self.ext_prev = (self.ext_success, self.ext_total)
        self.ext_success = self.ext_total = 0
        self.local_prev = (self.local_success, self.local_total)
        self.local_success = self.local_total = 0


class OutlierDetector:
    """A cluster's detector in one worker."""

    def __init__(self, config: OutlierDetectionConfig, scope: Any,
                 clock: Callable[[], float], rng: random.Random | None = None,
                 on_change: Callable[[Any], None] | None = None) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.on_change = on_change
        prefix = "outlier_detection."
        self.counters = {name: scope.counter(prefix + name) for name in OUTLIER_COUNTERS}
        self.ejections_active = scope.gauge(prefix + "ejections_active")
        self.monitors: dict[Any, HostMonitor] = {}
        self.ejected = 0

    # -- membership -----------------------------------------------------------------------
    def set_hosts(self, hosts: Iterable[Any]) -> None:
        """Follow the cluster's membership: new hosts get a monitor, gone ones lose theirs."""
        current = set(hosts)
        for host in list(self.monitors):
            if host not in current:
                del self.monitors[host]
                if host.ejected:
                    host.ejected = False
                    self.ejected -= 1
                host.outlier = None
        for host in current:
            if host not in self.monitors:
                host.outlier = self.monitors[host] = HostMonitor(self, host)
        self.ejections_active.set(self.ejected)

    # -- ejection -------------------------------------------------------------------------
    def _on_consecutive(self, monitor: HostMonitor, kind: str) -> None:
        if monitor.host.ejected or monitor.host not in self.monitors:
            return
        self.counters[f"ejections_detected_{kind}"].inc()
        self._eject(monitor, kind)
        if kind == CONSECUTIVE_5XX:
            self.counters["ejections_consecutive_5xx"].inc()  # deprecated, as Envoy
            monitor.consecutive_5xx = 0
        elif kind == CONSECUTIVE_GATEWAY_FAILURE:
            monitor.consecutive_gateway_failure = 0
        else:
            monitor.consecutive_local_origin_failure = 0

    def _enforcing(self, kind: str) -> int:
        cfg = self.config
        return {
            CONSECUTIVE_5XX: cfg.enforcing_consecutive_5xx,
            CONSECUTIVE_GATEWAY_FAILURE: cfg.enforcing_consecutive_gateway_failure,
            CONSECUTIVE_LOCAL_ORIGIN_FAILURE: cfg.enforcing_consecutive_local_origin_failure,
            SUCCESS_RATE: cfg.enforcing_success_rate,
            LOCAL_ORIGIN_SUCCESS_RATE: cfg.enforcing_local_origin_success_rate,
            FAILURE_PERCENTAGE: cfg.enforcing_failure_percentage,
            LOCAL_ORIGIN_FAILURE_PERCENTAGE: cfg.enforcing_failure_percentage_local_origin,
        }[kind]

    def _eject(self, monitor: HostMonitor, kind: str) -> bool:
        cfg = self.config
        ejected_percent = 100.0 * (self.ejected + 1) / len(self.monitors)
        should = ejected_percent <= min(100, cfg.max_ejection_percent)
        if cfg.always_eject_one_host and self.ejected == 0:
            should = True
        if not should:
            self.counters["ejections_overflow"].inc()
            return False
        if kind in (CONSECUTIVE_5XX, SUCCESS_RATE):
            self.counters["ejections_total"].inc()  # deprecated, as Envoy
        enforcing = self._enforcing(kind)
        if not (enforcing >= 100 or (enforcing > 0 and self.rng.randrange(100) < enforcing)):
            return False
        self.ejected += 1
        self.ejections_active.set(self.ejected)
        self.counters["ejections_enforced_total"].inc()
        self.counters[f"ejections_enforced_{kind}"].inc()
        host = monitor.host
        host.ejected = True
        monitor.num_ejections += 1
        monitor.last_ejection_time = self.clock()
        jitter_max = cfg.max_ejection_time_jitter
        monitor.jitter = (self.rng.randrange(int(jitter_max * 1000) + 1) / 1000
                          if jitter_max > 0 else 0.0)
        base = cfg.base_ejection_time
        if monitor.backoff * base < cfg.max_ejection_time + base:
            monitor.backoff += 1
        if self.on_change is not None:
            self.on_change(host)
        return True

    def _uneject(self, monitor: HostMonitor, now: float) -> None:
        host = monitor.host
        host.ejected = False
        self.ejected -= 1
        self.ejections_active.set(self.ejected)
        monitor.consecutive_5xx = 0
        monitor.consecutive_gateway_failure = 0
        monitor.consecutive_local_origin_failure = 0
        monitor.last_unejection_time = now
        if self.on_change is not None:
            self.on_change(host)

    def ejection_time(self, monitor: HostMonitor) -> float:
        """How long ``monitor``'s current ejection lasts (before the interval rounding)."""
        cfg = self.config
        return min(cfg.base_ejection_time * monitor.backoff, cfg.max_ejection_time) + monitor.jitter

    def on_health_check_success(self, host: Any) -> None:
        """An active health check passed: an ejected host comes back at once
        (``successful_active_health_check_uneject_host``, Envoy's default)."""
        monitor = self.monitors.get(host)
        if (monitor is not None and host.ejected
                and self.config.successful_active_health_check_uneject_host):
            self._uneject(monitor, self.clock())

    # -- the interval timer ---------------------------------------------------------------
    def on_interval(self) -> None:
        now = self.clock()
        for monitor in self.monitors.values():
            if (monitor.host.ejected and monitor.last_ejection_time is not None
                    and self.ejection_time(monitor) <= now - monitor.last_ejection_time):
                self._uneject(monitor, now)
            monitor._swap_buckets()
            monitor.success_rate = monitor.local_success_rate = -1.0
        self._success_rate_ejections(local=False)
        self._success_rate_ejections(local=True)
        interval = self.config.interval
        for monitor in self.monitors.values():
            if (not monitor.host.ejected and monitor.last_unejection_time is not None
                    and now - monitor.last_unejection_time >= interval and monitor.backoff):
                monitor.backoff -= 1

    def _success_rate_ejections(self, *, local: bool) -> None:
        cfg = self.config
        if (len(self.monitors) < cfg.success_rate_minimum_hosts
                and len(self.monitors) < cfg.failure_percentage_minimum_hosts):
            return
        sr_hosts: list[tuple[HostMonitor, float]] = []
        fp_hosts: list[tuple[HostMonitor, float]] = []
        for monitor in list(self.monitors.values()):
            if monitor.host.ejected:
                continue
            success, total = monitor.local_prev if local else monitor.ext_prev
            if not total:
                continue
            rate = success * 100.0 / total
            if total >= min(cfg.success_rate_request_volume, cfg.failure_percentage_request_volume):
                if local:
                    monitor.local_success_rate = rate
                else:
                    monitor.success_rate = rate
            if total >= cfg.success_rate_request_volume:
                sr_hosts.append((monitor, rate))
            if total >= cfg.failure_percentage_request_volume:
                fp_hosts.append((monitor, rate))
        if sr_hosts and len(sr_hosts) >= cfg.success_rate_minimum_hosts:
            mean = sum(r for _, r in sr_hosts) / len(sr_hosts)
            stdev = math.sqrt(sum((r - mean) ** 2 for _, r in sr_hosts) / len(sr_hosts))
            threshold = mean - cfg.success_rate_stdev_factor / 1000.0 * stdev
            kind = LOCAL_ORIGIN_SUCCESS_RATE if local else SUCCESS_RATE
            for monitor, rate in sr_hosts:
                if rate < threshold and not monitor.host.ejected:
                    self.counters["ejections_success_rate"].inc()  # deprecated, as Envoy
                    self.counters[f"ejections_detected_{kind}"].inc()
                    self._eject(monitor, kind)
        if fp_hosts and len(fp_hosts) >= cfg.failure_percentage_minimum_hosts:
            kind = LOCAL_ORIGIN_FAILURE_PERCENTAGE if local else FAILURE_PERCENTAGE
            for monitor, rate in fp_hosts:
                if 100.0 - rate >= cfg.failure_percentage_threshold and not monitor.host.ejected:
                    self.counters[f"ejections_detected_{kind}"].inc()
                    self._eject(monitor, kind)
