"""The loader's own retries: a transient fault never spends the Functions host's retries.

The host retries a failing queue message ``maxDequeueCount`` times, ``visibilityTimeout`` apart
(5 × 5 s in host.json), then moves it to the poison queue without telling the function: an
outage of half a minute would poison every waiting message and leave its batch ``queued``. So
on a transient fault (database or PgBouncer unreachable, pool exhausted, statement timeout,
storage errors) the queue function does not raise. It sends a COPY of the message to the same
queue, invisible for a backoff delay, and returns normally, so the host deletes the original.

- The delay doubles from :data:`BASE_DELAY` up to ``RECSYS_LOADER_RETRY_MAX_DELAY`` (300 s),
  each drawn between half and all of that ("equal jitter"): waiting messages come back spread
  out rather than all at once when the database returns.
- The copy is the original JSON document with two more top-level keys, which every reader of
  messages ignores: ``origin`` (the first delivery's message id and insertion time, so the
  ledger's ``message:<id>`` source and the insertion-time version of a foreign producer's writes
  stay those of the original: a retried old message never looks newer than it is) and
  ``retry`` (attempt number, time of the first failure, last error).
- Sending the copy before the original is deleted is at-least-once: should the worker die in
  between, both load, and the ledger and the versions make the second one a no-op.
- After ``RECSYS_LOADER_RETRY_WINDOW_HOURS`` (24 h) of failures the loader gives up: the part is
  recorded ``failed`` with the last error (when the database can be reached; otherwise the next
  housekeeping run or ``python -m recsys replay`` records it) and the message goes to the poison
  queue, kept as long as the ledger remembers the batch, for ``python -m recsys replay``.
- If even the copy cannot be sent (storage unreachable), the function raises and the host's own
  retries take over.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from azure.core.exceptions import AzureError
from psycopg_pool import PoolTimeout

from recsys.config import Settings
from recsys.ingest import ledger, storage
from recsys.ingest.messages import INLINE_MAX_BYTES, BlobRef, message_key

__all__ = [
    "BASE_DELAY",
    "TRANSIENT",
    "Delivery",
    "backoff_delay",
    "give_up",
    "poison_ttl",
    "retry_later",
]

log = logging.getLogger("recsys")

#: Faults that a later attempt can get past. ``QueryCanceled`` (statement timeout) and
#: ``PoolTimeout`` are ``OperationalError``s too; ``OSError`` covers sockets and DNS.
TRANSIENT: tuple[type[BaseException], ...] = (psycopg.OperationalError, PoolTimeout, AzureError, OSError)

#: The first retry's delay in seconds (then doubling up to the configured maximum).
BASE_DELAY = 2.0
#: Longest error kept in a retry copy.
MAX_ERROR = 300


def backoff_delay(attempt: int, max_delay: float, rng: random.Random | None = None) -> float:
    """Seconds before attempt ``attempt + 1``: ``BASE_DELAY · 2^(attempt-1)`` capped, equal jitter."""
    ceiling = min(max_delay, BASE_DELAY * 2 ** min(max(attempt - 1, 0), 30))
    return (rng or random).uniform(ceiling / 2, ceiling)


def poison_ttl(settings: Settings) -> int:
    """Seconds a poisoned message is kept: as long as the ledger remembers its batch."""
    return settings.ledger_retention_days * 86400


@dataclass(frozen=True)
class Delivery:
    """One delivery of a queue message, with what it inherited from earlier attempts."""

    body: bytes
    document: dict[str, Any] | None
    message_id: str | None
    inserted_at: datetime | None
    attempt: int
    first_failure: float | None

    @classmethod
    def of(cls, body: bytes, message_id: str | None, inserted_at: datetime | None) -> Delivery:
        """The delivery of ``body``; a retry copy's ``origin`` and ``retry`` keys are honoured."""
        document: dict[str, Any] | None = None
        attempt, first_failure = 0, None
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            parsed = None
        if isinstance(parsed, dict):
            document = parsed
            origin = parsed.get("origin")
            if isinstance(origin, dict):
                if isinstance(origin.get("message_id"), str):
                    message_id = origin["message_id"]
                if type(origin.get("inserted_us")) is int and origin["inserted_us"] > 0:
                    inserted_at = datetime.fromtimestamp(origin["inserted_us"] / 1_000_000, UTC)
            retry = parsed.get("retry")
            if isinstance(retry, dict):
                if type(retry.get("attempt")) is int and retry["attempt"] > 0:
                    attempt = retry["attempt"]
                if isinstance(retry.get("first_failure"), int | float):
                    first_failure = float(retry["first_failure"])
        return cls(body, document, message_id, inserted_at, attempt, first_failure)

    def origin(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.message_id:
            out["message_id"] = self.message_id
        if self.inserted_at is not None:
            out["inserted_us"] = int(self.inserted_at.timestamp() * 1_000_000)
        return out

    def copy(self, **extra: Any) -> dict[str, Any]:
        """The document again, with this delivery's origin and ``extra`` top-level keys."""
        assert self.document is not None
        return {**self.document, "origin": self.origin(), **extra}


async def _encode(settings: Settings, document: dict[str, Any]) -> bytes:
    """``document`` as a message body; moved to a claim-check blob when it outgrows a message."""
    body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    if len(body) <= INLINE_MAX_BYTES or document.get("blob") is not None:
        return body
    # The added keys pushed an inline part over 64 KiB on the wire: the part goes to a blob,
    # as the producer does with large parts (the loader deletes it once the part has loaded;
    # housekeeping deletes it past the ledger retention otherwise).
    ref = BlobRef(settings.blob_container, f"retries/{uuid.uuid4().hex}.json")
    content = {k: document[k] for k in ("items", "delete") if document.get(k) is not None}
    await storage.upload_blob(settings, ref, json.dumps(content, separators=(",", ":")).encode())
    envelope = {k: v for k, v in document.items() if k not in ("items", "delete")}
    envelope["blob"] = str(ref)
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()


async def retry_later(delivery: Delivery, fault: BaseException, settings: Settings, *, now: float | None = None) -> str:
    """Send ``delivery`` again after a backoff delay, or give it up past the retry window.

    Returns ``"retrying"`` or ``"failed"``. Raises when storage refuses the copy (the host's
    own retries then apply).
    """
    now = time.time() if now is None else now
    reason = f"{type(fault).__name__}: {str(fault).strip().splitlines()[0] if str(fault).strip() else ''}"
    first = delivery.first_failure or now
    if delivery.document is None or now - first >= settings.loader_retry_window_hours * 3600:
        await give_up(delivery, f"still failing after {delivery.attempt + 1} attempts: {reason}", settings)
        return "failed"
    attempt = delivery.attempt + 1
    delay = backoff_delay(attempt, settings.loader_retry_max_delay)
    retry = {"attempt": attempt, "first_failure": first, "error": reason[:MAX_ERROR]}
    body = await _encode(settings, delivery.copy(retry=retry))
    await storage.send_messages(settings, settings.queue_name, [body], visibility_timeout=max(1, round(delay)))
    log.warning("message %s: transient fault (attempt %d), retrying in %.0f s: %s",
                delivery.message_id, attempt, delay, reason)
    return "retrying"


async def give_up(delivery: Delivery, reason: str, settings: Settings) -> None:
    """Record the part ``failed`` (if the database answers) and poison the message for replay."""
    from recsys.db.pool import get_pool
    from recsys.db.retry import checked_connection

    key = message_key(delivery.document)
    body = delivery.body
    if delivery.document is not None:
        document = delivery.copy()
        document.pop("retry", None)
        body = await _encode(settings, document)
    await storage.send_messages(settings, settings.poison_queue_name, [body], time_to_live=poison_ttl(settings))
    log.error("message %s moved to %s: %s", delivery.message_id, settings.poison_queue_name, reason)
    if key is None:
        return
    try:
        pool = await get_pool("loader", settings)
        async with checked_connection(pool, settings) as conn:
            await ledger.mark_failed(conn, key[0], key[1], reason)
    except TRANSIENT as exc:
        log.warning("batch %s part %d: cannot record its failure now (%s); housekeeping or replay will",
                    key[0], key[1], exc)
