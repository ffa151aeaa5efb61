"""Benchmark 3: how fast embeddings get into the catalogue.

- Row-loading methods into the items table without its HNSW index, through PgBouncer as the
  loader connects: binary COPY, text COPY and ``executemany`` INSERT (psycopg batches it in a
  pipeline), each in one transaction.
- Index order: loading then building the HNSW index, vs loading into the indexed table.
- The write path against the database's own rate, side by side in one run: the same versioned
  upserts (replacements, new items, and writes made stale by tombstones) into the same indexed
  table, once as the project's loader SQL run straight from pre-built rows over the same number
  of connections as the loader's pool, once through the whole pipeline (the project's producer,
  Blob storage and the queue, the local host's queue-triggered loader). The pipeline's time is
  split into the producer, the time until the first part's transaction starts (queue polling,
  blob download, parsing) and the load window, so that what it loses is accounted for.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg.types.json import Jsonb

from recsys.bench.harness import (
    HNSW_BUILD,
    BenchOptions,
    app_environment,
    bench_stack,
    build_hnsw_index,
    drop_hnsw_index,
    local_host,
    server_versions,
)
from recsys.bench.results import BenchResult, Headline
from recsys.bench.stats import ratio
from recsys.config import Settings
from recsys.datasets import Catalogue, clustered_catalogue
from recsys.db.pool import connection_kwargs
from recsys.ingest.messages import Item, Part
from recsys.local.stack import Stack, free_port

__all__ = ["run"]

log = logging.getLogger("recsys")

TITLE = "loading embeddings"
COPY_BINARY = "COPY items (id, embedding, category) FROM STDIN WITH (FORMAT BINARY)"
COPY_TEXT = "COPY items (id, embedding, category) FROM STDIN"
INSERT = "INSERT INTO items (id, embedding, category) VALUES (%s, %s, %s)"

Loader = Callable[[psycopg.Connection[Any], Catalogue, int], None]


def _rows(catalogue: Catalogue, count: int) -> Any:
    return zip(catalogue.ids[:count], catalogue.vectors[:count], catalogue.categories[:count], strict=True)


def copy_binary(conn: psycopg.Connection[Any], catalogue: Catalogue, count: int) -> None:
    with conn.transaction(), conn.cursor() as cur, cur.copy(COPY_BINARY) as copy:
        copy.set_types(["text", "vector", "text"])
        for row in _rows(catalogue, count):
            copy.write_row(row)


def binary_copy_payload(catalogue: Catalogue, count: int) -> bytes:
    """The whole binary COPY stream of ``count`` rows (header, tuples, trailer), vectors via numpy.

    Each vector field is pgvector's binary form: dimension and an unused int16, then the
    big-endian float32 values, which numpy converts for all rows at once.
    """
    dim = catalogue.vectors.shape[1]
    big_endian = catalogue.vectors[:count].astype(">f4")
    vector_head = struct.pack(">iHH", 4 + 4 * dim, dim, 0)
    parts = [b"PGCOPY\n\xff\r\n\x00", struct.pack(">ii", 0, 0)]
    for item, vector, category in zip(catalogue.ids[:count], big_endian, catalogue.categories[:count], strict=True):
        item_bytes, category_bytes = item.encode(), category.encode()
        parts += [struct.pack(">hi", 3, len(item_bytes)), item_bytes, vector_head, vector.tobytes(),
                  struct.pack(">i", len(category_bytes)), category_bytes]
    parts.append(struct.pack(">h", -1))
    return b"".join(parts)


def copy_binary_bulk(conn: psycopg.Connection[Any], catalogue: Catalogue, count: int) -> None:
    """Binary COPY of a stream built in bulk (timed): no per-row adaptation by the driver."""
    payload = binary_copy_payload(catalogue, count)
    with conn.transaction(), conn.cursor() as cur, cur.copy(COPY_BINARY) as copy:
        copy.write(payload)


def copy_text(conn: psycopg.Connection[Any], catalogue: Catalogue, count: int) -> None:
    with conn.transaction(), conn.cursor() as cur, cur.copy(COPY_TEXT) as copy:
        for row in _rows(catalogue, count):
            copy.write_row(row)


def copy_text_preformatted(conn: psycopg.Connection[Any], catalogue: Catalogue, count: int) -> None:
    """Text COPY of lines formatted beforehand (not timed): the server's share of text COPY."""
    with conn.transaction(), conn.cursor() as cur, cur.copy(COPY_TEXT) as copy:
        copy.write(_text_lines(catalogue, count))


_formatted: dict[tuple[int, int], bytes] = {}


def _text_lines(catalogue: Catalogue, count: int) -> bytes:
    key = (id(catalogue), count)
    if key not in _formatted:
        _formatted[key] = "".join(
            f"{item}\t[{','.join(map(repr, vector.tolist()))}]\t{category}\n"
            for item, vector, category in _rows(catalogue, count)
        ).encode()
    return _formatted[key]


def insert_per_row(conn: psycopg.Connection[Any], catalogue: Catalogue, count: int) -> None:
    """One INSERT and one round trip per row: what a loop of ``execute`` calls does."""
    with conn.transaction(), conn.cursor() as cur:
        for row in _rows(catalogue, count):
            cur.execute(INSERT, row)


def executemany(conn: psycopg.Connection[Any], catalogue: Catalogue, count: int) -> None:
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(INSERT, list(_rows(catalogue, count)))


LOADERS: dict[str, Loader] = {
    "copy_binary": copy_binary,
    "copy_binary_bulk": copy_binary_bulk,
    "copy_text": copy_text,
    "copy_text_preformatted": copy_text_preformatted,
    "executemany": executemany,
    "insert_per_row": insert_per_row,
}


def _truncate(stack: Stack) -> None:
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        conn.execute("TRUNCATE items")


def _check_loaded(stack: Stack, catalogue: Catalogue, count: int) -> None:
    """Every method must have loaded the same rows: the count, and one vector read back."""
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        register_vector(conn)
        row = conn.execute("SELECT count(*), (SELECT embedding FROM items WHERE id = %s) FROM items",
                           [catalogue.ids[count - 1]]).fetchone()
    assert row is not None and row[0] == count, f"loaded {row and row[0]} rows instead of {count}"
    assert np.allclose(row[1].to_numpy(), catalogue.vectors[count - 1]), "a vector came back different"


def _methods(stack: Stack, catalogue: Catalogue, counts: dict[str, int], rounds: int) -> dict[str, Any]:
    drop_hnsw_index(stack)
    timings: dict[str, list[float]] = {name: [] for name in LOADERS}
    with psycopg.connect(stack.bouncer_url(), **connection_kwargs(Settings())) as conn:
        register_vector(conn)
        for _ in range(rounds):
            for name, load in LOADERS.items():
                _truncate(stack)
                if name == "copy_text_preformatted":
                    _text_lines(catalogue, counts[name])
                started = time.perf_counter()
                load(conn, catalogue, counts[name])
                timings[name].append(time.perf_counter() - started)
                _check_loaded(stack, catalogue, counts[name])
                log.info("ingest: %s %d rows in %.2f s", name, counts[name], timings[name][-1])
    return {
        name: {"rows": counts[name], "seconds": [round(s, 3) for s in spent],
               "rows_per_s": round(counts[name] / min(spent), 0)}
        for name, spent in timings.items()
    }


def _index_order(stack: Stack, catalogue: Catalogue, count: int) -> dict[str, Any]:
    with psycopg.connect(stack.bouncer_url(), **connection_kwargs(Settings())) as conn:
        register_vector(conn)
        _truncate(stack)
        drop_hnsw_index(stack)
        started = time.perf_counter()
        copy_binary(conn, catalogue, count)
        loaded = time.perf_counter() - started
        indexed = build_hnsw_index(stack)
        then_index = {"copy_s": round(loaded, 2), "index_s": round(indexed, 2), "total_s": round(loaded + indexed, 2)}

        _truncate(stack)
        build_hnsw_index(stack)
        started = time.perf_counter()
        copy_binary(conn, catalogue, count)
        into_indexed = {"total_s": round(time.perf_counter() - started, 2)}
    return {"rows": count, "load_then_index": then_index, "load_into_indexed": into_indexed}


@dataclass(frozen=True)
class Workload:
    """The state before the writes (items at version 1, tombstones) and the writes themselves."""

    base: list[Item]
    tombstones: list[tuple[str, int]]
    writes: list[Item]
    part_items: int

    @property
    def parts(self) -> list[Part]:
        return [Part(self.writes[i:i + self.part_items], []) for i in range(0, len(self.writes), self.part_items)]

    @property
    def expected(self) -> tuple[int, int]:
        """(rows written, writes stale): the writes of tombstoned ids are stale."""
        stale = len({i.id for i in self.writes} & {t for t, _ in self.tombstones})
        return len(self.writes) - stale, stale


def _workload(n_base: int, n_writes: int, part_items: int, dim: int) -> Workload:
    """Half the writes replace base items, two fifths are new ids, a tenth hit tombstones."""
    base_catalogue = clustered_catalogue(n_base, dim, seed=11, id_prefix="item-")
    fresh = clustered_catalogue(n_writes, dim, seed=12, id_prefix="fresh-")
    base = [Item(i, base_catalogue.vectors[n], base_catalogue.categories[n], [], {"n": n}, version=1)
            for n, i in enumerate(base_catalogue.ids)]
    replaced, stale = n_writes // 2, n_writes // 10
    ids = base_catalogue.ids[:replaced] + [f"new-{n:06d}" for n in range(n_writes - replaced - stale)]
    ids += [f"gone-{n:06d}" for n in range(stale)]
    writes = [Item(item_id, fresh.vectors[n], fresh.categories[n], ["fresh"], {"n": n}, version=2)
              for n, item_id in enumerate(ids)]
    tombstones = [(f"gone-{n:06d}", 10**15) for n in range(stale)]
    # Interleaved as a producer's updates come: replacements, new ids and stale ones mixed.
    order = np.random.default_rng(13).permutation(len(writes))
    return Workload(base, tombstones, [writes[n] for n in order], part_items)


def _reset(stack: Stack, workload: Workload) -> None:
    """The same starting state for every run: the base items (indexed), the tombstones, no ledger."""
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        register_vector(conn)
        conn.execute("TRUNCATE items, item_tombstones, ingest_batches")
        drop_hnsw_index(stack)
        with conn.transaction(), conn.cursor() as cur, cur.copy(
            "COPY items (id, version, embedding, category, metadata) FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["text", "int8", "vector", "text", "jsonb"])
            for item in workload.base:
                copy.write_row((item.id, item.version, item.embedding, item.category, Jsonb(item.metadata)))
        with conn.cursor() as cur, cur.copy("COPY item_tombstones (id, version) FROM STDIN") as copy:
            for row in workload.tombstones:
                copy.write_row(row)
    build_hnsw_index(stack)
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) items, item_tombstones")
        conn.execute("CHECKPOINT")


def _check_state(stack: Stack, workload: Workload) -> None:
    """Both ways must leave the same catalogue: every write applied except the stale ones."""
    written, stale = workload.expected
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE version = 2), "
            "(SELECT count(*) FROM items i JOIN item_tombstones t USING (id)) FROM items"
        ).fetchone()
    new = len({i.id for i in workload.writes} - {i.id for i in workload.base}) - stale
    assert row == (len(workload.base) + new, written, 0), f"unexpected catalogue after the writes: {row}"


async def _database_run(url: str, workload: Workload, connections: int, dim: int) -> dict[str, Any]:
    """The loader's SQL (``apply_part``) for every part, from pre-built rows, ``connections`` at a time."""
    from pgvector.psycopg import register_vector_async

    from recsys.ingest.loader import apply_part

    queue: asyncio.Queue[Part] = asyncio.Queue()
    for part in workload.parts:
        queue.put_nowait(part)
    counts = [0, 0]
    spans: list[float] = []

    async def worker() -> None:
        async with await psycopg.AsyncConnection.connect(url, **connection_kwargs(Settings())) as conn:
            await register_vector_async(conn)
            while not queue.empty():
                part = queue.get_nowait()
                started = time.perf_counter()
                async with conn.transaction():
                    applied = await apply_part(conn, part, dim=dim, version=1)
                spans.append(time.perf_counter() - started)
                counts[0] += applied.rows
                counts[1] += applied.stale

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    assert tuple(counts) == workload.expected, f"database run wrote {counts}, expected {workload.expected}"
    return {"seconds": round(elapsed, 3), "items_per_s": round(len(workload.writes) / elapsed, 0),
            "part_seconds": [round(s, 3) for s in spans]}


async def _pipeline_run(stack: Stack, workload: Workload, batch_id: str, timeout: float) -> dict[str, Any]:
    """The project's producer -> Blob storage + queue -> the local host's loader; timed from the ledger."""
    from recsys.db.pool import close_pools
    from recsys.ingest.producer import enqueue_items

    try:
        started_wall, started = time.time(), time.perf_counter()
        enqueued = await enqueue_items(workload.writes, batch_id=batch_id, part_items=workload.part_items)
        sent_wall = time.time()
        producer_s = time.perf_counter() - started
    finally:
        await close_pools()
    deadline = time.monotonic() + timeout
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'loaded'), count(*) FILTER (WHERE status = 'failed'),"
                " sum(rows), sum(stale), extract(epoch FROM min(updated_at)), extract(epoch FROM max(loaded_at)),"
                " array_agg(extract(epoch FROM loaded_at - updated_at) ORDER BY part)"
                " FROM ingest_batches WHERE batch_id = %s",
                [batch_id],
            ).fetchone()
            assert row is not None
            if row[0] == enqueued.messages or row[1] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    loaded, failed, rows, stale, first_start, last_end, spans = row
    assert loaded == enqueued.messages and not failed, f"{loaded} of {enqueued.messages} parts loaded"
    assert (rows, stale) == workload.expected, f"pipeline wrote {(rows, stale)}, expected {workload.expected}"
    end_to_end = float(last_end) - started_wall
    queue_to_table = float(last_end) - sent_wall
    return {
        "messages": enqueued.messages, "blobs": enqueued.blobs,
        "producer_s": round(producer_s, 3),
        "until_first_load_s": round(float(first_start) - sent_wall, 3),
        "load_window_s": round(float(last_end) - float(first_start), 3),
        "queue_to_table_s": round(queue_to_table, 3),
        "end_to_end_s": round(end_to_end, 3),
        "queue_to_table_items_per_s": round(len(workload.writes) / queue_to_table, 0),
        "end_to_end_items_per_s": round(len(workload.writes) / end_to_end, 0),
        "part_seconds": [round(float(s), 3) for s in spans],
    }


def _pipeline_vs_database(stack: Stack, workload: Workload, rounds: int, timeout: float) -> dict[str, Any]:
    """Alternating runs of both ways from the same starting state; the best round of each."""
    env = stack.app_environment()
    connections = Settings().pool_max_size  # the loader's pool (and load slots) per worker
    dim = stack.config.embedding_dim
    database: list[dict[str, Any]] = []
    pipeline: list[dict[str, Any]] = []
    with app_environment(env), local_host(env, free_port()):
        for n in range(rounds):
            _reset(stack, workload)
            database.append(asyncio.run(_database_run(stack.bouncer_url(), workload, connections, dim)))
            _check_state(stack, workload)
            log.info("ingest: database round %d: %s", n, database[-1])
            _reset(stack, workload)
            pipeline.append(asyncio.run(_pipeline_run(stack, workload, f"bench-pipeline-{n}", timeout)))
            _check_state(stack, workload)
            log.info("ingest: pipeline round %d: %s", n, pipeline[-1])
    best_db = min(database, key=lambda r: r["seconds"])
    best_pipe = min(pipeline, key=lambda r: r["queue_to_table_s"])
    return {
        "base_items": len(workload.base), "writes": len(workload.writes), "tombstones": len(workload.tombstones),
        "expected_rows_stale": list(workload.expected), "part_items": workload.part_items,
        "connections": connections, "database": database, "pipeline": pipeline,
        "best_database": best_db, "best_pipeline": best_pipe,
        "ratio_queue_to_table": round(ratio(best_pipe["queue_to_table_items_per_s"], best_db["items_per_s"]), 3),
        "ratio_end_to_end": round(ratio(best_pipe["end_to_end_items_per_s"], best_db["items_per_s"]), 3),
    }


def run(options: BenchOptions) -> BenchResult:
    dim = 384
    copy_rows = options.size(50_000, 2_000)
    insert_rows = options.size(10_000, 500)
    index_rows = options.size(20_000, 1_000)
    rounds = options.size(2, 1)
    catalogue = clustered_catalogue(max(copy_rows, index_rows), dim, seed=3)
    counts = {name: copy_rows for name in LOADERS if name.startswith("copy")}
    counts.update({"executemany": insert_rows, "insert_per_row": insert_rows})
    with bench_stack(options, "ingest", embedding_dim=dim) as stack:
        servers = server_versions(stack)
        figures: dict[str, Any] = {"methods": _methods(stack, catalogue, counts, rounds)}
        figures["index_order"] = _index_order(stack, catalogue, index_rows)
        workload = _workload(options.size(20_000, 1_000), options.size(20_000, 1_000),
                             options.size(5_000, 250), dim)
        figures["pipeline_vs_database"] = _pipeline_vs_database(
            stack, workload, rounds=options.size(2, 1), timeout=options.size(600, 120)
        )
    methods = figures["methods"]
    binary, text, many = (methods[n]["rows_per_s"] for n in ("copy_binary", "copy_text", "executemany"))
    text_server, per_row = methods["copy_text_preformatted"]["rows_per_s"], methods["insert_per_row"]["rows_per_s"]
    bulk = methods["copy_binary_bulk"]["rows_per_s"]
    order = figures["index_order"]
    index_speedup = ratio(order["load_into_indexed"]["total_s"], order["load_then_index"]["total_s"])
    figures["binary_vs_executemany"] = round(ratio(binary, many), 2)
    figures["binary_vs_text"] = round(ratio(binary, text), 2)
    figures["load_then_index_speedup"] = round(index_speedup, 2)
    side = figures["pipeline_vs_database"]
    pipe, db = side["best_pipeline"], side["best_database"]
    headlines = [
        Headline(f"binary COPY ÷ executemany INSERT, rows/s ({binary:,.0f} vs {many:,.0f})",
                 round(ratio(binary, many), 1), "×", "≥ 20×", ratio(binary, many) >= 20),
        Headline(f"binary COPY ÷ text COPY, rows/s (text: {text:,.0f})", round(ratio(binary, text), 1), "×", "≥ 3×",
                 ratio(binary, text) >= 3),
        Headline(f"binary COPY built in bulk with numpy ({bulk:,.0f} rows/s) ÷ executemany INSERT",
                 round(ratio(bulk, many), 1), "×"),
        Headline(f"binary COPY ÷ text COPY of lines formatted beforehand ({text_server:,.0f} rows/s)",
                 round(ratio(binary, text_server), 1), "×"),
        Headline(f"binary COPY ÷ one INSERT per row ({per_row:,.0f} rows/s)", round(ratio(binary, per_row), 1), "×"),
        Headline(f"write path, queue to table ÷ the database's own rate for the same {side['writes']:,} versioned "
                 f"upserts ({pipe['queue_to_table_items_per_s']:,.0f} vs {db['items_per_s']:,.0f} items/s)",
                 side["ratio_queue_to_table"], "×", "≥ 0.8×", side["ratio_queue_to_table"] >= 0.8),
        Headline("write path: from the queue to the first part's transaction (queue polling up to "
                 "maxPollingInterval, blob download, parsing)", pipe["until_first_load_s"], "s"),
        Headline(f"write path including the producer (encode, blob upload, send): "
                 f"{pipe['end_to_end_items_per_s']:,.0f} items/s ÷ the database's own rate",
                 side["ratio_end_to_end"], "×"),
        Headline(f"load into indexed table ÷ load then index, total time ({order['rows']:,} rows)",
                 round(index_speedup, 1), "×"),
    ]
    return BenchResult(
        name="ingest",
        title=TITLE,
        inputs={
            "dim": dim, "rows": counts, "rounds": rounds, "index_rows": index_rows,
            "path": "PgBouncer, one transaction per load",
            "statements": {"copy_binary": COPY_BINARY, "copy_text": COPY_TEXT, "executemany": INSERT,
                           "insert_per_row": INSERT},
            "hnsw": {**HNSW_BUILD, "maintenance_work_mem": "1GB", "parallel_workers": 2},
            "pipeline_vs_database": {
                "base_items": side["base_items"], "writes": side["writes"], "tombstones": side["tombstones"],
                "part_items": side["part_items"], "connections": side["connections"],
                "writes_mix": "1/2 replace base items (version 1 -> 2), 2/5 new ids, 1/10 ids with a newer tombstone",
            },
        },
        figures=figures,
        headlines=headlines,
        servers=servers,
        notes=[
            "rows/s is the best of the rounds",
            "psycopg 3 sends executemany as a pipeline with binary parameters: not one round trip per row",
            "copy_text formats each vector as text in Python (pgvector's text dumper) while copying",
            "copy_binary uses psycopg's write_row (per-row adaptation); copy_binary_bulk builds the stream with numpy",
            "pipeline vs database: the database's own rate runs the loader's SQL (apply_part: binary COPY into "
            "staging, version- and tombstone-checked upsert) from rows built beforehand, over as many connections "
            "as the loader's pool; the pipeline is timed from the moment its messages are in the queue to the "
            "commit of its last part (ledger loaded_at); both start from the same indexed table and tombstones",
            "pipeline time split: producer_s (before the queue), until_first_load_s (queue polling, blob "
            "download, JSON parsing of the first part), load_window_s (first part's transaction start to the "
            "last commit); part_seconds are each part's time inside its database transaction",
        ],
    )
