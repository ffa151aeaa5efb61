"""The bulk loader for initial loads: files -> binary COPY in chunks, straight to the database.

Sources: a ``.jsonl`` of items with ``embedding`` or ``embedding_b64`` (one item object per
line), or a ``.npy`` matrix of vectors (n × dim) with a ``.jsonl`` of the same n lines carrying
``id`` and optionally ``category``, ``tags``, ``metadata``. Each chunk is one transaction of the
loader's kind (COPY into an ``ON COMMIT DROP`` staging table, upsert), so a load can be
interrupted and run again.

With ``build_index`` the HNSW index is dropped first and built once at the end, with parallel
workers and a ``maintenance_work_mem`` large enough for the graph: building an HNSW graph in one
go is several times faster than inserting into it row by row. It is built with the ``m`` and
``ef_construction`` given (``RECSYS_HNSW_M``, ``RECSYS_HNSW_EF_CONSTRUCTION`` from the command),
for the column's type (``vector`` or ``halfvec``). Dropping and creating an index
needs the table owner's rights (not the loader role's), and searches fall back to exact scans
while it is missing, so this is for initial loads and maintenance windows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector_async
from psycopg import sql

from recsys.config import DEFAULT_HNSW_EF_CONSTRUCTION, DEFAULT_HNSW_M
from recsys.errors import InvalidArgument
from recsys.ingest.loader import copy_items
from recsys.ingest.messages import Item, decode_json, parse_item
from recsys.search.params import MAX_VECTOR_COMPONENT

__all__ = ["INDEX_NAME", "BulkResult", "bulk_load", "count_items", "read_items"]

INDEX_NAME = "items_embedding_cosine"
_INDEX = sql.SQL(
    "CREATE INDEX items_embedding_cosine ON items USING hnsw (embedding {opclass})"
    " WITH (m = {m}, ef_construction = {ef_construction})"
)
_OPERATOR_CLASSES = {"vector": "vector_cosine_ops", "halfvec": "halfvec_cosine_ops"}


@dataclass(frozen=True)
class BulkResult:
    rows: int
    chunks: int
    index_rebuilt: bool


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line


def count_items(path: Path) -> int:
    """Items in ``path`` (rows of a ``.npy``, non-blank lines of a ``.jsonl``), for the progress bar."""
    if path.suffix == ".npy":
        return int(np.load(path, mmap_mode="r").shape[0])
    return sum(1 for _ in _lines(path))


def _read_jsonl(path: Path, dim: int, limit: float) -> Iterator[Item]:
    for number, line in _lines(path):
        where = f"{path.name}:{number}"
        yield parse_item(decode_json(line, what=f"line {number}", field=where), dim, where, limit=limit)


def _read_npy(path: Path, items_path: Path, dim: int, limit: float) -> Iterator[Item]:
    vectors = np.load(path, mmap_mode="r")
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise InvalidArgument(f"{path.name} must be a matrix of n × {dim} vectors, got shape {vectors.shape}",
                              field=path.name)
    lines = _lines(items_path)
    for row in range(vectors.shape[0]):
        try:
            number, line = next(lines)
        except StopIteration:
            raise InvalidArgument(f"{items_path.name} has fewer lines than {path.name} has vectors ({row})",
                                  field=items_path.name) from None
        where = f"{items_path.name}:{number}"
        meta = decode_json(line, what=f"line {number}", field=where)
        if not isinstance(meta, dict):
            raise InvalidArgument(f"{where} must be an object with an id", field=where)
        yield parse_item(meta, dim, where, vector=np.asarray(vectors[row], dtype=np.float32), limit=limit)
    if next(lines, None) is not None:
        raise InvalidArgument(f"{items_path.name} has more lines than {path.name} has vectors", field=items_path.name)


def read_items(path: Path, dim: int, items_path: Path | None = None, *,
               limit: float = MAX_VECTOR_COMPONENT) -> Iterator[Item]:
    """Validated items of a bulk file; :class:`InvalidArgument` names the file and line at fault.

    ``limit``: the largest magnitude of a component (``recsys.search.params.max_component``).
    """
    if path.suffix == ".npy":
        if items_path is None:
            raise InvalidArgument("a .npy file needs a .jsonl of ids (--items)", field="items")
        return _read_npy(path, items_path, dim, limit)
    if path.suffix == ".jsonl":
        return _read_jsonl(path, dim, limit)
    raise InvalidArgument(f"{path.name}: expected a .jsonl or a .npy file", field="file")


def _chunks(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    chunk: dict[str, Item] = {}
    for item in items:
        chunk.pop(item.id, None)
        chunk[item.id] = item  # a later line with the same id wins, as a later upsert would
        if len(chunk) >= size:
            yield list(chunk.values())
            chunk = {}
    if chunk:
        yield list(chunk.values())


async def _index_definition(
    conn: psycopg.AsyncConnection[Any], *, m: int, ef_construction: int
) -> tuple[sql.Composed, bool]:
    """The index's ``CREATE INDEX`` statement for the column's type, and whether it exists now."""
    cur = await conn.execute(
        "SELECT t.typname, to_regclass(%s) IS NOT NULL FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
        " WHERE a.attrelid = 'public.items'::regclass AND a.attname = 'embedding'",
        [f"public.{INDEX_NAME}"],
    )
    row = await cur.fetchone()
    opclass = _OPERATOR_CLASSES.get(str(row[0]) if row else "", "vector_cosine_ops")
    definition = _INDEX.format(
        opclass=sql.SQL(opclass), m=sql.Literal(int(m)), ef_construction=sql.Literal(int(ef_construction))
    )
    return definition, bool(row and row[1])


async def _build_index(
    conn: psycopg.AsyncConnection[Any], definition: sql.Composed, *, workers: int, maintenance_work_mem: str
) -> None:
    async with conn.transaction():
        # Transaction-local (SET LOCAL), so that nothing leaks through PgBouncer's server connection.
        await conn.execute("SELECT set_config('maintenance_work_mem', %s, true)", [maintenance_work_mem])
        await conn.execute("SELECT set_config('max_parallel_maintenance_workers', %s, true)", [str(workers)])
        await conn.execute("SELECT set_config('statement_timeout', '0', true)")
        await conn.execute(definition)


async def bulk_load(
    url: str,
    items: Iterator[Item],
    *,
    dim: int,
    chunk_size: int = 10_000,
    build_index: bool = False,
    workers: int = 2,
    maintenance_work_mem: str = "1GB",
    hnsw_m: int = DEFAULT_HNSW_M,
    hnsw_ef_construction: int = DEFAULT_HNSW_EF_CONSTRUCTION,
    statement_timeout_ms: int = 600_000,
    progress: Callable[[int], None] | None = None,
) -> BulkResult:
    """COPY ``items`` into ``items`` in chunks of ``chunk_size`` (one transaction each).

    ``url`` may point at PgBouncer (transaction mode is fine: nothing outlives a transaction)
    or directly at PostgreSQL. ``progress`` is called with the rows of each committed chunk.
    With ``build_index``, the index is rebuilt with ``hnsw_m`` and ``hnsw_ef_construction``.
    """
    rows = chunks = 0
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, prepare_threshold=None) as conn:
        await register_vector_async(conn)
        definition, exists = await _index_definition(conn, m=hnsw_m, ef_construction=hnsw_ef_construction)
        if build_index and exists:
            await conn.execute(f"DROP INDEX IF EXISTS {INDEX_NAME}")  # type: ignore[arg-type]  # a constant
        try:
            for chunk in _chunks(items, chunk_size):
                async with conn.transaction():
                    await conn.execute("SELECT set_config('statement_timeout', %s, true)", [str(statement_timeout_ms)])
                    rows += await copy_items(conn, chunk, dim=dim)
                chunks += 1
                if progress is not None:
                    progress(len(chunk))
        finally:
            if build_index:
                await _build_index(conn, definition, workers=workers, maintenance_work_mem=maintenance_work_mem)
    return BulkResult(rows=rows, chunks=chunks, index_rebuilt=build_index)

