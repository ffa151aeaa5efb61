"""Schemathesis hooks for ``test_fuzz.py``: the constraints OpenAPI cannot state.

Only cases generated as *valid* are dropped, and only those that break a rule the document
states in words but JSON Schema cannot express: a positive case that breaks one would be
rejected (400) as documented, and the fuzzer would wrongly report a valid request rejected.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
import schemathesis
from schemathesis import GenerationMode


def _ids(entries: Any) -> list[str]:
    ids = []
    for entry in entries if isinstance(entries, list) else []:
        value = entry.get("id") if isinstance(entry, dict) else entry
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ids.append(str(value))
    return ids


def _number(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _breaks_search_rules(fields: dict[str, Any]) -> bool:
    exact = str(fields.get("exact", "false")).lower() in ("true", "1", "yes")
    tuned = [name for name in ("ef_search", "recall_target") if fields.get(name) is not None]
    if len(tuned) == 2 or (exact and tuned):
        return True
    return _number(fields.get("offset"), 0) + _number(fields.get("k"), 10) > 1000


def _breaks_unstated_rules(case: Any) -> bool:
    path = case.operation.path
    if path == "/api/items/{id}/similar":
        # Query parameters cannot exclude each other in OpenAPI: ef_search or recall_target,
        # neither with exact; nor can they add up: offset + k at most 1000.
        return _breaks_search_rules(case.query or {})
    if path == "/api/recommendations" and isinstance(case.body, dict):
        return _breaks_search_rules(case.body)
    if path == "/api/embeddings/batches" and isinstance(case.body, dict):
        # No id in both items and delete.
        if set(_ids(case.body.get("items"))) & set(_ids(case.body.get("delete"))):
            return True
        # embedding_b64 must decode to finite float32 values, not all zero.
        entries = case.body.get("items")
        return any(_bad_b64(item.get("embedding_b64")) for item in entries if isinstance(item, dict)) \
            if isinstance(entries, list) else False
    return False


def _bad_b64(text: Any) -> bool:
    if not isinstance(text, str):
        return False
    try:
        vector = np.frombuffer(base64.b64decode(text, validate=True), dtype="<f4")
    except (binascii.Error, ValueError):
        return False  # the schema's pattern and length decide
    return not np.isfinite(vector).all() or not vector.any() or bool(np.abs(vector).max() > 1e17)


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return True
    return not _breaks_unstated_rules(case)
