from __future__ import annotations

import pytest

from recsys.errors import NotCalibrated
from recsys.search.calibration import CalibrationPoint, EfSearch, pick_ef_search

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
