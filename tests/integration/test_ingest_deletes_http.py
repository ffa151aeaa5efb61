"""Deletes and versions through the HTTP endpoints and the local host, and the ingest endpoints
under load and during an outage.

The session's local host serves ``function_app.app`` (HTTP at /api, the ``loader_queue``
trigger on Azurite). Handlers are also called directly (``query_http.call``) where the host adds
nothing, and their answers are checked against ``openapi.json``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from ingest_support import id_prefix, raw_items
from query_http import call

from recsys.config import get_settings
from recsys.db.pool import RECONNECT_MAX_DELAY, close_pools
from recsys.ingest.messages import MAX_BATCH_ENTRIES, MAX_VERSION
from recsys.local.stack import Stack

pytestmark = pytest.mark.integration

BATCHES = "/api/embeddings/batches"


@pytest.fixture
def prefix(stack: Stack, stack_env: dict[str, str]) -> Iterator[str]:
    with id_prefix(stack, "w") as token:
        yield token


def settled(url: str, batch_id: str, bound: float = 120) -> dict[str, Any]:
    """The batch's status once it is no longer ``queued`` (polled within a generous bound)."""
    deadline = time.monotonic() + bound
    while True:
        response = httpx.get(f"{url}/api/embeddings/batches/{batch_id}", timeout=30)
        body: dict[str, Any] = response.json()
        if (response.status_code == 200 and body["status"] != "queued") or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def test_a_deleted_item_is_gone_from_every_read(local_host: str, prefix: str) -> None:
    category = f"{prefix}cat"
    items = [{**raw, "category": category} for raw in raw_items(6, prefix, b64=False)]
    ids = [str(i["id"]) for i in items]
    gone, kept = ids[0], ids[1:]
    posted = httpx.post(f"{local_host}{BATCHES}", json={"batch_id": f"{prefix}load", "items": items}, timeout=30)
    assert posted.status_code == 202
    assert settled(local_host, f"{prefix}load")["status"] == "loaded"
    before = httpx.get(f"{local_host}/api/items/{gone}", timeout=30).json()
    assert isinstance(before["version"], int) and 1 <= before["version"] <= MAX_VERSION

    deleted = httpx.delete(f"{local_host}/api/items/{gone}", timeout=30)
    assert deleted.status_code == 202
    accepted = deleted.json()
    assert (accepted["items"], accepted["deletes"], accepted["messages"]) == (0, 1, 1)
    assert deleted.headers["location"] == f"/api/embeddings/batches/{accepted['batch_id']}"
    status = settled(local_host, accepted["batch_id"])
    assert (status["status"], status["rows"], status["deleted"], status["stale"]) == ("loaded", 0, 1, 0)

    assert httpx.get(f"{local_host}/api/items/{gone}", timeout=30).status_code == 404
    lookup = httpx.post(f"{local_host}/api/items/lookup", json={"ids": ids}, timeout=30).json()
    assert [i["id"] for i in lookup["items"]] == kept and lookup["missing"] == [gone]
    similar = httpx.get(f"{local_host}/api/items/{kept[0]}/similar",
                        params={"k": 10, "category": category}, timeout=30).json()
    assert sorted(r["id"] for r in similar["results"]) == sorted(kept[1:])
    recommended = httpx.post(f"{local_host}/api/recommendations",
                             json={"positive": [kept[0]], "k": 10, "category": category}, timeout=30).json()
    assert sorted(r["id"] for r in recommended["results"]) == sorted(kept[1:])
    assert httpx.get(f"{local_host}/api/items/{gone}/similar", timeout=30).status_code == 404
    for field in ("positive", "negative"):
        body = {"positive": [kept[0]], field: [gone]} if field == "negative" else {"positive": [gone]}
        answer = httpx.post(f"{local_host}/api/recommendations", json=body, timeout=30)
        assert answer.status_code == 404 and answer.json()["field"] == field, answer.json()

    # An older deletion of a kept item, sent with the batch endpoint, is stale; a newer one applies.
    version = httpx.get(f"{local_host}/api/items/{kept[0]}", timeout=30).json()["version"]
    batch = {"batch_id": f"{prefix}del", "delete": [{"id": kept[0], "version": version}, kept[1]]}
    assert httpx.post(f"{local_host}{BATCHES}", json=batch, timeout=30).status_code == 202
    status = settled(local_host, f"{prefix}del")
    assert (status["status"], status["deleted"], status["stale"]) == ("loaded", 1, 1)
    assert httpx.get(f"{local_host}/api/items/{kept[0]}", timeout=30).status_code == 200
    assert httpx.get(f"{local_host}/api/items/{kept[1]}", timeout=30).status_code == 404
    assert httpx.delete(f"{local_host}/api/items/{kept[0]}", params={"version": version + 1},
                        timeout=30).status_code == 202

    # An id deleted twice in one batch is deleted once, and the repeat is stale.
    twice = {"batch_id": f"{prefix}twice", "delete": [kept[2], {"id": kept[2]}]}
    accepted = httpx.post(f"{local_host}{BATCHES}", json=twice, timeout=30)
    assert accepted.status_code == 202 and accepted.json()["deletes"] == 2
    status = settled(local_host, f"{prefix}twice")
    assert (status["status"], status["rows"], status["deleted"], status["stale"]) == ("loaded", 0, 1, 1)
    assert httpx.get(f"{local_host}/api/items/{kept[2]}", timeout=30).status_code == 404

    # An id upserted twice in one batch is written once, by the last entry; the first is stale.
    again = [{**items[4], "tags": ["first"]}, {**items[4], "tags": ["second"]}]
    accepted = httpx.post(f"{local_host}{BATCHES}", json={"batch_id": f"{prefix}again", "items": again}, timeout=30)
    assert accepted.status_code == 202 and accepted.json()["items"] == 2
    status = settled(local_host, f"{prefix}again")
    assert (status["status"], status["rows"], status["deleted"], status["stale"]) == ("loaded", 1, 0, 1)
    assert httpx.get(f"{local_host}/api/items/{kept[3]}", timeout=30).json()["tags"] == ["second"]


def _items(prefix: str, n: int = 2) -> list[dict[str, Any]]:
    return raw_items(n, prefix, b64=False)


_UPSERTED = raw_items(1, "r-", b64=False)
BAD_BATCHES: list[tuple[str, Any, str]] = [
    ("delete not a list", {"delete": "x"}, "delete"),
    ("both empty", {"items": [], "delete": []}, "items"),
    ("neither", {"batch_id": "b"}, "items"),
    ("bad id", {"delete": [""]}, "delete[0]"),
    ("bad id type", {"delete": [1.5]}, "delete[0]"),
    ("object without id", {"delete": [{"version": 3}]}, "delete[0].id"),
    ("unknown field", {"delete": [{"id": "a", "when": 3}]}, "delete[0]"),
    ("version zero", {"delete": [{"id": "a", "version": 0}]}, "delete[0].version"),
    ("version too big", {"delete": [{"id": "a", "version": MAX_VERSION + 1}]}, "delete[0].version"),
    ("version text", {"delete": [{"id": "a", "version": "3"}]}, "delete[0].version"),
    ("version fraction", {"delete": [{"id": "a", "version": 2.5}]}, "delete[0].version"),
    ("version boolean", {"delete": [{"id": "a", "version": True}]}, "delete[0].version"),
    ("repeated id also upserted", {"items": _UPSERTED, "delete": ["x", _UPSERTED[0]["id"], _UPSERTED[0]["id"]]},
     "delete"),
    ("too many deletions", {"delete": [f"i{n}" for n in range(MAX_BATCH_ENTRIES + 1)]}, "delete"),
]


@pytest.mark.parametrize(("body", "field"), [(b, f) for _, b, f in BAD_BATCHES], ids=[n for n, _, _ in BAD_BATCHES])
async def test_bad_deletions_and_versions_are_400_naming_the_field(
    body: dict[str, Any], field: str, app_pools: None
) -> None:
    answer = (await call("batches_post", method="POST", json_body=body)).check(BATCHES, "POST")
    assert answer.status == 400 and answer.body["code"] == "invalid_argument"
    assert answer.body["field"] == field, answer.body


async def test_an_id_both_upserted_and_deleted_and_bad_item_versions_are_400(prefix: str, app_pools: None) -> None:
    items = _items(prefix)
    cases = [
        ({"items": items, "delete": [items[1]["id"]]}, "delete"),
        ({"items": [{**items[0], "version": -1}]}, "items[0].version"),
        ({"items": [items[0], {**items[1], "version": "new"}]}, "items[1].version"),
        # 50,000 entries in all: two items and 49,999 deletions are one too many.
        ({"items": items, "delete": [f"{prefix}d{n}" for n in range(MAX_BATCH_ENTRIES - 1)]}, "delete"),
    ]
    for body, field in cases:
        answer = (await call("batches_post", method="POST", json_body=body)).check(BATCHES, "POST")
        assert (answer.status, answer.body["field"]) == (400, field), answer.body


@pytest.mark.parametrize("version", ["0", "-3", "1.5", "x", " 7", "9007199254740992", "1" * 5000, "٣"])
async def test_a_bad_version_on_delete_is_400(version: str, app_pools: None) -> None:
    answer = await call("items_delete", method="DELETE", route_params={"id": "a"}, params={"version": version})
    answer.check("/api/items/{id}", "DELETE")
    assert answer.status == 400 and answer.body["field"] == "version"


async def test_enqueue_answers_202_while_the_loader_is_saturated(stack: Stack, local_host: str, prefix: str) -> None:
    from recsys.ingest.demo import demo_items
    from recsys.ingest.producer import enqueue_items

    settings = get_settings()
    big = demo_items(12_000, stack.config.embedding_dim, seed=5, prefix=f"{prefix}big-")
    enqueued = await enqueue_items(big, batch_id=f"{prefix}big", settings=settings, part_items=3000)
    await close_pools()
    assert enqueued.messages == 4 == settings.pool_max_size  # one COPY transaction per loader connection
    deadline = time.monotonic() + 60
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as admin:
        while True:  # until the loader is writing the parts
            (busy,) = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'recsys_loader' AND state = 'active'"
                " AND query ILIKE '%ingest_staging%'"
            ).fetchone() or (0,)
            if busy >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert busy >= 2

    async with httpx.AsyncClient(base_url=local_host, timeout=30) as client:
        answers = await asyncio.gather(*(
            client.post(BATCHES, json={"batch_id": f"{prefix}small-{n}", "items": raw_items(3, f"{prefix}s{n}-")})
            for n in range(20)
        ))
    assert [a.status_code for a in answers] == [202] * 20, [a.text for a in answers if a.status_code != 202]
    assert settled(local_host, f"{prefix}big")["status"] == "loaded"  # the loads were in progress meanwhile
    for n in range(20):
        assert settled(local_host, f"{prefix}small-{n}")["status"] == "loaded"


async def test_enqueue_answers_503_within_the_pool_timeout_while_the_database_is_down_then_recovers(
    stack: Stack, local_host: str, prefix: str, app_pools: None
) -> None:
    timeout = get_settings().pool_timeout
    body = {"batch_id": f"{prefix}outage", "items": _items(prefix)}
    assert (await call("batches_post", method="POST", json_body=body)).status == 202  # pools warm
    assert httpx.post(f"{local_host}{BATCHES}", json=body, timeout=30).status_code == 202
    stack.stop_postgres()
    try:
        for name, kwargs in (
            ("batches_post", {"method": "POST", "json_body": body}),
            ("batches_get", {"route_params": {"batch_id": f"{prefix}outage"}}),
            ("items_delete", {"method": "DELETE", "route_params": {"id": f"{prefix}x"}}),
        ):
            started = time.monotonic()
            answer = await call(name, **kwargs)  # type: ignore[arg-type]
            elapsed = time.monotonic() - started
            assert answer.status == 503 and answer.body["code"] == "busy", (name, answer.body)
            assert answer.headers["retry-after"].isdigit()
            # Bounded by the pool timeout (3 s here), not PgBouncer's query_wait_timeout; a
            # generous margin for a loaded machine.
            assert elapsed < timeout + 2.0, (name, elapsed)
        through_host = httpx.post(f"{local_host}{BATCHES}", json=body, timeout=30)
        assert through_host.status_code == 503 and through_host.headers["retry-after"].isdigit()
    finally:
        stack.start_postgres()

    # Both the pools of this test and the host's, whose connection attempts failed during the
    # outage, reconnect by themselves: within one reconnection delay and one pool timeout.
    bound = RECONNECT_MAX_DELAY + timeout + 5.0
    started = time.monotonic()
    for n in itertools.count():
        again = {"batch_id": f"{prefix}back-{n}", "items": _items(prefix)}
        direct = (await call("batches_post", method="POST", json_body=again)).status
        hosted = httpx.post(f"{local_host}{BATCHES}", json={**again, "batch_id": f"{prefix}back-host-{n}"},
                            timeout=30).status_code
        if (direct, hosted) == (202, 202):
            break
        assert {direct, hosted} <= {202, 503}, (direct, hosted)
        assert time.monotonic() - started < bound, f"not recovered after {bound:.0f} s: {(direct, hosted)}"
        await asyncio.sleep(0.5)
    # Every batch accepted here loads before the test ends: a part retried after the outage, loaded
    # once the prefix's rows had been deleted, would leave items in the catalogue of later tests.
    deadline = time.monotonic() + 120
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as admin:
        while True:
            (queued,) = admin.execute("SELECT count(*) FROM ingest_batches WHERE starts_with(batch_id, %s)"
                                      " AND status = 'queued'", [prefix]).fetchone() or (0,)
            if queued == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    assert queued == 0, f"{queued} parts still queued"
