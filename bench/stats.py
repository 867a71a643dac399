"""Percentiles and medians used by every benchmark."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

PERCENTILES = (50, 90, 99, 99.9)


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_ms(seconds: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max of latencies given in seconds, in milliseconds."""
    values = sorted(seconds)
    out = {pct_name(p): percentile(values, p) * 1000 for p in PERCENTILES}
    out["max"] = (values[-1] * 1000) if values else 0.0
    return out


def pct_name(pct: float) -> str:
    return "p" + f"{pct:g}".replace(".", "")


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return value / base
