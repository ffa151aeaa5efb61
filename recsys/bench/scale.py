"""Benchmark ``scale``: a million 384-d items on one server, through the local host.

The catalogue has the structure of model embeddings (clusters in a low-dimensional subspace
plus noise, :func:`recsys.datasets.subspace_vectors`), with a category of 1 % and one of 10 %
of the items. It is written to a ``.npy`` and a ``.jsonl`` and loaded with the bulk loader
(``python -m recsys load --build-index``: binary COPY, then one parallel HNSW build with two
workers). Then, through the local host (``python -m recsys serve``), one client at a time:

* ``/similar`` recall@10 against exact truth (numpy over the same vectors) and p50/p95 per
  ``ef_search``, the default included: the recall/latency curve;
* ``python -m recsys calibrate`` timed, then ``recall_target=0.95``;
* cold (the first queries right after a PostgreSQL restart: empty shared buffers; the
  operating system's page cache stays warm) and warm;
* filtered at 1 % and 10 % at the default ``ef_search``;
* ``/recommendations`` (two positives, one negative) against the documented formula in numpy.

The same catalogue is loaded again into a ``halfvec`` database of the same server: load and
build time, index size, p50 and recall side by side.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg import sql

from recsys.bench.harness import (
    HNSW_BUILD,
    SERVER_SIZED_FOR_CATALOGUE,
    BenchOptions,
    bench_stack,
    grant_app_role,
    local_host,
    server_versions,
)
from recsys.bench.plots import line_plot
from recsys.bench.results import BenchResult, Headline
from recsys.bench.stats import percentile, ratio
from recsys.datasets import subspace_vectors
from recsys.local.stack import Stack, free_port
from recsys.search.filter_indexes import create_filter_index, drop_filter_index
from recsys.search.service import DEFAULT_EF_SEARCH

__all__ = ["run"]

log = logging.getLogger("recsys")

TITLE = "a million items: load, index, recall and latency through the local host"
K = 10
LADDER = (10, 20, 40, 80, 100, 160, 320)
RECALL_TARGET = 0.95
RARE, COMMON = "one-percent", "ten-percent"
HALFVEC_DATABASE = "recsys_halfvec"
WORKERS = 2
MAINTENANCE_WORK_MEM = "6GB"

Vectors = npt.NDArray[np.float32]


# ----------------------------------------------------------------------------- data


def _categories(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed + 1)
    draw = rng.random(n)
    others = rng.integers(0, 9, size=n)
    return [RARE if d < 0.01 else COMMON if d < 0.11 else f"other-{o}" for d, o in zip(draw, others, strict=True)]


def _write_files(folder: Path, vectors: Vectors, ids: list[str], categories: list[str]) -> tuple[Path, Path]:
    vectors_path, items_path = folder / "vectors.npy", folder / "ids.jsonl"
    np.save(vectors_path, vectors)
    with items_path.open("w", encoding="utf-8") as handle:
        for item_id, category in zip(ids, categories, strict=True):
            handle.write(json.dumps({"id": item_id, "category": category}) + "\n")
    return vectors_path, items_path


def _truth(unit: Vectors, queries: Vectors, skip: Sequence[Sequence[int]], k: int,
           mask: npt.NDArray[np.bool_] | None = None) -> list[list[int]]:
    """Exact top-``k`` rows per query by cosine (``unit`` rows are unit length), skipping rows."""
    out = []
    for start in range(0, len(queries), 64):
        block = queries[start:start + 64]
        block = block / np.linalg.norm(block, axis=1, keepdims=True)
        scores = block @ unit.T
        if mask is not None:
            scores[:, ~mask] = -np.inf
        for row, own in enumerate(skip[start:start + 64]):
            scores[row, list(own)] = -np.inf
        best = np.argpartition(-scores, k, axis=1)[:, :k + 1]
        for row in range(len(block)):
            order = best[row][np.argsort(-scores[row, best[row]], kind="stable")]
            out.append([int(i) for i in order[:k]])
    return out


# ----------------------------------------------------------------------------- HTTP


class Client:
    """One keep-alive HTTP/1.1 connection to the local host (``http.client``), timed per request."""

    def __init__(self, base: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=60)

    def request(self, method: str, path: str, body: Any = None) -> tuple[float, dict[str, Any]]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"content-type": "application/json"} if data is not None else {}
        for attempt in range(20):
            started = time.perf_counter()
            try:
                self.connection.request(method, path, body=data, headers=headers)
                response = self.connection.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError):
                # The host closes a keep-alive connection left idle (here during an index build):
                # the request is sent again on a new one, and timed from there.
                self.connection.close()
                if attempt == 19:
                    raise
                continue
            payload = response.read()
            elapsed = time.perf_counter() - started
            # Right after a PostgreSQL restart the pool may answer 503 until it has reconnected.
            if response.status != 503 or attempt == 19:
                break
            time.sleep(0.5)
        if response.status != 200:
            raise RuntimeError(f"{method} {path} answered {response.status}: {payload[:300]!r}")
        return elapsed, json.loads(payload)

    def close(self) -> None:
        self.connection.close()


@dataclass
class Series:
    latencies: list[float]
    found: list[list[str]]
    extra: dict[str, Any]

    def figures(self, truth: Sequence[Sequence[str]]) -> dict[str, Any]:
        hits = sum(len(set(f[:K]) & set(t[:K])) for f, t in zip(self.found, truth, strict=True))
        return {
            "count": len(self.latencies),
            "p50_ms": round(percentile(self.latencies, 50) * 1000, 3),
            "p95_ms": round(percentile(self.latencies, 95) * 1000, 3),
            "recall_at_10": round(hits / (K * len(truth)), 4),
            "results_per_query": round(sum(len(f) for f in self.found) / len(self.found), 2),
            **self.extra,
        }


def _similar_series(client: Client, ids: Sequence[str], **params: Any) -> Series:
    query = "&".join(f"{key}={quote(str(value))}" for key, value in params.items())
    latencies, found, efs = [], [], set()
    searches: dict[str, int] = {}
    for item_id in ids:
        elapsed, body = client.request("GET", f"/api/items/{quote(item_id)}/similar?k={K}&{query}")
        latencies.append(elapsed)
        found.append([r["id"] for r in body["results"]])
        efs.add(body.get("ef_search"))
        searches[body.get("search", "none")] = searches.get(body.get("search", "none"), 0) + 1
    return Series(latencies, found, {"ef_search_used": sorted(e for e in efs if e is not None), "searches": searches})


def _recommend_series(client: Client, bodies: Sequence[dict[str, Any]]) -> Series:
    latencies, found, efs = [], [], set()
    for body in bodies:
        elapsed, answer = client.request("POST", "/api/recommendations", {**body, "k": K})
        latencies.append(elapsed)
        found.append([r["id"] for r in answer["results"]])
        efs.add(answer.get("ef_search"))
    return Series(latencies, found, {"ef_search_used": sorted(e for e in efs if e is not None)})


# ----------------------------------------------------------------------------- database


def _load(stack: Stack, database: str, vectors_path: Path, items_path: Path, dim: int,
          vector_type: str) -> dict[str, float]:
    """The bulk loader into ``database``; seconds loading (COPY) and building the index."""
    from recsys.ingest.bulk import bulk_load, read_items

    marks: list[float] = []
    started = time.perf_counter()
    asyncio.run(bulk_load(
        stack.direct_url(user="postgres", database=database), read_items(vectors_path, dim, items_path), dim=dim,
        chunk_size=20_000, build_index=True, workers=WORKERS, maintenance_work_mem=MAINTENANCE_WORK_MEM,
        statement_timeout_ms=3_600_000, progress=lambda rows: marks.append(time.perf_counter()),
    ))
    done = time.perf_counter()
    loaded = marks[-1] if marks else started
    with psycopg.connect(stack.admin_conninfo(database), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE items")
    log.info("%s: loaded in %.1f s, index built in %.1f s", vector_type, loaded - started, done - loaded)
    return {"load_s": round(loaded - started, 1), "index_build_s": round(done - loaded, 1),
            "total_s": round(done - started, 1)}


def _sizes(stack: Stack, database: str) -> dict[str, int]:
    with psycopg.connect(stack.admin_conninfo(database), autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_table_size('items'), pg_relation_size('items_embedding_cosine'),"
            " pg_total_relation_size('items')"
        ).fetchone()
    assert row is not None
    return {"table_bytes": int(row[0]), "index_bytes": int(row[1]), "total_bytes": int(row[2])}


def _postgres_memory(stack: Stack) -> dict[str, Any]:
    """Proportional set size (shared pages split between the processes that map them) of PostgreSQL."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                exe = os.readlink(entry / "exe")
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if exe.endswith("/postgres") and str(stack.pg_data).encode() in cmdline:
                pids.append(int(entry.name))
    # The postmaster's children carry no data folder in their command line: take them by parent.
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) in pids[:1]:
                pids.append(int(entry.name))
    pss = 0
    for pid in set(pids):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        row = conn.execute("SELECT current_setting('shared_buffers')").fetchone()
    return {"pss_bytes": pss, "processes": len(set(pids)), "shared_buffers": str(row[0]) if row else "?"}


def _calibrate(stack: Stack, database: str) -> dict[str, Any]:
    from recsys.search.calibration import calibrate

    async def main() -> dict[str, Any]:
        url = stack.bouncer_url(user="recsys_loader", database=database)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True, prepare_threshold=None) as conn:
            started = time.perf_counter()
            calibration = await calibrate(conn)
            spent = time.perf_counter() - started
        return {"seconds": round(spent, 1), "sample": calibration.sample_size,
                "exact_ms_per_item": calibration.exact_ms,
                "points": {p.ef_search: p.recall for p in calibration.points}}

    return asyncio.run(main())


#: Candidates the binary-quantized index gives for re-ranking with the full vectors, per query.
RERANK_CANDIDATES = (40, 100, 200, 400)


def _quantized(stack: Stack, vectors: Vectors, work: Workload, dim: int) -> dict[str, Any]:
    """Binary quantization with re-ranking, measured beside the ``vector`` index in the same session.

    An HNSW index over ``binary_quantize(embedding)`` (one bit a dimension, Hamming distance) gives
    the nearest candidates; their full vectors re-rank them by cosine distance. Asked in SQL on
    one connection, each query next to the same query on the ``vector`` index (ef_search 40 and
    the default), so that the ratios hold on a noisy machine. The index is dropped afterwards.
    """
    from pgvector.psycopg import register_vector

    bits = sql.SQL("(binary_quantize(embedding)::bit({}))").format(sql.Literal(dim))
    figures: dict[str, Any] = {}
    with psycopg.connect(stack.admin_conninfo(), autocommit=True, prepare_threshold=None) as conn:
        register_vector(conn)
        conn.execute("SET maintenance_work_mem = '4GB'")
        conn.execute(sql.SQL("SET max_parallel_maintenance_workers = {}").format(sql.Literal(WORKERS)))
        started = time.perf_counter()
        conn.execute(sql.SQL("CREATE INDEX items_embedding_bits ON items USING hnsw ({} bit_hamming_ops)"
                             " WITH (m = {}, ef_construction = {})").format(
            bits, sql.Literal(HNSW_BUILD["m"]), sql.Literal(HNSW_BUILD["ef_construction"])))
        figures["index_build_s"] = round(time.perf_counter() - started, 1)
        row = conn.execute("SELECT pg_relation_size('items_embedding_bits')").fetchone()
        assert row is not None
        figures["index_bytes"] = int(row[0])
        rerank = sql.SQL(
            "SELECT c.id FROM (SELECT id, embedding FROM items WHERE id <> %(self)s"
            " ORDER BY {} <~> binary_quantize(%(q)s)::bit({}) LIMIT %(n)s) c"
            " ORDER BY c.embedding <=> %(q)s, c.id LIMIT %(k)s").format(bits, sql.Literal(dim))
        plain = sql.Composed([
            sql.SQL("SELECT id FROM items WHERE id <> %(self)s ORDER BY embedding <=> %(q)s LIMIT %(k)s")])
        variants: list[tuple[str, sql.Composed, int]] = [
            (f"vector ef_search {ef}", plain, ef) for ef in (40, DEFAULT_EF_SEARCH)]
        variants += [(f"bits, {n} re-ranked", rerank, n) for n in RERANK_CANDIDATES]
        timings: dict[str, list[float]] = {name: [] for name, _, _ in variants}
        found: dict[str, list[list[str]]] = {name: [] for name, _, _ in variants}
        for item_id in work.similar_ids:
            params = {"self": item_id, "q": vectors[int(item_id.split("-")[1])], "k": K}
            for name, statement, n in variants:
                with conn.transaction():
                    conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", [str(max(n, K))])
                    begun = time.perf_counter()
                    rows = conn.execute(statement, {**params, "n": n}).fetchall()
                    timings[name].append((time.perf_counter() - begun) * 1000)
                found[name].append([r[0] for r in rows])
        conn.execute("DROP INDEX items_embedding_bits")
    for name, _, _ in variants:
        recall = np.mean([len(set(got) & set(want)) / K for got, want in zip(found[name], work.similar_truth,
                                                                               strict=True)])
        figures[name] = {"p50_ms": round(percentile(timings[name], 50), 3),
                         "p95_ms": round(percentile(timings[name], 95), 3), "recall_at_10": round(float(recall), 4)}
    return figures


def _restart(stack: Stack) -> None:
    stack.stop_postgres()
    stack.start_postgres()


# ----------------------------------------------------------------------------- run


@dataclass
class Workload:
    similar_ids: list[str]
    similar_truth: list[list[str]]
    filtered: dict[str, tuple[list[str], list[list[str]]]]
    bodies: list[dict[str, Any]]
    recommend_truth: list[list[str]]


def _workload(vectors: Vectors, ids: list[str], categories: list[str], queries: int, seed: int) -> Workload:
    rng = np.random.default_rng(seed + 2)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    picks = rng.choice(len(ids), size=queries, replace=False)
    similar_truth = _truth(unit, unit[picks], [[int(p)] for p in picks], K)
    cats = np.asarray(categories)
    filtered = {}
    for category in (RARE, COMMON):
        mask = cats == category
        truth = _truth(unit, unit[picks], [[int(p)] for p in picks], K, mask)
        filtered[category] = ([ids[p] for p in picks], [[ids[i] for i in row] for row in truth])
    triples = rng.choice(len(ids), size=(queries, 3), replace=len(ids) <= 3 * queries)
    bodies, queries_vectors = [], []
    for a, b, c in triples:
        bodies.append({"positive": [ids[a], ids[b]], "negative": [ids[c]]})
        # The documented formula: mean of the unit positives minus 0.5 × mean of the unit negatives.
        queries_vectors.append((unit[a] + unit[b]) / 2 - 0.5 * unit[c])
    recommend_truth = _truth(unit, np.asarray(queries_vectors, dtype=np.float32),
                             [[int(t) for t in triple] for triple in triples], K)
    return Workload(
        similar_ids=[ids[p] for p in picks],
        similar_truth=[[ids[i] for i in row] for row in similar_truth],
        filtered=filtered,
        bodies=bodies,
        recommend_truth=[[ids[i] for i in row] for row in recommend_truth],
    )


def _measure(base: str, work: Workload, stack: Stack, *, full: bool, restart: Callable[[], None]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    client = Client(base)
    try:
        if full:
            # Cold: the first pass right after a restart (empty shared buffers).
            client.close()
            restart()
            client = Client(base)
            cold = _similar_series(client, work.similar_ids, ef_search=DEFAULT_EF_SEARCH)
            figures["similar_cold"] = cold.figures(work.similar_truth)
            cold_rec = _recommend_series(client, work.bodies)
            figures["recommend_cold"] = cold_rec.figures(work.recommend_truth)
        else:
            _similar_series(client, work.similar_ids[:50], ef_search=DEFAULT_EF_SEARCH)  # warm up a little
        ladder = LADDER if full else (40, DEFAULT_EF_SEARCH)
        figures["similar_by_ef"] = {
            ef: _similar_series(client, work.similar_ids, ef_search=ef).figures(work.similar_truth) for ef in ladder
        }
        figures["similar_warm"] = figures["similar_by_ef"][DEFAULT_EF_SEARCH]
        if full:
            figures["recommend_warm"] = _recommend_series(client, work.bodies).figures(work.recommend_truth)
            for category, label in ((RARE, "filtered_1pct"), (COMMON, "filtered_10pct")):
                figures[label] = _filtered(client, work, category)
            figures["filter_indexes"] = _with_filter_indexes(client, work, stack)
    finally:
        client.close()
    return figures


def _filtered(client: Client, work: Workload, category: str) -> dict[str, Any]:
    """A filtered series measured warm, as the unfiltered figure it is compared with: the queries
    are asked once (the first pass, reported beside: it reads the members' pages from disk) and
    measured the second time."""
    query_ids, truth = work.filtered[category]
    first = _similar_series(client, query_ids, ef_search=DEFAULT_EF_SEARCH, category=category).figures(truth)
    warm = _similar_series(client, query_ids, ef_search=DEFAULT_EF_SEARCH, category=category).figures(truth)
    return {**warm, "first_pass": {key: first[key] for key in ("p50_ms", "p95_ms", "recall_at_10")}}


def _with_filter_indexes(client: Client, work: Workload, stack: Stack) -> dict[str, Any]:
    """The filtered series again with a filter index on each category, built and dropped here."""
    figures: dict[str, Any] = {}
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        for category, label in ((RARE, "filtered_1pct"), (COMMON, "filtered_10pct")):
            started = time.perf_counter()
            index = create_filter_index(conn, "category", category, maintenance_work_mem=MAINTENANCE_WORK_MEM)
            built = round(time.perf_counter() - started, 1)
            try:
                measured = _filtered(client, work, category)
            finally:
                drop_filter_index(conn, "category", category)
            figures[label] = {**measured, "build_s": built, "index_bytes": index.size_bytes,
                              "members": index.members, "copy_lists": index.copy_lists,
                              "sweep_width": index.sweep_width}
            log.info("scale: %s with a filter index: %s", label, figures[label])
    return figures


def _target(base: str, work: Workload) -> dict[str, Any]:
    client = Client(base)
    try:
        similar = _similar_series(client, work.similar_ids, recall_target=RECALL_TARGET)
        recommend_bodies = [{**b, "recall_target": RECALL_TARGET} for b in work.bodies]
        recommend = _recommend_series(client, recommend_bodies)
    finally:
        client.close()
    return {"similar": similar.figures(work.similar_truth), "recommend": recommend.figures(work.recommend_truth)}


def _create_database(stack: Stack, name: str, vector_type: str) -> Stack:
    import dataclasses

    with psycopg.connect(stack.admin_conninfo("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} OWNER recsys").format(sql.Identifier(name)))
    view = Stack(dataclasses.replace(stack.config, database=name, vector_type=vector_type))
    view.migrate()
    grant_app_role(view)
    return view


@dataclass
class Sizes:
    items: int
    dim: int
    queries: int


def _gib(n: int) -> float:
    return round(n / 2**30, 2)


def run(options: BenchOptions) -> BenchResult:
    size = Sizes(items=options.size(1_000_000, 20_000), dim=options.size(384, 64), queries=options.size(300, 40))
    seed = 42
    folder = Path(tempfile.mkdtemp(prefix="recsys-bench-scale-data-", dir=options.work_dir))
    started = time.perf_counter()
    try:
        vectors = subspace_vectors(size.items, size.dim, seed=seed)
        ids = [f"sku-{i:07d}" for i in range(size.items)]
        categories = _categories(size.items, seed)
        vectors_path, items_path = _write_files(folder, vectors, ids, categories)
        generated_s = time.perf_counter() - started
        log.info("scale: %d × %d generated in %.0f s", size.items, size.dim, generated_s)
        pg = {**SERVER_SIZED_FOR_CATALOGUE, "max_parallel_maintenance_workers": "2"}
        with bench_stack(options, "scale", embedding_dim=size.dim, pg_settings=pg) as stack:
            servers = server_versions(stack)
            figures: dict[str, Any] = {"generate_s": round(generated_s, 1)}
            figures["vector_load"] = _load(stack, stack.config.database, vectors_path, items_path, size.dim, "vector")
            figures["vector_sizes"] = _sizes(stack, stack.config.database)
            work = _workload(vectors, ids, categories, size.queries, seed)
            env = {**stack.app_environment(), "RECSYS_POOL_MIN_SIZE": "1", "RECSYS_POOL_MAX_SIZE": "4",
                   "RECSYS_STATEMENT_TIMEOUT_MS": "60000"}
            with local_host(env, free_port()) as base:
                figures["vector"] = _measure(base, work, stack, full=True, restart=lambda: _restart(stack))
                figures["calibration"] = _calibrate(stack, stack.config.database)
                time.sleep(0.1)
                # The service caches a calibration for up to 60 s: this host has never read one.
                figures["vector_target"] = _target(base, work)
            figures["postgres_memory"] = _postgres_memory(stack)
            figures["quantized"] = _quantized(stack, vectors, work, size.dim)

            # halfvec: the same catalogue in a database of its own; truth from the stored (float16) values.
            half = _create_database(stack, HALFVEC_DATABASE, "halfvec")
            figures["halfvec_load"] = _load(half, HALFVEC_DATABASE, vectors_path, items_path, size.dim, "halfvec")
            figures["halfvec_sizes"] = _sizes(stack, HALFVEC_DATABASE)
            halves = vectors.astype(np.float16).astype(np.float32)
            half_work = _workload(halves, ids, categories, size.queries, seed)
            with local_host({**env, **half.app_environment()}, free_port()) as base:
                figures["halfvec"] = _measure(base, half_work, half, full=False, restart=lambda: None)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return _result(options.out_dir, size, figures, servers)


def _first_pass(figures: dict[str, Any]) -> str:
    first = figures.get("first_pass")
    return f"; first pass p50 {first['p50_ms']} ms, p95 {first['p95_ms']} ms" if first else ""


def _halfvec_headlines(figures: dict[str, Any], load: dict[str, Any], warm: dict[str, Any]) -> list[Headline]:
    found: list[Headline] = []
    vs, hs = figures["vector_sizes"], figures["halfvec_sizes"]
    hl = figures["halfvec_load"]
    hw = figures["halfvec"]["similar_warm"]
    found.append(Headline(
        f"halfvec ÷ vector index size ({_gib(hs['index_bytes'])} vs {_gib(vs['index_bytes'])} GiB; table "
        f"{_gib(hs['table_bytes'])} vs {_gib(vs['table_bytes'])} GiB; build {hl['index_build_s']} vs "
        f"{load['index_build_s']} s)", round(ratio(hs["index_bytes"], vs["index_bytes"]), 2), "×"))
    found.append(Headline(
        f"halfvec /similar at ef_search {DEFAULT_EF_SEARCH}: p50 (recall@10 {hw['recall_at_10']} vs vector "
        f"{warm['recall_at_10']}; vector p50 {warm['p50_ms']} ms)", hw["p50_ms"], "ms"))
    return found


def _quantized_headlines(figures: dict[str, Any]) -> list[Headline]:
    q, vs = figures["quantized"], figures["vector_sizes"]
    base = q["vector ef_search 40"]
    found = [Headline(
        f"binary-quantized ÷ vector index size ({_gib(q['index_bytes'])} vs {_gib(vs['index_bytes'])} GiB; "
        f"build {q['index_build_s']} s)", round(ratio(q["index_bytes"], vs["index_bytes"]), 2), "×")]
    for n in RERANK_CANDIDATES:
        f = q[f"bits, {n} re-ranked"]
        found.append(Headline(
            f"binary-quantized, {n} re-ranked: p50 ÷ vector p50 at ef_search 40 in SQL ({f['p50_ms']} vs "
            f"{base['p50_ms']} ms; recall@10 {f['recall_at_10']} vs {base['recall_at_10']})",
            round(ratio(f["p50_ms"], base["p50_ms"]), 2), "×"))
    return found


def _result(out: Path, size: Sizes, figures: dict[str, Any], servers: dict[str, str]) -> BenchResult:
    vector, load = figures["vector"], figures["vector_load"]
    target = figures["vector_target"]["similar"]
    warm = vector["similar_warm"]
    plot = "scale.png"
    curve = figures["vector"]["similar_by_ef"]
    half_curve = figures["halfvec"]["similar_by_ef"] if "halfvec" in figures else {}
    series = {
        "vector, /similar p50 by ef_search": (
            [curve[e]["p50_ms"] for e in curve], [curve[e]["recall_at_10"] for e in curve]),
        "halfvec": (
            [half_curve[e]["p50_ms"] for e in half_curve], [half_curve[e]["recall_at_10"] for e in half_curve]),
        "recall_target 0.95": ([target["p50_ms"]], [target["recall_at_10"]]),
    }
    annotations = {"vector, /similar p50 by ef_search": [str(e) for e in curve],
                   "halfvec": [str(e) for e in half_curve], "recall_target 0.95": [str(target["ef_search_used"])]}
    line_plot(out / plot, series,
              title=f"/similar through the local host, {size.items:,} × {size.dim}: recall@10 vs p50",
              xlabel="p50 (ms)", ylabel="recall@10", annotations=annotations)
    headlines = [
        Headline(f"load + parallel index build, {size.items:,} × {size.dim} (load {load['load_s']} s, "
                 f"index {load['index_build_s']} s)", load["total_s"], "s", "≤ 600 s", load["total_s"] <= 600),
        Headline(f"/similar p50 at recall_target 0.95 through the local host (recall@10 {target['recall_at_10']}, "
                 f"ef_search {target['ef_search_used']}, p95 {target['p95_ms']} ms)", target["p50_ms"], "ms",
                 "≤ 5 ms at recall ≥ 0.95", target["p50_ms"] <= 5 and target["recall_at_10"] >= 0.95),
        Headline(f"/similar recall@10 at the default ef_search {DEFAULT_EF_SEARCH} (p50 {warm['p50_ms']} ms, "
                 f"p95 {warm['p95_ms']} ms; cold p50 {vector['similar_cold']['p50_ms']} ms, "
                 f"p95 {vector['similar_cold']['p95_ms']} ms)", warm["recall_at_10"]),
        Headline(f"/recommendations recall@10 at recall_target 0.95 (ef_search "
                 f"{figures['vector_target']['recommend']['ef_search_used']}, p50 "
                 f"{figures['vector_target']['recommend']['p50_ms']} ms, p95 "
                 f"{figures['vector_target']['recommend']['p95_ms']} ms)",
                 figures["vector_target"]["recommend"]["recall_at_10"]),
        Headline(f"/recommendations recall@10 at ef_search {DEFAULT_EF_SEARCH} "
                 f"(p50 {vector['recommend_warm']['p50_ms']} ms, p95 {vector['recommend_warm']['p95_ms']} ms)",
                 vector["recommend_warm"]["recall_at_10"]),
    ]
    for label, name in (("filtered_1pct", "1%"), ("filtered_10pct", "10%")):
        f = vector[label]
        headlines.append(Headline(
            f"filtered {name}: p95 ÷ unfiltered p95 ({f['p95_ms']} ms vs {warm['p95_ms']} ms; recall@10 "
            f"{f['recall_at_10']}, {f['results_per_query']} results per query{_first_pass(f)})",
            round(ratio(f["p95_ms"], warm["p95_ms"]), 2), "×", "≤ 3×", ratio(f["p95_ms"], warm["p95_ms"]) <= 3))
    for label, name in (("filtered_1pct", "1%"), ("filtered_10pct", "10%")):
        f = vector.get("filter_indexes", {}).get(label)
        if f is None:
            continue
        headlines.append(Headline(
            f"filtered {name} with a filter index on the category: p95 ÷ unfiltered p95 ({f['p95_ms']} ms; p50 "
            f"{f['p50_ms']} ms; recall@10 {f['recall_at_10']}; index of {f['members']:,} items, "
            f"{_gib(f['index_bytes'])} GiB, built in {f['build_s']} s{_first_pass(f)})",
            round(ratio(f["p95_ms"], warm["p95_ms"]), 2), "×", "≤ 3×", ratio(f["p95_ms"], warm["p95_ms"]) <= 3))
    cal = figures["calibration"]
    headlines.append(Headline(f"python -m recsys calibrate on {size.items:,} items ({cal['sample']} sampled)",
                              cal["seconds"], "s", "≤ 120 s", cal["seconds"] <= 120))
    if "halfvec" in figures:
        headlines.extend(_halfvec_headlines(figures, load, warm))
    else:
        headlines.append(Headline("halfvec at 1M: not measured in this run", None))
    if "quantized" in figures:
        headlines.extend(_quantized_headlines(figures))
    mem = figures["postgres_memory"]
    headlines.append(Headline(f"PostgreSQL memory (PSS of its {mem['processes']} processes; shared_buffers "
                              f"{mem['shared_buffers']})", _gib(mem["pss_bytes"]), "GiB"))
    return BenchResult(
        name="scale",
        title=TITLE,
        inputs={
            "items": size.items, "dim": size.dim, "queries": size.queries, "k": K,
            "data": "subspace_vectors: 2000 clusters of uneven size in a 24-d subspace, spread 0.6, noise 0.25",
            "categories": {"one-percent": 0.01, "ten-percent": 0.10, "others": "9 × ~9.9%"},
            "load": f"bulk loader, chunks of 20000, --build-index --workers {WORKERS} "
                    f"--maintenance-work-mem {MAINTENANCE_WORK_MEM}",
            "hnsw": HNSW_BUILD, "ladder": list(LADDER), "recall_target": RECALL_TARGET,
            "client": "one keep-alive HTTP/1.1 connection to python -m recsys serve, one request at a time",
            "postgres": {"shared_buffers": "4GB"},
        },
        figures={**figures, "plot_series": {k: list(v) for k, v in series.items()}},
        headlines=headlines,
        plots=[plot],
        notes=[
            "cold = the first pass right after a PostgreSQL restart (shared buffers empty); the operating "
            "system's page cache is not dropped",
            "truth = exact cosine top-10 in numpy over the generated vectors (for halfvec: the float16 values stored)",
            "binary quantization: an HNSW index over binary_quantize(embedding) (bit_hamming_ops), its nearest n "
            "re-ranked by cosine distance, asked in SQL on one connection beside the vector index (not through "
            "the local host); the index is dropped afterwards",
        ],
        servers=servers,
    )
