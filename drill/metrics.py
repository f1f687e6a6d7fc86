"""Percentiles and per-second series: the arithmetic of the report, with no I/O."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks.

    The same definition as numpy's default (``method="linear"``), so figures can be
    checked against it; None for no values, because 0 would read as a measurement.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, not {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo = math.floor(rank)
    hi = math.ceil(rank)
    if lo == hi:
        return ordered[lo]
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def summarize(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> dict[str, float | int | None]:
    """count, p50, p90, p99, max and mean, each multiplied by ``scale`` (1000: ms)."""

    def fmt(v: float | None) -> float | None:
        return None if v is None else round(v * scale, digits)

    return {
        "count": len(values),
        "p50": fmt(percentile(values, 50)),
        "p90": fmt(percentile(values, 90)),
        "p99": fmt(percentile(values, 99)),
        "max": fmt(max(values) if values else None),
        "mean": fmt(sum(values) / len(values) if values else None),
    }


def per_second(times: Iterable[float], t0: float, t1: float, bin_s: float = 1.0) -> list[int]:
    """How many of ``times`` fall in each ``bin_s`` bin of [t0, t1); outside ones are dropped."""
    n = max(0, math.ceil((t1 - t0) / bin_s))
    bins = [0] * n
    for t in times:
        i = int((t - t0) // bin_s)
        if 0 <= i < n:
            bins[i] += 1
    return bins


def in_windows(t: float, windows: Sequence[tuple[float, float]]) -> bool:
    """Whether t falls in any [start, end] window (few windows: a scan is enough)."""
    return any(start <= t <= end for start, end in windows)
