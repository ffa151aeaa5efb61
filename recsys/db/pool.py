"""The module-level connection pool: one per worker process (and event loop), created lazily.

Azure Functions runs many short-lived instances, each with a few worker processes; every
one of them keeps a *small* pool to PgBouncer, which multiplexes them onto a handful of
PostgreSQL server connections (transaction mode). Nothing here runs at import time.

Connections are in autocommit mode: a query path sends one statement (one round trip)
that is its own transaction, and writers open an explicit ``conn.transaction()``.
PgBouncer in transaction mode cannot keep protocol-level prepared statements, hence
``prepare_threshold=None``.

A new connection is cheap on purpose, since a scale-out storm opens hundreds at once: its only
round trips are the login (PgBouncer verifies it from SCRAM secrets, without PBKDF2), pgvector's
types come from a per-process cache (``recsys.db.vector_types``), and it is not checked before
its first use. Connection attempts that fail are retried with exponential backoff and full
jitter, so instances that failed together do not come back together.

Each purpose connects as its own role: ``query`` with ``RECSYS_DATABASE_URL`` (``recsys_query``,
read-only), ``loader`` with ``RECSYS_LOADER_DATABASE_URL`` (``recsys_loader``). ``ingest`` is a
second, small pool of the loader role for the HTTP ingest endpoints' ledger writes and reads:
the loader holds its own connections for whole COPY transactions, and an enqueue must never
wait behind them. In Entra mode the password is a token of the purpose's managed identity
(``recsys.db.credentials``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool
from psycopg_pool.base import AttemptWithBackoff

from recsys.config import Settings, get_settings
from recsys.db.vector_types import cached_vector_types, register_vector_types

__all__ = [
    "INGEST_POOL_MAX_SIZE",
    "ReconnectBackoff",
    "RecsysPool",
    "all_pool_stats",
    "check_timeout",
    "close_pools",
    "configure_connection",
    "connection_kwargs",
    "get_pool",
    "is_unproven",
    "pool_stats",
]

log = logging.getLogger("recsys")

#: Pools by event loop, then by purpose ("query", "loader"). A pool belongs to the loop that
#: opened it; a worker has one loop, but the local host and tests may run several at once.
_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, AsyncConnectionPool]] = (
    weakref.WeakKeyDictionary()
)

#: Connections of the ``ingest`` pool: its statements are single-row ledger writes of a few
#: milliseconds, so two serve many concurrent enqueues.
INGEST_POOL_MAX_SIZE = 2

#: Seconds a connection opened or returned to the pool may be handed out without a check. The
#: check catches a connection whose server side is gone (PostgreSQL down behind PgBouncer holds a
#: query for its query_wait_timeout) within the pool timeout; a connection used within the last
#: second needs no such proof.
CHECK_AFTER_IDLE = 1.0
#: When each pooled connection was opened or last returned (time.monotonic()).
_idle_since: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = weakref.WeakKeyDictionary()

#: Connections that have not yet completed a statement: opened, but never returned to the pool.
_unproven: weakref.WeakSet[psycopg.AsyncConnection[Any]] = weakref.WeakSet()

#: Reconnection backoff: the first retry within RECONNECT_BASE_DELAY seconds, the bound doubling
#: after each failure up to RECONNECT_MAX_DELAY; each delay is drawn uniformly below the bound.
RECONNECT_BASE_DELAY = 1.0
RECONNECT_MAX_DELAY = 8.0

#: Builds the connection arguments of each new connection (with a fresh token in Entra mode).
KwargsFactory = Callable[[], Awaitable[dict[str, Any]]]
#: Bounds the lifetime of a new connection of a pool (by its token's expiry in Entra mode).
LifetimeHook = Callable[[AsyncConnectionPool, psycopg.AsyncConnection[Any]], None]


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    """libpq/psycopg arguments of every pooled connection, except the password source."""
    kwargs: dict[str, Any] = {
        "autocommit": True,
        "prepare_threshold": None,
        "connect_timeout": settings.connect_timeout,
        "application_name": "recsys",
    }
    if settings.sslmode:
        kwargs["sslmode"] = settings.sslmode
    if settings.sslrootcert:
        kwargs["sslrootcert"] = settings.sslrootcert
    return kwargs


async def configure_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    """Register pgvector's types (``vector``, ``halfvec``, ``sparsevec``, ``bit``) on a new connection.

    The types are looked up in the catalogue with the process's first connection to a database;
    later connections get them from memory, without a round trip.
    """
    register_vector_types(conn, await cached_vector_types(conn))


class ReconnectBackoff(AttemptWithBackoff):
    """psycopg_pool's reconnection schedule with full jitter instead of ±10 %.

    psycopg_pool retries a failed connection attempt after 1 s (±10 %), then 2 s, 4 s, ...: pools
    that failed together (every instance of a scale-out when PgBouncer or PostgreSQL refuses
    them) retry nearly together and fail together again. Each delay here is drawn uniformly
    between zero and a bound that doubles after each failure (``RECONNECT_BASE_DELAY`` up to
    ``RECONNECT_MAX_DELAY``), which spreads the retries over the whole interval. The attempt
    still gives up after the pool's ``reconnect_timeout``.
    """

    def __init__(self, *, timeout: float, rng: random.Random | None = None) -> None:
        super().__init__(timeout=timeout)
        self._bound = 0.0
        self._rng = rng or random

    def update_delay(self, now: float) -> None:
        if self._bound == 0.0:
            self.give_up_at = now + self.timeout
            self._bound = RECONNECT_BASE_DELAY
        else:
            self._bound = min(RECONNECT_MAX_DELAY, self._bound * self.DELAY_BACKOFF)
        self.delay = min(self._rng.uniform(0.0, self._bound), max(0.0, self.give_up_at - now))


class RecsysPool(AsyncConnectionPool):
    """``AsyncConnectionPool`` whose failed connection attempts back off with full jitter."""

    async def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        # psycopg_pool creates its own schedule for a first attempt; give it ours instead.
        if attempt is None:
            attempt = ReconnectBackoff(timeout=self.reconnect_timeout)
        await super()._add_connection(attempt, growing=growing)


def _entra_hooks(settings: Settings, purpose: str) -> tuple[KwargsFactory, LifetimeHook]:
    """Connection arguments with a fresh token, and the hook that bounds a connection's life.

    The token comes from a thread (azure-identity is synchronous) and the wait is bounded by
    the connect timeout: a token endpoint that hangs or fails makes the connection attempt
    fail, the pool retries in the background and waiting requests get ``PoolTimeout`` (503).
    """
    from recsys.db.credentials import TokenUnavailable, entra_password_provider

    base = connection_kwargs(settings)
    provider = entra_password_provider(settings, purpose=purpose)
    timeout = float(settings.connect_timeout)

    async def build() -> dict[str, Any]:
        try:
            password = await asyncio.wait_for(asyncio.to_thread(provider), timeout)
        except TimeoutError:
            log.warning("entra token request for the %s pool did not finish within %g s", purpose, timeout)
            raise TokenUnavailable("the entra token request timed out") from None
        return {**base, "password": password}

    def bound_lifetime(pool: AsyncConnectionPool, conn: psycopg.AsyncConnection[Any]) -> None:
        # psycopg_pool stamps each new connection's expiry from ``max_lifetime`` right after the
        # configure callback returns; bounding it here gives this connection a lifetime that ends
        # before its token's (PostgreSQL checks the token only at login, but a pool that never
        # outlives its credentials keeps working if the identity loses its rights).
        deadline = provider.deadline_for(conn.info.password)
        lifetime = settings.pool_max_lifetime if deadline is None else deadline - time.time()
        pool.max_lifetime = max(1.0, min(settings.pool_max_lifetime, lifetime))

    return build, bound_lifetime


def _new_pool(settings: Settings, purpose: str) -> AsyncConnectionPool:
    kwargs: dict[str, Any] | KwargsFactory = connection_kwargs(settings)
    bound_lifetime: LifetimeHook | None = None
    if settings.db_auth == "entra":
        kwargs, bound_lifetime = _entra_hooks(settings, purpose)

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await configure_connection(conn)
        _idle_since[conn] = time.monotonic()
        _unproven.add(conn)
        if bound_lifetime is not None:
            bound_lifetime(pool, conn)  # last, with no await after it: see _entra_hooks

    checked_within = check_timeout(settings)

    async def check(conn: psycopg.AsyncConnection[Any]) -> None:
        idle_since = _idle_since.get(conn)
        if idle_since is not None and time.monotonic() - idle_since < CHECK_AFTER_IDLE:
            # Just opened, or just used successfully: checking it would add a round trip to every
            # new connection of a scale-out and double those of a busy worker; a connection lost
            # since is caught by the read retry (recsys.db.retry).
            return
        # While PostgreSQL is unreachable, PgBouncer keeps a client's query waiting (up to its
        # query_wait_timeout) instead of failing it; bounded, a failed check discards the
        # connection and the request ends within the pool timeout (503) instead of hanging.
        async with asyncio.timeout(checked_within):
            await AsyncConnectionPool.check_connection(conn)

    async def reset(conn: psycopg.AsyncConnection[Any]) -> None:
        _idle_since[conn] = time.monotonic()
        _unproven.discard(conn)

    pool = RecsysPool(
        settings.url_for(purpose),
        kwargs=kwargs,  # type: ignore[arg-type]
        min_size=min(settings.pool_min_size, INGEST_POOL_MAX_SIZE) if purpose == "ingest" else settings.pool_min_size,
        max_size=INGEST_POOL_MAX_SIZE if purpose == "ingest" else settings.pool_max_size,
        timeout=settings.pool_timeout,
        max_lifetime=settings.pool_max_lifetime,
        max_idle=300.0,
        reconnect_timeout=settings.pool_timeout * 6,
        configure=configure,
        check=check,
        reset=reset,
        name=f"recsys-{purpose}",
        open=False,
    )
    return pool


def check_timeout(settings: Settings) -> float:
    """Seconds a connection's check may take: the connect timeout, within the pool timeout."""
    return min(settings.connect_timeout, settings.pool_timeout)


def is_unproven(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether ``conn`` is new from the pool and has not been used yet.

    Such a connection was not checked (see ``check`` in ``_new_pool``): PgBouncer accepts a login
    while PostgreSQL behind it is down, so its first statement is the first proof that the
    database answers, and the read retry bounds it as it would bound the check.
    """
    return conn in _unproven


async def get_pool(purpose: str = "query", settings: Settings | None = None) -> AsyncConnectionPool:
    """The pool of this process for ``purpose``, opened on first use.

    Opening does not wait for connections: a database that is down at start delays only the
    requests that need it, which then get :class:`psycopg_pool.PoolTimeout`.
    """
    pools = _pools.setdefault(asyncio.get_running_loop(), {})
    pool = pools.get(purpose)
    if pool is None or pool.closed:
        pool = pools[purpose] = _new_pool(settings or get_settings(), purpose)
        await pool.open(wait=False)
    return pool


async def close_pools() -> None:
    """Close the pools opened on the running loop (tests and the local host's shutdown)."""
    pools = _pools.pop(asyncio.get_running_loop(), {})
    for pool in pools.values():
        await pool.close()


def all_pool_stats() -> list[tuple[str, dict[str, int]]]:
    """``(purpose, get_stats())`` of every open pool of the process, whatever its event loop.

    For metrics, which are collected outside the loops. ``get_stats`` only reads counters.
    """
    return [
        (purpose, pool.get_stats())
        for pools in list(_pools.values())
        for purpose, pool in list(pools.items())
        if not pool.closed
    ]


def pool_stats() -> dict[str, dict[str, int]]:
    """``get_stats()`` of each open pool of the running loop, by purpose."""
    pools = _pools.get(asyncio.get_running_loop(), {})
    return {purpose: pool.get_stats() for purpose, pool in pools.items() if not pool.closed}
