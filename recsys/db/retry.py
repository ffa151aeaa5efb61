"""Retry of read-only database work on transient connection faults.

A pooled connection can break between requests (PgBouncer restarted, PostgreSQL failed over,
an idle connection dropped by the network): the next read fails with ``OperationalError``
although a fresh connection would succeed. Reads are safe to repeat, so they are retried on a
new connection, with exponential backoff and full jitter (many Functions instances failing at
once must not come back in step), within one deadline: the whole request, connection waits
included, stays within the pool timeout, after which the caller answers 503.

Not retried: a statement timeout (``QueryCanceled``, the query itself is too slow), an
exhausted pool (``PoolTimeout``: it has already waited its time), and every error that is not
an ``OperationalError`` (bad data, missing rows: repeating would give the same answer).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout, TooManyRequests

__all__ = ["Database", "backoff_delay", "is_transient", "run_read"]

log = logging.getLogger("recsys")

T = TypeVar("T")

#: What the query functions accept: the pool (retried) or one connection (used as is).
Database = AsyncConnectionPool | psycopg.AsyncConnection[Any]

#: First retry delay (upper bound of the jitter), its growth factor and its cap, in seconds.
BASE_DELAY = 0.05
FACTOR = 2.0
MAX_DELAY = 1.0


def is_transient(exc: BaseException) -> bool:
    """Whether a failed read may succeed if repeated on another connection."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    return not isinstance(exc, pg_errors.QueryCanceled | PoolTimeout | TooManyRequests | PoolClosed)


def backoff_delay(attempt: int, *, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1, 2, ...): full jitter, capped."""
    ceiling = min(MAX_DELAY, BASE_DELAY * FACTOR ** (attempt - 1))
    return (rng or random).uniform(0.0, ceiling)


async def run_read(
    db: Database,
    operation: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]],
    *,
    budget: float | None = None,
) -> T:
    """Run ``operation`` on a connection of ``db`` and return its result.

    With a pool, a transient ``OperationalError`` (see :func:`is_transient`) is retried on
    another connection after a backoff, as long as the next attempt can start before
    ``budget`` seconds (default: the pool's timeout) have passed since the call; each wait
    for a connection is limited to what is left of the budget. The last error is raised when
    the budget is spent; an exhausted pool raises :class:`psycopg_pool.PoolTimeout`.

    With a connection, ``operation`` runs once on it.
    """
    if isinstance(db, psycopg.AsyncConnection):
        return await operation(db)
    deadline = time.monotonic() + (db.timeout if budget is None else budget)
    attempt = 0
    while True:
        attempt += 1
        remaining = deadline - time.monotonic()
        try:
            async with db.connection(timeout=max(remaining, 0.001)) as conn:
                return await operation(conn)
        except Exception as exc:
            if not is_transient(exc):
                raise
            delay = backoff_delay(attempt)
            if time.monotonic() + delay >= deadline:
                raise
            log.info("retrying a read after %s (attempt %d, in %.3f s)", type(exc).__name__, attempt, delay)
            await asyncio.sleep(delay)
