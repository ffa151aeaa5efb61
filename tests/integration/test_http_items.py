"""``/api/items/...`` handlers called with real requests; every answer checked against openapi.json."""

from __future__ import annotations

import pytest
from query_catalogue import RARE_CATEGORY
from query_http import call

from recsys.datasets import Catalogue

pytestmark = pytest.mark.integration

ITEM = "/api/items/{id}"
LOOKUP = "/api/items/lookup"
SIMILAR = "/api/items/{id}/similar"


@pytest.fixture(autouse=True)
def _pools(app_pools: None, catalogue: Catalogue) -> None:
    """Every test here uses the app's pool on its own event loop."""


async def test_get_item(catalogue: Catalogue) -> None:
    answer = (await call("items_get", route_params={"id": catalogue.ids[3]})).check(ITEM, "GET")
    assert answer.status == 200
    assert answer.body["id"] == catalogue.ids[3]
    assert answer.body["category"] == catalogue.categories[3]
    assert "embedding" not in answer.body
    answer = (await call("items_get", route_params={"id": catalogue.ids[3]}, params={"include_vector": "true"}))
    answer.check(ITEM, "GET")
    assert len(answer.body["embedding"]) == catalogue.vectors.shape[1]


async def test_get_item_errors() -> None:
    missing = (await call("items_get", route_params={"id": "absent"})).check(ITEM, "GET")
    assert (missing.status, missing.body["code"]) == (404, "not_found")
    too_long = (await call("items_get", route_params={"id": "x" * 129})).check(ITEM, "GET")
    assert (too_long.status, too_long.body["field"]) == (400, "id")
    flag = (await call("items_get", route_params={"id": "a"}, params={"include_vector": "maybe"})).check(ITEM, "GET")
    assert (flag.status, flag.body["field"]) == (400, "include_vector")


async def test_lookup_keeps_order_lists_missing_and_takes_integer_ids(catalogue: Catalogue) -> None:
    ids = [catalogue.ids[9], "nope", catalogue.ids[1], 12345, catalogue.ids[9]]
    answer = (await call("items_lookup", method="POST", json_body={"ids": ids})).check(LOOKUP, "POST")
    assert answer.status == 200
    assert [item["id"] for item in answer.body["items"]] == [catalogue.ids[9], catalogue.ids[1], catalogue.ids[9]]
    assert answer.body["missing"] == ["nope", "12345"]
    with_vectors = await call("items_lookup", method="POST", json_body={"ids": ids[:1], "include_vector": True})
    with_vectors.check(LOOKUP, "POST")
    assert len(with_vectors.body["items"][0]["embedding"]) == catalogue.vectors.shape[1]
    empty = (await call("items_lookup", method="POST", json_body={"ids": []})).check(LOOKUP, "POST")
    assert empty.body == {"items": [], "missing": []}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"ids": ["a"] * 1001}, "ids"),
        ({"ids": "a,b"}, "ids"),
        ({"ids": ["a", True]}, "ids"),
        ({"ids": ["a", 1.5]}, "ids"),
        ({"ids": [None]}, "ids"),
        ({"ids": ["x" * 129]}, "ids"),
        ({"ids": [""]}, "ids"),
        ({}, "ids"),
        ({"ids": ["a"], "include_vector": "yes"}, "include_vector"),
        ({"ids": ["a"], "with_vector": True}, "with_vector"),
        (["a", "b"], "body"),
    ],
)
async def test_lookup_invalid_bodies_name_the_field(body: object, field: str) -> None:
    answer = (await call("items_lookup", method="POST", json_body=body)).check(LOOKUP, "POST")
    assert (answer.status, answer.body["code"], answer.body["field"]) == (400, "invalid_argument", field)


async def test_lookup_body_errors() -> None:
    not_json = await call("items_lookup", method="POST", body=b"{ids: [", headers={"content-type": "application/json"})
    assert (not_json.check(LOOKUP, "POST").status, not_json.body["field"]) == (400, "body")
    text = await call("items_lookup", method="POST", body=b'{"ids": []}', headers={"content-type": "text/plain"})
    assert (text.check(LOOKUP, "POST").status, text.body["code"]) == (415, "unsupported_media_type")
    huge = await call("items_lookup", method="POST", json_body={"ids": ["a" * 100] * 12000})
    assert (huge.check(LOOKUP, "POST").status, huge.body["code"]) == (413, "too_large")


async def test_similar(catalogue: Catalogue) -> None:
    item_id = catalogue.ids[42]
    params = {"k": "7", "ef_search": "80", "category": RARE_CATEGORY, "exclude": f"{catalogue.ids[1]},other"}
    answer = (await call("similar_get", route_params={"id": item_id}, params=params)).check(SIMILAR, "GET")
    assert answer.status == 200
    assert answer.body["id"] == item_id and answer.body["ef_search"] == 80
    assert len(answer.body["results"]) == 7
    assert {r["category"] for r in answer.body["results"]} == {RARE_CATEGORY}
    assert item_id not in {r["id"] for r in answer.body["results"]}
    default = (await call("similar_get", route_params={"id": item_id}, params={"code": "ignored"}))
    assert len(default.check(SIMILAR, "GET").body["results"]) == 10
    small_ef = await call("similar_get", route_params={"id": item_id}, params={"k": "30", "ef_search": "3"})
    assert small_ef.check(SIMILAR, "GET").body["ef_search"] == 30


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"k": "0"}, "k"),
        ({"k": "1001"}, "k"),
        ({"k": "ten"}, "k"),
        ({"k": "2.5"}, "k"),
        ({"ef_search": "0"}, "ef_search"),
        ({"ef_search": "1001"}, "ef_search"),
        ({"recall_target": "0.4"}, "recall_target"),
        ({"recall_target": "1"}, "recall_target"),
        ({"recall_target": "high"}, "recall_target"),
        ({"recall_target": "0.9", "ef_search": "50"}, "recall_target"),
        ({"category": ""}, "category"),
        ({"exclude": ",".join(["a"] * 1001)}, "exclude"),
        ({"exclude": "a,,b"}, "exclude"),
        ({"exclude": "x" * 129}, "exclude"),
    ],
)
async def test_similar_invalid_parameters_name_the_field(
    catalogue: Catalogue, params: dict[str, str], field: str
) -> None:
    answer = await call("similar_get", route_params={"id": catalogue.ids[0]}, params=params)
    answer.check(SIMILAR, "GET")
    assert (answer.status, answer.body["code"], answer.body["field"]) == (400, "invalid_argument", field)


async def test_similar_not_found_and_not_calibrated(catalogue: Catalogue) -> None:
    missing = (await call("similar_get", route_params={"id": "absent"})).check(SIMILAR, "GET")
    assert (missing.status, missing.body["code"], missing.body["field"]) == (404, "not_found", "id")
    calibrated = await call("similar_get", route_params={"id": catalogue.ids[0]}, params={"recall_target": "0.95"})
    calibrated.check(SIMILAR, "GET")
    assert (calibrated.status, calibrated.body["code"]) == (409, "not_calibrated")
    assert "python -m recsys calibrate" in calibrated.body["error"]
