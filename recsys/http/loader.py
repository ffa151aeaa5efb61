"""The queue-triggered loader: one message of ``%RECSYS_QUEUE_NAME%`` -> one load transaction."""

from __future__ import annotations

import logging
import time

import azure.functions as func

from recsys.config import get_settings
from recsys.ingest.loader import process_message
from recsys.ingest.retry import TRANSIENT, Delivery, retry_later
from recsys.telemetry import invocation_span, record_load

__all__ = ["bp"]

log = logging.getLogger("recsys")

bp = func.Blueprint()


@bp.queue_trigger(arg_name="msg", queue_name="%RECSYS_QUEUE_NAME%", connection="AzureWebJobsStorage")
@invocation_span
async def loader_queue(msg: func.QueueMessage) -> None:
    """Load the message's batch part.

    A message that can never load is recorded ``failed`` and moved to the poison queue by the
    loader, and this function returns normally (the host deletes it: no retries wasted). On a
    transient fault a copy of the message is sent again with a backoff delay, and this function
    returns normally too (``recsys.ingest.retry``): the host's own retries, which end in the
    poison queue within half a minute, are left for faults of the storage account itself.
    """
    started = time.monotonic()
    delivery = Delivery.of(msg.get_body(), msg.id, msg.insertion_time)
    try:
        outcome = await process_message(
            delivery.body, message_id=delivery.message_id, inserted_at=delivery.inserted_at
        )
    except TRANSIENT as exc:
        await retry_later(delivery, exc, get_settings())
        return
    record_load(status=outcome.status, rows=outcome.rows, stale=outcome.stale, seconds=time.monotonic() - started)
    if outcome.status == "failed":
        log.warning(
            "message %s (batch %s part %d) moved to the poison queue: %s",
            msg.id, outcome.batch_id, outcome.part, outcome.error,
        )
    else:
        log.info("message %s: batch %s part %d %s, %d rows, %d deleted, %d stale", msg.id, outcome.batch_id,
                 outcome.part, outcome.status, outcome.rows, outcome.deleted, outcome.stale)
