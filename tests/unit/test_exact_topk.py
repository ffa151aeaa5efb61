"""The streaming top-k of the exact reference against a brute-force sort."""

from __future__ import annotations

import numpy as np

from recsys.search.exact import TopK, row_dtype


def test_top_k_over_blocks_is_the_top_k_of_the_whole() -> None:
    rng = np.random.default_rng(3)
    candidates = rng.standard_normal((1000, 16)).astype(np.float32) * rng.uniform(0.1, 5, (1000, 1)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    top = TopK(queries, 12)
    keys = np.arange(1000, dtype=np.int64) * 3 + 5
    for start in range(0, 1000, 97):  # uneven blocks, the last one short
        top.add(candidates[start:start + 97], keys[start:start + 97])
    found, scores = top.result()
    unit = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    for q, query in enumerate(queries):
        similarity = unit @ (query / np.linalg.norm(query))
        expected = keys[np.argsort(-similarity, kind="stable")[:12]]
        assert list(found[q]) == list(expected)
        assert np.all(np.diff(scores[q]) <= 0)


def test_zero_vectors_are_nobodys_neighbour_and_short_catalogues_leave_gaps() -> None:
    top = TopK(np.ones((1, 4), dtype=np.float32), 3)
    top.add(np.array([[0, 0, 0, 0], [1, 1, 0, 0]], dtype=np.float32), np.array([10, 11]))
    found, scores = top.result()
    assert list(found[0][scores[0] > -np.inf]) == [11]


def test_copy_rows_have_a_fixed_width() -> None:
    # field count, ctid (length + 4 + 2 bytes), vector (length + dim + unused + floats)
    assert row_dtype(384).itemsize == 2 + 4 + 6 + 4 + 4 + 4 * 384
