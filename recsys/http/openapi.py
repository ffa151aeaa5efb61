"""``GET /api/openapi.json`` (anonymous): the OpenAPI 3 description of every endpoint."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import azure.functions as func

from recsys.config import get_settings
from recsys.search.params import HALFVEC_MAX
from recsys.telemetry import invocation_span

__all__ = ["OPENAPI_PATH", "bp", "openapi_document"]

OPENAPI_PATH = Path(__file__).with_name("openapi.json")

#: Schemas whose size follows the catalogue's dimension carry this key: ``length`` for a JSON
#: array of numbers, ``base64`` for base64 of little-endian float32 values. The file states the
#: default dimension (384); the served document states the configured one.
DIMENSION_KEY = "x-recsys-dimension"

bp = func.Blueprint()


def _base64_pattern(size: int) -> str:
    """A pattern matching exactly the base64 texts of ``size`` bytes (with their padding)."""
    full, rest = divmod(size, 3)
    tail = {0: "", 1: "[A-Za-z0-9+/]{2}==", 2: "[A-Za-z0-9+/]{3}="}[rest]
    return f"^[A-Za-z0-9+/]{{{4 * full}}}{tail}$"


def _set_dimension(node: Any, dim: int) -> None:
    if isinstance(node, dict):
        kind = node.get(DIMENSION_KEY)
        if kind == "length":
            node["minItems"] = node["maxItems"] = dim
        elif kind == "base64":
            node["minLength"] = node["maxLength"] = 4 * math.ceil(dim * 4 / 3)
            node["pattern"] = _base64_pattern(dim * 4)
        for value in node.values():
            _set_dimension(value, dim)
    elif isinstance(node, list):
        for value in node:
            _set_dimension(value, dim)


def _set_halfvec_bounds(doc: dict[str, Any]) -> None:
    """The stored embedding's components within ±HALFVEC_MAX, for a catalogue in half precision
    (a query's vector is scaled to unit length first, and keeps its bounds)."""
    item = doc["components"]["schemas"]["IngestItem"]["properties"]
    bounds = item["embedding"]["items"]
    bounds["minimum"], bounds["maximum"] = -HALFVEC_MAX, HALFVEC_MAX
    for field in ("embedding", "embedding_b64"):
        item[field]["description"] = item[field]["description"].replace(
            "±1e17", f"±{HALFVEC_MAX:g} (the catalogue stores half precision)")


@functools.cache
def openapi_document(dim: int | None = None, vector_type: str = "vector") -> bytes:
    """The document kept next to this module, with vector sizes for ``dim`` and the stored
    components' bounds for ``vector_type`` (as is when ``None`` and ``vector``)."""
    if dim is None and vector_type != "halfvec":
        return OPENAPI_PATH.read_bytes()
    doc = json.loads(OPENAPI_PATH.read_bytes())
    if dim is not None:
        _set_dimension(doc, dim)
    if vector_type == "halfvec":
        _set_halfvec_bounds(doc)
    return json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8")


@bp.route(route="openapi.json", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@invocation_span
async def openapi_get(req: func.HttpRequest) -> func.HttpResponse:
    settings = get_settings()
    document = openapi_document(settings.embedding_dim, settings.vector_type)
    return func.HttpResponse(document, status_code=200, mimetype="application/json", charset="utf-8")
