"""Hostile input through the local host and the real app: always a 4xx with the documented body.

Each case here answered 500 ``internal error`` before (deep nesting, lone surrogates) or was
silently changed (an invalid UTF-8 path became U+FFFD, a duplicate key kept its last value).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration

JSON = {"content-type": "application/json"}
#: 700 kB of brackets: under the 1 MiB limit, far deeper than Python's recursion limit.
DEEP = b"[" * 350_000 + b"]" * 350_000


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) <= {"error", "code", "field", "missing"} and body["error"] and body["code"], body
    return dict(body)


@pytest.fixture(scope="module")
def client(local_host: str) -> Any:
    with httpx.Client(base_url=local_host, timeout=30) as client:
        yield client


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/recommendations", DEEP, "body"),
        ("/api/items/lookup", b'{"ids": ' + DEEP + b"}", "body"),
        ("/api/recommendations/batch", b'{"queries": [' + DEEP + b"]}", "body"),
        ("/api/embeddings/batches", b'{"items": ' + DEEP + b"}", "body"),
        ("/api/items/lookup", b'{"ids": ["\\ud800"]}', "ids[0]"),
        ("/api/recommendations", b'{"positive": ["item-00001"], "category": "\\ud800"}', "category"),
        ("/api/recommendations", b'{"vector": [1], "category": "a\\udc00b"}', "category"),
        ("/api/items/lookup", b'{"ids": ["\xed\xa0\x80"]}', "body"),  # a surrogate encoded in UTF-8
        ("/api/items/lookup", b'{"ids": ["\xff"]}', "body"),
        ("/api/items/lookup", b'{"ids": ["a\\u0000"]}', "ids[0]"),
        ("/api/embeddings/batches", b'{"items": [{"id": "x\\u0000", "embedding": [1]}]}', "items[0].id"),
        ("/api/recommendations", b'{"positive": ["a"], "k": 1, "k": 2}', "k"),
        ("/api/recommendations", b'{"positive": ["a"], "k": 1e999}', "k"),
        ("/api/recommendations", b'{"positive": ["a"], "k": 100000000000000000000000000000000}', "k"),
        ("/api/recommendations", b'{"positive": ["a"], "k": ' + b"9" * 5000 + b"}", "body"),
        ("/api/recommendations", b'{"positive": [' + b"9" * 200 + b"]}", "positive"),
        ("/api/recommendations", b'{"positive": ["a"], "recall_target": -1e999}', "recall_target"),
        ("/api/recommendations", b'{"positive": ["a"], "k": NaN}', "body"),
    ],
)
def test_hostile_bodies_are_a_400_naming_the_field(client: httpx.Client, path: str, body: bytes, field: str) -> None:
    assert error_of(client.post(path, content=body, headers=JSON), 400)["field"] == field


@pytest.mark.parametrize(
    ("target", "status", "field"),
    [
        ("/api/items/%ED%A0%80", 400, "path"),
        ("/api/items/%FF/similar", 400, "path"),
        ("/api/items/a%00b", 400, "id"),
        ("/api/embeddings/batches/%ED%A0%80", 400, "path"),
        ("/api/embeddings/batches/a%00", 400, "batch_id"),
        ("/api/items/item-00001/similar?category=%ED%A0%80", 400, "category"),
        ("/api/items/item-00001/similar?category=%00", 400, "category"),
        ("/api/items/item-00001/similar?exclude=a,%00", 400, "exclude"),
        ("/api/items/item-00001/similar?k=1e999", 400, "k"),
        ("/api/items/item-00001/similar?k=99999999999999999999999999", 400, "k"),
        ("/api/items/item-00001/similar?recall_target=nan", 400, "recall_target"),
        ("/api/items/item-00001?include_vector=%FF", 400, "include_vector"),
    ],
)
def test_hostile_paths_and_query_strings_are_a_400(client: httpx.Client, target: str, status: int, field: str) -> None:
    assert error_of(client.get(target), status)["field"] == field


def test_a_wrong_content_type_is_a_415(client: httpx.Client) -> None:
    for path in ("/api/recommendations", "/api/items/lookup", "/api/recommendations/batch", "/api/embeddings/batches"):
        body = error_of(client.post(path, content=b'{"ids": ["a"]}', headers={"content-type": "text/plain"}), 415)
        assert body["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/api/recommendations", "POST"),
        ("GET", "/api/recommendations/batch", "POST"),
        ("PUT", "/api/items/item-1/similar", "GET"),
        ("PATCH", "/api/health", "GET"),
        ("POST", "/api/embeddings/batches/b-1", "GET"),
    ],
)
def test_a_wrong_method_is_a_405_with_allow(client: httpx.Client, method: str, path: str, allow: str) -> None:
    response = client.request(method, path)
    assert error_of(response, 405)["code"] == "method_not_allowed"
    assert allow in response.headers["allow"].split(", ")


def test_any_batch_id_gets_a_202_with_a_percent_encoded_location(client: httpx.Client) -> None:
    # A newline or an emoji in a header would make the server drop the connection instead.
    response = client.post("/api/embeddings/batches", json={"batch_id": "b ✓/\n😍", "delete": ["hostile-none"]})
    assert response.status_code == 202, response.text
    assert response.headers["location"] == "/api/embeddings/batches/b%20%E2%9C%93%2F%0A%F0%9F%98%8D"
    assert response.json()["batch_id"] == "b ✓/\n😍"
