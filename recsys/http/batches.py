"""Writes: ``POST /api/embeddings/batches``, ``GET /api/embeddings/batches/{batch_id}`` and
``DELETE /api/items/{id}``.

Every write goes through the queue; these endpoints validate, enqueue and answer 202. Their
ledger writes and reads use the small ``ingest`` pool (never the loader's, which holds its
connections for whole COPY transactions), each bounded by the pool timeout (503 past it).
"""

from __future__ import annotations

from urllib.parse import quote

import azure.functions as func

from recsys.config import get_settings
from recsys.errors import InvalidArgument, NotFound
from recsys.http.responses import handle_errors, json_response, read_json
from recsys.ingest import ledger
from recsys.ingest.messages import MAX_BATCH_ENTRIES, MAX_VERSION, Delete, parse_batch_id, parse_id, parse_version
from recsys.ingest.producer import Enqueued, enqueue_document, enqueue_items
from recsys.telemetry import invocation_span

__all__ = ["MAX_BATCH_BODY_BYTES", "MAX_BATCH_ENTRIES", "bp"]

bp = func.Blueprint()

#: Largest batch body: ~15k items with ``embedding_b64`` at 384 dimensions, ~8k as JSON arrays.
MAX_BATCH_BODY_BYTES = 32 << 20


def _accepted(enqueued: Enqueued) -> func.HttpResponse:
    # Percent-encoded: a batch id may hold any character, a header only Latin-1 without controls.
    location = f"/api/embeddings/batches/{quote(enqueued.batch_id, safe='')}"
    return json_response(enqueued.to_body(), status=202, headers={"Location": location})


@bp.route(route="embeddings/batches", methods=["POST"])
@invocation_span
@handle_errors
async def batches_post(req: func.HttpRequest) -> func.HttpResponse:
    """Validate every upsert and deletion, enqueue the batch for the loader, answer 202 with its id."""
    settings = get_settings()
    doc = read_json(req, max_bytes=MAX_BATCH_BODY_BYTES)
    return _accepted(await enqueue_document(doc, settings=settings, max_entries=MAX_BATCH_ENTRIES))


@bp.route(route="embeddings/batches/{batch_id}", methods=["GET"])
@invocation_span
@handle_errors
async def batches_get(req: func.HttpRequest) -> func.HttpResponse:
    """The batch's status over its parts; 404 for an unknown batch."""
    batch_id = parse_batch_id(req.route_params.get("batch_id", ""))
    status = await ledger.batch_status_bounded(batch_id)
    if status is None:
        raise NotFound(f"batch {batch_id!r} not found")
    return json_response(status.to_body())


@bp.route(route="items/{id}", methods=["DELETE"])
@invocation_span
@handle_errors
async def items_delete(req: func.HttpRequest) -> func.HttpResponse:
    """Enqueue a batch holding one deletion (``?version=`` optional); 202 as for batches."""
    item_id = parse_id(req.route_params.get("id"), "id")
    raw = req.params.get("version")
    version = None
    if raw is not None:
        # Digits only (no sign, no spaces, no other scripts' digits), and few enough of them
        # that int() is cheap; the range is checked as for versions in a body.
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 20):
            raise InvalidArgument(f"version must be an integer between 1 and {MAX_VERSION}", field="version")
        version = parse_version(int(raw), "version")
    return _accepted(await enqueue_items([], deletes=[Delete(item_id, version)], settings=get_settings()))
