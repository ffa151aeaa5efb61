"""pgvector's types on a connection, looked up in the catalogue once per process and database.

``pgvector.psycopg.register_vector_async`` asks the catalogue for four types (``vector``,
``bit``, ``halfvec``, ``sparsevec``) on every connection it is given: four round trips, each a
transaction that takes one of PgBouncer's few server connections. When hundreds of Functions
instances open their pools at once, those queries queue behind each other with the real work.
The types' OIDs do not change while the extension is installed, so they are fetched with the
first connection to a database, kept, and registered on every later connection from memory.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import psycopg
from pgvector.psycopg.bit import register_bit_info
from pgvector.psycopg.halfvec import register_halfvec_info
from pgvector.psycopg.sparsevec import register_sparsevec_info
from pgvector.psycopg.vector import register_vector_info
from psycopg.types import TypeInfo

__all__ = ["VectorTypes", "cached_vector_types", "fetch_vector_types", "forget_vector_types", "register_vector_types"]

#: Where a connection points: host, port and database as libpq reports them once connected.
DatabaseKey = tuple[str, int, str]


@dataclass(frozen=True)
class VectorTypes:
    """The catalogue entries of pgvector's types in one database."""

    vector: TypeInfo
    bit: TypeInfo | None
    halfvec: TypeInfo | None
    sparsevec: TypeInfo | None


_known: dict[DatabaseKey, VectorTypes] = {}
_known_lock = threading.Lock()
#: One lookup at a time per event loop: a burst of new connections waits for the first one's.
_lookup_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def _key(conn: psycopg.AsyncConnection[Any]) -> DatabaseKey:
    info = conn.info
    return (info.host, info.port, info.dbname)


async def fetch_vector_types(conn: psycopg.AsyncConnection[Any]) -> VectorTypes:
    """Look pgvector's types up in the catalogue (four queries on ``conn``).

    Raises ``psycopg.ProgrammingError`` when the ``vector`` extension is not installed.
    """
    vector = await TypeInfo.fetch(conn, "vector")
    if vector is None:
        raise psycopg.ProgrammingError("vector type not found in the database")
    return VectorTypes(
        vector=vector,
        bit=await TypeInfo.fetch(conn, "bit"),
        halfvec=await TypeInfo.fetch(conn, "halfvec"),
        sparsevec=await TypeInfo.fetch(conn, "sparsevec"),
    )


async def cached_vector_types(conn: psycopg.AsyncConnection[Any]) -> VectorTypes:
    """pgvector's types of the database ``conn`` is connected to: from memory after the first call."""
    key = _key(conn)
    known = _known.get(key)
    if known is not None:
        return known
    lock = _lookup_locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())
    async with lock:
        known = _known.get(key)
        if known is None:
            known = await fetch_vector_types(conn)
            with _known_lock:
                _known[key] = known
    return known


def register_vector_types(conn: psycopg.BaseConnection[Any], types: VectorTypes) -> None:
    """Register pgvector's dumpers and loaders on ``conn`` (no I/O)."""
    register_vector_info(conn, types.vector)
    if types.bit is not None:
        register_bit_info(conn, types.bit)
    if types.halfvec is not None:
        register_halfvec_info(conn, types.halfvec)
    if types.sparsevec is not None:
        register_sparsevec_info(conn, types.sparsevec)


def forget_vector_types() -> None:
    """Drop what is known, so that the next connection looks the types up again.

    Only needed after the extension was dropped and created again (its OIDs change).
    """
    with _known_lock:
        _known.clear()
