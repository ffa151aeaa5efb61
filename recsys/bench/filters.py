"""Benchmark: filtered queries at five selectivities, anti-correlated and correlated, next to unfiltered.

The catalogue carries nested filter tags (``recsys.datasets.selectivity_tags``) on 50 %, 30 %, 5 %,
0.5 % and 0.05 % of the items: anti-correlated ones that never occur in the query items' cluster
(an index scan has to walk past the whole neighbourhood) and correlated ones that surround it.
Every query goes through the project's query path (``similar_items``: one statement, the cost
model choosing the index or an exact scan), on one connection through PgBouncer, side by side:
each query item asked as every series in turn, the unfiltered one among them, without filter
indexes and again with the tags field indexed; recall@10 against ground truth computed with numpy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from recsys.bench.harness import (
    HNSW_BUILD,
    SERVER_SIZED_FOR_CATALOGUE,
    BenchOptions,
    Deadline,
    bench_stack,
    build_hnsw_index,
    drop_hnsw_index,
    server_versions,
)
from recsys.bench.plots import line_plot
from recsys.bench.results import BenchResult, Headline
from recsys.bench.stats import ratio, recall_at_k, summarize
from recsys.config import Settings
from recsys.datasets import (
    SELECTIVITIES,
    Catalogue,
    clustered_catalogue,
    exact_nearest,
    selectivity_tag,
    selectivity_tags,
)
from recsys.db.pool import configure_connection, connection_kwargs
from recsys.search.filter_indexes import (
    DEFAULT_MIN_MEMBERS,
    apply_indexed_fields,
    set_indexed_field,
    unset_indexed_field,
)
from recsys.search.params import SimilarQuery
from recsys.search.service import INDEX_COST_RATIO, similar_items

__all__ = ["indexed_field", "run", "side_by_side", "warm_series"]

log = logging.getLogger("recsys")

TITLE = "filtered queries at five selectivities"
K = 10
QUERY_CLUSTER = 0
#: The four selectivities of the goal, and 30 %: at 200,000 items (ef_search 100, k 10, the
#: service's cost ratio) nine budgets of 6,633 rows, near the largest filter avoiding the query
#: whose passing items the exact scan still answers (ten budgets), where that scan costs most.
BENCH_SELECTIVITIES = (0.5, 0.3, *SELECTIVITIES[1:])


def _load(stack: Any, catalogue: Catalogue, tags: list[list[str]]) -> dict[str, float]:
    drop_hnsw_index(stack)
    started = time.perf_counter()
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        register_vector(conn)
        with conn.transaction(), conn.cursor() as cur, cur.copy(
            "COPY items (id, embedding, category, tags) FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["text", "vector", "text", "text[]"])
            for row in zip(catalogue.ids, catalogue.vectors, catalogue.categories, tags, strict=True):
                copy.write_row(row)
        conn.execute("VACUUM (ANALYZE) items")
    copied = time.perf_counter() - started
    indexed = build_hnsw_index(stack)
    log.info("loaded %d items in %.1f s, indexed in %.1f s", len(catalogue.ids), copied, indexed)
    return {"copy_s": round(copied, 3), "index_s": round(indexed, 3)}


def _truth(catalogue: Catalogue, queries: list[int], members: np.ndarray | None) -> list[list[str]]:
    return [[catalogue.ids[i] for i in line] for line in exact_nearest(catalogue.vectors, queries, K, members)]


async def side_by_side(conn: psycopg.AsyncConnection[Any], ids: Sequence[str], queries: Sequence[int],
                       asked: dict[str, tuple[SimilarQuery, list[list[str]]]],
                       deadline: Deadline) -> dict[str, dict[str, Any]]:
    """``/similar`` of each of ``queries`` (positions in ``ids``) asked as each series of ``asked``
    (by name: its query and its ground truth), on ``conn``: for each series, recall@10, the fewest
    results, how each was answered (``search``) and the latencies. Side by side: each query item is
    asked as every series in turn before the next item, so that a slow spell of the shared machine
    falls on every series alike rather than on those measured in it. Measured warm: every query is
    asked once (the first pass, reported beside) and measured the second time."""
    passes: list[dict[str, dict[str, Any]]] = []
    for _ in range(2):
        found: dict[str, list[list[str]]] = {name: [] for name in asked}
        latencies: dict[str, list[float]] = {name: [] for name in asked}
        searches: dict[str, dict[str, int]] = {name: {} for name in asked}
        for q in queries:
            for name, (query, _) in asked.items():
                if not deadline:
                    raise TimeoutError("the benchmark ran out of time; use fewer queries")
                started = time.perf_counter()
                answer = await similar_items(conn, ids[q], query, timeout_ms=60_000)
                latencies[name].append(time.perf_counter() - started)
                found[name].append([r["id"] for r in answer["results"]])
                search = answer.get("search", "none")
                searches[name][search] = searches[name].get(search, 0) + 1
        passes.append({name: {"recall": round(recall_at_k(found[name], truth, K), 4),
                              "min_results": min(map(len, found[name])),
                              "searches": searches[name],
                              **summarize(latencies[name])}
                       for name, (_, truth) in asked.items()})
    first, warm = passes
    return {name: {**warm[name], "first_pass": {key: first[name][key] for key in ("p50_ms", "p95_ms", "recall")}}
            for name in asked}


async def warm_series(conn: psycopg.AsyncConnection[Any], ids: Sequence[str], queries: Sequence[int],
                      query: SimilarQuery, truth: list[list[str]], deadline: Deadline) -> dict[str, Any]:
    """One series of :func:`side_by_side`: ``queries`` asked as ``query``, one after another."""
    return (await side_by_side(conn, ids, queries, {"series": (query, truth)}, deadline))["series"]


@contextlib.contextmanager
def indexed_field(admin: str, kind: str) -> Iterator[dict[str, dict[str, Any]]]:
    """The field ``kind`` indexed at the default bound (``filter-index create --every-tag`` or
    ``--every-category``), on the owner's connection string ``admin``: yields each value's
    filter index as built (seconds, members, bytes, the copy's lists, the sweep's width); the
    rule is forgotten and its filter indexes dropped after."""
    with psycopg.connect(admin, autocommit=True) as owner:
        set_indexed_field(owner, kind, DEFAULT_MIN_MEMBERS)
        indexes: dict[str, dict[str, Any]] = {}
        try:
            started = time.perf_counter()
            for line in apply_indexed_fields(owner, build={}):
                index, now = line["index"], time.perf_counter()
                indexes[line["value"]] = {"build_s": round(now - started, 1), "members": index["members"],
                                          "index_bytes": index["size_bytes"], "copy_lists": index["copy_lists"],
                                          "sweep_width": index["sweep_width"]}
                started = now
            yield indexes
        finally:
            unset_indexed_field(owner, kind)
            for _ in apply_indexed_fields(owner, build={}):
                pass


#: Any of two tags: the anti-correlated 50 % and 5 % tags (nested: the items of the 5 % tag carry
#: the 50 % tag too), which no filter index covers alone.
ANY_OF = (selectivity_tag(0.5), selectivity_tag(0.05))


def _filters() -> list[tuple[str, tuple[str, ...]]]:
    """Each filtered series: its name and the tags of which any will do."""
    single = [(f"{'correlated' if correlated else 'anti'}/{selectivity:g}",
               (selectivity_tag(selectivity, correlated=correlated),))
              for correlated in (False, True) for selectivity in BENCH_SELECTIVITIES]
    return [*single, ("anti/any", ANY_OF)]


def _asked(catalogue: Catalogue, tags: list[list[str]], queries: list[int],
           suffix: str = "") -> dict[str, tuple[SimilarQuery, list[list[str]]]]:
    """The unfiltered series and each filtered one, by name (with ``suffix``): its query and truth."""
    asked = {"unfiltered" + suffix: (SimilarQuery(k=K), _truth(catalogue, queries, None))}
    for name, tags_any in _filters():
        members = np.asarray([not set(tags_any).isdisjoint(t) for t in tags])
        asked[name + suffix] = (SimilarQuery(k=K, tags_any=tags_any), _truth(catalogue, queries, members))
    return asked


async def _run(url: str, admin: str, catalogue: Catalogue, tags: list[list[str]], queries: list[int],
               seconds: float) -> dict[str, Any]:
    conn = await psycopg.AsyncConnection.connect(url, **connection_kwargs(Settings()))
    await configure_connection(conn)
    deadline = Deadline(seconds)
    figures: dict[str, Any] = {}
    try:
        figures.update(await side_by_side(conn, catalogue.ids, queries, _asked(catalogue, tags, queries), deadline))
        for name in figures:
            log.info("%s: %s", name, figures[name])
        # The same filters, and the unfiltered search beside them again, with the tags field indexed
        # (`filter-index create --every-tag`, its default bound): the filter indexes of the tags that
        # reach it, built here and dropped after.
        with indexed_field(admin, "tag") as indexes:
            figures["indexed_field"] = {"min_members": DEFAULT_MIN_MEMBERS, "indexes": indexes}
            indexed = await side_by_side(conn, catalogue.ids, queries,
                                         _asked(catalogue, tags, queries, "/filter_index"), deadline)
            for name, tags_any in _filters():
                indexed[f"{name}/filter_index"]["indexed"] = all(tag in indexes for tag in tags_any)
            for name in indexed:
                log.info("%s: %s", name, indexed[name])
            figures.update(indexed)
    finally:
        await conn.close()
    return figures


def run(options: BenchOptions) -> BenchResult:
    items = options.size(200_000, 5_000)
    dim = options.size(384, 64)
    count = options.size(100, 10)
    seconds = options.size(1200, 120)
    catalogue = clustered_catalogue(items, dim, clusters=100, seed=12)
    tags = [a + b for a, b in zip(
        selectivity_tags(catalogue, around=QUERY_CLUSTER, correlated=False, selectivities=BENCH_SELECTIVITIES),
        selectivity_tags(catalogue, around=QUERY_CLUSTER, correlated=True, selectivities=BENCH_SELECTIVITIES),
        strict=True)]
    rng = np.random.default_rng(12)
    queries = [int(i) for i in rng.choice(np.flatnonzero(catalogue.clusters == QUERY_CLUSTER), count, replace=False)]
    with bench_stack(options, "filters", embedding_dim=dim, pg_settings=SERVER_SIZED_FOR_CATALOGUE) as stack:
        loaded = _load(stack, catalogue, tags)
        servers = server_versions(stack)
        figures = asyncio.run(_run(stack.bouncer_url(), stack.admin_conninfo(), catalogue, tags, queries, seconds))
    figures["load"] = loaded

    percent = [100 * s for s in BENCH_SELECTIVITIES]
    series: dict[str, tuple[list[float], list[float]]] = {}
    for suffix, tail in (("", ""), ("/filter_index", ", tags indexed")):
        series[f"unfiltered{tail}"] = (percent, [figures[f"unfiltered{suffix}"]["p95_ms"]] * len(percent))
        for kind in ("anti", "correlated"):
            label = "anti-correlated filter" if kind == "anti" else "correlated filter"
            series[f"{label}{tail}"] = (percent, [figures[f"{kind}/{s:g}{suffix}"]["p95_ms"]
                                                  for s in BENCH_SELECTIVITIES])
    plot = "filters.png"
    line_plot(options.out_dir / plot, series, title=f"p95 of filtered /similar, {items:,} × {dim}, k={K}",
              xlabel="selectivity of the filter (% of the catalogue, log)", ylabel="p95 latency (ms, log)",
              logx=True, logy=True)
    headlines = [
        Headline(f"unfiltered p95{tail} (p50 {base['p50_ms']} ms, recall@10 {base['recall']}; first pass p95 "
                 f"{base['first_pass']['p95_ms']} ms)", base["p95_ms"], "ms")
        for base, tail in ((figures["unfiltered"], ", beside the filters without filter indexes"),
                           (figures["unfiltered/filter_index"], ", beside them with the tags field indexed"))
    ]
    indexed = figures["indexed_field"]["indexes"]
    headlines.append(Headline(
        f"tags field indexed (every tag of {DEFAULT_MIN_MEMBERS:,} members or more): filter indexes built, "
        "members each (" + ", ".join(f"{v['members']:,} in {v['build_s']} s" for v in indexed.values()) + ")",
        len(indexed), "",
    ))
    indexed_label = f", every tag of {DEFAULT_MIN_MEMBERS:,} members or more indexed"
    rows = [(f"{kind}/{selectivity:g}{suffix}", f"{label}{tail} {100 * selectivity:g}%")
            for suffix, tail in (("", ""), ("/filter_index", indexed_label))
            for kind, label in (("anti", "anti-correlated"), ("correlated", "correlated"))
            for selectivity in BENCH_SELECTIVITIES]
    rows += [(f"anti/any{suffix}", f"any of the anti-correlated 50% and 5% tags{tail}")
             for suffix, tail in (("", ""), ("/filter_index", indexed_label))]
    for key, label in rows:
        point = figures[key]
        base = figures["unfiltered/filter_index" if key.endswith("/filter_index") else "unfiltered"]
        share = ratio(point["p95_ms"], base["p95_ms"])
        met = share <= 3 and point["recall"] >= 0.95
        searches = ", ".join(f"{k} {v}" for k, v in sorted(point["searches"].items()))
        headlines.append(Headline(
            f"{label}: p95 ÷ unfiltered p95 beside it (p95 {point['p95_ms']} ms, p50 "
            f"{point['p50_ms']} ms, recall@10 {point['recall']}, fewest results {point['min_results']}; "
            f"{searches}; first pass p95 {point['first_pass']['p95_ms']} ms)",
            round(share, 2), "×", "≤ 3× with recall ≥ 0.95", met,
        ))
    return BenchResult(
        name="filters",
        title=TITLE,
        inputs={
            "catalogue_items": items, "dim": dim, "queries": count, "k": K,
            "catalogue": "clustered_catalogue(clusters=100, seed=12)",
            "filters": "tags_any of one selectivity tag (recsys.datasets.selectivity_tags around cluster 0), "
                       f"and tags_any of {list(ANY_OF)} (any of two); query items from cluster 0",
            "selectivities": list(BENCH_SELECTIVITIES), "index_cost_ratio": INDEX_COST_RATIO,
            "hnsw": HNSW_BUILD, "ef_search": 100,
            "service": "recsys.search.service.similar_items (recsys_query / recsys_nearest)",
            "filter_index": "each filter again with the tags field indexed: python -m recsys filter-index create "
                            f"--every-tag (bound {DEFAULT_MIN_MEMBERS}), its filter indexes built, then dropped",
            "measured": "side by side: each query item asked as every series in turn (the unfiltered one among "
                        "them) before the next, once without filter indexes and once with the tags field indexed, "
                        "each series' filtered p95 divided by the unfiltered p95 measured beside it; every query "
                        "asked twice, figures from the second (warm) pass, the first pass beside them",
            "postgres": dict(SERVER_SIZED_FOR_CATALOGUE),
        },
        figures=figures,
        headlines=headlines,
        plots=[plot],
        servers=servers,
    )
