from __future__ import annotations

import math

import numpy as np
import pytest

from recsys.bench.stats import percentile, rate, ratio, recall_at_k, summarize


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    values = [float(v) for v in np.random.default_rng(5).exponential(3.0, size=101)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([7.0], 95) == 7.0


def test_percentile_rejects_empty_input_and_bad_q() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentile([1.0], 101)


def test_summarize_reports_milliseconds() -> None:
    summary = summarize([0.001, 0.002, 0.003, 0.004, 0.100])
    assert summary["count"] == 5
    assert summary["p50_ms"] == 3.0
    assert summary["mean_ms"] == 22.0
    assert summary["p95_ms"] == pytest.approx(80.8)
    assert summarize([]) == {"count": 0}


def test_rate_and_ratio_edges() -> None:
    assert rate(10, 2.0) == 5.0
    assert rate(10, 0.0) == 0.0
    assert ratio(6.0, 3.0) == 2.0
    assert ratio(1.0, 0.0) == math.inf
    assert math.isnan(ratio(0.0, 0.0))


def test_recall_counts_missing_results_against_k() -> None:
    truth = [["a", "b", "c", "d"], ["e", "f", "g", "h"]]
    found = [["a", "b", "x", "d"], ["e"]]
    # 3 of 4, then 1 of 4 (a short answer still counts against k)
    assert recall_at_k(found, truth, 4) == pytest.approx(0.5)
    assert recall_at_k(truth, truth, 4) == 1.0
    with pytest.raises(ValueError, match="one list per query"):
        recall_at_k(found[:1], truth, 4)
