"""Floating-point limits in the query functions: no request ends in PostgreSQL's overflow or
underflow error (a 500), on a stack of its own.

PostgreSQL raises an error where a product of doubles, or pgvector's of vectors, underflows to
zero, and where exp overflows. The cases found: a negative example with a component of 1.4e-45
(the smallest float32) weighed by 0.5, and the rank estimate of a filter's nearest member when
near-duplicates of the query fill the probe. Their own catalogue, because the items they insert
and delete change the shared index's graph, which other tests count the tuples of.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector
from stack_support import stack_folder
from test_query_filters import truth

from recsys.datasets import Catalogue, clustered_catalogue
from recsys.db.pool import configure_connection
from recsys.local.stack import Stack, StackConfig
from recsys.search import service
from recsys.search.filter_indexes import create_filter_index
from recsys.search.params import RecommendationQuery

pytestmark = pytest.mark.integration

K = 10
#: About a tenth of the catalogue (recsys.datasets' category weights).
CATEGORY = "music"


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return clustered_catalogue(3_000, 384, clusters=10, seed=21)


@pytest.fixture(scope="module")
def own_stack(catalogue: Catalogue) -> Iterator[Stack]:
    with stack_folder("float-limits") as root:
        stack = Stack(StackConfig.ephemeral(Path(root)))
        try:
            stack.up()
            with psycopg.connect(stack.admin_conninfo(), autocommit=True) as admin:
                register_vector(admin)
                load = "COPY items (id, embedding, category) FROM STDIN WITH (FORMAT BINARY)"
                with admin.cursor().copy(load) as copy:
                    copy.set_types(["text", "vector", "text"])
                    for row in zip(catalogue.ids, catalogue.vectors, catalogue.categories, strict=True):
                        copy.write_row(row)
                admin.execute("ANALYZE items")
                admin.execute("GRANT SELECT ON items TO recsys")
            yield stack
        finally:
            stack.down()


async def test_a_negative_example_whose_component_is_the_smallest_float_is_no_error(
    own_stack: Stack, catalogue: Catalogue
) -> None:
    # average_vector weighs the negatives' mean by 0.5, and pgvector raised underflow for 0.5 times
    # 1.4e-45. q is scaled by 1 / 0.5 instead, the same direction: the exact answer is numpy's.
    tiny = np.zeros(catalogue.vectors.shape[1], dtype=np.float32)
    tiny[0], tiny[1] = 1.0, np.float32(1.4e-45)
    assert tiny[1] > 0
    with psycopg.connect(own_stack.admin_conninfo(), autocommit=True) as admin:
        register_vector(admin)
        admin.execute("INSERT INTO items (id, embedding, category) VALUES ('smallest-float', %s, 'none')", [tiny])
    query = catalogue.vectors[5] / np.linalg.norm(catalogue.vectors[5]) - 0.5 * tiny.astype(np.float64)
    expected = [catalogue.ids[i] for i in truth(catalogue, query, K, lambda i: True, {5})]
    conn = await psycopg.AsyncConnection.connect(own_stack.bouncer_url(), autocommit=True, prepare_threshold=None)
    await configure_connection(conn)
    try:
        answer = await service.recommend(
            conn, RecommendationQuery(positive=(catalogue.ids[5],), negative=("smallest-float",), k=K, exact=True),
            timeout_ms=5000,
        )
    finally:
        await conn.close()
    assert [r["id"] for r in answer["results"]] == expected


def test_near_duplicates_around_the_query_leave_the_rank_estimate_finite(
    own_stack: Stack, catalogue: Catalogue
) -> None:
    # Twelve near-duplicates of an item outside the category, each at the same angle to it (an
    # offset orthogonal to it), fill the probe at ef_search 10. Their distances, equal but for
    # float rounding, estimate a local dimension in the tens of thousands, and the rank of the
    # category's nearest member, across the gap, overflowed exp. Held finite, it says that the
    # filter avoids the query, and the exact scan answers: numpy's answer. (The category's
    # filter index is searched first, its sweep not calibrated, as the category is rare enough
    # for its nearest member to be judged.)
    members = np.asarray([c == CATEGORY for c in catalogue.categories])
    q = int(np.flatnonzero(~members)[0])
    base = catalogue.vectors[q].astype(np.float64) / np.linalg.norm(catalogue.vectors[q])
    rng = np.random.default_rng(5)
    near = []
    for _ in range(12):
        offset = rng.standard_normal(base.shape[0])
        offset -= (offset @ base) * base
        near.append((base + 0.06 * offset / np.linalg.norm(offset)).astype(np.float32))
    with psycopg.connect(own_stack.admin_conninfo(), autocommit=True) as admin:
        register_vector(admin)
        create_filter_index(admin, "category", CATEGORY, maintenance_work_mem="64MB")
        admin.execute("UPDATE filter_indexes SET sweep_width = NULL")
        for n, vector in enumerate(near):
            admin.execute("INSERT INTO items (id, embedding, category) VALUES (%s, %s, 'none')",
                          [f"near-duplicate-{n}", vector])
        rows = admin.execute(
            "SELECT id, method FROM recsys_nearest((SELECT embedding FROM items WHERE id = %s), %s, 10,"
            " ARRAY[%s], NULL, NULL, NULL, ARRAY[%s], false, 2)",
            [catalogue.ids[q], K, CATEGORY, catalogue.ids[q]],
        ).fetchall()
    expected = [catalogue.ids[i] for i in truth(catalogue, catalogue.vectors[q], K, lambda i: bool(members[i]), {q})]
    assert [r[0] for r in rows] == expected
    assert {r[1] for r in rows} == {"exact"}
