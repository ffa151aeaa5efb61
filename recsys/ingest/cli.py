"""Commands of the ingest area: ``python -m recsys load | enqueue | demo``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from recsys.config import Settings, SettingsError, load_settings
from recsys.errors import InvalidArgument

__all__ = ["demo_main", "enqueue_main", "load_main"]

log = logging.getLogger("recsys")


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)


def _settings() -> Settings | None:
    try:
        return load_settings()
    except SettingsError as exc:
        print(f"recsys: {exc}", file=sys.stderr)
        return None


def _loader_url(settings: Settings) -> str:
    url_for = getattr(settings, "url_for", None)
    return str(url_for("loader")) if callable(url_for) else settings.database_url


def _progress(total: int, enabled: bool) -> tuple[Callable[[int], None] | None, Callable[[], None]]:
    if not enabled:
        return None, lambda: None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a development dependency; the load works without a bar
        return None, lambda: None
    bar = tqdm(total=total, unit="items", unit_scale=True, desc="loading")
    return bar.update, bar.close


def load_main(argv: list[str]) -> int:
    """``python -m recsys load FILE``: bulk-load a file straight into the database (initial loads)."""
    from recsys.ingest.bulk import bulk_load, count_items, read_items
    from recsys.search.params import max_component

    parser = argparse.ArgumentParser(
        prog="python -m recsys load",
        description="bulk-load items with binary COPY (a .jsonl of items, or a .npy of vectors with --items)",
    )
    parser.add_argument("file", type=Path, help=".jsonl of items with embedding/embedding_b64, or .npy of vectors")
    parser.add_argument("--items", type=Path, help=".jsonl with one {id, category, tags, metadata} per .npy row")
    parser.add_argument("--url", help="database URL (default: the loader's; --build-index needs the table owner)")
    parser.add_argument("--chunk-size", type=int, default=10_000, help="rows per transaction (default 10000)")
    parser.add_argument("--build-index", action="store_true",
                        help="drop the HNSW index before loading and build it once after, in parallel"
                             " (with RECSYS_HNSW_M and RECSYS_HNSW_EF_CONSTRUCTION)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="parallel maintenance workers for the index build (default: cores - 1)")
    parser.add_argument("--maintenance-work-mem", default="1GB",
                        help="memory for the index build; the graph should fit (default 1GB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    _logging()
    settings = _settings()
    if settings is None:
        return 2
    if args.chunk_size < 1 or args.workers < 0:
        parser.error("--chunk-size must be at least 1 and --workers at least 0")
    try:
        total = count_items(args.file)
        items: Iterator[Any] = read_items(args.file, settings.embedding_dim, args.items,
                                          limit=max_component(settings.vector_type))
    except (OSError, ValueError, InvalidArgument) as exc:
        print(f"recsys load: {exc}", file=sys.stderr)
        return 2
    update, close = _progress(total, not args.no_progress)
    try:
        result = asyncio.run(bulk_load(
            args.url or _loader_url(settings), items, dim=settings.embedding_dim, chunk_size=args.chunk_size,
            build_index=args.build_index, workers=args.workers, maintenance_work_mem=args.maintenance_work_mem,
            hnsw_m=settings.hnsw_m, hnsw_ef_construction=settings.hnsw_ef_construction,
            statement_timeout_ms=max(settings.loader_statement_timeout_ms, 600_000), progress=update,
        ))
    except InvalidArgument as exc:
        print(f"recsys load: {exc}", file=sys.stderr)
        return 2
    finally:
        close()
    print(json.dumps({"rows": result.rows, "chunks": result.chunks, "index_rebuilt": result.index_rebuilt}))
    return 0


def _read_batch(path: Path) -> Any:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            return {"items": [json.loads(line) for line in handle if line.strip()]}
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


async def _enqueue(doc: Any, settings: Settings, wait: float | None) -> dict[str, Any]:
    from recsys.db.pool import close_pools
    from recsys.ingest.demo import wait_for_batches
    from recsys.ingest.producer import enqueue_document

    try:
        enqueued = await enqueue_document(doc, settings=settings)
        body = enqueued.to_body()
        if wait is not None:
            (status,) = await wait_for_batches([enqueued.batch_id], timeout=wait)
            body.update(status=status.status, rows=status.rows)
        return body
    finally:
        await close_pools()


def enqueue_main(argv: list[str]) -> int:
    """``python -m recsys enqueue FILE``: validate a batch and send it to the loader's queue."""
    parser = argparse.ArgumentParser(
        prog="python -m recsys enqueue",
        description="send a batch to the loader's queue (a .json batch document, or a .jsonl of items)",
    )
    parser.add_argument("file", type=Path, help='{"batch_id"?, "items": [...]} as .json, or one item per line (.jsonl)')
    parser.add_argument("--batch-id", help="the batch id (default: the document's, or a generated one)")
    parser.add_argument("--wait", type=float, metavar="SECONDS",
                        help="wait up to SECONDS until the batch is loaded (needs a running loader)")
    args = parser.parse_args(argv)
    _logging()
    settings = _settings()
    if settings is None:
        return 2
    try:
        doc = _read_batch(args.file)
        if args.batch_id and isinstance(doc, dict):
            doc["batch_id"] = args.batch_id
        body = asyncio.run(_enqueue(doc, settings, args.wait))
    except (OSError, ValueError) as exc:
        print(f"recsys enqueue: {exc}", file=sys.stderr)
        return 2
    except InvalidArgument as exc:
        print(f"recsys enqueue: {exc.field}: {exc.message}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as exc:
        print(f"recsys enqueue: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(body))
    return 0


def demo_main(argv: list[str]) -> int:
    """``python -m recsys demo``: enqueue the demo catalogue and wait until a running host loaded it."""
    from recsys.ingest.demo import DEMO_BATCHES, DEMO_ITEMS, DEMO_PREFIX, DEMO_SEED, load_demo_catalogue

    parser = argparse.ArgumentParser(prog="python -m recsys demo",
                                     description="load the demo catalogue through the queue (needs a running host)")
    parser.add_argument("--items", type=int, default=DEMO_ITEMS)
    parser.add_argument("--batches", type=int, default=DEMO_BATCHES)
    parser.add_argument("--seed", type=int, default=DEMO_SEED)
    parser.add_argument("--prefix", default=DEMO_PREFIX, help="prefix of the item ids (default item-)")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--force", action="store_true", help="enqueue again even when already loaded")
    args = parser.parse_args(argv)
    _logging()
    settings = _settings()
    if settings is None:
        return 2

    async def run() -> int:
        from recsys.db.pool import close_pools

        try:
            statuses = await load_demo_catalogue(settings, n=args.items, batches=args.batches, seed=args.seed,
                                                 prefix=args.prefix, timeout=args.timeout, force=args.force)
        finally:
            await close_pools()
        print(json.dumps([s.to_body() for s in statuses]))
        return 0

    try:
        return asyncio.run(run())
    except (RuntimeError, TimeoutError) as exc:
        print(f"recsys demo: {exc}", file=sys.stderr)
        return 1
