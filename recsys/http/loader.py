"""The queue-triggered loader: one message of ``%RECSYS_QUEUE_NAME%`` -> one load transaction."""

from __future__ import annotations

import logging

import azure.functions as func

from recsys.ingest.loader import process_message

__all__ = ["bp"]

log = logging.getLogger("recsys")

bp = func.Blueprint()


@bp.queue_trigger(arg_name="msg", queue_name="%RECSYS_QUEUE_NAME%", connection="AzureWebJobsStorage")
async def loader_queue(msg: func.QueueMessage) -> None:
    """Load the message's batch part.

    A message that can never load is recorded ``failed`` and moved to the poison queue by the
    loader, and this function returns normally (the host deletes it: no retries wasted). A
    transient fault raises, so the host makes the message visible again and retries it.
    """
    outcome = await process_message(msg.get_body(), message_id=msg.id, inserted_at=msg.insertion_time)
    if outcome.status == "failed":
        log.warning(
            "message %s (batch %s part %d) moved to the poison queue: %s",
            msg.id, outcome.batch_id, outcome.part, outcome.error,
        )
    else:
        log.info("message %s: batch %s part %d %s, %d rows, %d deleted, %d stale", msg.id, outcome.batch_id,
                 outcome.part, outcome.status, outcome.rows, outcome.deleted, outcome.stale)
