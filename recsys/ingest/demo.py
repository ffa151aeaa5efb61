"""The demo catalogue, loaded through the queue path like any producer's batches.

20,000 clustered items at the configured dimension (``recsys.datasets.clustered_catalogue``,
fixed seed), sent as a handful of large batches: each is one queue message pointing at a blob
(claim-check) with the vectors as ``embedding_b64``. ``make run`` enqueues them once the local
host is serving and waits until every batch is ``loaded``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import psycopg
from psycopg_pool import PoolTimeout

from recsys.config import Settings, get_settings
from recsys.datasets import clustered_catalogue
from recsys.ingest import ledger
from recsys.ingest.messages import Item
from recsys.ingest.producer import enqueue_items

__all__ = [
    "DEMO_BATCHES",
    "DEMO_ITEMS",
    "DEMO_PREFIX",
    "DEMO_SEED",
    "demo_batch_ids",
    "demo_items",
    "enqueue_demo_catalogue",
    "load_demo_catalogue",
    "wait_for_batches",
]

log = logging.getLogger("recsys")

DEMO_ITEMS = 20_000
DEMO_BATCHES = 4
DEMO_SEED = 42
DEMO_PREFIX = "item-"


def demo_items(n: int = DEMO_ITEMS, dim: int = 384, *, seed: int = DEMO_SEED, prefix: str = DEMO_PREFIX) -> list[Item]:
    """The demo catalogue's items: ids ``item-000000``…, a category, a cluster tag, a title."""
    catalogue = clustered_catalogue(n, dim, seed=seed, id_prefix=prefix)
    return [
        Item(
            id=item_id,
            embedding=catalogue.vectors[i],
            category=catalogue.categories[i],
            tags=[f"cluster-{int(catalogue.clusters[i])}"],
            metadata={"title": f"Demo item {i}", "cluster": int(catalogue.clusters[i])},
        )
        for i, item_id in enumerate(catalogue.ids)
    ]


def demo_batch_ids(
    batches: int = DEMO_BATCHES, *, seed: int = DEMO_SEED, n: int = DEMO_ITEMS, prefix: str = DEMO_PREFIX
) -> list[str]:
    return [f"{prefix}demo-{seed}-{n}-{k + 1}of{batches}" for k in range(batches)]


async def enqueue_demo_catalogue(
    settings: Settings | None = None,
    *,
    n: int = DEMO_ITEMS,
    batches: int = DEMO_BATCHES,
    seed: int = DEMO_SEED,
    prefix: str = DEMO_PREFIX,
) -> list[str]:
    """Send the demo catalogue to the loader's queue as ``batches`` batches; returns their ids."""
    settings = settings or get_settings()
    items = await asyncio.to_thread(demo_items, n, settings.embedding_dim, seed=seed, prefix=prefix)
    size = -(-n // batches)
    ids = demo_batch_ids(batches, seed=seed, n=n, prefix=prefix)
    for k, batch_id in enumerate(ids):
        chunk = items[k * size:(k + 1) * size]
        # One part per batch: each batch is one message and one blob, whatever its size.
        await enqueue_items(chunk, batch_id=batch_id, settings=settings, part_items=max(1, len(chunk)))
    return ids


async def _statuses(batch_ids: Sequence[str]) -> list[ledger.BatchStatus | None]:
    # Through the ingest pool: the loader's is busy with the very loads being waited for.
    return [await ledger.batch_status_bounded(batch_id) for batch_id in batch_ids]


async def _statuses_when_available(batch_ids: Sequence[str]) -> list[ledger.BatchStatus | None] | None:
    """The statuses, or ``None`` while the database is busy or unreachable."""
    try:
        return await _statuses(batch_ids)
    except (PoolTimeout, psycopg.OperationalError) as exc:
        # The database may be unreachable for a moment: ask again later.
        log.debug("batch statuses unavailable for now: %s", exc)
        return None


async def wait_for_batches(
    batch_ids: Sequence[str], *, timeout: float = 900.0, interval: float = 1.0
) -> list[ledger.BatchStatus]:
    """Wait until every batch is ``loaded``; return their statuses.

    Raises ``RuntimeError`` when one fails (with its reason) and ``TimeoutError`` after ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    while True:
        statuses = await _statuses_when_available(batch_ids)
        if statuses is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch statuses unavailable after {timeout:g} s")
            await asyncio.sleep(interval)
            continue
        failed = [s for s in statuses if s is not None and s.status == "failed"]
        if failed:
            raise RuntimeError(f"batch {failed[0].batch_id} failed: {failed[0].error}")
        if all(s is not None and s.status == "loaded" for s in statuses):
            return [s for s in statuses if s is not None]
        if time.monotonic() > deadline:
            waiting = [b for b, s in zip(batch_ids, statuses, strict=True) if s is None or s.status != "loaded"]
            raise TimeoutError(f"batches not loaded after {timeout:g} s: {', '.join(waiting)}")
        await asyncio.sleep(interval)


async def load_demo_catalogue(
    settings: Settings | None = None,
    *,
    n: int = DEMO_ITEMS,
    batches: int = DEMO_BATCHES,
    seed: int = DEMO_SEED,
    prefix: str = DEMO_PREFIX,
    timeout: float = 900.0,
    force: bool = False,
) -> list[ledger.BatchStatus]:
    """Enqueue the demo catalogue and wait until it is loaded (a no-op when it already is)."""
    ids = demo_batch_ids(batches, seed=seed, n=n, prefix=prefix)
    if not force:
        current = await _statuses_when_available(ids) or [None]
        if all(s is not None and s.status == "loaded" for s in current):
            log.info("the demo catalogue is already loaded (%d batches)", len(ids))
            return [s for s in current if s is not None]
    await enqueue_demo_catalogue(settings, n=n, batches=batches, seed=seed, prefix=prefix)
    statuses = await wait_for_batches(ids, timeout=timeout)
    log.info("demo catalogue loaded: %d items in %d batches", sum(s.rows for s in statuses), len(statuses))
    return statuses
