"""``POST /api/embeddings/batches`` and ``GET /api/embeddings/batches/{batch_id}``."""

from __future__ import annotations

import azure.functions as func

from recsys.config import get_settings
from recsys.db.pool import get_pool
from recsys.errors import NotFound
from recsys.http.responses import handle_errors, json_response, read_json
from recsys.ingest import ledger
from recsys.ingest.messages import parse_batch_id
from recsys.ingest.producer import enqueue_document

__all__ = ["MAX_BATCH_BODY_BYTES", "MAX_BATCH_ITEMS", "bp"]

bp = func.Blueprint()

#: Largest batch body: ~15k items with ``embedding_b64`` at 384 dimensions, ~8k as JSON arrays.
MAX_BATCH_BODY_BYTES = 32 << 20
MAX_BATCH_ITEMS = 50_000


@bp.route(route="embeddings/batches", methods=["POST"])
@handle_errors
async def batches_post(req: func.HttpRequest) -> func.HttpResponse:
    """Validate every item, enqueue the batch for the loader, answer 202 with its id."""
    settings = get_settings()
    doc = read_json(req, max_bytes=MAX_BATCH_BODY_BYTES)
    enqueued = await enqueue_document(doc, settings=settings, max_items=MAX_BATCH_ITEMS)
    location = f"/api/embeddings/batches/{enqueued.batch_id}"
    return json_response(enqueued.to_body(), status=202, headers={"Location": location})


@bp.route(route="embeddings/batches/{batch_id}", methods=["GET"])
@handle_errors
async def batches_get(req: func.HttpRequest) -> func.HttpResponse:
    """The batch's status over its parts; 404 for an unknown batch."""
    batch_id = parse_batch_id(req.route_params.get("batch_id", ""))
    # The ledger belongs to the ingest side: read it with the loader's pool (and role).
    pool = await get_pool("loader")
    async with pool.connection() as conn:
        status = await ledger.batch_status(conn, batch_id)
    if status is None:
        raise NotFound(f"batch {batch_id!r} not found")
    return json_response(status.to_body())
