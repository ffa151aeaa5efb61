"""Benchmark: lost searches, HNSW builds of clustered catalogues at two ``ef_construction``.

An HNSW search can fail whole: the greedy descent through the graph's upper layers ends in
another cluster, and the search at ``ef_search`` returns that cluster's items, none of the query's
neighbours. How often depends on the build (its levels are drawn at random) and on how far apart
the catalogue's clusters lie. For each catalogue the items are loaded once, then the index is
built again and again, ``ef_construction`` 64 (pgvector's default) and 128 (the service's) in
turn, and every ``stride``-th item asks, in SQL on one connection, for the ten nearest to its own
vector, against numpy's exact answer (the item itself left out): recall@10, and how many searches
found fewer than half of the ten.

The catalogues are those of the tests (ten wide clusters) and of ``bench filters`` (100 clusters).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
import psycopg

from recsys.bench.harness import BenchOptions, bench_stack, build_hnsw_index, load_catalogue, server_versions
from recsys.bench.recall import ground_truth
from recsys.bench.results import BenchResult, Headline
from recsys.config import DEFAULT_HNSW_EF_CONSTRUCTION, DEFAULT_HNSW_M
from recsys.datasets import Catalogue, clustered_catalogue

__all__ = ["LOST_BELOW", "lost_searches", "run", "search_recalls"]

TITLE = "lost searches: HNSW builds of clustered catalogues at two ef_construction"
K = 10
M = DEFAULT_HNSW_M
EF_CONSTRUCTIONS = (64, DEFAULT_HNSW_EF_CONSTRUCTION)
EF_SEARCHES = (40, 100)
#: A search that finds fewer than this share of the ten nearest is counted as lost.
LOST_BELOW = 0.5
SEARCH = "SELECT id FROM items ORDER BY embedding <=> (SELECT embedding FROM items WHERE id = %s) LIMIT %s"


def search_recalls(conn: psycopg.Connection[Any], query_ids: Sequence[str], truth: Sequence[set[str]],
                   ef_search: int) -> list[float]:
    """Recall@10 of the index's search at ``ef_search`` for each item of ``query_ids``: its own
    vector asked, the item left out, against ``truth`` (each item's ten nearest ids)."""
    recalls = []
    with conn.transaction():
        conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", [str(ef_search)])
        for item, nearest in zip(query_ids, truth, strict=True):
            rows = conn.execute(SEARCH, [item, K + 1]).fetchall()
            found = [r[0] for r in rows if r[0] != item][:K]
            recalls.append(len(nearest.intersection(found)) / K)
    return recalls


def lost_searches(conn: psycopg.Connection[Any], query_ids: list[str], truth: list[set[str]],
                  ef_search: int) -> dict[str, Any]:
    """Mean recall@10 of ``search_recalls``, and how many searches found fewer than
    ``LOST_BELOW`` of the ten."""
    shares = np.asarray(search_recalls(conn, query_ids, truth, ef_search))
    return {"recall": round(float(shares.mean()), 4), "lost": int((shares < LOST_BELOW).sum()),
            "queries": len(shares)}


def _measure(options: BenchOptions, name: str, catalogue: Catalogue, stride: int, builds: int) -> dict[str, Any]:
    """Every build of ``catalogue``'s index, the two ``ef_construction`` in turn, and its searches."""
    query_ids = catalogue.ids[::stride]
    truth = [set(nearest) for nearest in ground_truth(catalogue, query_ids, None, K)]
    runs: list[dict[str, Any]] = []
    with bench_stack(options, f"graph-{name}", embedding_dim=catalogue.vectors.shape[1]) as stack:
        loaded = load_catalogue(stack, catalogue, index=False)
        servers = server_versions(stack)
        for build in range(builds):
            for ef_construction in EF_CONSTRUCTIONS:
                seconds = build_hnsw_index(stack, m=M, ef_construction=ef_construction)
                with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
                    searches = {str(ef): lost_searches(conn, query_ids, truth, ef) for ef in EF_SEARCHES}
                runs.append({"build": build, "ef_construction": ef_construction, "build_s": round(seconds, 1),
                             "searches": searches})
    return {"items": len(catalogue.ids), "queries": len(query_ids), "load": loaded, "servers": servers,
            "runs": runs}


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:g}" if low == high else f"{low:g}–{high:g}"


def run(options: BenchOptions) -> BenchResult:
    dim = options.size(384, 64)
    catalogues = {
        # The tests' query catalogue (tests/integration/query_catalogue.py): ten wide clusters.
        "tests": (clustered_catalogue(options.size(20_000, 2_000), dim, clusters=10, spread=1.0, seed=7),
                  options.size(10, 2), options.size(3, 1)),
        # `bench filters`' catalogue: 100 clusters.
        "filters": (clustered_catalogue(options.size(200_000, 4_000), dim, clusters=100, seed=12),
                    options.size(100, 4), options.size(2, 1)),
    }
    figures: dict[str, Any] = {}
    servers: dict[str, str] = {}
    headlines = []
    for name, (catalogue, stride, builds) in catalogues.items():
        measured = _measure(options, name, catalogue, stride, builds)
        servers = measured.pop("servers")
        figures[name] = measured
        for ef_construction in EF_CONSTRUCTIONS:
            runs = [r for r in measured["runs"] if r["ef_construction"] == ef_construction]
            at = {ef: [r["searches"][str(ef)] for r in runs] for ef in EF_SEARCHES}
            headlines.append(Headline(
                f"{name}' catalogue ({measured['items']:,} × {dim}), m {M}, ef_construction {ef_construction},"
                f" {len(runs)} builds ({_span([r['build_s'] for r in runs])} s): searches of {measured['queries']:,}"
                f" finding under half of their ten nearest at ef_search 100, the builds' median"
                f" ({_span([s['lost'] for s in at[100]])}; recall@10 {_span([s['recall'] for s in at[100]])};"
                f" at ef_search 40 {_span([s['lost'] for s in at[40]])} lost,"
                f" recall@10 {_span([s['recall'] for s in at[40]])})",
                statistics.median(s["lost"] for s in at[100])))
    return BenchResult(
        name="graph",
        title=TITLE,
        inputs={
            "catalogues": {
                "tests": "clustered_catalogue(20,000, clusters=10, spread=1.0, seed=7), every 10th item asks, 3 builds",
                "filters": "clustered_catalogue(200,000, clusters=100, seed=12), every 100th item asks, 2 builds",
            },
            "dim": dim, "k": K, "m": M, "ef_construction": list(EF_CONSTRUCTIONS), "ef_search": list(EF_SEARCHES),
            "lost": f"a search finding fewer than {LOST_BELOW:g} of the item's ten nearest (numpy, item left out)",
            "search": SEARCH,
            "builds": "two parallel workers, maintenance_work_mem 1 GB (recsys.bench.harness.build_hnsw_index),"
                      " the two ef_construction in turn on one stack",
        },
        figures=figures,
        headlines=headlines,
        servers=servers,
    )
