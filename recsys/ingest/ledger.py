"""The batch ledger (``sql/020_ingest_batches.sql``, ``050``): one row per (batch id, part).

A part is what one queue message carries. The loader locks the part's row, loads the rows and
marks it ``loaded`` in one transaction. The row's ``source`` names the content it stands for
(the enqueue that recorded it, or another producer's queue message id), so that a redelivery of
loaded content is skipped while a batch id sent again with new content is loaded, whatever the
order in which the old and new messages arrive. Versions (``items.version``) make a load that
does run anyway harmless: it writes only what is newer.

The producers' bookkeeping (:func:`record_queued_bounded`, :func:`mark_enqueue_failed`) and the
status endpoint go through the small ``ingest`` pool, never the loader's: a saturated loader
cannot starve the HTTP ingest endpoints, and each call ends within the pool timeout (503) when
the database is unreachable instead of waiting out PgBouncer's ``query_wait_timeout``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg

from recsys.config import Settings, get_settings

__all__ = [
    "BatchStatus",
    "Claim",
    "batch_status",
    "batch_status_bounded",
    "claim_part",
    "mark_enqueue_failed",
    "mark_failed",
    "mark_loaded",
    "part_status",
    "record_queued",
    "record_queued_bounded",
]

Conn = psycopg.AsyncConnection[Any]
T = TypeVar("T")

#: Longest error kept in the ledger; reasons are one line, a message could be long.
MAX_ERROR_LENGTH = 1000

_RECORD_QUEUED = """
INSERT INTO ingest_batches (batch_id, part, parts, status, source)
SELECT %(batch_id)s, part, %(parts)s, 'queued', %(source)s FROM generate_series(0, %(parts)s - 1) AS part
ON CONFLICT (batch_id, part) DO UPDATE
   SET parts = EXCLUDED.parts, status = 'queued', rows = 0, deleted = 0, stale = 0, error = NULL,
       source = EXCLUDED.source, updated_at = now(), loaded_at = NULL
"""

# DO UPDATE (rather than DO NOTHING) locks the row, also one inserted by a concurrent delivery
# that has not committed yet: a second delivery waits here until the first one commits, then
# sees its status and source.
_CLAIM = """
INSERT INTO ingest_batches AS b (batch_id, part, status, source) VALUES (%s, %s, 'queued', %s)
ON CONFLICT (batch_id, part) DO UPDATE SET updated_at = now()
RETURNING b.status, b.source
"""

# updated_at is the load transaction's start (now()), loaded_at the moment the part was written
# (clock_timestamp()): their difference is the time the part spent in the database.
_MARK_LOADED = """
UPDATE ingest_batches
   SET status = 'loaded', rows = %s, deleted = %s, stale = %s, source = %s, error = NULL,
       updated_at = now(), loaded_at = clock_timestamp()
 WHERE batch_id = %s AND part = %s
"""

_MARK_FAILED = """
INSERT INTO ingest_batches AS b (batch_id, part, status, error) VALUES (%s, %s, 'failed', %s)
ON CONFLICT (batch_id, part) DO UPDATE
   SET status = 'failed', rows = 0, deleted = 0, stale = 0, error = EXCLUDED.error, updated_at = now()
 WHERE b.status <> 'loaded'
"""

_MARK_ENQUEUE_FAILED = """
UPDATE ingest_batches SET status = 'failed', error = %(error)s, updated_at = now()
 WHERE batch_id = %(batch_id)s AND part < %(parts)s AND status = 'queued'
"""

_PART_STATUS = "SELECT status FROM ingest_batches WHERE batch_id = %s AND part = %s"

_BATCH_STATUS = """
SELECT count(*)::int,
       count(*) FILTER (WHERE status = 'loaded')::int,
       count(*) FILTER (WHERE status = 'failed')::int,
       coalesce(sum(rows), 0)::bigint,
       coalesce(sum(deleted), 0)::bigint,
       coalesce(sum(stale), 0)::bigint,
       (array_agg(error ORDER BY part) FILTER (WHERE status = 'failed'))[1]
  FROM ingest_batches
 WHERE batch_id = %(batch_id)s
   AND part < coalesce((SELECT parts FROM ingest_batches WHERE batch_id = %(batch_id)s AND part = 0), 2147483647)
"""


@dataclass(frozen=True)
class BatchStatus:
    batch_id: str
    status: str
    rows: int
    error: str | None
    parts: int
    deleted: int = 0
    stale: int = 0

    def to_body(self) -> dict[str, Any]:
        return {"batch_id": self.batch_id, "status": self.status, "rows": self.rows, "deleted": self.deleted,
                "stale": self.stale, "error": self.error}


@dataclass(frozen=True)
class Claim:
    """The part's row as the loader found it (locked until the end of its transaction)."""

    status: str
    source: str | None

    def skips(self, source: str) -> bool:
        """Whether a message with ``source`` must not load.

        It must not when its content has loaded already (a redelivery), or when it comes from an
        enqueue of the project's producers that a later enqueue of the same batch id superseded
        (that enqueue recorded its own source before sending; the old content must not be
        loaded over the new one, nor be reported as its status).
        """
        if self.source == source:
            return self.status == "loaded"
        return source.startswith("enqueue:") and (self.source or "").startswith("enqueue:")


async def record_queued(conn: Conn, batch_id: str, parts: int, source: str) -> None:
    """Record ``parts`` parts of ``batch_id`` as queued with ``source`` (a batch id sent again starts afresh)."""
    await conn.execute(_RECORD_QUEUED, {"batch_id": batch_id, "parts": parts, "source": source})


async def claim_part(conn: Conn, batch_id: str, part: int, source: str) -> Claim:
    """Insert or lock the part's row inside the caller's transaction; return what it holds."""
    cur = await conn.execute(_CLAIM, [batch_id, part, source])
    row = await cur.fetchone()
    assert row is not None
    return Claim(str(row[0]), row[1])


async def mark_loaded(
    conn: Conn, batch_id: str, part: int, *, rows: int, deleted: int, stale: int, source: str
) -> None:
    await conn.execute(_MARK_LOADED, [rows, deleted, stale, source, batch_id, part])


async def mark_failed(conn: Conn, batch_id: str, part: int, reason: str) -> None:
    """Record a permanent failure, unless the part has already loaded."""
    await conn.execute(_MARK_FAILED, [batch_id, part, reason[:MAX_ERROR_LENGTH]])


async def part_status(conn: Conn, batch_id: str, part: int) -> str | None:
    cur = await conn.execute(_PART_STATUS, [batch_id, part])
    row = await cur.fetchone()
    return None if row is None else str(row[0])


async def batch_status(conn: Conn, batch_id: str) -> BatchStatus | None:
    """The batch's status over its parts (``None`` for an unknown batch).

    ``failed`` when any part failed, ``loaded`` when every part loaded, ``queued`` otherwise;
    ``rows``, ``deleted`` and ``stale`` are sums over the parts.
    """
    cur = await conn.execute(_BATCH_STATUS, {"batch_id": batch_id})
    row = await cur.fetchone()
    if row is None or row[0] == 0:
        return None
    parts, loaded, failed, rows, deleted, stale, error = row
    status = "failed" if failed else "loaded" if loaded == parts else "queued"
    return BatchStatus(batch_id=batch_id, status=status, rows=int(rows), error=error, parts=int(parts),
                       deleted=int(deleted), stale=int(stale))


# ----------------------------------------------------------------------------- bounded, own pool


async def _bounded(operation: Callable[[Conn], Awaitable[T]], settings: Settings | None) -> T:
    """``operation`` on a connection of the ``ingest`` pool, all of it within the pool timeout.

    Transient faults are retried on another connection within that time (every operation here
    is idempotent); past it the caller gets ``PoolTimeout`` or ``NoAnswer`` (both 503).
    """
    from recsys.db.pool import get_pool
    from recsys.db.retry import NoAnswer, run_read, within

    settings = settings or get_settings()
    pool = await get_pool("ingest", settings)
    try:
        return await within(run_read(pool, operation, limit=pool.timeout), pool.timeout)
    except TimeoutError:
        raise NoAnswer(f"the ledger did not answer within {pool.timeout:.2f} sec") from None


async def record_queued_bounded(batch_id: str, parts: int, source: str, *, settings: Settings | None = None) -> None:
    """:func:`record_queued` through the ``ingest`` pool, within its timeout."""
    await _bounded(lambda conn: record_queued(conn, batch_id, parts, source), settings)


async def mark_enqueue_failed(batch_id: str, parts: int, reason: str, *, settings: Settings | None = None) -> None:
    """Mark the parts of an enqueue that could not be sent ``failed`` (those still queued)."""

    async def operation(conn: Conn) -> None:
        await conn.execute(_MARK_ENQUEUE_FAILED,
                           {"batch_id": batch_id, "parts": parts, "error": reason[:MAX_ERROR_LENGTH]})

    await _bounded(operation, settings)


async def batch_status_bounded(batch_id: str, *, settings: Settings | None = None) -> BatchStatus | None:
    """:func:`batch_status` through the ``ingest`` pool, within its timeout."""
    return await _bounded(lambda conn: batch_status(conn, batch_id), settings)
