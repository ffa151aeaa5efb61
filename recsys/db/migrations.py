"""The migrations runner: applies ``sql/NNN_name.sql`` in order, once each, then the function
definitions of ``sql/functions/`` whenever their text has changed.

It talks to PostgreSQL directly (not through PgBouncer) as the schema owner. Each file runs
in its own transaction together with the row that records it, under an advisory lock, so
concurrent runners apply every file exactly once.

A function that keeps being revised (``recsys_nearest``) lives in one file of ``sql/functions/``
instead of being restated by every migration that changes it. Such a file replaces its
function (``CREATE OR REPLACE``), against the schema of the latest migration, and is recorded in
``schema_migrations`` under ``fn:<name>:<hash of its text>``: a file whose text is not the one
applied last is applied again (changed, or changed back), an unchanged one never again.

Migrations may read ``current_setting('recsys.embedding_dim')``, ``recsys.vector_type``,
``recsys.hnsw_m`` and ``recsys.hnsw_ef_construction``: the runner sets them, transaction-locally,
from the validated settings, so the SQL files never need formatting.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import psycopg

from recsys.config import DEFAULT_HNSW_EF_CONSTRUCTION, DEFAULT_HNSW_M, default_vector_type

__all__ = ["MIGRATIONS_DIR", "applied_versions", "apply_migrations", "function_definitions", "pending_migrations"]

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


def function_definitions(directory: Path = MIGRATIONS_DIR) -> list[tuple[str, Path]]:
    """The files of ``directory/functions`` as ``(version, path)`` in name order, where the version
    names the file and the text it holds now."""
    found = []
    for path in sorted((directory / "functions").glob("*.sql")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        found.append((f"fn:{path.stem}:{digest}", path))
    return found


def applied_versions(conn: psycopg.Connection) -> set[str]:
    _ensure_record(conn)
    return {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}


def _ensure_record(conn: psycopg.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version text PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
    )


def apply_migrations(
    conn: psycopg.Connection,
    *,
    embedding_dim: int = 384,
    vector_type: str | None = None,
    hnsw_m: int = DEFAULT_HNSW_M,
    hnsw_ef_construction: int = DEFAULT_HNSW_EF_CONSTRUCTION,
    directory: Path = MIGRATIONS_DIR,
) -> list[str]:
    """Apply the migrations not yet recorded; return the names of those applied now.

    ``conn`` must be a direct, autocommit connection with the rights to create the schema.
    ``vector_type`` (default: ``vector`` up to 2000 dimensions, ``halfvec`` above) and the HNSW
    parameters shape the catalogue when its table is created; an existing table keeps them.
    """
    values = {
        "recsys.embedding_dim": str(int(embedding_dim)),
        "recsys.vector_type": vector_type or default_vector_type(embedding_dim),
        "recsys.hnsw_m": str(int(hnsw_m)),
        "recsys.hnsw_ef_construction": str(int(hnsw_ef_construction)),
    }
    applied: list[str] = []
    files = [(version, path, path.name, False) for version, path in pending_migrations(directory)]
    files += [(version, path, f"functions/{path.name}", True) for version, path in function_definitions(directory)]
    for version, path, name, repeatable in files:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_KEY])
            # A function definition: the text applied last is the one in force, so a file
            # changed back is applied again.
            done = _last_applied(conn, name) == version if repeatable else version in applied_versions(conn)
            if done:
                continue
            for setting, value in values.items():
                conn.execute("SELECT set_config(%s, %s, true)", [setting, value])
            conn.execute(path.read_text())  # type: ignore[arg-type]  # a file of ours, not user input
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)"
                " ON CONFLICT (version) DO UPDATE SET applied_at = now()",
                [version, name],
            )
        log.info("applied migration %s", name)
        applied.append(name)
    _warn_if_different(conn, values["recsys.vector_type"], embedding_dim)
    return applied


def _last_applied(conn: psycopg.Connection, name: str) -> str | None:
    """The version of ``name`` (a function definition) applied last, if any."""
    _ensure_record(conn)
    row = conn.execute(
        "SELECT version FROM schema_migrations WHERE name = %s ORDER BY applied_at DESC, version LIMIT 1", [name]
    ).fetchone()
    return None if row is None else str(row[0])


def _warn_if_different(conn: psycopg.Connection, vector_type: str, embedding_dim: int) -> None:
    """Say so when the catalogue was created with another column type than the settings ask for."""
    row = conn.execute(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = to_regclass('items') AND attname = 'embedding'"
    ).fetchone()
    wanted = f"{vector_type}({int(embedding_dim)})"
    if row is not None and row[0] != wanted:
        log.warning(
            "items.embedding is %s but the settings ask for %s: the column type is chosen when the "
            "catalogue is created and is not converted", row[0], wanted,
        )
