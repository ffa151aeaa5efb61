"""The batch endpoints and the queue-triggered loader end to end, through the local host.

The session's local host serves ``function_app.app``: HTTP at /api and the ``loader_queue``
trigger driven from Azurite's ``embedding-batches`` queue as host.json says.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from azure.storage.queue import QueueClient
from ingest_support import count_items, id_prefix, raw_items

from recsys.local.stack import Stack

pytestmark = pytest.mark.integration

QUEUE = "embedding-batches"


@pytest.fixture
def prefix(stack: Stack, stack_env: dict[str, str]) -> Iterator[str]:
    with id_prefix(stack, "h") as token:
        yield token



def settled(url: str, batch_id: str, bound: float = 120) -> dict[str, Any]:
    """The batch's status once it is no longer ``queued`` (polled, within a generous bound).

    A batch sent by another producer is unknown (404) until the loader has seen its message.
    """
    deadline = time.monotonic() + bound
    while True:
        response = httpx.get(f"{url}/api/embeddings/batches/{batch_id}", timeout=30)
        body: dict[str, Any] = response.json()
        if (response.status_code == 200 and body["status"] != "queued") or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def test_a_posted_batch_is_accepted_then_loaded(stack: Stack, local_host: str, prefix: str) -> None:
    items = raw_items(5, prefix, b64=False)
    response = httpx.post(f"{local_host}/api/embeddings/batches",
                          json={"batch_id": f"{prefix}small", "items": items}, timeout=30)
    assert response.status_code == 202
    assert response.json() == {"batch_id": f"{prefix}small", "items": 5, "deletes": 0, "messages": 1}
    status = httpx.get(f"{local_host}/api/embeddings/batches/{prefix}small", timeout=30)
    assert status.status_code == 200  # known at once, before the loader has run
    assert status.json()["status"] in ("queued", "loaded")

    assert settled(local_host, f"{prefix}small") == {"batch_id": f"{prefix}small", "status": "loaded", "rows": 5,
                                                    "deleted": 0, "stale": 0, "error": None}
    assert count_items(stack, prefix) == 5


def test_a_large_batch_without_id_gets_one_and_loads_through_blob_storage(
    stack: Stack, local_host: str, prefix: str
) -> None:
    items = raw_items(400, prefix)
    body = json.dumps({"items": items})
    assert len(body) > 64 * 1024
    response = httpx.post(f"{local_host}/api/embeddings/batches", content=body,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 202
    accepted = response.json()
    assert accepted["items"] == 400 and accepted["messages"] == 1 and accepted["batch_id"]
    try:
        assert settled(local_host, accepted["batch_id"])["status"] == "loaded"
        assert count_items(stack, prefix) == 400
    finally:
        with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
            conn.execute("DELETE FROM ingest_batches WHERE batch_id = %s", [accepted["batch_id"]])


def test_a_bad_batch_is_refused_naming_the_field_and_nothing_is_queued(local_host: str, prefix: str) -> None:
    items = raw_items(3, prefix, b64=False)
    items[2]["embedding"] = items[2]["embedding"][:10]
    response = httpx.post(f"{local_host}/api/embeddings/batches",
                          json={"batch_id": f"{prefix}bad", "items": items}, timeout=30)
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_argument"
    assert response.json()["field"] == "items[2].embedding"
    assert httpx.get(f"{local_host}/api/embeddings/batches/{prefix}bad", timeout=30).status_code == 404

    not_json = httpx.post(f"{local_host}/api/embeddings/batches", content=b"{nope",
                          headers={"content-type": "application/json"}, timeout=30)
    assert not_json.status_code == 400 and not_json.json()["field"] == "body"
    wrong_type = httpx.post(f"{local_host}/api/embeddings/batches", content=b"x",
                            headers={"content-type": "text/plain"}, timeout=30)
    assert wrong_type.status_code == 415
    too_long = httpx.post(f"{local_host}/api/embeddings/batches",
                          json={"batch_id": "x" * 129, "items": raw_items(1, prefix)}, timeout=30)
    assert too_long.status_code == 400 and too_long.json()["field"] == "batch_id"


def test_an_unknown_batch_is_404(local_host: str) -> None:
    response = httpx.get(f"{local_host}/api/embeddings/batches/no-such-batch", timeout=30)
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_a_message_from_another_producer_loads_and_a_broken_one_is_poisoned_without_retries(
    stack: Stack, local_host: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="recsys")
    items = raw_items(3, prefix, b64=False)
    broken = [*items[:1], {**items[1], "embedding": [1.0, 2.0]}]
    connection = stack.storage_connection_string()
    with QueueClient.from_connection_string(connection, QUEUE) as queue:
        for batch_id, batch in ((f"{prefix}ext", items), (f"{prefix}ext-broken", broken)):
            document = json.dumps({"batch_id": batch_id, "items": batch})
            queue.send_message(base64.b64encode(document.encode()).decode())  # as API.md shows

    assert settled(local_host, f"{prefix}ext") == {"batch_id": f"{prefix}ext", "status": "loaded", "rows": 3,
                                                  "deleted": 0, "stale": 0, "error": None}
    failed = settled(local_host, f"{prefix}ext-broken")
    assert failed["status"] == "failed" and failed["rows"] == 0
    assert "items[1].embedding must have 384 dimensions, got 2" in failed["error"]
    assert count_items(stack, prefix) == 3  # the broken batch's valid item was not written

    with QueueClient.from_connection_string(connection, f"{QUEUE}-poison") as poison:
        contents = [base64.b64decode(m.content) for m in poison.peek_messages(max_messages=32)]
        mine = [c for c in contents if f"{prefix}ext-broken".encode() in c]
        assert len(mine) == 1
        poison.clear_messages()
    # Moved by the loader on its one and only attempt: the host never saw it fail.
    assert not [r for r in caplog.records if "failed on message" in r.getMessage()]
    assert [r for r in caplog.records if f"{prefix}ext-broken" in r.getMessage() and "poison" in r.getMessage()]
