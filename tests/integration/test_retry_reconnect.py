"""A read that loses its connection mid-query is retried on another one and succeeds."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import pytest

from recsys.datasets import Catalogue
from recsys.db.pool import get_pool
from recsys.local.stack import Stack
from recsys.search import service
from recsys.search.params import SimilarQuery

pytestmark = pytest.mark.integration


async def test_a_terminated_server_connection_is_retried(
    stack: Stack, catalogue: Catalogue, app_pools: None, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await get_pool()
    admin_url = stack.admin_conninfo()
    async with (
        await psycopg.AsyncConnection.connect(admin_url) as locker,
        await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as admin,
    ):
        await locker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        with caplog.at_level(logging.INFO, logger="recsys"):
            request = asyncio.create_task(
                service.similar_items(pool, catalogue.ids[0], SimilarQuery(k=5), timeout_ms=10_000)
            )
            # The request waits for the lock; then its server connection dies under it.
            waiting: list[int] = []
            for _ in range(200):
                cursor = await admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                    ["%recsys_query%"],
                )
                waiting = [row[0] for row in await cursor.fetchall()]
                if waiting:
                    break
                await asyncio.sleep(0.02)
            assert len(waiting) == 1
            await admin.execute("SELECT pg_terminate_backend(%s)", [waiting[0]])
            await locker.rollback()
            body = await request
    assert [r["id"] for r in body["results"]] == [
        r["id"] for r in (await service.similar_items(pool, catalogue.ids[0], SimilarQuery(k=5), timeout_ms=10_000))[
            "results"]
    ]
    assert any("retrying a read" in record.getMessage() for record in caplog.records)
