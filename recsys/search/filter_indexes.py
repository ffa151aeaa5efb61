"""Filter indexes: a partial HNSW index over the items of one category or of one tag.

The shared HNSW index serves every filter by reading on past the items that fail it
(``recsys_nearest``). Two kinds of filter make that costly: a rare value spread across the
catalogue (a 1 % category: about a hundred tuples read for each one that passes), and a value
that avoids the query's neighbourhood (anti-correlated: no passing item among the nearest, so the
exact scan of every passing item answers). A filter index is a graph of the members alone, so its
search reads passing items only; ``recsys_nearest`` uses it when the request's filter requires its
value and its search costs less than the exact scan (``sql/090_filter_indexes.sql``).

``python -m recsys filter-index create --category books`` builds one with ``CREATE INDEX
CONCURRENTLY`` (writes go on meanwhile) and the catalogue's HNSW parameters and operator class,
then records it in ``filter_indexes``, which the query function reads. The value becomes the
index predicate, so it is quoted by psycopg as a literal; the index name is derived from a hash
of kind and value, never from the value's text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

__all__ = [
    "KINDS",
    "FilterIndex",
    "create_filter_index",
    "drop_filter_index",
    "filter_index_main",
    "filter_index_name",
    "list_filter_indexes",
]

log = logging.getLogger("recsys.filter_indexes")

#: The filter a partial index can stand for -> the column its predicate reads.
KINDS = {"category": "category", "tag": "tags"}
#: The index orders unit vectors by inner product (``l2_normalize(embedding) <#> ...``), the order
#: of cosine distance: an ORDER BY that the shared cosine index cannot serve, so that the planner
#: never takes the shared index for a filter index's search.
_OPERATOR_CLASSES = {"vector": "vector_ip_ops", "halfvec": "halfvec_ip_ops"}
_PREDICATES = {
    # The forms recsys_nearest writes, so that the planner proves the index applies.
    "category": sql.SQL("category = {value}"),
    "tag": sql.SQL("tags && ARRAY[{value}]::text[]"),
}
MAX_VALUE_LENGTH = 256


@dataclass(frozen=True)
class FilterIndex:
    kind: str
    value: str
    index_name: str
    members: int
    size_bytes: int
    valid: bool


def filter_index_name(kind: str, value: str) -> str:
    """The index's name: the kind and a hash of the value (any text is a valid value)."""
    _check(kind, value)
    digest = hashlib.sha256(f"{kind}\0{value}".encode()).hexdigest()[:16]
    return f"items_filter_{kind}_{digest}"


def _check(kind: str, value: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not 1 <= len(value) <= MAX_VALUE_LENGTH:
        raise ValueError(f"a {kind} must be 1 to {MAX_VALUE_LENGTH} characters long")


def list_filter_indexes(conn: psycopg.Connection[Any]) -> list[FilterIndex]:
    """The recorded filter indexes, with their member count (the index's tuples) and size."""
    rows = conn.execute(
        "SELECT f.kind, f.value, f.index_name, coalesce(greatest(c.reltuples, 0), 0)::bigint,"
        " coalesce(pg_relation_size(c.oid), 0), coalesce(x.indisvalid, false)"
        " FROM filter_indexes f"
        " LEFT JOIN pg_class c ON c.relname = f.index_name AND c.relnamespace = 'public'::regnamespace"
        " LEFT JOIN pg_index x ON x.indexrelid = c.oid"
        " ORDER BY f.kind, f.value"
    ).fetchall()
    return [FilterIndex(*row) for row in rows]


def create_filter_index(
    conn: psycopg.Connection[Any],
    kind: str,
    value: str,
    *,
    m: int = 16,
    ef_construction: int = 64,
    maintenance_work_mem: str = "1GB",
) -> FilterIndex:
    """Build the filter index of ``kind`` = ``value`` unless a valid one exists, and record it.

    ``conn``: a direct autocommit connection of the table's owner (``CREATE INDEX CONCURRENTLY``
    cannot run in a transaction, nor through PgBouncer in transaction mode). A build that fails
    leaves no index behind.
    """
    _check(kind, value)
    name = filter_index_name(kind, value)
    row = conn.execute(
        "SELECT t.typname, format_type(a.atttypid, a.atttypmod), x.indisvalid"
        " FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
        " LEFT JOIN pg_class c ON c.relname = %s AND c.relnamespace = 'public'::regnamespace"
        " LEFT JOIN pg_index x ON x.indexrelid = c.oid"
        " WHERE a.attrelid = 'public.items'::regclass AND a.attname = 'embedding'",
        [name],
    ).fetchone()
    if row is None:
        raise psycopg.ProgrammingError("the items table has no embedding column")
    vector_type, column_type, valid = row
    if valid is False:
        # What a failed concurrent build leaves: an invalid index that writes still maintain.
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(name)))
    if not valid:
        conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", [maintenance_work_mem])
        statement = sql.SQL(
            "CREATE INDEX CONCURRENTLY {name} ON items USING hnsw ((l2_normalize(embedding)::{column}) {opclass})"
            " WITH (m = {m}, ef_construction = {ef}) WHERE {predicate}"
        ).format(
            name=sql.Identifier(name),
            # The column's own type from the catalogue, e.g. vector(384): an HNSW index on an
            # expression needs its dimension.
            column=sql.SQL(str(column_type)),
            opclass=sql.SQL(_OPERATOR_CLASSES[str(vector_type)]),
            m=sql.Literal(int(m)),
            ef=sql.Literal(int(ef_construction)),
            predicate=_PREDICATES[kind].format(value=sql.Literal(value)),
        )
        log.info("building %s for %s %r", name, kind, value)
        try:
            conn.execute(statement)
        except psycopg.Error:
            conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(name)))
            raise
        finally:
            conn.execute("RESET maintenance_work_mem")
        conn.execute("ANALYZE items")
    conn.execute(
        "INSERT INTO filter_indexes (kind, value, index_name) VALUES (%s, %s, %s)"
        " ON CONFLICT (kind, value) DO NOTHING",
        [kind, value, name],
    )
    return next(i for i in list_filter_indexes(conn) if i.index_name == name)


def drop_filter_index(conn: psycopg.Connection[Any], kind: str, value: str) -> bool:
    """Forget the filter index of ``kind`` = ``value`` and drop it; False when there was none.

    The record goes first, so that no query is planned for an index about to go.
    """
    _check(kind, value)
    name = filter_index_name(kind, value)
    forgotten = conn.execute("DELETE FROM filter_indexes WHERE kind = %s AND value = %s", [kind, value]).rowcount
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [f"public.{name}"]).fetchone()
    if exists and exists[0]:
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(name)))
        return True
    return forgotten > 0


def filter_index_main(argv: list[str]) -> int:
    """``python -m recsys filter-index create|drop|list``."""
    parser = argparse.ArgumentParser(prog="python -m recsys filter-index",
                                     description="partial HNSW indexes for a category or a tag")
    parser.add_argument("action", choices=["create", "drop", "list"])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--category", help="the category whose items the index holds")
    which.add_argument("--tag", help="the tag whose items the index holds")
    parser.add_argument("--url", help="a direct (not PgBouncer) URL of the table's owner, e.g. on Azure")
    parser.add_argument("--root", help="folder of the local stack (default: .stack/)")
    parser.add_argument("--maintenance-work-mem", default="1GB", help="memory for the build (default 1GB)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    chosen = [(kind, getattr(args, kind)) for kind in KINDS if getattr(args, kind) is not None]
    if args.action != "list" and not chosen:
        parser.error("create and drop need --category or --tag")
    from recsys.config import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"recsys filter-index: {exc}", file=sys.stderr)
        return 2
    if args.url:
        url = args.url
    else:
        from recsys.local.stack import Stack, StackConfig

        url = Stack(StackConfig.local(Path(args.root) if args.root else None)).admin_conninfo()
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            if args.action == "list":
                print(json.dumps([asdict(i) for i in list_filter_indexes(conn)], indent=2))
                return 0
            kind, value = chosen[0]
            if args.action == "create":
                index = create_filter_index(conn, kind, value, m=settings.hnsw_m,
                                            ef_construction=settings.hnsw_ef_construction,
                                            maintenance_work_mem=args.maintenance_work_mem)
                print(json.dumps(asdict(index)))
                return 0
            dropped = drop_filter_index(conn, kind, value)
            print(json.dumps({"kind": kind, "value": value, "dropped": dropped}))
            return 0
    except ValueError as exc:
        print(f"recsys filter-index: {exc}", file=sys.stderr)
        return 2
    except psycopg.Error as exc:
        print(f"recsys filter-index: {exc}", file=sys.stderr)
        return 1
