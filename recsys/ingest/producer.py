"""The producer: validated items -> queue messages, inline or through Blob storage.

A batch is cut into parts of at most ``part_items`` items (one transaction each in the loader,
so a huge batch never becomes one huge transaction); a part travels inline when its document
fits a queue message (64 KiB after base64, i.e. 48 KiB of JSON), otherwise as a claim-check:
the document in Blob storage and a small message pointing at it. A large batch is therefore a
handful of large blobs, never hundreds of tiny messages.

Every item is validated before anything is sent, and the parts are recorded ``queued`` in the
ledger *before* their messages go out, so that the status answers right after the 202 and a
fast loader can never be overtaken by the producer's own bookkeeping.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from recsys.config import Settings, get_settings
from recsys.ingest import ledger, storage
from recsys.ingest.messages import (
    INLINE_MAX_BYTES,
    BlobRef,
    Item,
    encode_document,
    new_batch_id,
    parse_batch_document,
)

__all__ = ["PART_ITEMS", "Enqueued", "enqueue_document", "enqueue_items", "plan_messages"]

#: Items per part: ~10 MB of base64 JSON at 384 dimensions, a few seconds of upsert.
PART_ITEMS = 5000


@dataclass(frozen=True)
class Enqueued:
    batch_id: str
    items: int
    messages: int
    blobs: int

    def to_body(self) -> dict[str, Any]:
        return {"batch_id": self.batch_id, "items": self.items, "messages": self.messages}


def plan_messages(
    batch_id: str, items: Sequence[Item], *, container: str, part_items: int = PART_ITEMS
) -> tuple[list[bytes], list[tuple[BlobRef, bytes]]]:
    """The queue payloads of a batch, and the blobs they point at (CPU only, no I/O)."""
    if part_items < 1:
        raise ValueError("part_items must be at least 1")
    token = uuid.uuid4().hex
    payloads: list[bytes] = []
    blobs: list[tuple[BlobRef, bytes]] = []
    for part, start in enumerate(range(0, len(items), part_items)):
        document = encode_document(batch_id, part, items=items[start:start + part_items])
        if len(document) <= INLINE_MAX_BYTES:
            payloads.append(document)
            continue
        # A fresh name per enqueue: sending a batch id again never overwrites a blob that a
        # message still in the queue points at.
        ref = BlobRef(container, f"batches/{token}/{part:05d}.json")
        blobs.append((ref, document))
        payloads.append(encode_document(batch_id, part, blob=ref))
    return payloads, blobs


async def enqueue_items(
    items: Sequence[Item],
    *,
    batch_id: str | None = None,
    settings: Settings | None = None,
    part_items: int = PART_ITEMS,
) -> Enqueued:
    """Send validated ``items`` to the loader's queue as batch ``batch_id`` (generated if absent).

    Raises what storage or the database raise when they cannot be reached (nothing is sent
    then, or the parts already recorded are marked failed).
    """
    from recsys.db.pool import get_pool

    settings = settings or get_settings()
    batch_id = batch_id or new_batch_id()
    if not items:
        raise ValueError("a batch needs at least one item")
    payloads, blobs = await asyncio.to_thread(
        plan_messages, batch_id, items, container=settings.blob_container, part_items=part_items
    )
    await asyncio.gather(*(storage.upload_blob(settings, ref, data) for ref, data in blobs))
    pool = await get_pool("loader")
    async with pool.connection() as conn:
        await ledger.record_queued(conn, batch_id, len(payloads))
    try:
        await storage.send_messages(settings, settings.queue_name, payloads)
    except Exception as exc:
        async with pool.connection() as conn:
            for part in range(len(payloads)):
                await ledger.mark_failed(conn, batch_id, part, f"could not enqueue: {type(exc).__name__}")
        raise
    return Enqueued(batch_id=batch_id, items=len(items), messages=len(payloads), blobs=len(blobs))


async def enqueue_document(
    doc: Any, *, settings: Settings | None = None, max_items: int | None = None, part_items: int = PART_ITEMS
) -> Enqueued:
    """Validate a batch document ``{"batch_id"?, "items": [...]}`` and enqueue it.

    Raises :class:`~recsys.errors.InvalidArgument` naming the first bad field; nothing is sent then.
    """
    settings = settings or get_settings()
    batch_id, items = await asyncio.to_thread(parse_batch_document, doc, settings.embedding_dim, max_items=max_items)
    return await enqueue_items(items, batch_id=batch_id, settings=settings, part_items=part_items)
