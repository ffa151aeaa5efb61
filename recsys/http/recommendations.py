"""Recommendations: ``POST /api/recommendations`` and ``POST /api/recommendations/batch``."""

from __future__ import annotations

import azure.functions as func

from recsys.config import get_settings
from recsys.db.pool import get_pool
from recsys.errors import RecsysError
from recsys.http.responses import MAX_BODY_BYTES, handle_errors, json_response, read_json
from recsys.search import service
from recsys.search.params import MAX_BATCH_QUERIES, RecommendationQuery, parse_batch, parse_recommendation
from recsys.telemetry import invocation_span

__all__ = ["MAX_BATCH_BODY_BYTES", "bp"]

bp = func.Blueprint()

#: 32 queries with a 2000-dimension vector each (about 40 KB of JSON apiece) fit with room to spare.
MAX_BATCH_BODY_BYTES = 4 * MAX_BODY_BYTES


@bp.route(route="recommendations", methods=["POST"])
@invocation_span
@handle_errors
async def recommendations_post(req: func.HttpRequest) -> func.HttpResponse:
    settings = get_settings()
    query = parse_recommendation(read_json(req), settings.embedding_dim)
    body = await service.recommend(await get_pool(), query, timeout_ms=settings.statement_timeout_ms)
    return json_response(body)


@bp.route(route="recommendations/batch", methods=["POST"])
@invocation_span
@handle_errors
async def recommendations_batch(req: func.HttpRequest) -> func.HttpResponse:
    settings = get_settings()
    raw_queries = parse_batch(read_json(req, max_bytes=MAX_BATCH_BODY_BYTES))
    batch: list[RecommendationQuery | RecsysError] = []
    for raw in raw_queries[:MAX_BATCH_QUERIES]:
        try:
            batch.append(parse_recommendation(raw, settings.embedding_dim))
        except RecsysError as exc:
            batch.append(exc)
    body = await service.recommend_batch(await get_pool(), batch, timeout_ms=settings.statement_timeout_ms)
    return json_response(body)
