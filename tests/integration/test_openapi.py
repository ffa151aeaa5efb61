"""openapi.json describes every function of the app and is served anonymously at /api/openapi.json."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import jsonschema
import psycopg
import pytest
from query_catalogue import ensure_catalogue
from query_http import Answer, call, openapi, routes

from recsys.http.openapi import OPENAPI_PATH
from recsys.local.stack import Stack

pytestmark = pytest.mark.integration


def test_every_http_function_is_documented_under_its_route_and_method() -> None:
    doc = openapi()
    for function in routes().values():
        path = "/api/" + function.route
        assert path in doc["paths"], f"{function.name}: {path} is not in openapi.json"
        for method in function.methods or ():
            operation = doc["paths"][path].get(method.lower())
            assert operation is not None, f"{function.name}: {method} {path} is not in openapi.json"
            assert operation["operationId"] == function.name
            anonymous = operation.get("security") == []
            assert anonymous == (function.auth_level == "anonymous"), function.name


def test_the_ingest_endpoints_of_the_contract_are_documented() -> None:
    paths = openapi()["paths"]
    assert set(paths["/api/embeddings/batches"]) == {"post"}
    assert set(paths["/api/embeddings/batches"]["post"]["responses"]) >= {"202", "400", "413", "415", "503"}
    assert set(paths["/api/embeddings/batches/{batch_id}"]["get"]["responses"]) >= {"200", "404"}


def test_every_schema_is_valid_json_schema() -> None:
    doc = openapi()
    assert doc["openapi"].startswith("3.1")
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            assert operation["responses"], f"{method} {path} documents no response"


def test_the_checker_refuses_a_body_that_breaks_the_document() -> None:
    with pytest.raises(jsonschema.ValidationError):
        Answer(200, {}, {"id": "a", "category": None}).check("/api/items/{id}", "GET")
    with pytest.raises(jsonschema.ValidationError):
        Answer(400, {}, {"error": "bad", "code": "invalid"}).check("/api/items/lookup", "POST")
    with pytest.raises(AssertionError):
        Answer(503, {}, {"error": "busy", "code": "busy"}).check("/api/items/lookup", "POST")


async def test_openapi_is_served_anonymously_as_in_the_repository() -> None:
    assert routes()["openapi_get"].auth_level == "anonymous"
    answer = (await call("openapi_get")).check("/api/openapi.json", "GET")
    assert answer.status == 200
    assert answer.body == json.loads(OPENAPI_PATH.read_text())


def test_the_lookup_path_documents_every_method_the_host_routes_there(local_host: str) -> None:
    # GET and DELETE of /api/items/lookup are /api/items/{id} for the id "lookup".
    documented = {m.upper() for m in openapi()["paths"]["/api/items/lookup"]}
    assert documented == {"POST", "GET", "DELETE"}
    refused = httpx.request("OPTIONS", f"{local_host}/api/items/lookup", timeout=30)
    assert refused.status_code == 405
    assert {m.strip() for m in refused.headers["allow"].split(",")} == documented
    missing = httpx.get(f"{local_host}/api/items/lookup", timeout=30)
    Answer(missing.status_code, dict(missing.headers), missing.json()).check("/api/items/lookup", "GET")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"


async def test_health_answers_as_documented(app_pools: None) -> None:
    answer = (await call("health_get")).check("/api/health", "GET")
    assert answer.status == 200


def test_answers_through_the_local_host_match_the_document(stack: Stack, local_host: str) -> None:
    """Real HTTP answers of every area, the ingest endpoints included, against openapi.json."""
    catalogue = ensure_catalogue(stack)
    prefix = f"oa{uuid.uuid4().hex[:8]}-"
    dim = catalogue.vectors.shape[1]

    def answer(response: httpx.Response) -> Answer:
        return Answer(response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.json())

    with httpx.Client(base_url=f"{local_host}/api", timeout=60) as client:
        try:
            answer(client.get("/health")).check("/api/health", "GET")
            answer(client.get("/openapi.json")).check("/api/openapi.json", "GET")
            answer(client.get(f"/items/{catalogue.ids[0]}")).check("/api/items/{id}", "GET")
            similar = answer(client.get(f"/items/{catalogue.ids[0]}/similar", params={"k": 3}))
            assert similar.check("/api/items/{id}/similar", "GET").status == 200
            lookup = answer(client.post("/items/lookup", json={"ids": [catalogue.ids[1], "nope"]}))
            assert lookup.check("/api/items/lookup", "POST").body["missing"] == ["nope"]
            recommended = answer(client.post("/recommendations", json={"positive": [catalogue.ids[2]], "k": 2}))
            assert recommended.check("/api/recommendations", "POST").status == 200
            batch = answer(client.post("/recommendations/batch", json={"queries": [{"positive": ["nope"]}]}))
            assert batch.check("/api/recommendations/batch", "POST").body["results"][0]["status"] == 404

            items = [{"id": f"{prefix}{i}", "embedding": [float(x) for x in catalogue.vectors[i]],
                      "category": "books", "tags": ["t"], "metadata": {"i": i}} for i in range(2)]
            accepted = answer(client.post("/embeddings/batches", json={"batch_id": f"{prefix}b", "items": items}))
            assert accepted.check("/api/embeddings/batches", "POST").status == 202
            status = answer(client.get(f"/embeddings/batches/{prefix}b")).check(
                "/api/embeddings/batches/{batch_id}", "GET"
            )
            for _ in range(200):
                if status.body["status"] != "queued":
                    break
                time.sleep(0.1)
                status = answer(client.get(f"/embeddings/batches/{prefix}b"))
            assert status.check("/api/embeddings/batches/{batch_id}", "GET").body["status"] == "loaded"
            unknown = answer(client.get(f"/embeddings/batches/{prefix}unknown"))
            assert unknown.check("/api/embeddings/batches/{batch_id}", "GET").status == 404
            wrong_dimension = {"items": [{"id": "x", "embedding": [1.0] * (dim + 1)}]}
            bad = answer(client.post("/embeddings/batches", json=wrong_dimension))
            assert bad.check("/api/embeddings/batches", "POST").status == 400
        finally:
            with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
                conn.execute("DELETE FROM items WHERE starts_with(id, %s)", [prefix])
                conn.execute("DELETE FROM ingest_batches WHERE starts_with(batch_id, %s)", [prefix])
