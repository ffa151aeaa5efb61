"""Disruptive: an exhausted pool, a statement timeout and a stopped database, through the handlers.

Each test restores what it disturbs (settings, locks, PostgreSQL) and leaves the stack healthy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator

import psycopg
import pytest
from query_http import call

from recsys.config import forget_settings, get_settings
from recsys.datasets import Catalogue
from recsys.db.pool import close_pools, get_pool
from recsys.local.stack import Stack

pytestmark = pytest.mark.integration

SIMILAR = "/api/items/{id}/similar"
BUSY = {"error": "Service temporarily busy, please retry", "code": "busy"}


@pytest.fixture
def app_settings(monkeypatch: pytest.MonkeyPatch, stack_env: dict[str, str]) -> Iterator[Callable[..., None]]:
    """Override app settings for one test; the settings cache is cleared on the way in and out."""

    def apply(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        forget_settings()

    yield apply
    forget_settings()


@pytest.fixture
async def locked_items(stack: Stack) -> AsyncIterator[None]:
    """An ACCESS EXCLUSIVE lock on items, held by another session until the test ends."""
    async with await psycopg.AsyncConnection.connect(stack.admin_conninfo()) as locker:
        await locker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        yield
        await locker.rollback()


async def test_exhausted_pool_answers_503_with_retry_after_within_the_pool_timeout(
    catalogue: Catalogue, app_settings: Callable[..., None], app_pools: None
) -> None:
    app_settings(RECSYS_POOL_MIN_SIZE="1", RECSYS_POOL_MAX_SIZE="2", RECSYS_POOL_TIMEOUT="1")
    await close_pools()
    pool = await get_pool()
    async with pool.connection(), pool.connection():
        started = time.monotonic()
        answer = (await call("similar_get", route_params={"id": catalogue.ids[0]})).check(SIMILAR, "GET")
        elapsed = time.monotonic() - started
        # Three queries of a batch time out together: one 503 for the batch, not a 500.
        queries = [{"positive": [catalogue.ids[i]]} for i in range(3)]
        batch = await call("recommendations_batch", method="POST", json_body={"queries": queries})
    assert answer.status == 503 and answer.body == BUSY
    assert answer.headers["retry-after"].isdigit()
    assert 0.9 <= elapsed <= 1.0 + 1.5, elapsed
    assert batch.check("/api/recommendations/batch", "POST").status == 503 and batch.body == BUSY
    after = await call("similar_get", route_params={"id": catalogue.ids[0]})
    assert after.status == 200


async def test_statement_timeout_answers_504(
    catalogue: Catalogue, app_settings: Callable[..., None], app_pools: None, locked_items: None
) -> None:
    app_settings(RECSYS_STATEMENT_TIMEOUT_MS="300")
    similar = (await call("similar_get", route_params={"id": catalogue.ids[0]})).check(SIMILAR, "GET")
    assert (similar.status, similar.body["code"]) == (504, "timeout")
    item = (await call("items_get", route_params={"id": catalogue.ids[0]})).check("/api/items/{id}", "GET")
    assert item.status == 504
    lookup = await call("items_lookup", method="POST", json_body={"ids": catalogue.ids[:3]})
    assert lookup.check("/api/items/lookup", "POST").status == 504
    one = await call("recommendations_post", method="POST", json_body={"positive": [catalogue.ids[0]]})
    assert one.check("/api/recommendations", "POST").status == 504
    batch = await call(
        "recommendations_batch", method="POST",
        json_body={"queries": [{"positive": [catalogue.ids[0]]}, {"positive": [catalogue.ids[1]]}]},
    )
    assert batch.check("/api/recommendations/batch", "POST").status == 200
    assert [r["status"] for r in batch.body["results"]] == [504, 504]


async def test_stopped_database_answers_503_and_the_service_resumes(
    stack: Stack, catalogue: Catalogue, app_pools: None
) -> None:
    assert (await call("similar_get", route_params={"id": catalogue.ids[0]})).status == 200
    await asyncio.to_thread(stack.stop_postgres)
    try:
        started = time.monotonic()
        answer = (await call("similar_get", route_params={"id": catalogue.ids[0]})).check(SIMILAR, "GET")
        elapsed = time.monotonic() - started
        assert answer.status == 503 and answer.body == BUSY
        assert answer.headers["retry-after"].isdigit()
        # PgBouncer would hold the request for its query_wait_timeout (30 s); the pool timeout ends it.
        assert elapsed <= get_settings().pool_timeout + 1.5, elapsed
    finally:
        await asyncio.to_thread(stack.start_postgres)
    # The pool reconnects on its own schedule (psycopg_pool's backoff); no restart is needed.
    statuses = []
    for _ in range(20):
        answer = await call("similar_get", route_params={"id": catalogue.ids[0]})
        statuses.append(answer.status)
        if answer.status == 200:
            break
        await asyncio.sleep(0.5)
    assert statuses[-1] == 200, statuses
    assert len(answer.body["results"]) == 10
