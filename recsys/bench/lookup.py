"""Benchmark 2: one ``= ANY`` query for 500 ids vs 500 single-id queries.

Both are the service's own calls (``lookup_items`` once, ``get_item`` 500 times) over the same
connection of the app's pool through PgBouncer; what differs is the number of round trips and
statements (1 vs 500). Measured without and with the vectors in the answer.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from typing import Any

import psycopg

from recsys.bench.harness import BenchOptions, Deadline, bench_stack, load_catalogue, server_versions
from recsys.bench.results import BenchResult, Headline
from recsys.bench.stats import ratio, summarize
from recsys.config import Settings
from recsys.datasets import clustered_catalogue
from recsys.db.pool import close_pools, get_pool
from recsys.search import queries
from recsys.search.service import get_item, lookup_items

__all__ = ["run"]

TITLE = "one ANY query vs single-id queries"
TIMEOUT_MS = 5000


async def _one_query(conn: psycopg.AsyncConnection[Any], ids: list[str], include_vector: bool) -> int:
    answer = await lookup_items(conn, ids, include_vector=include_vector, timeout_ms=TIMEOUT_MS)
    return len(answer["items"])


async def _many_queries(conn: psycopg.AsyncConnection[Any], ids: list[str], include_vector: bool) -> int:
    for item_id in ids:
        await get_item(conn, item_id, include_vector=include_vector, timeout_ms=TIMEOUT_MS)
    return len(ids)


async def _run(url: str, ids: list[str], batch: int, repeats: int, seconds: float) -> dict[str, Any]:
    pool = await get_pool("bench-lookup", replace(Settings(), database_url=url, pool_min_size=1, pool_max_size=1))
    timings: dict[str, list[float]] = {"any": [], "single": [], "any_with_vectors": [], "single_with_vectors": []}
    rng = random.Random(7)
    deadline = Deadline(seconds)
    try:
        async with pool.connection() as conn:
            for repeat in range(repeats + 1):
                if repeat and not deadline:
                    break
                wanted = rng.sample(ids, batch)
                for variant, call, include_vector in (
                    ("any", _one_query, False),
                    ("single", _many_queries, False),
                    ("any_with_vectors", _one_query, True),
                    ("single_with_vectors", _many_queries, True),
                ):
                    started = time.perf_counter()
                    found = await call(conn, wanted, include_vector)
                    elapsed = time.perf_counter() - started
                    assert found == batch, f"{variant} found {found} of {batch}"
                    if repeat:  # the first round warms caches
                        timings[variant].append(elapsed)
    finally:
        await close_pools()
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
            "path": "PgBouncer (transaction mode), one connection of the app's pool",
            "any": "recsys.search.service.lookup_items: " + queries.TIMEOUT_PREFIX + queries.LOOKUP_ITEMS,
            "single": "recsys.search.service.get_item: " + queries.TIMEOUT_PREFIX + queries.GET_ITEM,
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
