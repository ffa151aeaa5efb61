"""The loader: one queue message -> one transaction that binary-COPYs its items and upserts them.

Per message, in ONE transaction (so a failure at any point leaves nothing behind):

1. the part's row in the batch ledger is inserted or locked (``ledger.claim_part``); if it is
   already ``loaded`` the message is a redelivery and nothing else happens;
2. the rows are binary-COPYed into a temporary staging table created ``ON COMMIT DROP``: the
   table lives exactly as long as the transaction, which is what PgBouncer in transaction mode
   allows (a session-lived temp table could be seen by, or lost to, another client);
3. they are upserted into ``items`` (``ON CONFLICT (id) DO UPDATE``), in id order so that two
   batches touching the same ids lock them in the same order instead of deadlocking;
4. the part is marked ``loaded`` with its row count.

The statement timeout is the loader's own (``RECSYS_LOADER_STATEMENT_TIMEOUT_MS``), applied
with ``set_config(..., true)``, i.e. ``SET LOCAL``: it ends with the transaction and never
reaches another client of the same PgBouncer server connection.

Faults are sorted as the queue needs them: a message that can never load (bad JSON, bad item,
missing blob, rows the database refuses) is recorded ``failed`` with the reason and moved to the
poison queue by :func:`process_message` itself, which then returns normally so the host deletes
the original without spending retries; anything else (database or PgBouncer unreachable, pool
exhausted, statement timeout, storage errors) propagates, and the host delivers the message again.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from recsys.config import Settings, get_settings
from recsys.errors import InvalidArgument
from recsys.ingest import ledger, storage
from recsys.ingest.messages import Item, Message, decode_json, message_from_document, message_key, parse_items

__all__ = ["Outcome", "copy_items", "load_part", "process_message", "vector_type"]

log = logging.getLogger("recsys")

Conn = psycopg.AsyncConnection[Any]
#: (id, embedding, category, tags, metadata) in the staging table's column order.
Row = tuple[str, Any, str | None, list[str], Jsonb]

_STAGING = sql.SQL(
    "CREATE TEMP TABLE ingest_staging ("
    " id text NOT NULL, embedding {type}({dim}) NOT NULL, category text,"
    " tags text[] NOT NULL, metadata jsonb NOT NULL"
    ") ON COMMIT DROP"
)
_COPY = "COPY ingest_staging (id, embedding, category, tags, metadata) FROM STDIN (FORMAT BINARY)"
_UPSERT = """
INSERT INTO items AS i (id, embedding, category, tags, metadata, updated_at)
SELECT id, embedding, category, tags, metadata, now() FROM ingest_staging ORDER BY id
ON CONFLICT (id) DO UPDATE
   SET embedding = EXCLUDED.embedding, category = EXCLUDED.category, tags = EXCLUDED.tags,
       metadata = EXCLUDED.metadata, updated_at = EXCLUDED.updated_at
"""

#: Database errors caused by the rows themselves: retrying the message cannot help.
_REFUSED = (pg_errors.DataError, pg_errors.IntegrityError)


def vector_type(dim: int) -> str:
    """The items column type for ``dim``, as ``sql/002_items.sql`` chooses it."""
    return "halfvec" if dim > 2000 else "vector"


def item_rows(items: Iterable[Item]) -> Iterable[Row]:
    for item in items:
        yield (item.id, item.embedding, item.category, item.tags, Jsonb(item.metadata))


async def copy_items(conn: Conn, rows: Iterable[Row], *, dim: int) -> int:
    """Stage ``rows`` with binary COPY and upsert them into ``items``; return the rows written.

    Must run inside the caller's transaction (the staging table drops at its commit).
    """
    kind = vector_type(dim)
    await conn.execute(_STAGING.format(type=sql.SQL(kind), dim=sql.Literal(dim)))
    async with conn.cursor() as cur:
        try:
            async with cur.copy(_COPY) as copy:
                copy.set_types(["text", kind, "text", "text[]", "jsonb"])
                for row in rows:
                    await copy.write_row(row)
        except Exception as exc:
            # A backend that dies mid-COPY can surface from psycopg's copy writer as an error
            # other than OperationalError; a lost connection is a transient fault all the same.
            if conn.broken or conn.closed:
                raise psycopg.OperationalError(f"connection lost during COPY: {exc}") from exc
            raise
        await cur.execute(_UPSERT)
        return max(cur.rowcount, 0)


@dataclass(frozen=True)
class Outcome:
    """What became of one message: ``loaded``, ``skipped`` (already loaded) or ``failed`` (poisoned)."""

    status: str
    batch_id: str | None
    part: int
    rows: int = 0
    error: str | None = None


async def load_part(
    conn: Conn, batch_id: str, part: int, items: Sequence[Item], *, dim: int, statement_timeout_ms: int
) -> Outcome:
    """Load one part in one transaction (see the module docstring); idempotent per (batch, part)."""
    async with conn.transaction():
        await conn.execute("SELECT set_config('statement_timeout', %s, true)", [str(statement_timeout_ms)])
        if await ledger.claim_part(conn, batch_id, part) == "loaded":
            return Outcome("skipped", batch_id, part)
        rows = await copy_items(conn, item_rows(items), dim=dim)
        await ledger.mark_loaded(conn, batch_id, part, rows)
    return Outcome("loaded", batch_id, part, rows=rows)


#: Loads running at once per event loop, bounded by the loader pool's size so that a burst of
#: messages waits its turn here rather than timing out on the pool (which must mean that the
#: database is unreachable, a transient fault).
_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def _slot(size: int) -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    semaphore = _slots.get(loop)
    if semaphore is None:
        semaphore = _slots[loop] = asyncio.Semaphore(size)
    return semaphore


def _parse_part(data: bytes, dim: int, what: str) -> list[Item]:
    doc = decode_json(data, what=what, field="blob")
    if not isinstance(doc, dict) or "items" not in doc:
        raise InvalidArgument(f"{what} must be a JSON object with items", field="blob")
    return parse_items(doc["items"], dim)


async def _items_of(message: Message, settings: Settings, pool: AsyncConnectionPool) -> list[Item] | None:
    """The message's validated items; ``None`` when its blob is gone because it already loaded."""
    if message.blob is None:
        assert message.items is not None
        return await asyncio.to_thread(parse_items, message.items, settings.embedding_dim)
    data = await storage.download_blob(settings, message.blob)
    if data is None:
        # The loader deletes a part's blob once it has loaded: a late redelivery finds it gone.
        async with pool.connection() as conn:
            if await ledger.part_status(conn, message.batch_id, message.part) == "loaded":
                return None
        raise InvalidArgument(f"blob {message.blob} not found", field="blob")
    return await asyncio.to_thread(_parse_part, data, settings.embedding_dim, f"blob {message.blob}")


async def _reject(
    body: bytes, key: tuple[str, int] | None, reason: str, settings: Settings, pool: AsyncConnectionPool
) -> Outcome:
    batch_id, part = key if key is not None else (None, 0)
    if batch_id is not None:
        async with pool.connection() as conn:
            await ledger.mark_failed(conn, batch_id, part, reason)
    # Moved by hand rather than by raising: the host would retry maxDequeueCount times first.
    await storage.send_messages(settings, settings.poison_queue_name, [body])
    return Outcome("failed", batch_id, part, error=reason)


async def process_message(
    body: bytes, *, settings: Settings | None = None, pool: AsyncConnectionPool | None = None
) -> Outcome:
    """Load one queue message (its decoded body) and return what became of it.

    Permanent faults return a ``failed`` outcome after recording it and poisoning the message;
    transient faults raise (``psycopg.OperationalError``, ``psycopg_pool.PoolTimeout``,
    ``QueryCanceled``, Azure storage errors) so that the message is delivered again.
    """
    from recsys.db.pool import get_pool

    settings = settings or get_settings()
    pool = pool or await get_pool("loader")
    try:
        doc = decode_json(body)
    except InvalidArgument as exc:
        return await _reject(body, None, exc.message, settings, pool)
    key = message_key(doc)
    try:
        message = message_from_document(doc)
        items = await _items_of(message, settings, pool)
        if items is None:
            return Outcome("skipped", message.batch_id, message.part)
        async with _slot(pool.max_size), pool.connection() as conn:
            outcome = await load_part(
                conn, message.batch_id, message.part, items,
                dim=settings.embedding_dim, statement_timeout_ms=settings.loader_statement_timeout_ms,
            )
    except InvalidArgument as exc:
        return await _reject(body, key, exc.message, settings, pool)
    except _REFUSED as exc:
        reason = f"the database refused the rows: {str(exc).splitlines()[0]}"
        return await _reject(body, key, reason, settings, pool)
    if message.blob is not None:
        # Loaded now or before (a redelivery after a failed delete): the claim-check is spent.
        await storage.delete_blob(settings, message.blob)
    return outcome
