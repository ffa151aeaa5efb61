"""``python -m recsys replay``: send messages of the poison queue back to the loader.

A message reaches ``<queue>-poison`` when it can never load as it is (its part is ``failed`` with
the reason), when the loader gave up retrying it after ``RECSYS_LOADER_RETRY_WINDOW_HOURS``, or
when the Functions host gave up on it by itself (a worker that crashed or timed out
``maxDequeueCount`` times). Once the cause is fixed (the database is back, the dimension
setting corrected, the blob restored), ``replay`` sends each one back to the queue, marks its part
``queued`` again and deletes it from the poison queue; the loader then loads it or poisons it
again with the reason. A replayed message keeps its first delivery's id and insertion time
(``origin``, see ``recsys.ingest.retry``), so its writes keep their versions.

``--list`` only shows what is there, and records ``failed`` for a part that is still ``queued``
although its message is in the poison queue (the host gave up without the loader knowing).

A message another producer sent as plain JSON text, without the queue's base64 encoding, reaches
the poison queue unread (the host cannot decode it); ``replay`` sends it back encoded, and it loads.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

from recsys.config import Settings, get_settings
from recsys.ingest import storage
from recsys.ingest.messages import message_key

__all__ = ["ReplayReport", "replay", "replay_main"]

log = logging.getLogger("recsys")

#: Seconds a poison message stays hidden while one run looks at it.
LEASE_SECONDS = 120

_REQUEUE = """
UPDATE ingest_batches SET status = 'queued', error = NULL, updated_at = now()
 WHERE batch_id = %s AND part = %s AND status = 'failed'
"""
_MARK_POISONED = """
UPDATE ingest_batches SET status = 'failed', updated_at = now(),
       error = 'the Functions host moved this message to the poison queue after repeated failed deliveries'
 WHERE batch_id = %s AND part = %s AND status = 'queued'
"""


@dataclass
class ReplayReport:
    replayed: list[str] = field(default_factory=list)
    listed: list[str] = field(default_factory=list)
    marked_failed: list[str] = field(default_factory=list)
    skipped: int = 0


def _decode(content: Any) -> bytes | None:
    try:
        return base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError, TypeError):
        return None


def _document(body: bytes | None) -> dict[str, Any] | None:
    if body is None:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


async def replay(
    settings: Settings | None = None, *, batch_ids: set[str] | None = None, list_only: bool = False
) -> ReplayReport:
    """Replay (or with ``list_only`` list) the poison queue's messages, of ``batch_ids`` if given."""
    from recsys.db.pool import get_pool
    from recsys.ingest.clients import queue_client

    settings = settings or get_settings()
    report = ReplayReport()
    pool = await get_pool("loader", settings)
    held: list[Any] = []
    async with queue_client(settings.storage, settings.poison_queue_name) as poison:
        while True:
            page = [m async for m in poison.receive_messages(max_messages=32, visibility_timeout=LEASE_SECONDS)]
            if not page:
                break
            for message in page:
                doc = _document(_decode(message.content))
                if doc is None and isinstance(message.content, str):
                    # Sent as plain text, without the queue's base64 encoding (the host poisons it
                    # unread): replayed, it is sent encoded and loads.
                    doc = _document(message.content.encode())
                key = message_key(doc)
                label = f"{key[0]}/{key[1]}" if key else f"message {message.id} (unreadable)"
                if key is None or (batch_ids is not None and key[0] not in batch_ids):
                    report.skipped += 1
                    held.append(message)
                    continue
                if list_only:
                    report.listed.append(label)
                    async with pool.connection() as conn:
                        cur = await conn.execute(_MARK_POISONED, list(key))
                        if cur.rowcount:
                            report.marked_failed.append(label)
                    held.append(message)
                    continue
                assert doc is not None
                doc.pop("retry", None)
                # A message the host poisoned has lost its first insertion time: its insertion
                # into the poison queue is the closest one left.
                if message.inserted_on is not None:
                    doc.setdefault("origin", {"inserted_us": int(message.inserted_on.timestamp() * 1_000_000)})
                async with pool.connection() as conn:
                    await conn.execute(_REQUEUE, list(key))
                await storage.send_messages(settings, settings.queue_name, [json.dumps(doc).encode()])
                await poison.delete_message(message)
                report.replayed.append(label)
                log.info("replayed %s to %s", label, settings.queue_name)
        for message in held:  # visible again for the next run
            await poison.update_message(message, visibility_timeout=0)
    return report


def replay_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys replay", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", action="append", help="replay only this batch id (repeatable)")
    parser.add_argument("--list", action="store_true", help="only list the poison queue (and record failures)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> ReplayReport:
        from recsys.db.pool import close_pools

        try:
            return await replay(batch_ids=set(args.batch) if args.batch else None, list_only=args.list)
        finally:
            await close_pools()

    report = asyncio.run(main())
    for label in report.listed:
        print(f"poisoned  {label}" + ("  (recorded failed)" if label in report.marked_failed else ""))
    for label in report.replayed:
        print(f"replayed  {label}")
    print(f"{len(report.replayed)} replayed, {len(report.listed)} listed, {report.skipped} left in the poison queue")
    return 0


if __name__ == "__main__":
    sys.exit(replay_main(sys.argv[1:]))
