"""The migrations runner: applies ``sql/NNN_name.sql`` in order, once each.

It talks to PostgreSQL directly (not through PgBouncer) as the schema owner. Each file runs
in its own transaction together with the row that records it, under an advisory lock, so
concurrent runners apply every file exactly once.

Migrations may read ``current_setting('recsys.embedding_dim')``: the runner sets it,
transaction-locally, from the validated settings, so the SQL files never need formatting.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import psycopg

__all__ = ["MIGRATIONS_DIR", "applied_versions", "apply_migrations", "pending_migrations"]

log = logging.getLogger("recsys")

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "sql"
_NAME = re.compile(r"^(\d{3,})_[a-z0-9_]+\.sql$")
#: An arbitrary, fixed key for pg_advisory_xact_lock: "recsys" in ASCII.
_LOCK_KEY = 0x726563737973


def pending_migrations(directory: Path = MIGRATIONS_DIR) -> list[tuple[str, Path]]:
    """All migration files as ``(version, path)``, ordered by version."""
    found = []
    for path in directory.glob("*.sql"):
        match = _NAME.match(path.name)
        if match:
            found.append((match.group(1), path))
    versions = [v for v, _ in found]
    if len(versions) != len(set(versions)):
        raise ValueError(f"two migration files share a version in {directory}")
    return sorted(found)


def applied_versions(conn: psycopg.Connection) -> set[str]:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version text PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    return {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}


def apply_migrations(
    conn: psycopg.Connection, *, embedding_dim: int = 384, directory: Path = MIGRATIONS_DIR
) -> list[str]:
    """Apply the migrations not yet recorded; return the names of those applied now.

    ``conn`` must be a direct, autocommit connection with the rights to create the schema.
    """
    applied: list[str] = []
    for version, path in pending_migrations(directory):
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_KEY])
            if version in applied_versions(conn):
                continue
            conn.execute("SELECT set_config('recsys.embedding_dim', %s, true)", [str(int(embedding_dim))])
            conn.execute(path.read_text())  # type: ignore[arg-type]  # a file of ours, not user input
            conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", [version, path.name])
        log.info("applied migration %s", path.name)
        applied.append(path.name)
    return applied
