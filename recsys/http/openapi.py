"""``GET /api/openapi.json`` (anonymous): the OpenAPI 3 description of every endpoint."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import azure.functions as func

from recsys.config import get_settings
from recsys.telemetry import invocation_span

__all__ = ["OPENAPI_PATH", "bp", "openapi_document"]

OPENAPI_PATH = Path(__file__).with_name("openapi.json")

bp = func.Blueprint()


#: Arrays in the document whose length is the catalogue's embedding dimension.
_VECTOR_SCHEMAS = (("components", "schemas", "RecommendationRequest", "properties", "vector"),)


@functools.cache
def openapi_document(embedding_dim: int) -> bytes:
    """The document kept in the repository next to this module, built once per dimension.

    The repository's copy states the default dimension; the served one states the configured
    ``RECSYS_EMBEDDING_DIM``, so that a schema-driven client builds vectors of the right length.
    """
    document = json.loads(OPENAPI_PATH.read_bytes())
    for path in _VECTOR_SCHEMAS:
        node = document
        for key in path:
            node = node[key]
        node["minItems"] = node["maxItems"] = embedding_dim
    return json.dumps(document, ensure_ascii=False).encode()


@bp.route(route="openapi.json", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@invocation_span
async def openapi_get(req: func.HttpRequest) -> func.HttpResponse:
    document = openapi_document(get_settings().embedding_dim)
    return func.HttpResponse(document, status_code=200, mimetype="application/json", charset="utf-8")
