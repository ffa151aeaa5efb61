"""Items: ``GET /api/items/{id}``, ``POST /api/items/lookup``, ``GET /api/items/{id}/similar``."""

from __future__ import annotations

import azure.functions as func

from recsys.config import get_settings
from recsys.db.pool import get_pool
from recsys.http.responses import handle_errors, json_response, query_pairs, read_json
from recsys.search import service
from recsys.search.params import parse_bool, parse_id, parse_lookup, parse_similar
from recsys.telemetry import invocation_span

__all__ = ["bp"]

bp = func.Blueprint()


@bp.route(route="items/lookup", methods=["POST"])
@invocation_span
@handle_errors
async def items_lookup(req: func.HttpRequest) -> func.HttpResponse:
    ids, include_vector = parse_lookup(read_json(req))
    settings = get_settings()
    body = await service.lookup_items(
        await get_pool(), ids, include_vector=include_vector, timeout_ms=settings.statement_timeout_ms
    )
    return json_response(body)


@bp.route(route="items/{id}", methods=["GET"])
@invocation_span
@handle_errors
async def items_get(req: func.HttpRequest) -> func.HttpResponse:
    item_id = parse_id(req.route_params.get("id"), "id")
    include_vector = parse_bool(req.params.get("include_vector", "false"), "include_vector", text=True)
    settings = get_settings()
    body = await service.get_item(
        await get_pool(), item_id, include_vector=include_vector, timeout_ms=settings.statement_timeout_ms
    )
    return json_response(body)


@bp.route(route="items/{id}/similar", methods=["GET"])
@invocation_span
@handle_errors
async def similar_get(req: func.HttpRequest) -> func.HttpResponse:
    item_id = parse_id(req.route_params.get("id"), "id")
    query = parse_similar(req.params, query_pairs(req))
    settings = get_settings()
    body = await service.similar_items(await get_pool(), item_id, query, timeout_ms=settings.statement_timeout_ms)
    return json_response(body)
