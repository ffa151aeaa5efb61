"""The benchmarks' ground truth: ``recsys.datasets.exact_nearest`` against a stable sort of every score."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from recsys.datasets import clustered_catalogue, exact_nearest


def _by_sorting_everything(vectors: npt.NDArray[np.float32], rows: list[int], k: int,
                           members: npt.NDArray[np.bool_] | None = None) -> list[list[int]]:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    found = []
    for row in rows:
        scores = unit @ unit[row]
        if members is not None:
            scores[~members] = -np.inf
        scores[row] = -np.inf
        order = np.argsort(-scores, kind="stable")[:k]
        found.append([int(i) for i in order if np.isfinite(scores[i])])
    return found


def test_it_ranks_as_a_stable_sort_of_every_score_ties_in_order_of_position() -> None:
    catalogue = clustered_catalogue(3_000, 16, clusters=10, seed=5)
    # Duplicates tie with each other: three copies of item 7 and two of item 900, among others.
    vectors = np.concatenate([catalogue.vectors, catalogue.vectors[[7, 7, 7, 900, 900]] * 2.0])
    rows = [7, 900, 3_001, 12, 2_999]
    for k in (1, 3, 10, 50):
        assert exact_nearest(vectors, rows, k) == _by_sorting_everything(vectors, rows, k)
    first = exact_nearest(vectors, [7], 4)[0]
    assert first[:3] == [3_000, 3_001, 3_002]


def test_only_members_and_fewer_where_fewer_exist() -> None:
    catalogue = clustered_catalogue(2_000, 8, clusters=5, seed=6)
    members = np.zeros(2_000, dtype=bool)
    members[[3, 50, 1_999]] = True
    found = exact_nearest(catalogue.vectors, [50, 10], 10, members)
    assert found == _by_sorting_everything(catalogue.vectors, [50, 10], 10, members)
    assert sorted(found[0]) == [3, 1_999] and sorted(found[1]) == [3, 50, 1_999]
    assert exact_nearest(catalogue.vectors, [0], 5_000)[0] == _by_sorting_everything(catalogue.vectors, [0], 5_000)[0]
