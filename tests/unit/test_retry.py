"""Backoff, the transient-error rule and the hard time bound of ``recsys.db.retry``."""

from __future__ import annotations

import asyncio
import random

import psycopg
import pytest
from psycopg import errors as pg_errors
from psycopg_pool import PoolTimeout

from recsys.db.retry import BASE_DELAY, MAX_DELAY, backoff_delay, is_transient, within


def test_backoff_grows_exponentially_with_full_jitter_and_a_cap() -> None:
    rng = random.Random(1)
    for attempt in range(1, 12):
        ceiling = min(MAX_DELAY, BASE_DELAY * 2 ** (attempt - 1))
        delays = [backoff_delay(attempt, rng=rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8 and min(delays) < ceiling * 0.2


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (psycopg.OperationalError("server closed the connection unexpectedly"), True),
        (pg_errors.AdminShutdown("terminating connection due to administrator command"), True),
        (pg_errors.QueryCanceled("canceling statement due to statement timeout"), False),
        (PoolTimeout("couldn't get a connection"), False),
        (pg_errors.UndefinedTable("no such table"), False),
        (pg_errors.DataError("bad value"), False),
        (ValueError("not a database error"), False),
    ],
)
def test_only_connection_faults_are_transient(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


async def test_within_returns_what_finishes_in_time() -> None:
    async def quick() -> str:
        await asyncio.sleep(0)
        return "done"

    assert await within(quick(), 1.0) == "done"


async def test_within_ends_work_that_resists_the_first_cancellation() -> None:
    # Like psycopg, which answers a cancellation by waiting up to 5 s for the server.
    stages: list[str] = []

    async def stubborn() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stages.append("first")
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                stages.append("second")
                raise

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await within(stubborn(), 0.05)
    assert stages == ["first", "second"]
    assert loop.time() - started < 4  # not the 5 s the first cancellation would wait


async def test_cancelling_the_caller_of_within_cancels_the_operation_and_collects_it() -> None:
    # An outer time limit around within(): the operation must not live on unobserved (its
    # failure would surface as "Task exception was never retrieved").
    ended: list[str] = []

    async def slow_then_failing() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await within(slow_then_failing(), 30)
    await asyncio.sleep(0.01)
    assert ended == ["cancelled"]
