"""Benchmark 7: round trips of the similar query, with a delaying proxy in front of PgBouncer.

On Azure the function and the database are a network hop apart; every round trip costs that
hop. A proxy adds ``delay`` each way (one round trip = 2 × delay more); the latency each query
path adds over the undelayed path, divided by the measured cost of one round trip (``SELECT 1``
with and without the proxy), is the number of round trips the path makes.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from recsys.bench.harness import BenchOptions, Deadline, bench_stack, load_catalogue, server_versions
from recsys.bench.proxy import delaying_proxy
from recsys.bench.results import BenchResult, Headline
from recsys.bench.stats import percentile, ratio, summarize
from recsys.config import Settings
from recsys.datasets import clustered_catalogue
from recsys.db.pool import close_pools, configure_connection, connection_kwargs, get_pool
from recsys.search import queries
from recsys.search.params import SimilarQuery
from recsys.search.service import similar_items

__all__ = ["run"]

TITLE = "round trips of the similar query"
K = 10
EF_SEARCH = 40
TIMEOUT_MS = 5000

#: The naive path: four statements, four round trips.
NAIVE_SET = "SET LOCAL hnsw.ef_search = 40"
NAIVE_SELECT = """
WITH q AS (SELECT embedding FROM items WHERE id = %(id)s)
SELECT i.id, 1 - (i.embedding <=> (SELECT embedding FROM q)) AS score
FROM items i
WHERE i.id <> %(id)s
ORDER BY i.embedding <=> (SELECT embedding FROM q)
LIMIT %(k)s
"""

@dataclass
class Route:
    """One way to the database: a connection, and the app's pool (``recsys.db.pool``)."""

    conn: psycopg.AsyncConnection[Any]
    pool: AsyncConnectionPool


Path = Callable[[Route, str], Awaitable[int]]
QUERY = SimilarQuery(k=K, ef_search=EF_SEARCH)


async def select_one(route: Route, item_id: str) -> int:
    await (await route.conn.execute("SELECT 1")).fetchall()
    return 1


async def one_statement(route: Route, item_id: str) -> int:
    """The project's query path (``recsys.search.service.similar_items``) on one connection."""
    answer = await similar_items(route.conn, item_id, QUERY, timeout_ms=TIMEOUT_MS)
    return len(answer["results"])


async def naive(route: Route, item_id: str) -> int:
    async with route.conn.transaction():
        await route.conn.execute(NAIVE_SET)
        rows = await (await route.conn.execute(NAIVE_SELECT, {"id": item_id, "k": K})).fetchall()
    return len(rows)


async def service(route: Route, item_id: str) -> int:
    """The same behind the app's pool, which checks a connection idle for more than a second."""
    answer = await similar_items(route.pool, item_id, QUERY, timeout_ms=TIMEOUT_MS)
    return len(answer["results"])


PATHS: dict[str, Path] = {
    "select_1": select_one,
    "one_statement": one_statement,
    "naive": naive,
    "service_over_app_pool": service,
}


async def _route(name: str, url: str) -> Route:
    settings = replace(Settings(), database_url=url, pool_min_size=1, pool_max_size=1)
    conn = await psycopg.AsyncConnection.connect(url, **connection_kwargs(settings))
    await configure_connection(conn)
    pool = await get_pool(f"bench-{name}", settings)
    await pool.wait(timeout=30)
    return Route(conn, pool)


async def _run(urls: dict[str, str], ids: list[str], count: int, seconds: float) -> dict[str, list[float]]:
    routes = {name: await _route(name, url) for name, url in urls.items()}
    samples: dict[str, list[float]] = {f"{name}/{path}": [] for name in routes for path in PATHS}
    rng = random.Random(3)
    deadline = Deadline(seconds)
    try:
        for i in range(count + 20):
            if not deadline:
                break
            item_id = rng.choice(ids)
            # Every path on every route for the same item, in turn: background noise hits all alike.
            for route_name, route in routes.items():
                for name, path in PATHS.items():
                    started = time.perf_counter()
                    found = await path(route, item_id)
                    elapsed = time.perf_counter() - started
                    assert found > 0
                    if i >= 20:  # warm-up
                        samples[f"{route_name}/{name}"].append(elapsed)
    finally:
        for route in routes.values():
            await route.conn.close()
        await close_pools()
    return samples


def run(options: BenchOptions) -> BenchResult:
    items = options.size(10_000, 1_000)
    dim = options.size(384, 64)
    count = options.size(400, 30)
    seconds = options.size(120, 20)
    delay_ms = 1.0
    catalogue = clustered_catalogue(items, dim, seed=7)
    with bench_stack(options, "roundtrips", embedding_dim=dim) as stack:
        load_catalogue(stack, catalogue)
        servers = server_versions(stack)
        with delaying_proxy(stack.config.host, stack.config.bouncer_port, delay_ms / 1000) as port:
            urls = {"pgbouncer": stack.bouncer_url(), "delayed": stack.bouncer_url().replace(
                f":{stack.config.bouncer_port}/", f":{port}/")}
            samples = asyncio.run(_run(urls, catalogue.ids, count, seconds))

    figures: dict[str, Any] = {key: summarize(values) for key, values in samples.items()}
    rtt = percentile(samples["delayed/select_1"], 50) - percentile(samples["pgbouncer/select_1"], 50)
    figures["round_trip_ms"] = round(rtt * 1000, 3)
    added: dict[str, float] = {}
    for name in [p for p in PATHS if p != "select_1"]:
        extra = percentile(samples[f"delayed/{name}"], 50) - percentile(samples[f"pgbouncer/{name}"], 50)
        added[name] = ratio(extra, rtt)
        figures[f"{name}/added_ms"] = round(extra * 1000, 3)
        figures[f"{name}/added_round_trips"] = round(added[name], 2)
    return BenchResult(
        name="roundtrips",
        title=TITLE,
        inputs={
            "catalogue_items": items, "dim": dim, "k": K, "ef_search": EF_SEARCH, "delay_each_way_ms": delay_ms,
            "requests_per_path": count,
            "one_statement": "recsys.search.service.similar_items: " + queries.TIMEOUT_PREFIX + queries.SEARCH,
            "naive": ["BEGIN", NAIVE_SET, NAIVE_SELECT.strip(), "COMMIT"],
        },
        figures=figures,
        headlines=[
            Headline(f"round trips added by the one-statement path (1 RTT = {figures['round_trip_ms']} ms)",
                     round(added["one_statement"], 2), "RTT", "≤ 1.2", added["one_statement"] <= 1.2),
            Headline("round trips added by BEGIN / SET LOCAL / SELECT / COMMIT", round(added["naive"], 2), "RTT",
                     "~4", abs(added["naive"] - 4) <= 0.75),
            Headline("round trips added by the service over the app's pool",
                     round(added["service_over_app_pool"], 2), "RTT"),
            Headline("p50 with 1 ms each way: one statement",
                     figures["delayed/one_statement"]["p50_ms"], "ms"),
            Headline("p50 with 1 ms each way: naive", figures["delayed/naive"]["p50_ms"], "ms"),
        ],
        servers=servers,
    )
