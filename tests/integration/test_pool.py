"""The module-level pool: lazy, per event loop, configured for PgBouncer's transaction mode."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from recsys.config import Settings
from recsys.db.pool import close_pools, connection_kwargs, get_pool, pool_stats

pytestmark = pytest.mark.integration


def test_connection_arguments_suit_transaction_pooling(settings: Settings) -> None:
    kwargs = connection_kwargs(settings)
    assert kwargs["prepare_threshold"] is None
    assert kwargs["autocommit"] is True
    assert kwargs["connect_timeout"] == settings.connect_timeout


async def test_one_pool_per_purpose_reused_and_configured(settings: Settings, app_pools: None) -> None:
    pool = await get_pool("query")
    assert await get_pool("query") is pool
    assert pool.max_size == settings.pool_max_size and pool.timeout == settings.pool_timeout
    async with pool.connection() as conn:
        # pgvector is registered on every pooled connection.
        row = await (await conn.execute("SELECT '[1,2,3]'::vector")).fetchone()
        assert row is not None and row[0].to_list() == [1.0, 2.0, 3.0]
        assert conn.autocommit
    assert "query" in pool_stats()


def test_each_event_loop_keeps_its_own_pool(stack_env: dict[str, str]) -> None:
    seen: dict[int, list[int]] = {}
    barrier = threading.Barrier(2)

    async def work(index: int) -> None:
        ids = []
        for _ in range(5):
            pool = await get_pool("loader")
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
            ids.append(id(pool))
            await asyncio.to_thread(barrier.wait, 10)  # interleave the two loops
        assert not pool.closed
        seen[index] = ids
        await close_pools()

    threads = [threading.Thread(target=asyncio.run, args=(work(i),)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(set(seen[0])) == 1 and len(set(seen[1])) == 1  # stable within a loop
    assert seen[0][0] != seen[1][0]  # not shared, not replaced, across loops


async def test_connections_are_checked_on_checkout_unless_just_returned(
    settings: Settings, app_pools: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from psycopg_pool import AsyncConnectionPool

    checked: list[int] = []
    original = AsyncConnectionPool.check_connection

    async def counting(conn: object) -> None:
        checked.append(1)
        await original(conn)  # type: ignore[arg-type]

    monkeypatch.setattr(AsyncConnectionPool, "check_connection", staticmethod(counting))
    # One connection, so that every checkout hands out the same one.
    pool = await get_pool("query", dataclasses.replace(settings, pool_min_size=1, pool_max_size=1))
    async with pool.connection() as conn:
        await conn.execute("SELECT 1")
    first = len(checked)
    async with pool.connection() as conn:  # returned a moment ago: handed out unchecked
        await conn.execute("SELECT 1")
    assert len(checked) == first
    await asyncio.sleep(1.2)  # idle for longer than CHECK_AFTER_IDLE: checked again
    async with pool.connection() as conn:
        await conn.execute("SELECT 1")
    assert len(checked) == first + 1
