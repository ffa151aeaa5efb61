"""Benchmark 2: one ``= ANY`` query for 500 ids vs 500 single-id queries.

Both run over the same pooled connection through PgBouncer; what differs is the number of
round trips and statements (1 vs 500). Measured without and with the vectors in the answer.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from psycopg_pool import AsyncConnectionPool

from recsys.bench.harness import BenchOptions, Deadline, bench_stack, load_catalogue, server_versions
from recsys.bench.results import BenchResult, Headline
from recsys.bench.stats import ratio, summarize
from recsys.config import Settings
from recsys.datasets import clustered_catalogue
from recsys.db.pool import configure_connection, connection_kwargs

__all__ = ["run"]

TITLE = "one ANY query vs single-id queries"
COLUMNS = "id, category, tags, metadata, updated_at"
ANY_SQL = f"SELECT {COLUMNS} FROM items WHERE id = ANY(%s)"
ONE_SQL = f"SELECT {COLUMNS} FROM items WHERE id = %s"
ANY_VECTOR_SQL = f"SELECT {COLUMNS}, embedding FROM items WHERE id = ANY(%s)"
ONE_VECTOR_SQL = f"SELECT {COLUMNS}, embedding FROM items WHERE id = %s"


async def _one_query(pool: AsyncConnectionPool, statement: str, ids: list[str]) -> int:
    async with pool.connection() as conn:
        rows = await (await conn.execute(statement, [ids])).fetchall()
    return len(rows)


async def _many_queries(pool: AsyncConnectionPool, statement: str, ids: list[str]) -> int:
    found = 0
    async with pool.connection() as conn:
        for item_id in ids:
            found += len(await (await conn.execute(statement, [item_id])).fetchall())
    return found


async def _run(url: str, ids: list[str], batch: int, repeats: int, seconds: float) -> dict[str, Any]:
    pool = AsyncConnectionPool(url, kwargs=connection_kwargs(Settings()), min_size=1, max_size=1,
                               configure=configure_connection, open=False)
    await pool.open(wait=True, timeout=30)
    timings: dict[str, list[float]] = {"any": [], "single": [], "any_with_vectors": [], "single_with_vectors": []}
    rng = random.Random(7)
    deadline = Deadline(seconds)
    try:
        for repeat in range(repeats + 1):
            if repeat and not deadline:
                break
            wanted = rng.sample(ids, batch)
            for variant, call, statement in (
                ("any", _one_query, ANY_SQL),
                ("single", _many_queries, ONE_SQL),
                ("any_with_vectors", _one_query, ANY_VECTOR_SQL),
                ("single_with_vectors", _many_queries, ONE_VECTOR_SQL),
            ):
                started = time.perf_counter()
                found = await call(pool, statement, wanted)
                elapsed = time.perf_counter() - started
                assert found == batch, f"{variant} found {found} of {batch}"
                if repeat:  # the first round warms caches
                    timings[variant].append(elapsed)
    finally:
        await pool.close()
    return {variant: summarize(values) for variant, values in timings.items()}


def run(options: BenchOptions) -> BenchResult:
    items = options.size(20_000, 2_000)
    dim = 384
    batch = 500
    repeats = options.size(30, 3)
    seconds = options.size(120, 20)
    catalogue = clustered_catalogue(items, dim, seed=2)
    with bench_stack(options, "lookup", embedding_dim=dim) as stack:
        load_catalogue(stack, catalogue, index=False)
        servers = server_versions(stack)
        figures = asyncio.run(_run(stack.bouncer_url(), catalogue.ids, batch, repeats, seconds))
    speedup = ratio(figures["single"]["p50_ms"], figures["any"]["p50_ms"])
    speedup_vectors = ratio(figures["single_with_vectors"]["p50_ms"], figures["any_with_vectors"]["p50_ms"])
    figures["single_vs_any_p50"] = round(speedup, 2)
    figures["single_vs_any_p50_with_vectors"] = round(speedup_vectors, 2)
    return BenchResult(
        name="lookup",
        title=TITLE,
        inputs={
            "catalogue_items": items, "dim": dim, "ids_per_lookup": batch, "repeats": repeats,
            "path": "PgBouncer (transaction mode), one pooled connection", "any_sql": ANY_SQL, "single_sql": ONE_SQL,
        },
        figures=figures,
        headlines=[
            Headline(f"500 single queries ÷ one ANY query, p50 time (ANY: {figures['any']['p50_ms']} ms)",
                     round(speedup, 1), "×", "≥ 20×", speedup >= 20),
            Headline("same, with vectors in the answer", round(speedup_vectors, 1), "×"),
            Headline("p50 of 500 single queries", figures["single"]["p50_ms"], "ms"),
        ],
        servers=servers,
    )
