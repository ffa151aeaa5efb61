"""``GET /api/openapi.json`` (anonymous): the OpenAPI 3 description of every endpoint."""

from __future__ import annotations

import functools
from pathlib import Path

import azure.functions as func

__all__ = ["OPENAPI_PATH", "bp", "openapi_document"]

OPENAPI_PATH = Path(__file__).with_name("openapi.json")

bp = func.Blueprint()


@functools.cache
def openapi_document() -> bytes:
    """The document kept in the repository next to this module, read once on first use."""
    return OPENAPI_PATH.read_bytes()


@bp.route(route="openapi.json", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def openapi_get(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(openapi_document(), status_code=200, mimetype="application/json", charset="utf-8")
