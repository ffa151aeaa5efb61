"""``/api/recommendations`` and its batch endpoint, called with real requests, checked against openapi.json."""

from __future__ import annotations

from typing import Any

import pytest
from query_http import call

from recsys.datasets import Catalogue

pytestmark = pytest.mark.integration

ONE = "/api/recommendations"
BATCH = "/api/recommendations/batch"


@pytest.fixture(autouse=True)
def _pools(app_pools: None, catalogue: Catalogue) -> None:
    """Every test here uses the app's pool on its own event loop."""


def vector(catalogue: Catalogue, i: int) -> list[float]:
    return [float(x) for x in catalogue.vectors[i]]


async def test_recommendations(catalogue: Catalogue) -> None:
    body = {
        "positive": [catalogue.ids[1], catalogue.ids[2]],
        "negative": [catalogue.ids[3]],
        "vector": vector(catalogue, 4),
        "k": 12,
        "ef_search": 60,
        "exclude": [catalogue.ids[5]],
        "category": "music",
    }
    answer = (await call("recommendations_post", method="POST", json_body=body)).check(ONE, "POST")
    assert answer.status == 200
    assert answer.body["ef_search"] == 60 and len(answer.body["results"]) == 12
    ids = {r["id"] for r in answer.body["results"]}
    assert not ids & set(catalogue.ids[1:6])
    assert {r["category"] for r in answer.body["results"]} == {"music"}
    scores = [r["score"] for r in answer.body["results"]]
    assert scores == sorted(scores, reverse=True)
    # A bare vector is a query of its own. Exact, so that the item with that very vector ranks
    # first whatever graph this session's HNSW build drew (it once missed the item itself).
    only_vector = await call("recommendations_post", method="POST",
                             json_body={"vector": vector(catalogue, 8), "k": 3, "exact": True})
    assert only_vector.check(ONE, "POST").body["results"][0]["id"] == catalogue.ids[8]
    by_index = await call("recommendations_post", method="POST", json_body={"vector": vector(catalogue, 8), "k": 3})
    assert by_index.check(ONE, "POST").status == 200 and len(by_index.body["results"]) == 3


async def test_integer_ids_are_their_decimal_strings(catalogue: Catalogue) -> None:
    answer = await call("recommendations_post", method="POST", json_body={"positive": [42]})
    answer.check(ONE, "POST")
    assert (answer.status, answer.body["field"], answer.body["missing"]) == (404, "positive", ["42"])


def dim_vector(catalogue: Catalogue, value: Any, size: int | None = None) -> list[Any]:
    return [value] * (size or catalogue.vectors.shape[1])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "positive"),
        ({"negative": ["a"]}, "positive"),
        ({"positive": []}, "positive"),
        ({"positive": "a"}, "positive"),
        ({"positive": ["a"] * 1001}, "positive"),
        ({"positive": ["a"], "negative": [{"id": "b"}]}, "negative"),
        ({"positive": ["a"], "exclude": ["a"] * 1001}, "exclude"),
        ({"positive": ["a"], "k": 0}, "k"),
        ({"positive": ["a"], "k": 1001}, "k"),
        ({"positive": ["a"], "k": "10"}, "k"),
        ({"positive": ["a"], "k": True}, "k"),
        ({"positive": ["a"], "k": 2.5}, "k"),
        ({"positive": ["a"], "ef_search": 0}, "ef_search"),
        ({"positive": ["a"], "ef_search": 1001}, "ef_search"),
        ({"positive": ["a"], "recall_target": 0.9999}, "recall_target"),
        ({"positive": ["a"], "recall_target": "0.9"}, "recall_target"),
        ({"positive": ["a"], "recall_target": 0.9, "ef_search": 10}, "recall_target"),
        ({"positive": ["a"], "category": 7}, "category"),
        ({"positive": ["a"], "category": ""}, "category"),
        ({"positive": ["a"], "postive": ["b"]}, "postive"),
        ({"vector": [0.1, 0.2]}, "vector"),
        ({"vector": "0.1,0.2"}, "vector"),
    ],
)
async def test_invalid_bodies_name_the_field(body: dict[str, Any], field: str) -> None:
    answer = (await call("recommendations_post", method="POST", json_body=body)).check(ONE, "POST")
    assert (answer.status, answer.body["code"], answer.body["field"]) == (400, "invalid_argument", field)


@pytest.mark.parametrize("value", [True, "1", None, 0.0, 1e39])
async def test_invalid_vector_values(catalogue: Catalogue, value: Any) -> None:
    values = dim_vector(catalogue, 0.5)
    values[3] = value
    if value == 0.0:
        values = dim_vector(catalogue, 0.0)
    answer = (await call("recommendations_post", method="POST", json_body={"vector": values})).check(ONE, "POST")
    assert (answer.status, answer.body["field"]) == (400, "vector")


async def test_non_finite_numbers_are_refused(catalogue: Catalogue) -> None:
    text = "[" + ",".join(["0.5"] * (catalogue.vectors.shape[1] - 1) + ["1e400"]) + "]"
    huge = await call("recommendations_post", method="POST", body=f'{{"vector": {text}}}'.encode(),
                      headers={"content-type": "application/json"})
    assert (huge.check(ONE, "POST").status, huge.body["field"]) == (400, "vector")
    nan = await call("recommendations_post", method="POST", body=text.replace("1e400", "NaN").join(['{"vector": ', "}"])
                     .encode(), headers={"content-type": "application/json"})
    assert (nan.check(ONE, "POST").status, nan.body["code"]) == (400, "invalid_argument")


async def test_unknown_ids_and_uncalibrated_recall(catalogue: Catalogue) -> None:
    unknown = await call(
        "recommendations_post", method="POST",
        json_body={"positive": [catalogue.ids[0]], "negative": ["ghost-1", "ghost-2"]},
    )
    unknown.check(ONE, "POST")
    assert (unknown.status, unknown.body["field"], unknown.body["missing"]) == (404, "negative", ["ghost-1", "ghost-2"])
    target = await call(
        "recommendations_post", method="POST", json_body={"positive": [catalogue.ids[0]], "recall_target": 0.9}
    )
    assert (target.check(ONE, "POST").status, target.body["code"]) == (409, "not_calibrated")


async def test_media_type_and_size() -> None:
    text = await call("recommendations_post", method="POST", body=b"{}", headers={"content-type": "text/plain"})
    assert text.check(ONE, "POST").status == 415
    huge = await call("recommendations_post", method="POST", json_body={"positive": ["x" * 128] * 9000})
    assert huge.check(ONE, "POST").status == 413


async def test_batch_answers_each_query_in_order(catalogue: Catalogue) -> None:
    queries: list[Any] = [{"positive": [catalogue.ids[i]], "k": 4} for i in range(20)]
    queries += [{"positive": ["ghost"]}, {"positive": [catalogue.ids[0]], "k": 0}, "not an object",
                {"positive": [catalogue.ids[0]], "recall_target": 0.9}]
    answer = (await call("recommendations_batch", method="POST", json_body={"queries": queries})).check(BATCH, "POST")
    assert answer.status == 200
    results = answer.body["results"]
    assert len(results) == 24
    for i in range(20):
        single = await call("recommendations_post", method="POST", json_body=queries[i])
        assert results[i]["status"] == 200
        assert [r["id"] for r in results[i]["results"]] == [r["id"] for r in single.body["results"]]
    assert [r["status"] for r in results[20:]] == [404, 400, 400, 409]
    assert [r.get("field") for r in results[20:]] == ["positive", "k", "body", None]


@pytest.mark.parametrize(
    ("body", "field"),
    [({"queries": []}, "queries"), ({"queries": [{"positive": ["a"]}] * 33}, "queries"), ({}, "queries"),
     ({"queries": {"positive": ["a"]}}, "queries"), ({"queries": [], "extra": 1}, "extra"), ([], "body")],
)
async def test_batch_envelope_errors(body: Any, field: str) -> None:
    answer = (await call("recommendations_batch", method="POST", json_body=body)).check(BATCH, "POST")
    assert (answer.status, answer.body["field"]) == (400, field)
