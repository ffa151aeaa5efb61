"""Benchmark 3: how fast embeddings get into the catalogue.

- Row-loading methods into the items table without its HNSW index, through PgBouncer as the
  loader connects: binary COPY, text COPY and ``executemany`` INSERT (psycopg batches it in a
  pipeline), each in one transaction.
- Index order: loading then building the HNSW index, vs loading into the indexed table.
- End to end: batches enqueued with the project's producer, loaded by the queue-triggered loader
  run by the local host, until the last row is in the table.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from recsys.bench.harness import (
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


async def _enqueue_and_wait(items: list[Any], batch_id: str, part_items: int, timeout: float) -> dict[str, Any]:
    from recsys.db.pool import close_pools
    from recsys.ingest.demo import wait_for_batches
    from recsys.ingest.producer import enqueue_items

    try:
        started = time.perf_counter()
        enqueued = await enqueue_items(items, batch_id=batch_id, part_items=part_items)
        sent = time.perf_counter() - started
        statuses = await wait_for_batches([batch_id], timeout=timeout, interval=0.2)
        elapsed = time.perf_counter() - started
    finally:
        await close_pools()
    rows = sum(s.rows for s in statuses)
    assert rows == len(items), f"loaded {rows} of {len(items)} items"
    return {
        "items": len(items), "messages": enqueued.messages, "blobs": enqueued.blobs, "part_items": part_items,
        "enqueue_s": round(sent, 2), "total_s": round(elapsed, 2), "items_per_s": round(len(items) / elapsed, 0),
    }


def _end_to_end(stack: Stack, runs: dict[str, tuple[int, int]], timeout: float) -> dict[str, Any]:
    """Enqueue with the project's producer, load with the host's queue-triggered loader; items/s."""
    from recsys.ingest.demo import demo_items

    figures: dict[str, Any] = {}
    env = stack.app_environment()
    with app_environment(env), local_host(env, free_port()):
        for name, (count, part_items) in runs.items():
            items = demo_items(count, stack.config.embedding_dim, seed=9, prefix=f"{name}-")
            figures[name] = asyncio.run(_enqueue_and_wait(items, f"bench-{name}", part_items, timeout))
            log.info("ingest: end to end %s: %s", name, figures[name])
    return figures


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
        _truncate(stack)
        end_to_end = {
            # The project's default: parts of 5,000 items, each a blob behind one message.
            "claim_check": (options.size(20_000, 1_000), 5_000),
            # Parts small enough to travel inside the queue message (64 KiB).
            "inline": (options.size(2_000, 100), 20),
        }
        figures["end_to_end"] = _end_to_end(stack, end_to_end, timeout=options.size(600, 120))
    methods = figures["methods"]
    binary, text, many = (methods[n]["rows_per_s"] for n in ("copy_binary", "copy_text", "executemany"))
    text_server, per_row = methods["copy_text_preformatted"]["rows_per_s"], methods["insert_per_row"]["rows_per_s"]
    bulk = methods["copy_binary_bulk"]["rows_per_s"]
    order = figures["index_order"]
    index_speedup = ratio(order["load_into_indexed"]["total_s"], order["load_then_index"]["total_s"])
    figures["binary_vs_executemany"] = round(ratio(binary, many), 2)
    figures["binary_vs_text"] = round(ratio(binary, text), 2)
    figures["load_then_index_speedup"] = round(index_speedup, 2)
    e2e = figures["end_to_end"]
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
        Headline(f"end to end, queue to table, {e2e['claim_check']['items']:,} items in parts of "
                 f"{e2e['claim_check']['part_items']:,} through Blob storage", e2e["claim_check"]["items_per_s"],
                 "items/s"),
        Headline(f"end to end, {e2e['inline']['items']:,} items in inline messages of "
                 f"{e2e['inline']['part_items']} items", e2e["inline"]["items_per_s"], "items/s"),
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
            "hnsw": {"m": 16, "ef_construction": 64, "maintenance_work_mem": "1GB", "parallel_workers": 2},
        },
        figures=figures,
        headlines=headlines,
        servers=servers,
        notes=[
            "rows/s is the best of the rounds",
            "psycopg 3 sends executemany as a pipeline with binary parameters: not one round trip per row",
            "copy_text formats each vector as text in Python (pgvector's text dumper) while copying",
            "copy_binary uses psycopg's write_row (per-row adaptation); copy_binary_bulk builds the stream with numpy",
        ],
    )
