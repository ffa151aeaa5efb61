"""``recall_target`` on the query endpoints: the calibration chooses ``ef_search`` (API.md, per-request tuning).

The calibrations here live in the session's database only for the duration of a test: the other
query tests expect a catalogue without one (409 ``not_calibrated``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import psycopg
import pytest
from query_catalogue import QUERY_CLUSTER
from query_http import call

from recsys.datasets import Catalogue, selectivity_tag
from recsys.db.pool import get_pool
from recsys.local.stack import Stack
from recsys.search.calibration import (
    calibrate,
    calibrate_catalogue,
    forget_calibrations,
    load_calibration,
    pick_ef_search,
)
from recsys.search.params import SimilarQuery
from recsys.search.service import EXACT_METHODS, similar_items

pytestmark = pytest.mark.integration

SIMILAR = "/api/items/{id}/similar"
RECOMMEND = "/api/recommendations"
CURVE = [(10, 0.80), (20, 0.90), (40, 0.96), (80, 0.99)]


def assert_choice(body: dict, ef_search: int, recall: float) -> None:
    """``ef_search`` and ``expected_recall`` as the curve gives them to a search from an item's own
    vector; where that search was lost (its descent ended elsewhere in the graph, which a build
    of the graph now and then does to an item) the exact scan answered, and the recall is 1."""
    assert body["search"] in ("hnsw", "hnsw+exact"), body["search"]
    expected = 1.0 if body["search"] in EXACT_METHODS else recall
    assert (body["ef_search"], body["expected_recall"]) == (ef_search, expected)


def _clear(stack: Stack) -> None:
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        conn.execute("DELETE FROM recall_calibrations")
    forget_calibrations()


@pytest.fixture
def no_calibration(stack: Stack, app_pools: None, catalogue: Catalogue) -> Iterator[None]:
    _clear(stack)
    yield
    _clear(stack)


@pytest.fixture
def calibrated(no_calibration: None, stack: Stack) -> None:
    """A known curve as the catalogue's latest calibration."""
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO recall_calibrations (k, sample_size, catalogue_size) VALUES (10, 100, 20000) RETURNING id"
        ).fetchone()
        assert row is not None
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO recall_calibration_points (calibration_id, ef_search, recall) VALUES (%s, %s, %s)",
                [(row[0], ef, recall) for ef, recall in CURVE],
            )


async def test_similar_takes_the_smallest_ef_search_expected_to_reach_the_target(
    calibrated: None, catalogue: Catalogue
) -> None:
    answer = await call("similar_get", route_params={"id": catalogue.ids[5]}, params={"recall_target": "0.95"})
    answer.check(SIMILAR, "GET")
    assert answer.status == 200
    # 0.96 over the 100 sampled items is not confidently above 0.95 (lower bound 0.928); 0.99 is.
    assert_choice(answer.body, 80, 0.99)
    assert len(answer.body["results"]) == 10
    assert catalogue.ids[5] not in [r["id"] for r in answer.body["results"]]


async def test_k_above_the_calibrated_ef_search_raises_it_to_k(calibrated: None, catalogue: Catalogue) -> None:
    answer = await call("similar_get", route_params={"id": catalogue.ids[5]},
                        params={"recall_target": "0.9", "k": "50"})
    assert answer.check(SIMILAR, "GET").status == 200
    # 0.96 at ef_search 40 is the smallest recall confidently above 0.9; k 50 raises 40 to 50.
    assert_choice(answer.body, 50, 0.96)
    assert len(answer.body["results"]) == 50


async def test_a_target_above_every_calibrated_recall_gets_the_best_and_says_so(
    calibrated: None, catalogue: Catalogue
) -> None:
    answer = await call("similar_get", route_params={"id": catalogue.ids[5]}, params={"recall_target": "0.999"})
    assert answer.check(SIMILAR, "GET").status == 200
    assert_choice(answer.body, 80, 0.99)


async def test_recommendations_take_recall_target_too(calibrated: None, catalogue: Catalogue) -> None:
    body = {"positive": [catalogue.ids[1], catalogue.ids[2]], "recall_target": 0.85, "k": 5}
    answer = await call("recommendations_post", method="POST", json_body=body)
    assert answer.check(RECOMMEND, "POST").status == 200
    assert (answer.body["ef_search"], answer.body["expected_recall"]) == (20, 0.90)
    assert len(answer.body["results"]) == 5


async def test_a_recommendation_of_several_examples_goes_by_the_recommendation_curve(
    calibrated: None, stack: Stack, catalogue: Catalogue
) -> None:
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO recall_calibration_points (calibration_id, shape, ef_search, recall)"
            " VALUES ((SELECT max(id) FROM recall_calibrations), 'recommendation', %s, %s)",
            [(10, 0.6), (80, 0.85), (320, 0.93)],
        )
    forget_calibrations()
    mixed = {"positive": [catalogue.ids[1], catalogue.ids[2]], "negative": [catalogue.ids[3]],
             "recall_target": 0.85, "k": 5}
    answer = await call("recommendations_post", method="POST", json_body=mixed)
    assert answer.check(RECOMMEND, "POST").status == 200
    # 0.93 at 320 is the smallest recommendation recall confidently above 0.85 over 100 samples.
    assert (answer.body["ef_search"], answer.body["expected_recall"]) == (320, 0.93)
    # One positive item alone is an item's own vector: the item curve.
    single = {"positive": [catalogue.ids[1]], "recall_target": 0.85, "k": 5}
    answer = await call("recommendations_post", method="POST", json_body=single)
    assert answer.check(RECOMMEND, "POST").status == 200
    assert_choice(answer.body, 20, 0.90)


async def test_a_filtered_request_the_exact_scan_answers_expects_recall_1(
    calibrated: None, catalogue: Catalogue
) -> None:
    item_id = catalogue.ids[int(np.flatnonzero(catalogue.clusters == QUERY_CLUSTER)[0])]
    rare = selectivity_tag(0.0005)  # ten items, far from the query's cluster
    answer = await call("similar_get", route_params={"id": item_id},
                        params={"recall_target": "0.95", "tags_any": rare})
    assert answer.check(SIMILAR, "GET").status == 200
    assert (answer.body["search"], answer.body["ef_search"], answer.body["expected_recall"]) == ("exact", 80, 1.0)
    assert len(answer.body["results"]) == 10 and all(rare in r["tags"] for r in answer.body["results"])
    body = {"positive": [item_id, catalogue.ids[2]], "recall_target": 0.85, "tags_any": [rare]}
    answer = await call("recommendations_post", method="POST", json_body=body)
    assert answer.check(RECOMMEND, "POST").status == 200
    assert (answer.body["search"], answer.body["expected_recall"]) == ("exact", 1.0)
    # best_score: each positive's candidates scanned exactly are its exact nearest, and the best
    # of them the best overall; a negative example reorders them, so the calibration's recall stays.
    for negative, expected in (([], 1.0), ([catalogue.ids[3]], 0.90)):
        answer = await call("recommendations_post", method="POST",
                            json_body={**body, "strategy": "best_score", "negative": negative})
        assert answer.check(RECOMMEND, "POST").status == 200
        assert (answer.body["search"], answer.body["expected_recall"]) == ("exact", expected), negative


async def test_without_ef_search_or_recall_target_no_expected_recall(calibrated: None, catalogue: Catalogue) -> None:
    answer = await call("similar_get", route_params={"id": catalogue.ids[5]}, params={"ef_search": "40"})
    assert answer.check(SIMILAR, "GET").status == 200
    assert "expected_recall" not in answer.body


async def test_a_real_calibration_of_the_catalogue_drives_the_service(
    no_calibration: None, stack: Stack, catalogue: Catalogue
) -> None:
    async with await psycopg.AsyncConnection.connect(stack.admin_conninfo(), autocommit=True) as conn:
        calibration = await calibrate(conn, sample_size=30, k=10, ladder=[10, 40, 160])
    expected = pick_ef_search(calibration.points, 0.9, calibration.sample_size)
    answer = await similar_items(await get_pool(), catalogue.ids[7], SimilarQuery(recall_target=0.9),
                                 timeout_ms=5000)
    assert_choice(answer, max(10, expected.ef_search), expected.expected_recall)


async def test_the_loader_role_can_calibrate_through_the_app_pool(
    no_calibration: None, stack: Stack, catalogue: Catalogue
) -> None:
    calibration = await calibrate_catalogue(sample_size=10, ladder=[10, 40])
    assert calibration.catalogue_size == len(catalogue.ids)
    async with await psycopg.AsyncConnection.connect(stack.admin_conninfo(), autocommit=True) as conn:
        assert await load_calibration(conn) == calibration
