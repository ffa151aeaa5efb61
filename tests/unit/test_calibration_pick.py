from __future__ import annotations

import pytest

from recsys.errors import NotCalibrated
from recsys.search.calibration import CalibrationPoint, EfSearch, pick_ef_search, recall_lower_bound

CURVE = (
    CalibrationPoint(10, 0.80),
    CalibrationPoint(20, 0.90),
    CalibrationPoint(40, 0.96),
    CalibrationPoint(80, 0.99),
    CalibrationPoint(160, 0.99),
)


@pytest.mark.parametrize(
    ("target", "expected"),
    [(0.5, EfSearch(10, 0.80)), (0.8, EfSearch(10, 0.80)), (0.95, EfSearch(40, 0.96)), (0.99, EfSearch(80, 0.99))],
)
def test_smallest_ef_search_reaching_the_target(target: float, expected: EfSearch) -> None:
    assert pick_ef_search(CURVE, target) == expected


def test_order_of_points_does_not_matter() -> None:
    assert pick_ef_search(tuple(reversed(CURVE)), 0.9) == EfSearch(20, 0.90)


def test_unreachable_target_gives_the_best_calibrated_value_with_its_lower_recall() -> None:
    choice = pick_ef_search(CURVE, 0.999)
    assert choice == EfSearch(80, 0.99)
    assert choice.expected_recall < 0.999


def test_no_points_is_not_calibrated_naming_the_command() -> None:
    with pytest.raises(NotCalibrated) as caught:
        pick_ef_search((), 0.9)
    assert caught.value.status == 409
    assert caught.value.code == "not_calibrated"
    assert "python -m recsys calibrate" in caught.value.message


def test_the_lower_confidence_bound_uses_the_largest_variance_of_a_recall() -> None:
    # 200 sampled items at mean 0.959: at most 0.959 * 0.041 variance each.
    assert recall_lower_bound(0.959, 200) == pytest.approx(0.959 - 1.645 * (0.959 * 0.041 / 200) ** 0.5)
    assert recall_lower_bound(1.0, 200) == 1.0
    assert recall_lower_bound(0.9, 10_000) > recall_lower_bound(0.9, 100)


def test_with_the_sample_size_a_mean_just_above_the_target_is_not_enough() -> None:
    # The curve of a 1M-item calibration whose ef_search 20 gave 0.959 on its 200 sampled items
    # and 0.937 on 300 other queries: the bound sends the target 0.95 to ef_search 40.
    curve = (CalibrationPoint(10, 0.935), CalibrationPoint(20, 0.959), CalibrationPoint(40, 0.972),
             CalibrationPoint(80, 0.985))
    assert pick_ef_search(curve, 0.95) == EfSearch(20, 0.959)
    assert pick_ef_search(curve, 0.95, 200) == EfSearch(40, 0.972)
    # A larger sample narrows the bound: 0.959 over 5,000 items is confidently above 0.95.
    assert pick_ef_search(curve, 0.95, 5_000) == EfSearch(20, 0.959)


def test_when_no_bound_reaches_the_target_the_smallest_mean_that_does() -> None:
    curve = (CalibrationPoint(10, 0.90), CalibrationPoint(20, 0.955), CalibrationPoint(40, 0.958))
    assert pick_ef_search(curve, 0.95, 200) == EfSearch(20, 0.955)


def test_recommendation_mixes_pair_each_sampled_item_with_the_next_two() -> None:
    from recsys.search.calibration import recommendation_mixes

    mixes = recommendation_mixes(["a", "b", "c", "d"], 0.5)
    assert [(m.positive, m.negative) for m in mixes] == [
        (("a", "b"), ("c",)), (("b", "c"), ("d",)), (("c", "d"), ("a",)), (("d", "a"), ("b",))]
    assert len({m.name for m in mixes}) == 4 and all(m.alpha == 0.5 for m in mixes)
    assert recommendation_mixes(["a", "b"], 0.5) == []


def test_recommendations_go_by_their_own_curve_when_the_calibration_has_one() -> None:
    from recsys.search.calibration import Calibration

    mixes = (CalibrationPoint(10, 0.5), CalibrationPoint(640, 0.9))
    both = Calibration(k=10, sample_size=100, catalogue_size=1000, points=CURVE, recommendation_points=mixes)
    assert both.curve("item") == CURVE
    assert both.curve("recommendation") == mixes
    # A calibration from before recommendations were measured: the item curve for both.
    older = Calibration(k=10, sample_size=100, catalogue_size=1000, points=CURVE)
    assert older.curve("recommendation") == CURVE


def test_a_mix_is_the_mean_of_its_unit_positives_minus_alpha_times_its_unit_negatives() -> None:
    import numpy as np

    from recsys.search.exact import Mix

    vectors = {"a": np.array([2.0, 0.0], np.float32), "b": np.array([0.0, 3.0], np.float32),
               "c": np.array([-4.0, 4.0], np.float32)}
    query = Mix("m", ("a", "b"), ("c",), 0.5).vector(vectors)
    assert query is not None
    expected = np.array([0.5, 0.5]) - 0.5 * np.array([-1.0, 1.0]) / np.sqrt(2)
    assert np.allclose(query, expected)
    assert Mix("m", ("a", "x")).vector(vectors) is None
