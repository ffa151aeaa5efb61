"""A scale-out storm against the test stack: many pools opening at once through PgBouncer.

Counts what PgBouncer passes to PostgreSQL (SHOW STATS) to show that a new connection of the
app's pool costs its login and nothing else, and drives a burst of pools to show that none of
their requests fails and that the service is back to normal right after it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from typing import Any

import psycopg
import pytest
from bouncer_stats import pool_rows, settled_query_count

from recsys.config import Settings
from recsys.db.pool import RECONNECT_BASE_DELAY, RecsysPool, close_pools, connection_kwargs, get_pool
from recsys.db.vector_types import fetch_vector_types, forget_vector_types
from recsys.local.stack import Stack, free_port
from recsys.search.service import lookup_items

pytestmark = pytest.mark.integration

CONNECTIONS = 200


def generous(settings: Settings, **changes: Any) -> Settings:
    """Bounds for a crowd of connections on a shared 2-core machine, where the test process itself
    computes each login's PBKDF2 (about 8 ms of CPU): what is asserted is that nothing fails and
    what is counted, not how fast."""
    return dataclasses.replace(settings, connect_timeout=20, pool_timeout=30.0, **changes)


async def test_200_new_connections_at_once_run_no_catalogue_query_and_none_fails(
    stack: Stack, settings: Settings, app_pools: None
) -> None:
    # What one lookup of pgvector's types costs, counted the way the burst is counted below.
    before = await settled_query_count(stack)
    async with await psycopg.AsyncConnection.connect(settings.database_url, **connection_kwargs(settings)) as conn:
        await fetch_vector_types(conn)
    lookup = await settled_query_count(stack) - before
    assert lookup >= 4  # four types, each its own transaction

    # 200 pools of one connection each, all opened at once, as 200 instances scaling out would.
    # The process has not seen this database yet: the first connection looks the types up,
    # once; the 199 others get them from memory and send nothing at all.
    forget_vector_types()
    one = generous(settings, pool_min_size=1, pool_max_size=1)
    before = await settled_query_count(stack)
    pools = await asyncio.gather(*(get_pool(f"storm-open-{i}", one) for i in range(CONNECTIONS)))
    await asyncio.gather(*(pool.wait(timeout=60) for pool in pools))
    assert await settled_query_count(stack) - before == lookup
    stats = [pool.get_stats() for pool in pools]
    assert sum(s.get("connections_num", 0) for s in stats) == CONNECTIONS
    assert sum(s.get("connections_errors", 0) for s in stats) == 0
    assert sum(s.get("pool_available", 0) for s in stats) == CONNECTIONS
    clients = sum(int(str(r["cl_active"])) for r in pool_rows(stack, "recsys_query"))  # logged in, not waiting
    assert clients >= CONNECTIONS
    await close_pools()

    # 200 more pools that connect on their first request (min_size 0): each request is the
    # connection's first use, and it is the only statement sent, with no check before it.
    lazy = generous(settings, pool_min_size=0, pool_max_size=1)
    before = await settled_query_count(stack)
    pools = await asyncio.gather(*(get_pool(f"storm-first-use-{i}", lazy) for i in range(CONNECTIONS)))

    async def first_use(pool: Any) -> None:
        async with pool.connection() as conn:
            row = await (await conn.execute("SELECT '[1,2]'::vector")).fetchone()
            assert row is not None and row[0].to_list() == [1.0, 2.0]  # pgvector's loader is registered

    await asyncio.gather(*(first_use(pool) for pool in pools))
    assert await settled_query_count(stack) - before == CONNECTIONS
    assert sum(pool.get_stats().get("connections_errors", 0) for pool in pools) == 0


async def test_a_burst_of_100_pools_in_1_s_fails_nothing_and_recovers(
    stack: Stack, settings: Settings, app_pools: None
) -> None:
    """100 instances start within 1 s, each with the app's default pool, and serve requests.

    Bounds are generous (this is a fault test, not a benchmark): what matters is that no request
    fails and that nothing is left waiting once the burst is over.
    """
    instances, rate, duration, ramp = 100, 2.0, 3.0, 1.0
    settings = dataclasses.replace(settings, connect_timeout=10, pool_timeout=10.0)
    rng = random.Random(14)
    failures: list[str] = []
    issued = served = 0
    start = time.monotonic()

    async def instance(number: int, offset: float) -> Any:
        nonlocal issued, served
        await asyncio.sleep(offset)
        pool = await get_pool(f"storm-burst-{number}", settings)
        tasks = []
        end = start + ramp + duration
        while time.monotonic() < end:
            tasks.append(asyncio.create_task(lookup_items(pool, [f"burst-{number}"], timeout_ms=5000)))
            issued += 1
            await asyncio.sleep(1 / rate)
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, BaseException):
                failures.append(f"{type(outcome).__name__}: {outcome}")
            else:
                served += 1
        return pool

    pools = await asyncio.gather(*(instance(n, rng.uniform(0, ramp)) for n in range(instances)))
    assert failures == []
    assert served == issued >= instances * duration * rate / 2

    # Recovered: nobody waits in PgBouncer, and every instance answers at once again.
    assert all(int(str(r["cl_waiting"])) == 0 for r in pool_rows(stack, "recsys_query"))
    started = time.monotonic()
    answers = await asyncio.gather(*(lookup_items(pool, ["after"], timeout_ms=5000) for pool in pools))
    assert all(answer["missing"] == ["after"] for answer in answers)
    assert time.monotonic() - started < 5.0
    errors = sum(pool.get_stats().get("connections_errors", 0) for pool in pools)
    assert errors == 0


async def test_failed_connection_attempts_retry_spread_out_not_in_step() -> None:
    """Pools that fail together retry at moments drawn over the whole backoff interval.

    psycopg_pool's own schedule retries after 1 s ± 10 %: 20 pools refused at the same moment
    would come back within 0.2 s of each other. Nothing listens on the port here.
    """
    url = f"postgresql://nobody@127.0.0.1:{free_port()}/nothing"
    attempts: dict[int, list[float]] = {n: [] for n in range(20)}

    def recorder(number: int) -> Any:
        def kwargs() -> dict[str, Any]:
            attempts[number].append(time.monotonic())
            return {"connect_timeout": 2}
        return kwargs

    pools = [RecsysPool(url, kwargs=recorder(n), min_size=1, max_size=1, reconnect_timeout=30, open=False)
             for n in range(20)]
    for pool in pools:
        await pool.open(wait=False)
    await asyncio.sleep(RECONNECT_BASE_DELAY + 0.5)
    for pool in pools:
        await pool.close(timeout=1)
    gaps = [times[1] - times[0] for times in attempts.values() if len(times) >= 2]
    assert len(gaps) == 20  # every pool retried within the first bound
    assert all(gap <= RECONNECT_BASE_DELAY + 0.2 for gap in gaps)
    assert max(gaps) - min(gaps) > 0.4


async def test_the_app_pool_is_the_backing_off_pool(settings: Settings, app_pools: None) -> None:
    assert isinstance(await get_pool("query"), RecsysPool)
    await close_pools()
