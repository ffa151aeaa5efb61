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
import dataclasses
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from recsys.config import Settings, get_settings
from recsys.ingest import ledger, storage
from recsys.ingest.messages import (
    INLINE_MAX_BYTES,
    MAX_BATCH_ENTRIES,
    MAX_PART_BYTES,
    MAX_PART_ENTRIES,
    BlobRef,
    Delete,
    Item,
    dump_json,
    encode_delete,
    encode_document,
    encode_item,
    latest_items,
    message_envelope,
    new_batch_id,
    parse_batch_document,
)
from recsys.search.params import max_component

__all__ = [
    "PART_BYTES",
    "PART_ITEMS",
    "Enqueued",
    "enqueue_document",
    "enqueue_items",
    "next_version",
    "plan_messages",
    "stamp_versions",
]

#: Entries per part: ~10 MB of base64 JSON at 384 dimensions, a few seconds of upsert.
PART_ITEMS = 5000
#: Bytes per part document: half the loader's limit, so that a part of wide vectors (halfvec
#: at 4,000 dimensions is ~22 KB an item) is cut smaller rather than refused.
PART_BYTES = MAX_PART_BYTES // 2

_clock = threading.Lock()
_last_version = 0


def next_version() -> int:
    """The time now in microseconds since the epoch, strictly increasing within the process.

    The version the project's producers give writes that do not state one: two enqueues of
    the same id from one process never share a version, so the later one always wins.
    """
    global _last_version
    with _clock:
        _last_version = max(time.time_ns() // 1000, _last_version + 1)
        return _last_version


def stamp_versions(items: Sequence[Item], deletes: Sequence[Delete], version: int) -> tuple[list[Item], list[Delete]]:
    """``items`` and ``deletes`` with ``version`` wherever they carry none."""
    return (
        [i if i.version is not None else dataclasses.replace(i, version=version) for i in items],
        [d if d.version is not None else Delete(d.id, version) for d in deletes],
    )


@dataclass(frozen=True)
class Enqueued:
    batch_id: str
    items: int
    messages: int
    blobs: int
    deletes: int = 0

    def to_body(self) -> dict[str, Any]:
        return {"batch_id": self.batch_id, "items": self.items, "deletes": self.deletes, "messages": self.messages}


def _cut(entries: list[tuple[str, str]], part_items: int, part_bytes: int) -> list[list[tuple[str, str]]]:
    """Entries (kind, JSON) in runs of at most ``part_items`` entries and about ``part_bytes`` bytes."""
    parts: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    size = 0
    for entry in entries:
        length = len(entry[1]) + 1
        if current and (len(current) >= part_items or size + length > part_bytes):
            parts.append(current)
            current, size = [], 0
        current.append(entry)
        size += length
    if current:
        parts.append(current)
    return parts


def _document(batch_id: str, part: int, source: str, entries: list[tuple[str, str]], stale: int) -> bytes:
    """The part document from entries already encoded (each item serialised once)."""
    head = dump_json(message_envelope(batch_id, part, source=source, stale=stale))[:-1]
    items = ",".join(text for kind, text in entries if kind == "items")
    deletes = ",".join(text for kind, text in entries if kind == "delete")
    return f'{head},"items":[{items}],"delete":[{deletes}]}}'.encode()


def plan_messages(
    batch_id: str,
    items: Sequence[Item],
    *,
    container: str,
    deletes: Sequence[Delete] = (),
    source: str | None = None,
    part_items: int = PART_ITEMS,
    part_bytes: int = PART_BYTES,
    stale: int = 0,
) -> tuple[list[bytes], list[tuple[BlobRef, bytes]]]:
    """The queue payloads of a batch, and the blobs they point at (CPU only, no I/O).

    Parts hold at most ``part_items`` entries and about ``part_bytes`` bytes (never more than
    the loader's limits); each travels inline when it fits a queue message, else as a blob.
    ``stale`` (writes dropped before sending) travels on the first part's message.
    """
    if not 1 <= part_items <= MAX_PART_ENTRIES:
        raise ValueError(f"part_items must be between 1 and {MAX_PART_ENTRIES}")
    token = uuid.uuid4().hex
    source = source or f"enqueue:{token}"
    entries = [("items", dump_json(encode_item(i))) for i in items]
    entries += [("delete", dump_json(encode_delete(d))) for d in deletes]
    payloads: list[bytes] = []
    blobs: list[tuple[BlobRef, bytes]] = []
    for part, chunk in enumerate(_cut(entries, part_items, min(part_bytes, MAX_PART_BYTES - 4096))):
        dropped = stale if part == 0 else 0
        document = _document(batch_id, part, source, chunk, dropped)
        if len(document) <= INLINE_MAX_BYTES:
            payloads.append(document)
            continue
        # A fresh name per enqueue: sending a batch id again never overwrites a blob that a
        # message still in the queue points at.
        ref = BlobRef(container, f"batches/{token}/{part:05d}.json")
        blobs.append((ref, document))
        payloads.append(encode_document(batch_id, part, blob=ref, source=source, stale=dropped))
    return payloads, blobs


async def enqueue_items(
    items: Sequence[Item],
    *,
    deletes: Sequence[Delete] = (),
    batch_id: str | None = None,
    settings: Settings | None = None,
    part_items: int = PART_ITEMS,
) -> Enqueued:
    """Send validated ``items`` and ``deletes`` to the loader's queue as batch ``batch_id``.

    The batch id is generated when absent; writes without a version get the time of enqueue
    (:func:`next_version`). Of an id upserted more than once, only the entry that wins is sent
    (:func:`~recsys.ingest.messages.latest_items`), the others counted stale in the batch's
    status: the parts of a batch may load in any order, and equal versions would race. The
    ledger is written through the small ``ingest`` pool of its own, within the pool timeout, so
    enqueueing never waits for the loader's connections.

    Raises what storage or the database raise when they cannot be reached (nothing is sent
    then, or the parts already recorded are marked failed).
    """
    settings = settings or get_settings()
    batch_id = batch_id or new_batch_id()
    if not items and not deletes:
        raise ValueError("a batch needs at least one item or deletion")
    given = len(items)
    items, deletes = stamp_versions(items, deletes, next_version())
    items, stale = latest_items(items)
    source = f"enqueue:{uuid.uuid4().hex}"
    payloads, blobs = await asyncio.to_thread(
        plan_messages, batch_id, items, deletes=deletes, container=settings.blob_container,
        source=source, part_items=part_items, stale=stale,
    )
    await asyncio.gather(*(storage.upload_blob(settings, ref, data) for ref, data in blobs))
    await ledger.record_queued_bounded(batch_id, len(payloads), source, settings=settings)
    try:
        await storage.send_messages(settings, settings.queue_name, payloads)
    except Exception as exc:
        await ledger.mark_enqueue_failed(batch_id, len(payloads), f"could not enqueue: {type(exc).__name__}",
                                         settings=settings)
        raise
    return Enqueued(batch_id=batch_id, items=given, messages=len(payloads), blobs=len(blobs),
                    deletes=len(deletes))


async def enqueue_document(
    doc: Any, *, settings: Settings | None = None, max_entries: int | None = MAX_BATCH_ENTRIES,
    part_items: int = PART_ITEMS,
) -> Enqueued:
    """Validate a batch document ``{"batch_id"?, "items"?: [...], "delete"?: [...]}`` and enqueue it.

    Raises :class:`~recsys.errors.InvalidArgument` naming the first bad field; nothing is sent then.
    """
    settings = settings or get_settings()
    batch_id, part = await asyncio.to_thread(parse_batch_document, doc, settings.embedding_dim,
                                             max_entries=max_entries, limit=max_component(settings.vector_type))
    return await enqueue_items(part.items, deletes=part.deletes, batch_id=batch_id, settings=settings,
                               part_items=part_items)
