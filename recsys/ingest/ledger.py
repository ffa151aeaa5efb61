"""The batch ledger (``sql/020_ingest_batches.sql``): one row per (batch id, part).

A part is what one queue message carries. Its row is the idempotency key of the loader: the
loader locks it, loads the rows and marks it ``loaded`` in one transaction, so a redelivered
message (even one running at the same moment) finds it loaded and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

__all__ = [
    "BatchStatus",
    "batch_status",
    "claim_part",
    "mark_failed",
    "mark_loaded",
    "part_status",
    "record_queued",
]

Conn = psycopg.AsyncConnection[Any]

#: Longest error kept in the ledger; reasons are one line, a message could be long.
MAX_ERROR_LENGTH = 1000

_RECORD_QUEUED = """
INSERT INTO ingest_batches (batch_id, part, parts, status)
SELECT %(batch_id)s, part, %(parts)s, 'queued' FROM generate_series(0, %(parts)s - 1) AS part
ON CONFLICT (batch_id, part) DO UPDATE
   SET parts = EXCLUDED.parts, status = 'queued', rows = 0, error = NULL, updated_at = now(), loaded_at = NULL
"""

# DO UPDATE (rather than DO NOTHING) locks the row, also one inserted by a concurrent delivery
# that has not committed yet: a second delivery waits here until the first one commits, then
# sees its status.
_CLAIM = """
INSERT INTO ingest_batches AS b (batch_id, part, status) VALUES (%s, %s, 'queued')
ON CONFLICT (batch_id, part) DO UPDATE SET updated_at = now()
RETURNING b.status
"""

_MARK_LOADED = """
UPDATE ingest_batches SET status = 'loaded', rows = %s, error = NULL, updated_at = now(), loaded_at = now()
 WHERE batch_id = %s AND part = %s
"""

_MARK_FAILED = """
INSERT INTO ingest_batches AS b (batch_id, part, status, error) VALUES (%s, %s, 'failed', %s)
ON CONFLICT (batch_id, part) DO UPDATE
   SET status = 'failed', rows = 0, error = EXCLUDED.error, updated_at = now()
 WHERE b.status <> 'loaded'
"""

_PART_STATUS = "SELECT status FROM ingest_batches WHERE batch_id = %s AND part = %s"

_BATCH_STATUS = """
SELECT count(*)::int,
       count(*) FILTER (WHERE status = 'loaded')::int,
       count(*) FILTER (WHERE status = 'failed')::int,
       coalesce(sum(rows), 0)::bigint,
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

    def to_body(self) -> dict[str, Any]:
        return {"batch_id": self.batch_id, "status": self.status, "rows": self.rows, "error": self.error}


async def record_queued(conn: Conn, batch_id: str, parts: int) -> None:
    """Record ``parts`` parts of ``batch_id`` as queued (a batch id sent again starts afresh)."""
    await conn.execute(_RECORD_QUEUED, {"batch_id": batch_id, "parts": parts})


async def claim_part(conn: Conn, batch_id: str, part: int) -> str:
    """Insert or lock the part's row inside the caller's transaction; return its status."""
    cur = await conn.execute(_CLAIM, [batch_id, part])
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def mark_loaded(conn: Conn, batch_id: str, part: int, rows: int) -> None:
    await conn.execute(_MARK_LOADED, [rows, batch_id, part])


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
    ``rows`` is the sum over the loaded parts.
    """
    cur = await conn.execute(_BATCH_STATUS, {"batch_id": batch_id})
    row = await cur.fetchone()
    if row is None or row[0] == 0:
        return None
    parts, loaded, failed, rows, error = row
    status = "failed" if failed else "loaded" if loaded == parts else "queued"
    return BatchStatus(batch_id=batch_id, status=status, rows=int(rows), error=error, parts=int(parts))
