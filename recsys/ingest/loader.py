"""The loader: one queue message -> one transaction that binary-COPYs its writes and applies them.

Per message, in ONE transaction (so a failure at any point leaves nothing behind):

1. the part's row in the batch ledger is inserted or locked (``ledger.claim_part``); a
   redelivery of content already loaded, or a message of an enqueue superseded by a later one
   of the same batch id, stops here (``skipped``);
2. the catalogue's write lock is taken (:data:`WRITE_LOCK_KEY`): shared by loads that only
   upsert, so they run side by side; exclusive for loads that delete (see :func:`apply_part`);
3. upserts and deletions are binary-COPYed into a temporary staging table created
   ``ON COMMIT DROP``: the table lives exactly as long as the transaction, which is what
   PgBouncer in transaction mode allows;
4. upserts go into ``items`` in id order (two loads touching the same ids lock them in the same
   order instead of deadlocking), each only when its version is greater than the item's and
   than its tombstone's; deletions record or raise the tombstone and remove the item, each only
   when its version is greater than both; the rest is counted ``stale``;
5. the part is marked ``loaded`` with its counts.

Versions make loading idempotent and order-independent: a message delivered twice, late or
concurrently with a newer one leaves the newest state. A write without a version gets the
message's insertion time in microseconds (the project's producers always stamp one).

Work is bounded per message: a part holds at most ``MAX_PART_ENTRIES`` entries and a blob at
most ``MAX_PART_BYTES`` bytes (checked before it is read). Downloading and parsing happen inside
the load slot, so at most the loader pool's size of parts are in memory at once.

The statement timeout is the loader's own (``RECSYS_LOADER_STATEMENT_TIMEOUT_MS``), applied
with ``set_config(..., true)``, i.e. ``SET LOCAL``: it ends with the transaction and never
reaches another client of the same PgBouncer server connection.

Faults are sorted as the queue needs them: a message that can never load (bad JSON, bad entry,
a part over the limits, missing blob, rows the database refuses) is recorded ``failed`` with the
reason and moved to the poison queue by :func:`process_message` itself, which then returns
normally so the host deletes the original without spending retries; anything else (database or
PgBouncer unreachable, pool exhausted, statement timeout, storage errors) propagates, and the
host delivers the message again.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from recsys.config import Settings, get_settings
from recsys.db.retry import checked_connection
from recsys.errors import InvalidArgument
from recsys.ingest import ledger, storage
from recsys.ingest.messages import (
    MAX_PART_BYTES,
    Delete,
    Item,
    Message,
    Part,
    decode_json,
    message_from_document,
    message_key,
    parse_part,
)
from recsys.search.params import max_component

__all__ = [
    "WRITE_LOCK_KEY",
    "Applied",
    "Outcome",
    "apply_part",
    "copy_items",
    "load_part",
    "process_message",
]

log = logging.getLogger("recsys")

Conn = psycopg.AsyncConnection[Any]
#: (id, version, embedding, category, tags, metadata, deleted, ord) in the staging table's column order.
Row = tuple[str, int, Any, str | None, list[str] | None, Jsonb | None, bool, int]

#: The advisory lock that orders deletions against upserts of the catalogue ("recsitms").
WRITE_LOCK_KEY = 0x7265637369746D73

_LOCK_SHARED = "SELECT pg_advisory_xact_lock_shared(%s)"
_LOCK_EXCLUSIVE = "SELECT pg_advisory_xact_lock(%s)"
_STAGING = sql.SQL(
    "CREATE TEMP TABLE ingest_staging ("
    " id text NOT NULL, version bigint NOT NULL, embedding {type}({dim}), category text,"
    " tags text[], metadata jsonb, deleted boolean NOT NULL, ord integer NOT NULL"
    ") ON COMMIT DROP"
)
_COPY = (
    "COPY ingest_staging (id, version, embedding, category, tags, metadata, deleted, ord) FROM STDIN (FORMAT BINARY)"
)
# Of an id upserted more than once in the part, only the entry with the highest version can
# apply, the last of them (``ord``) where versions are equal; the others are stale.
_UPSERT = """
INSERT INTO items AS i (id, version, embedding, category, tags, metadata, updated_at)
SELECT s.id, s.version, s.embedding, s.category, s.tags, s.metadata, now()
  FROM (SELECT DISTINCT ON (u.id) u.* FROM ingest_staging u
         WHERE NOT u.deleted
         ORDER BY u.id, u.version DESC, u.ord DESC) s
 WHERE NOT EXISTS (SELECT FROM item_tombstones t WHERE t.id = s.id AND t.version >= s.version)
 ORDER BY s.id
ON CONFLICT (id) DO UPDATE
   SET version = EXCLUDED.version, embedding = EXCLUDED.embedding, category = EXCLUDED.category,
       tags = EXCLUDED.tags, metadata = EXCLUDED.metadata, updated_at = EXCLUDED.updated_at
 WHERE i.version < EXCLUDED.version
"""
# A deletion applies when its version is above the item's and the tombstone's: the tombstone is
# recorded or raised and the item removed. Of an id deleted more than once in the part, only the
# highest version can apply (the others are stale). Runs under the exclusive write lock (apply_part).
_DELETE = """
WITH highest AS (
    SELECT DISTINCT ON (s.id) s.id, s.version FROM ingest_staging s
     WHERE s.deleted
     ORDER BY s.id, s.version DESC
), applied AS (
    SELECT h.id, h.version FROM highest h
     WHERE NOT EXISTS (SELECT FROM items i WHERE i.id = h.id AND i.version >= h.version)
       AND NOT EXISTS (SELECT FROM item_tombstones t WHERE t.id = h.id AND t.version >= h.version)
), remembered AS (
    INSERT INTO item_tombstones AS t (id, version)
    SELECT id, version FROM applied ORDER BY id
    ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, deleted_at = now()
), removed AS (
    DELETE FROM items i USING applied a WHERE i.id = a.id
)
SELECT count(*) FROM applied
"""

#: Database errors caused by the rows themselves: retrying the message cannot help.
_REFUSED = (pg_errors.DataError, pg_errors.IntegrityError)


def now_version() -> int:
    """The time now in microseconds since the epoch."""
    return time.time_ns() // 1000


def part_rows(items: Iterable[Item], deletes: Iterable[Delete] = (), *, version: int) -> Iterable[Row]:
    """Staging rows of a part, numbered in order; ``version`` for entries that carry none."""
    position = 0
    for item in items:
        position += 1
        yield (item.id, item.version or version, item.embedding, item.category, item.tags,
               Jsonb(item.metadata), False, position)
    for delete in deletes:
        position += 1
        yield (delete.id, delete.version or version, None, None, None, None, True, position)


@dataclass(frozen=True)
class Applied:
    """What a part did to the catalogue."""

    rows: int
    deleted: int
    stale: int


async def apply_part(conn: Conn, part: Part, *, dim: int, version: int) -> Applied:
    """Stage ``part`` with binary COPY and apply it to the catalogue by version; return the counts.

    Must run inside the caller's transaction (the staging table and the lock end with it).

    Why a lock: with the item absent, an upsert and a deletion of it running at the same time
    would each miss the other's uncommitted row (READ COMMITTED) and both commit, leaving an
    item behind its tombstone. Upserts among themselves are ordered by the row locks of
    ``ON CONFLICT``; deletions take the lock exclusively, so they wait for the upserts in
    flight and those after them wait for the deletion (one lock, whatever the part's size).
    """
    await conn.execute(_LOCK_EXCLUSIVE if part.deletes else _LOCK_SHARED, [WRITE_LOCK_KEY])
    # Staged as float32 whatever the catalogue's column type: pgvector casts vector to halfvec
    # implicitly in the upsert, so the loader needs no knowledge of RECSYS_VECTOR_TYPE.
    kind = "vector"
    await conn.execute(_STAGING.format(type=sql.SQL(kind), dim=sql.Literal(dim)))
    async with conn.cursor() as cur:
        try:
            async with cur.copy(_COPY) as copy:
                copy.set_types(["text", "int8", kind, "text", "text[]", "jsonb", "bool", "int4"])
                for row in part_rows(part.items, part.deletes, version=version):
                    await copy.write_row(row)
        except Exception as exc:
            # A backend that dies mid-COPY can surface from psycopg's copy writer as an error
            # other than OperationalError; a lost connection is a transient fault all the same.
            if conn.broken or conn.closed:
                raise psycopg.OperationalError(f"connection lost during COPY: {exc}") from exc
            raise
        rows = deleted = 0
        if part.items:
            await cur.execute(_UPSERT)
            rows = max(cur.rowcount, 0)
        if part.deletes:
            await cur.execute(_DELETE)
            found = await cur.fetchone()
            deleted = int(found[0]) if found else 0
    return Applied(rows=rows, deleted=deleted, stale=len(part) - rows - deleted)


async def copy_items(conn: Conn, items: Iterable[Item], *, dim: int, version: int | None = None) -> int:
    """Upsert ``items`` by version as :func:`apply_part` does; return the rows written.

    For the bulk loader: items without a version get ``version`` (default: now, in µs).
    """
    applied = await apply_part(conn, Part(list(items), []), dim=dim, version=version or now_version())
    return applied.rows


@dataclass(frozen=True)
class Outcome:
    """What became of one message: ``loaded``, ``skipped`` (already loaded, or superseded) or
    ``failed`` (poisoned)."""

    status: str
    batch_id: str | None
    part: int
    rows: int = 0
    error: str | None = None
    deleted: int = 0
    stale: int = 0


async def load_part(
    conn: Conn,
    batch_id: str,
    part_no: int,
    part: Part,
    *,
    dim: int,
    statement_timeout_ms: int,
    source: str,
    version: int,
    stale: int = 0,
) -> Outcome:
    """Load one part in one transaction (see the module docstring); idempotent per (batch, part, source).

    ``stale`` counts writes its producer dropped as stale before sending (``Message.stale``).
    """
    async with conn.transaction():
        await conn.execute("SELECT set_config('statement_timeout', %s, true)", [str(statement_timeout_ms)])
        if (await ledger.claim_part(conn, batch_id, part_no, source)).skips(source):
            return Outcome("skipped", batch_id, part_no)
        applied = await apply_part(conn, part, dim=dim, version=version)
        stale_in_all = stale + applied.stale
        await ledger.mark_loaded(conn, batch_id, part_no, rows=applied.rows, deleted=applied.deleted,
                                 stale=stale_in_all, source=source)
    return Outcome("loaded", batch_id, part_no, rows=applied.rows, deleted=applied.deleted, stale=stale_in_all)


#: Loads running at once per event loop, bounded by the loader pool's size so that a burst of
#: messages waits its turn here rather than timing out on the pool (which must mean that the
#: database is unreachable, a transient fault), and so that at most that many parts are
#: downloaded and parsed (in memory) at once.
_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def _slot(size: int) -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    semaphore = _slots.get(loop)
    if semaphore is None:
        semaphore = _slots[loop] = asyncio.Semaphore(size)
    return semaphore


def _parse_blob(data: bytes, dim: int, what: str, limit: float) -> Part:
    doc = decode_json(data, what=what, field="blob")
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what} must be a JSON object with items or delete", field="blob")
    return parse_part(doc, dim, limit=limit)


async def _part_of(message: Message, settings: Settings, pool: AsyncConnectionPool) -> Part | None:
    """The message's validated part; ``None`` when its blob is gone because it already loaded."""
    dim, limit = settings.embedding_dim, max_component(settings.vector_type)
    if message.blob is None:
        doc = {"items": message.items, "delete": message.deletes}
        return await asyncio.to_thread(functools.partial(parse_part, doc, dim, limit=limit))
    data = await storage.download_blob(settings, message.blob, max_bytes=MAX_PART_BYTES)
    if data is None:
        # The loader deletes a part's blob once it has loaded: a late redelivery finds it gone.
        async with checked_connection(pool, settings) as conn:
            if await ledger.part_status(conn, message.batch_id, message.part) == "loaded":
                return None
        raise InvalidArgument(f"blob {message.blob} not found", field="blob")
    return await asyncio.to_thread(_parse_blob, data, dim, f"blob {message.blob}", limit)


async def _reject(
    body: bytes, key: tuple[str, int] | None, reason: str, settings: Settings, pool: AsyncConnectionPool
) -> Outcome:
    batch_id, part = key if key is not None else (None, 0)
    if batch_id is not None:
        async with checked_connection(pool, settings) as conn:
            await ledger.mark_failed(conn, batch_id, part, reason)
    # Moved by hand rather than by raising: the host would retry maxDequeueCount times first.
    # Kept as long as the ledger remembers the batch, so that `python -m recsys replay` can reload it.
    await storage.send_messages(settings, settings.poison_queue_name, [body],
                                time_to_live=settings.ledger_retention_days * 86400)
    return Outcome("failed", batch_id, part, error=reason)


def message_source(message: Message, body: bytes, message_id: str | None) -> str:
    """What identifies the message's content in the ledger (see ``ledger.Claim``)."""
    if message.source is not None:
        return message.source
    if message_id:
        return f"message:{message_id}"
    return f"body:{hashlib.sha256(body).hexdigest()[:32]}"


def insertion_version(inserted_at: datetime | None) -> int:
    """The default version of a message's writes: its insertion time in µs (now if unknown)."""
    if inserted_at is None:
        return now_version()
    return max(1, int(inserted_at.timestamp() * 1_000_000))


async def process_message(
    body: bytes,
    *,
    settings: Settings | None = None,
    pool: AsyncConnectionPool | None = None,
    message_id: str | None = None,
    inserted_at: datetime | None = None,
) -> Outcome:
    """Load one queue message (its decoded body) and return what became of it.

    ``message_id`` and ``inserted_at`` are the queue's: the id tells a redelivery from a new
    message of another producer, the insertion time versions writes that carry none.

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
        async with _slot(pool.max_size):
            part = await _part_of(message, settings, pool)
            if part is None:
                return Outcome("skipped", message.batch_id, message.part)
            async with checked_connection(pool, settings) as conn:
                outcome = await load_part(
                    conn, message.batch_id, message.part, part,
                    dim=settings.embedding_dim, statement_timeout_ms=settings.loader_statement_timeout_ms,
                    source=message_source(message, body, message_id), version=insertion_version(inserted_at),
                    stale=message.stale,
                )
    except InvalidArgument as exc:
        return await _reject(body, key, exc.message, settings, pool)
    except _REFUSED as exc:
        reason = f"the database refused the rows: {str(exc).splitlines()[0]}"
        return await _reject(body, key, reason, settings, pool)
    if message.blob is not None:
        # Loaded now or before, or superseded: the claim-check is spent.
        await storage.delete_blob(settings, message.blob)
    return outcome
