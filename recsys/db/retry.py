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
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout, TooManyRequests

from recsys.config import Settings
from recsys.db.pool import check_timeout, is_unproven

__all__ = ["Database", "NoAnswer", "backoff_delay", "checked_connection", "is_transient", "run_read", "within"]

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


class NoAnswer(psycopg.OperationalError):
    """The database did not answer within the request's time limit (nor cancelled the statement)."""


async def within(awaitable: Awaitable[T], seconds: float | None) -> T:
    """``await awaitable``, but raise ``TimeoutError`` after ``seconds`` without waiting longer.

    While PostgreSQL is down, PgBouncer holds a query (the pool's check on checkout, or the
    request itself) for its ``query_wait_timeout`` (30 s locally, 120 s by default on Azure)
    waiting for a server connection. Cancelling a psycopg operation makes psycopg ask the
    server to cancel and wait up to 5 s for it; a query PgBouncer is holding is never
    cancelled, and a second cancellation makes psycopg close the connection at once, which is
    what we want: the request ends on time and the connection is discarded.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
        if done:
            return task.result()
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.05)
    except asyncio.CancelledError:
        # The caller itself is cancelled (an outer time limit): asyncio.wait leaves the operation
        # running, unobserved, and its later failure would be logged as "Task exception was
        # never retrieved". Cancel it too and collect its outcome whenever it ends.
        task.cancel()
        task.add_done_callback(_collect)
        raise
    if not task.cancelled() and task.exception() is None:
        return task.result()  # it finished just as it was being cancelled
    raise TimeoutError


@contextlib.asynccontextmanager
async def checked_connection(
    pool: AsyncConnectionPool, settings: Settings
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection of ``pool``, checked with an empty query within the bound of the pool's own
    check (:func:`recsys.db.pool.check_timeout`: the connect timeout, within the pool timeout).

    For work whose statements may rightly run long (the loader's COPY), where no time limit of
    its own can tell a slow statement from one PgBouncer is holding: PgBouncer accepts a login
    while PostgreSQL behind it is down, and holds a statement for its ``query_wait_timeout``
    (30 s locally, 120 s by default on Azure) instead of failing it. The pool's own check passes
    over a connection new or returned within the last second (``recsys.db.pool``), and one
    returned after an error PgBouncer answered for PostgreSQL is such a connection. Past that
    bound this raises :class:`NoAnswer` (a transient fault), the connection closed.
    """
    seconds = check_timeout(settings)
    async with pool.connection() as conn:
        try:
            await within(AsyncConnectionPool.check_connection(conn), seconds)
        except TimeoutError:
            raise NoAnswer(f"the database did not answer a connection's check within {seconds:.2f} sec") from None
        yield conn


def _collect(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def _attempt(
    pool: AsyncConnectionPool,
    operation: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]],
    deadline: float,
    limit: float | None,
) -> T:
    remaining = max(deadline - time.monotonic(), 0.001)
    try:
        conn = await within(pool.getconn(timeout=remaining), remaining)
    except TimeoutError:
        raise PoolTimeout(f"no working connection within {remaining:.2f} sec") from None
    if is_unproven(conn):
        # A new connection is not checked before its first use, so its first statement is the
        # check: bounded like a connection wait, by what is left of the budget (PgBouncer would
        # hold it for its query_wait_timeout while PostgreSQL is down).
        left = max(deadline - time.monotonic(), 0.001)
        limit = left if limit is None else min(limit, left)
    try:
        return await within(operation(conn), limit)
    except TimeoutError:
        raise NoAnswer(f"the database did not answer within {limit:.2f} sec") from None
    finally:
        await pool.putconn(conn)


async def run_read(
    db: Database,
    operation: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]],
    *,
    budget: float | None = None,
    limit: float | None = None,
) -> T:
    """Run ``operation`` on a connection of ``db`` and return its result.

    With a pool, a transient ``OperationalError`` (see :func:`is_transient`) is retried on
    another connection after a backoff, as long as the next attempt can start before
    ``budget`` seconds (default: the pool's timeout) have passed since the call; each wait
    for a connection is limited to what is left of the budget, and each run of ``operation``
    to ``limit`` seconds (:class:`NoAnswer` past it). The last error is raised when the budget
    is spent; no working connection in time raises :class:`psycopg_pool.PoolTimeout`.

    With a connection, ``operation`` runs once on it (within ``limit``).
    """
    if isinstance(db, psycopg.AsyncConnection):
        try:
            return await within(operation(db), limit)
        except TimeoutError:
            raise NoAnswer(f"the database did not answer within {limit:.2f} sec") from None
    deadline = time.monotonic() + (db.timeout if budget is None else budget)
    attempt = 0
    while True:
        attempt += 1
        try:
            return await _attempt(db, operation, deadline, limit)
        except Exception as exc:
            if not is_transient(exc):
                raise
            delay = backoff_delay(attempt)
            if time.monotonic() + delay >= deadline:
                raise
            log.info("retrying a read after %s (attempt %d, in %.3f s)", type(exc).__name__, attempt, delay)
            await asyncio.sleep(delay)
