"""Circuit breakers (Envoy's ``ResourceManagerImpl``), sans-IO: per cluster, per priority.

Theory of operation
-------------------
1. ``CircuitBreakers.from_proto`` compiles ``Cluster.circuit_breakers``: for each routing
   priority (DEFAULT, HIGH) the first ``thresholds`` entry naming it, else Envoy's defaults
   (1024 connections, 1024 pending requests, 1024 requests, 3 retries). ``retry_budget``, when
   present, replaces ``max_retries`` (``budget_percent`` of the active plus pending requests,
   never under ``min_retry_concurrency``; defaults 20 % and 3).
2. ``ResourceManager`` holds one worker's counts for one cluster and priority: four
   ``ResourceLimit``s (``connections``, ``pending_requests``, ``requests``, ``retries``).
   ``can_create()`` is ``count < max``; callers ``inc()`` what they take and ``dec()`` it back
   however the request ends. A limit of 0 refuses everything, as in Envoy.
3. Each limit keeps Envoy's gauges current: ``circuit_breakers.<priority>.<x>_open`` is 1 while
   the limit is reached, and with ``track_remaining`` ``remaining_<x>`` is ``max - count``.
   They are written only when they change, so an uncongested request pays two integer
   compares and two additions (requests in, requests out).
4. Limits are **per worker process**: Envoy's are shared by the worker threads of one
   process; trioxy's workers are processes with no shared state on the request path, so a
   cluster's limits hold within each worker (README, "resilience").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.config.errors import ConfigError, not_supported
from proxy.config.protos import wrapped

__all__ = [
    "DEFAULT",
    "HIGH",
    "PRIORITY_NAMES",
    "CircuitBreakers",
    "ResourceLimit",
    "ResourceManager",
    "Thresholds",
]

DEFAULT, HIGH = 0, 1  # envoy.config.core.v3.RoutingPriority
PRIORITY_NAMES = ("default", "high")

DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_PENDING_REQUESTS = 1024
DEFAULT_MAX_REQUESTS = 1024
DEFAULT_MAX_RETRIES = 3
DEFAULT_BUDGET_PERCENT = 20.0
DEFAULT_MIN_RETRY_CONCURRENCY = 3


@dataclass(frozen=True, slots=True)
class Thresholds:
    """One priority's limits (``CircuitBreakers.Thresholds``)."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_pending_requests: int = DEFAULT_MAX_PENDING_REQUESTS
    max_requests: int = DEFAULT_MAX_REQUESTS
    max_retries: int = DEFAULT_MAX_RETRIES
    # (budget_percent, min_retry_concurrency) when retry_budget is set; replaces max_retries.
    retry_budget: tuple[float, int] | None = None
    track_remaining: bool = False


@dataclass(frozen=True, slots=True)
class CircuitBreakers:
    """``Cluster.circuit_breakers`` compiled: thresholds for DEFAULT and HIGH."""

    default: Thresholds = Thresholds()
    high: Thresholds = Thresholds()

    @staticmethod
    def from_proto(msg: Any, path: str) -> CircuitBreakers:
        if msg.per_host_thresholds:
            raise not_supported(f"{path}.per_host_thresholds", "per_host_thresholds")
        found: dict[int, Thresholds] = {}
        for i, t in enumerate(msg.thresholds):
            tpath = f"{path}.thresholds[{i}]"
            if t.priority not in (DEFAULT, HIGH):
                raise ConfigError(f"{tpath}.priority", f"unknown value {t.priority}")
            if t.HasField("max_connection_pools"):
                raise not_supported(f"{tpath}.max_connection_pools", "max_connection_pools")
            if t.priority in found:
                continue  # Envoy: the first entry for a priority wins
            budget = None
            if t.HasField("retry_budget"):
                rb = t.retry_budget
                percent = DEFAULT_BUDGET_PERCENT
                if rb.HasField("budget_percent"):
                    percent = rb.budget_percent.value
                    if not 0.0 <= percent <= 100.0:
                        raise ConfigError(f"{tpath}.retry_budget.budget_percent.value",
                                          "value must be inside range [0, 100]")
                budget = (percent, wrapped(rb, "min_retry_concurrency",
                                           DEFAULT_MIN_RETRY_CONCURRENCY))
            found[t.priority] = Thresholds(
                max_connections=wrapped(t, "max_connections", DEFAULT_MAX_CONNECTIONS),
                max_pending_requests=wrapped(t, "max_pending_requests",
                                             DEFAULT_MAX_PENDING_REQUESTS),
                max_requests=wrapped(t, "max_requests", DEFAULT_MAX_REQUESTS),
                max_retries=wrapped(t, "max_retries", DEFAULT_MAX_RETRIES),
                retry_budget=budget,
                track_remaining=t.track_remaining,
            )
        return CircuitBreakers(found.get(DEFAULT, Thresholds()), found.get(HIGH, Thresholds()))

    def for_priority(self, priority: int) -> Thresholds:
        return self.high if priority == HIGH else self.default


class ResourceLimit:
    """One counted resource against its maximum, with Envoy's open / remaining gauges."""

    __slots__ = ("count", "max", "_open", "_remaining")

    def __init__(self, maximum: int, open_gauge: Any, remaining_gauge: Any = None) -> None:
        self.count = 0
        self.max = maximum
        self._open = open_gauge
        self._remaining = remaining_gauge
        if remaining_gauge is not None:
            remaining_gauge.set(maximum)
        open_gauge.set(1 if maximum <= 0 else 0)

    def can_create(self) -> bool:
        return self.count < self.max

    def inc(self) -> None:
        self.count += 1
        if self.count >= self.max or self._remaining is not None:
            self._update()

    def dec(self) -> None:
        self.count -= 1
        if self.count + 1 >= self.max or self._remaining is not None:
            self._update()

    def _update(self) -> None:
        self._open.value = 1 if self.count >= self.max else 0
        if self._remaining is not None:
            self._remaining.value = max(0, self.max - self.count)


class _RetryBudget(ResourceLimit):
    """``retry_budget``: the maximum follows the active and pending requests (Envoy's
    ``RetryBudgetImpl``)."""

    __slots__ = ("_percent", "_min", "_requests", "_pending")

    def __init__(self, percent: float, minimum: int, requests: ResourceLimit,
                 pending: ResourceLimit, open_gauge: Any, remaining_gauge: Any) -> None:
        self._percent = percent
        self._min = minimum
        self._requests = requests
        self._pending = pending
        super().__init__(minimum, open_gauge, remaining_gauge)

    def can_create(self) -> bool:
        self._refresh()
        return self.count < self.max

    def _refresh(self) -> None:
        active = self._requests.count + self._pending.count
        self.max = max(int(self._percent / 100.0 * active), self._min)

    def _update(self) -> None:
        self._refresh()
        super()._update()


class ResourceManager:
    """A worker's circuit breakers for one cluster and one priority."""

    __slots__ = ("connections", "pending_requests", "requests", "retries")

    def __init__(self, thresholds: Thresholds, scope: Any, priority: int = DEFAULT) -> None:
        prefix = f"circuit_breakers.{PRIORITY_NAMES[priority]}."
        track = thresholds.track_remaining

        def limit(maximum: int, open_name: str, remaining_name: str) -> ResourceLimit:
            return ResourceLimit(maximum, scope.gauge(prefix + open_name),
                                 scope.gauge(prefix + remaining_name) if track else None)

        self.connections = limit(thresholds.max_connections, "cx_open", "remaining_cx")
        self.pending_requests = limit(thresholds.max_pending_requests, "rq_pending_open",
                                      "remaining_pending")
        self.requests = limit(thresholds.max_requests, "rq_open", "remaining_rq")
        if thresholds.retry_budget is None:
            self.retries = limit(thresholds.max_retries, "rq_retry_open", "remaining_retries")
        else:
            percent, minimum = thresholds.retry_budget
            self.retries = _RetryBudget(
                percent, minimum, self.requests, self.pending_requests,
                scope.gauge(prefix + "rq_retry_open"),
                scope.gauge(prefix + "remaining_retries") if track else None)
