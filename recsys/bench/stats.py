"""Percentiles, latency summaries and recall: the arithmetic of the benchmarks (pure)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["percentile", "rate", "ratio", "recall_at_k", "summarize"]


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between ranks (numpy's default).

    Raises ``ValueError`` for an empty input or ``q`` outside 0-100.
    """
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be between 0 and 100, got {q}")
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(latencies_s: Sequence[float]) -> dict[str, float | int]:
    """Count, p50, p95, p99 and mean of latencies given in seconds, reported in milliseconds."""
    if not latencies_s:
        return {"count": 0}
    return {
        "count": len(latencies_s),
        "p50_ms": round(percentile(latencies_s, 50) * 1000, 3),
        "p95_ms": round(percentile(latencies_s, 95) * 1000, 3),
        "p99_ms": round(percentile(latencies_s, 99) * 1000, 3),
        "mean_ms": round(sum(latencies_s) / len(latencies_s) * 1000, 3),
    }


def rate(count: int, seconds: float) -> float:
    """Events per second; 0 when no time elapsed."""
    return count / seconds if seconds > 0 else 0.0


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, infinite for a zero denominator (a variant that never failed)."""
    if denominator == 0:
        return math.inf if numerator else math.nan
    return numerator / denominator


def recall_at_k(found: Sequence[Sequence[str]], truth: Sequence[Sequence[str]], k: int) -> float:
    """Mean over queries of |first k found ∩ first k true| / k (``k`` counts even when fewer came back)."""
    if len(found) != len(truth):
        raise ValueError("found and truth must hold one list per query")
    if not truth:
        raise ValueError("recall of no queries")
    hits = sum(len(set(f[:k]) & set(t[:k])) for f, t in zip(found, truth, strict=True))
    return hits / (k * len(truth))
