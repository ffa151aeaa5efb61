"""The module-level connection pool: one per worker process (and event loop), created lazily.

Azure Functions runs many short-lived instances, each with a few worker processes; every
one of them keeps a *small* pool to PgBouncer, which multiplexes them onto a handful of
PostgreSQL server connections (transaction mode). Nothing here runs at import time.

Connections are in autocommit mode: a query path sends one statement (one round trip)
that is its own transaction, and writers open an explicit ``conn.transaction()``.
PgBouncer in transaction mode cannot keep protocol-level prepared statements, hence
``prepare_threshold=None``.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import Any

import psycopg
from pgvector.psycopg import register_vector_async
from psycopg_pool import AsyncConnectionPool

from recsys.config import Settings, get_settings

__all__ = ["close_pools", "configure_connection", "connection_kwargs", "get_pool", "pool_stats"]

log = logging.getLogger("recsys")

#: Pools by event loop, then by purpose ("query", "loader"). A pool belongs to the loop that
#: opened it; a worker has one loop, but the local host and tests may run several at once.
_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, AsyncConnectionPool]] = (
    weakref.WeakKeyDictionary()
)

#: Builds the connection arguments of each new connection (a fresh token in Entra mode).
KwargsFactory = Callable[[], dict[str, Any]]


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
    """Register pgvector's types (``vector``, ``halfvec``, ``sparsevec``) on a new connection."""
    await register_vector_async(conn)


def _kwargs_factory(settings: Settings, purpose: str) -> KwargsFactory | dict[str, Any]:
    base = connection_kwargs(settings)
    if settings.db_auth != "entra":
        return base
    from recsys.db.credentials import entra_password_provider

    password = entra_password_provider(settings)

    def build() -> dict[str, Any]:
        return {**base, "password": password()}

    return build


def _new_pool(settings: Settings, purpose: str) -> AsyncConnectionPool:
    return AsyncConnectionPool(
        settings.database_url,
        kwargs=_kwargs_factory(settings, purpose),  # type: ignore[arg-type]
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        timeout=settings.pool_timeout,
        max_lifetime=settings.pool_max_lifetime,
        max_idle=300.0,
        reconnect_timeout=settings.pool_timeout * 6,
        configure=configure_connection,
        check=AsyncConnectionPool.check_connection,
        name=f"recsys-{purpose}",
        open=False,
    )


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


def pool_stats() -> dict[str, dict[str, int]]:
    """``get_stats()`` of each open pool of the running loop, by purpose."""
    pools = _pools.get(asyncio.get_running_loop(), {})
    return {purpose: pool.get_stats() for purpose, pool in pools.items() if not pool.closed}
