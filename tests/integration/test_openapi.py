"""openapi.json describes every function of the app and is served anonymously at /api/openapi.json."""

from __future__ import annotations

import json

import jsonschema
import pytest
from query_http import Answer, call, openapi, routes

from recsys.http.openapi import OPENAPI_PATH

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


async def test_health_answers_as_documented(app_pools: None) -> None:
    answer = (await call("health_get")).check("/api/health", "GET")
    assert answer.status == 200
