"""``python -m recsys bench [NAME...]``: run benchmarks, write their results and the README table."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from recsys.bench.harness import BenchOptions
from recsys.bench.results import machine_info, to_document, write_readme, write_result
from recsys.local import tools

__all__ = ["BENCHMARKS", "bench_main"]

log = logging.getLogger("recsys")

#: name -> (module with ``run(options) -> BenchResult``, what it measures), in the README's order.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "connections": (
        "recsys.bench.connections",
        "a pooled connection vs a new connection per request (SCRAM password authentication), straight "
        "to PostgreSQL and through PgBouncer: requests/s and p50 of a one-row lookup, one client.",
    ),
    "lookup": (
        "recsys.bench.lookup",
        "one `= ANY` query for 500 ids vs 500 single-id queries over the same pooled connection.",
    ),
    "ingest": (
        "recsys.bench.ingest",
        "binary COPY vs text COPY vs `executemany` INSERT (rows/s); loading then indexing vs loading "
        "into the indexed table; the write path (producer, queue, Blob storage, loader) vs the database's "
        "own rate for the same versioned upserts into the same indexed table with the same tombstones, "
        "side by side, and where the difference goes.",
    ),
    "graph": (
        "recsys.bench.graph",
        "lost searches: the tests' catalogue (20,000 × 384, ten wide clusters) and `bench filters`' (200,000, "
        "100 clusters), the HNSW index built again and again at ef_construction 64 (pgvector's default) and "
        "128 (the service's) in turn; for every 10th (100th) item the ten nearest to its own vector at "
        "ef_search 40 and 100 against numpy: recall@10 and the searches that found fewer than half of the ten. "
        "Not in the default set (about 7 minutes).",
    ),
    "recall": (
        "recsys.bench.recall",
        "recall@10 against numpy ground truth and p50 latency per `ef_search`, next to the exact scan "
        "in PostgreSQL; filtered queries at 10% and 1% selectivity with and without iterative scans.",
    ),
    "filters": (
        "recsys.bench.filters",
        "filtered `/similar` (the service's query path) at selectivities 50%, 30%, 5%, 0.5% and 0.05%, with "
        "filters anti-correlated and correlated with the query, and any of two anti-correlated tags, next to "
        "unfiltered: p50/p95, recall@10, side by side (each query item asked as every series in turn, the "
        "unfiltered one among them), warm (asked twice, measured the second time), without filter indexes and "
        "with the tags field indexed (a filter index for every tag of 2,000 members or more); "
        "PostgreSQL with 4 GB of shared buffers.",
    ),
    "endpoint": (
        "recsys.bench.endpoint",
        "`/similar` through the local host vs the same SQL run raw over the same pool, at concurrency "
        "1, 8 and 32: p50, p95, requests/s.",
    ),
    "overload": (
        "recsys.bench.overload",
        "the scale-out storm, PostgreSQL with `max_connections = 22` behind PgBouncer (16 server "
        "connections): what a new connection costs before and after (statements PgBouncer passes on, "
        "PgBouncer CPU per connection); 500 instances, each with the app's pool, starting within 2 s "
        "while 20 warm ones serve 200 requests/s, five times, then 1,000: failures, p50/p95/p99 before, "
        "during and after the burst, server connections, PgBouncer waiting clients and CPU; pool sizes "
        "side by side; direct vs PgBouncer at 30 and 100 instances.",
    ),
    "roundtrips": (
        "recsys.bench.roundtrips",
        "a TCP proxy delaying each direction by 1 ms between the client and PgBouncer: the similar "
        "query through the project's one-statement path vs a naive BEGIN / SET LOCAL / SELECT / COMMIT.",
    ),
    "scale": (
        "recsys.bench.scale",
        "1M × 384 clustered-subspace items through the bulk loader (parallel HNSW build): load and build "
        "time, sizes, PostgreSQL memory; /similar and /recommendations recall@10 and p50/p95 through the "
        "local host per ef_search, at recall_target 0.95, cold and warm, filtered at 1% and 10%; "
        "calibration time; halfvec vs vector. Not in the default set (about 25 minutes).",
    ),
    "embeddings": (
        "recsys.bench.embeddings",
        "real sentence embeddings (all-MiniLM-L6-v2 over the ~31,000 verses of the World English Bible, both "
        "installed from PyPI by the benchmark): recall@10 per ef_search next to a synthetic catalogue of the "
        "same size, and whether recall_target 0.95 holds on queries the calibration did not sample. Not in "
        "the default set (installs torch).",
    ),
}
#: Benchmarks that run only when named (long, or with packages of their own).
OPT_IN = ("scale", "embeddings", "graph")


def results_dir() -> Path:
    return tools.project_root() / "bench" / "results"


def descriptions() -> dict[str, str]:
    return {name: text for name, (_, text) in BENCHMARKS.items()}


def bench_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recsys bench",
        description="run benchmarks against ephemeral local stacks; write bench/results/ and bench/README.md",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"some of: {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, results to a temporary folder")
    parser.add_argument("--out", type=Path, help="folder of the results (default: bench/results)")
    parser.add_argument("--readme-only", action="store_true", help="only regenerate bench/README.md")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)

    out = args.out or (Path(tempfile.mkdtemp(prefix="recsys-bench-quick-")) if args.quick else results_dir())
    readme = out.parent / "README.md" if args.out or not args.quick else out / "README.md"
    if args.readme_only:
        print(write_readme(out, readme, descriptions()))
        return 0
    tools.ensure_tools()
    out.mkdir(parents=True, exist_ok=True)
    options = BenchOptions(quick=args.quick, out_dir=out)
    failed = []
    for name in args.names or [n for n in BENCHMARKS if n not in OPT_IN]:
        module_name, _ = BENCHMARKS[name]
        run = importlib.import_module(module_name).run
        command = f"python -m recsys bench {name}" + (" --quick" if args.quick else "")
        started_at = datetime.now(UTC).replace(microsecond=0).isoformat()
        log.info("benchmark %s: starting", name)
        started = time.monotonic()
        try:
            result = run(options)
        except Exception:
            log.exception("benchmark %s failed", name)
            failed.append(name)
            continue
        document = to_document(
            result, command=command, started_at=started_at, duration_s=time.monotonic() - started,
            machine=machine_info(),
        )
        path = write_result(document, out)
        for plot in result.plots:
            log.info("benchmark %s: plot %s", name, out / plot)
        log.info("benchmark %s: %s", name, path)
        for headline in result.headlines:
            print(f"{name}: {headline.label}: {headline.value} {headline.unit}"
                  + (f" (goal {headline.goal}: {'met' if headline.met else 'MISSED'})" if headline.goal else ""))
    write_readme(out, readme, descriptions())
    print(f"results in {out}, table in {readme}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
