"""Benchmark 4: recall@10 and latency per ``ef_search``, next to the exact scan; filtered queries.

Ground truth is computed with numpy (exact cosine over the whole catalogue, the query item
excluded). Queries run one after another on one connection through PgBouncer: the project's
query path (``similar_items``), and next to it plain HNSW (a function that applies the settings
transaction-locally, with or without pgvector 0.8's iterative scan) and the exact scan. The
plain HNSW variants keep the planner on the index under a filter (the category test is written
so that the category index cannot answer it), to show what the index alone does there.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg

from recsys.bench.harness import HNSW_BUILD, BenchOptions, Deadline, bench_stack, load_catalogue, server_versions
from recsys.bench.plots import line_plot
from recsys.bench.results import BenchResult, Headline
from recsys.bench.stats import ratio, recall_at_k, summarize
from recsys.config import Settings
from recsys.datasets import CATEGORIES, Catalogue, clustered_catalogue
from recsys.db.pool import configure_connection, connection_kwargs
from recsys.search.params import SimilarQuery
from recsys.search.service import similar_items

__all__ = ["ground_truth", "run"]

TITLE = "recall against latency per ef_search"
K = 10
LADDER = (10, 20, 40, 80, 160, 320)
#: ef_search of the filtered comparison (pgvector's default).
FILTER_EF = 40

# enable_seqscan off: the HNSW index, not a scan of the table, answers the filtered query;
# `category || ''` keeps the planner from using the category's B-tree index instead.
FUNCTIONS = """
CREATE OR REPLACE FUNCTION bench_hnsw(query_id text, k int, ef int, cat text, iterative text)
RETURNS TABLE (id text) LANGUAGE plpgsql AS $$
DECLARE
    q vector;
BEGIN
    PERFORM set_config('hnsw.ef_search', ef::text, true);
    PERFORM set_config('hnsw.iterative_scan', iterative, true);
    PERFORM set_config('enable_seqscan', 'off', true);
    SELECT i.embedding INTO q FROM items i WHERE i.id = query_id;
    RETURN QUERY
        SELECT i.id FROM items i
        WHERE i.id <> query_id AND (cat IS NULL OR i.category || '' = cat)
        ORDER BY i.embedding <=> q LIMIT k;
END $$;

CREATE OR REPLACE FUNCTION bench_exact(query_id text, k int, cat text)
RETURNS TABLE (id text) LANGUAGE plpgsql AS $$
DECLARE
    q vector;
BEGIN
    PERFORM set_config('enable_indexscan', 'off', true);
    PERFORM set_config('enable_bitmapscan', 'off', true);
    SELECT i.embedding INTO q FROM items i WHERE i.id = query_id;
    RETURN QUERY
        SELECT i.id FROM items i
        WHERE i.id <> query_id AND (cat IS NULL OR i.category = cat)
        ORDER BY i.embedding <=> q, i.id LIMIT k;
END $$;
"""
HNSW_SQL = "SELECT id FROM bench_hnsw(%(id)s, %(k)s, %(ef)s, %(cat)s, %(iterative)s)"
EXACT_SQL = "SELECT id FROM bench_exact(%(id)s, %(k)s, %(cat)s)"


def ground_truth(catalogue: Catalogue, query_ids: list[str], category: str | None, k: int) -> list[list[str]]:
    """Exact top-``k`` by cosine (unit vectors: dot product), query item excluded, with numpy."""
    position = {item: i for i, item in enumerate(catalogue.ids)}
    vectors: npt.NDArray[np.float32] = catalogue.vectors
    allowed = np.ones(len(catalogue.ids), dtype=bool)
    if category is not None:
        allowed = np.asarray([c == category for c in catalogue.categories])
    truth = []
    for item in query_ids:
        scores = vectors @ vectors[position[item]]
        scores[~allowed] = -np.inf
        scores[position[item]] = -np.inf
        top = np.argpartition(-scores, k)[:k]
        truth.append([catalogue.ids[i] for i in top[np.argsort(-scores[top], kind="stable")]])
    return truth


async def _timed(
    query_ids: list[str], deadline: Deadline, search: Callable[[str], Awaitable[list[str]]]
) -> tuple[list[list[str]], list[float]]:
    """The ids ``search`` finds for each query item, and how long each search took."""
    found: list[list[str]] = []
    latencies: list[float] = []
    for item in query_ids:
        if not deadline:
            raise TimeoutError("the recall benchmark ran out of time; use fewer queries")
        started = time.perf_counter()
        ids = await search(item)
        latencies.append(time.perf_counter() - started)
        found.append(ids)
    return found, latencies


async def _series(conn: psycopg.AsyncConnection[Any], statement: str, params: dict[str, Any], query_ids: list[str],
                  deadline: Deadline) -> tuple[list[list[str]], list[float]]:
    async def search(item: str) -> list[str]:
        rows = await (await conn.execute(statement, {**params, "id": item})).fetchall()
        return [r[0] for r in rows]

    return await _timed(query_ids, deadline, search)


async def _service_series(conn: psycopg.AsyncConnection[Any], query: SimilarQuery, query_ids: list[str],
                          deadline: Deadline) -> tuple[list[list[str]], list[float]]:
    """The project's query path (``similar_items``) for each query item."""
    async def search(item: str) -> list[str]:
        answer = await similar_items(conn, item, query, timeout_ms=30_000)
        return [r["id"] for r in answer["results"]]

    return await _timed(query_ids, deadline, search)


def _figures(found: list[list[str]], latencies: list[float], truth: list[list[str]]) -> dict[str, Any]:
    return {
        "recall": round(recall_at_k(found, truth, K), 4),
        "mean_results": round(sum(map(len, found)) / len(found), 2),
        **summarize(latencies),
    }


async def _run(url: str, catalogue: Catalogue, query_ids: list[str], filters: dict[str, str | None],
               seconds: float) -> dict[str, Any]:
    conn = await psycopg.AsyncConnection.connect(url, **connection_kwargs(Settings()))
    await configure_connection(conn)
    deadline = Deadline(seconds)
    figures: dict[str, Any] = {}
    try:
        await _series(conn, EXACT_SQL, {"k": K, "cat": None}, query_ids[:5], deadline)  # warm the cache
        for name, category in filters.items():
            truth = ground_truth(catalogue, query_ids, category, K)
            found, latencies = await _series(conn, EXACT_SQL, {"k": K, "cat": category}, query_ids, deadline)
            figures[f"{name}/exact"] = _figures(found, latencies, truth)
            ladder = LADDER if category is None else (FILTER_EF,)
            for ef in ladder:
                query = SimilarQuery(k=K, ef_search=ef, categories=(category,) if category else None)
                found, latencies = await _service_series(conn, query, query_ids, deadline)
                figures[f"{name}/service/{ef}"] = _figures(found, latencies, truth)
            for mode in ("off",) if category is None else ("off", "relaxed_order"):
                for ef in ladder:
                    params = {"k": K, "ef": ef, "cat": category, "iterative": mode}
                    found, latencies = await _series(conn, HNSW_SQL, params, query_ids, deadline)
                    figures[f"{name}/hnsw/{mode}/{ef}"] = _figures(found, latencies, truth)
    finally:
        await conn.close()
    return figures


def run(options: BenchOptions) -> BenchResult:
    items = options.size(30_000, 3_000)
    dim = options.size(384, 64)
    queries = options.size(200, 20)
    seconds = options.size(600, 60)
    # One category holds 10% of the catalogue, another 1%: the two filter selectivities.
    weights = (0.10, 0.01, *([0.89 / (len(CATEGORIES) - 2)] * (len(CATEGORIES) - 2)))
    catalogue = clustered_catalogue(items, dim, seed=4, category_weights=weights)
    filters: dict[str, str | None] = {"unfiltered": None, "filter_10pct": CATEGORIES[0], "filter_1pct": CATEGORIES[1]}
    query_ids = random.Random(4).sample(catalogue.ids, queries)
    with bench_stack(options, "recall", embedding_dim=dim) as stack:
        loaded = load_catalogue(stack, catalogue)
        with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
            conn.execute(FUNCTIONS)
        servers = server_versions(stack)
        figures = asyncio.run(_run(stack.bouncer_url(), catalogue, query_ids, filters, seconds))
    figures["load"] = loaded

    exact = figures["unfiltered/exact"]
    curve = [(ef, figures[f"unfiltered/service/{ef}"]) for ef in LADDER]
    plain = [(ef, figures[f"unfiltered/hnsw/off/{ef}"]) for ef in LADDER]
    reaching = [(ef, point) for ef, point in curve if point["recall"] >= 0.95]
    plot = "recall.png"
    line_plot(
        options.out_dir / plot,
        {
            "query path (similar_items)": ([p["p50_ms"] for _, p in curve], [p["recall"] for _, p in curve]),
            "HNSW without iterative scan": ([p["p50_ms"] for _, p in plain], [p["recall"] for _, p in plain]),
            "exact scan": ([exact["p50_ms"]], [exact["recall"]]),
        },
        annotations={"query path (similar_items)": [f"ef={ef}" for ef, _ in curve]},
        title=f"recall@{K} vs p50 latency, {items:,} × {dim}", xlabel="p50 latency per query (ms)",
        ylabel=f"recall@{K}", logx=True,
    )
    headlines = []
    if reaching:
        ef, point = reaching[0]
        share = ratio(point["p50_ms"], exact["p50_ms"])
        figures["smallest_ef_search_for_0.95"] = ef
        headlines += [
            Headline(f"p50 at ef_search {ef} (smallest with recall@10 ≥ 0.95: {point['recall']}) ÷ exact scan "
                     f"p50 ({point['p50_ms']} ms vs {exact['p50_ms']} ms)", round(100 * share, 1), "%", "≤ 10%",
                     share <= 0.10),
        ]
    else:
        headlines.append(Headline("no ef_search of the ladder reached recall@10 ≥ 0.95", None, "", "≤ 10%", False))
    headlines += [Headline(f"recall@10 at ef_search {ef}", point["recall"], "") for ef, point in curve[:1]]
    for name, label in (("filter_10pct", "10%"), ("filter_1pct", "1%")):
        off = figures[f"{name}/hnsw/off/{FILTER_EF}"]
        on = figures[f"{name}/hnsw/relaxed_order/{FILTER_EF}"]
        project = figures[f"{name}/service/{FILTER_EF}"]
        headlines += [
            Headline(f"filter {label}, ef_search {FILTER_EF}: recall@10 with iterative scan "
                     f"(without: {off['recall']}, {off['mean_results']} results per query)", on["recall"], ""),
            Headline(f"filter {label}: recall@10 of the query path ({project['mean_results']} results per query, "
                     f"p50 {project['p50_ms']} ms)", project["recall"], ""),
        ]
    return BenchResult(
        name="recall",
        title=TITLE,
        inputs={
            "catalogue_items": items, "dim": dim, "queries": queries, "k": K, "ladder": list(LADDER),
            "filter_ef_search": FILTER_EF, "filters": filters, "catalogue": "clustered_catalogue(seed=4)",
            "hnsw": HNSW_BUILD, "hnsw_sql": HNSW_SQL, "exact_sql": EXACT_SQL,
            "service": "recsys.search.service.similar_items (recsys_query: index or exact scan by cost)",
            "functions": FUNCTIONS.strip(),
        },
        figures=figures,
        headlines=headlines,
        plots=[plot],
        servers=servers,
    )

