"""Request bodies: JSON text into Python values, or an error naming what is wrong.

Pure functions (no Azure, no database), so that every check has a unit test. A body is
accepted only when everything in it can travel further without surprises:

- UTF-8 text (RFC 8259), decoded strictly: an invalid byte sequence, or a surrogate encoded
  in UTF-8, is a 400 here rather than a ``UnicodeEncodeError`` deep in a driver;
- JSON nested at most :data:`MAX_DEPTH` levels: Python's parser recurses, and a document of
  ``[[[[...]]]]`` well under the size limit would otherwise exhaust the interpreter's stack;
- no key twice in one object: which of two values a parser keeps is not something a client
  should have to guess (Python keeps the last, others the first);
- strings free of ``\\u0000`` (PostgreSQL's text and jsonb cannot hold NUL) and of lone
  surrogate escapes such as ``\\ud800`` (not Unicode: no UTF-8 encoding exists for them);
- no ``NaN``/``Infinity`` (not JSON).

Numbers too large for a float parse as ``inf`` and integers stay exact; the field validators
(``recsys.search.params``, ``recsys.ingest.messages``) bound both.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from recsys.errors import InvalidArgument

__all__ = ["MAX_DEPTH", "json_depth", "parse_json_body"]

#: Deepest nesting of arrays and objects accepted in a body (a request needs 3 or 4 levels;
#: metadata gets the rest).
MAX_DEPTH = 64

# A complete JSON string; the unrolled form keeps the regular expression engine linear.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPENERS = np.frombuffer(b"[{", dtype=np.uint8)
# A surrogate pair written as two escapes is one valid character (emoji from ASCII-only encoders).
_SURROGATE_PAIR = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")
_FORBIDDEN_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})")


def json_depth(body: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in a JSON text, brackets inside strings not counted.

    Linear and done in C (regular expressions, ``bytes.translate``, numpy), so that it costs
    little even on a 32 MiB ingest body; a malformed text gets some answer, and the parser
    rejects it next.
    """
    structure = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if not structure:
        return 0
    brackets = np.frombuffer(structure, dtype=np.uint8)
    steps = np.where(np.isin(brackets, _OPENERS), 1, -1)
    return int(np.cumsum(steps).max())


def _printable(key: str) -> str:
    """A key as it may appear in an error: NUL and lone surrogates as backslash escapes."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidArgument(f"key {key!r} appears twice in one object", field=_printable(key))
            seen.add(key)
    return obj


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number")


def _path_of_bad_string(doc: Any) -> tuple[str, str] | None:
    """The path (``ids[0]``, ``items[2].metadata``) of the first string holding NUL or a lone
    surrogate, and what is wrong with it; ``None`` when there is none."""
    stack: list[tuple[str, Any]] = [("", doc)]
    while stack:
        path, value = stack.pop()
        texts: list[tuple[str, Any]] = []
        if isinstance(value, dict):
            for key, inner in reversed(value.items()):
                inner_path = f"{path}.{_printable(key)}" if path else _printable(key)
                texts.append((inner_path, key))
                stack.append((inner_path, inner))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", inner) for i, inner in reversed(list(enumerate(value))))
        elif isinstance(value, str):
            texts.append((path or "body", value))
        for text_path, text in texts:
            if "\x00" in text:
                return text_path, "must not contain NUL characters (\\u0000)"
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return text_path, "is not valid Unicode: it holds a lone surrogate escape"
    return None


def parse_json_body(body: bytes) -> Any:
    """``body`` parsed as JSON, under the rules of this module.

    Raises :class:`InvalidArgument`: ``field`` is ``body`` for text that is not acceptable
    JSON, the key for a duplicate key, and the path of the string for a NUL or a lone surrogate.
    """
    if not body.strip():
        raise InvalidArgument("request body is empty; a JSON object is required", field="body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        message = f"request body is not valid UTF-8: {exc.reason} at byte {exc.start}"
        raise InvalidArgument(message, field="body") from None
    depth = json_depth(body)
    if depth > MAX_DEPTH:
        raise InvalidArgument(f"request body is nested {depth} levels deep, the limit is {MAX_DEPTH}", field="body")
    try:
        doc = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_object_without_duplicates)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"request body is not valid JSON: {exc}", field="body") from None
    if "\\u" in text:
        # Escaped backslashes first (so that ``\\u0000`` is text, not an escape), then valid pairs.
        escapes = _SURROGATE_PAIR.sub("", text.replace("\\\\", ""))
        if _FORBIDDEN_ESCAPE.search(escapes):
            found = _path_of_bad_string(doc)
            if found is not None:
                path, problem = found
                raise InvalidArgument(f"{path} {problem}", field=path)
    return doc
