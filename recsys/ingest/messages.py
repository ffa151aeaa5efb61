"""Batch documents and queue messages of the ingest path: parsing, validation, encoding.

Pure functions, no I/O: the HTTP producer, the queue loader, the CLI and the demo all validate
items here, so a batch the producer accepted is one the loader can load. Every error is an
:class:`~recsys.errors.InvalidArgument` naming the offending field (``items[3].embedding``);
for the loader it is a permanent fault of the message.

Wire format (``API.md``): a UTF-8 JSON document
``{"batch_id", "part"?, "items": [...]}`` or ``{"batch_id", "part"?, "blob": "<container>/<name>"}``,
base64-encoded on the queue (the Functions host's default ``messageEncoding``).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from recsys.errors import InvalidArgument

__all__ = [
    "INLINE_MAX_BYTES",
    "MAX_ID_LENGTH",
    "QUEUE_MESSAGE_MAX_BYTES",
    "BlobRef",
    "Item",
    "Message",
    "decode_json",
    "encode_document",
    "encode_item",
    "message_from_document",
    "message_key",
    "new_batch_id",
    "parse_batch_document",
    "parse_batch_id",
    "parse_item",
    "parse_items",
    "parse_message",
]

#: Largest queue message Azure Storage accepts (and Azurite enforces), as sent on the wire.
QUEUE_MESSAGE_MAX_BYTES = 64 * 1024
#: Largest JSON document sent inline: base64 (the host's ``messageEncoding``) adds a third.
INLINE_MAX_BYTES = QUEUE_MESSAGE_MAX_BYTES // 4 * 3
MAX_ID_LENGTH = 128
MAX_CATEGORY_LENGTH = 256
MAX_TAGS = 256
MAX_TAG_LENGTH = 256
MAX_METADATA_BYTES = 64 * 1024

Vector = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Item:
    """One validated catalogue item, as the loader writes it."""

    id: str
    embedding: Vector
    category: str | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BlobRef:
    """A claim-check: the blob that holds a batch document."""

    container: str
    name: str

    def __str__(self) -> str:
        return f"{self.container}/{self.name}"


@dataclass(frozen=True)
class Message:
    """A queue message: its batch and part, and either the raw items or the blob holding them."""

    batch_id: str
    part: int
    items: list[Any] | None = None
    blob: BlobRef | None = None


def new_batch_id() -> str:
    return f"b-{uuid.uuid4().hex}"


# ----------------------------------------------------------------------------- JSON


def decode_json(data: bytes | str, *, what: str = "message", field: str = "body") -> Any:
    """``data`` parsed as JSON; :class:`InvalidArgument` naming ``field`` when it is not.

    ``NaN`` and ``Infinity`` are parsed (as Python does) so that the item they sit in can be
    named by the validation that follows, rather than rejecting the document as a whole.
    """
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}", field=field) from None


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# ----------------------------------------------------------------------------- scalars


def _check_text(value: str, name: str) -> None:
    # PostgreSQL text and jsonb cannot hold NUL; lone surrogates cannot be encoded as UTF-8.
    if "\x00" in value:
        raise InvalidArgument(f"{name} must not contain NUL characters", field=name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{name} is not valid Unicode (lone surrogate)", field=name) from None


def parse_id(value: Any, name: str) -> str:
    """An item id: a string of 1–128 characters, or a JSON integer taken as its decimal string."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a string or an integer", field=name)
    if not 1 <= len(value) <= MAX_ID_LENGTH:
        raise InvalidArgument(f"{name} must be 1 to {MAX_ID_LENGTH} characters, got {len(value)}", field=name)
    _check_text(value, name)
    return value


def parse_batch_id(value: Any, name: str = "batch_id") -> str:
    """A batch id: same rules as an item id."""
    return parse_id(value, name)


def _parse_category(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a string or null", field=name)
    if len(value) > MAX_CATEGORY_LENGTH:
        raise InvalidArgument(f"{name} must be at most {MAX_CATEGORY_LENGTH} characters", field=name)
    _check_text(value, name)
    return value


def _parse_tags(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument(f"{name} must be a list of strings", field=name)
    if len(value) > MAX_TAGS:
        raise InvalidArgument(f"{name} must have at most {MAX_TAGS} entries, got {len(value)}", field=name)
    for i, tag in enumerate(value):
        tag_name = f"{name}[{i}]"
        if not isinstance(tag, str):
            raise InvalidArgument(f"{tag_name} must be a string", field=tag_name)
        if len(tag) > MAX_TAG_LENGTH:
            raise InvalidArgument(f"{tag_name} must be at most {MAX_TAG_LENGTH} characters", field=tag_name)
        _check_text(tag, tag_name)
    return value


def _check_json_value(value: Any, name: str) -> None:
    stack = [value]
    while stack:
        current = stack.pop()
        if isinstance(current, str):
            _check_text(current, name)
        elif isinstance(current, float):
            if not math.isfinite(current):
                raise InvalidArgument(f"{name} must contain only finite numbers", field=name)
        elif isinstance(current, dict):
            for key, inner in current.items():
                _check_text(key, name)
                stack.append(inner)
        elif isinstance(current, list):
            stack.extend(current)


def _parse_metadata(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{name} must be a JSON object", field=name)
    _check_json_value(value, name)
    size = len(_dumps(value).encode("utf-8"))
    if size > MAX_METADATA_BYTES:
        raise InvalidArgument(f"{name} must be at most {MAX_METADATA_BYTES} bytes as JSON, got {size}", field=name)
    return value


# ----------------------------------------------------------------------------- vectors


def _finite_vector(vector: Vector, name: str) -> Vector:
    if not np.isfinite(vector).all():
        raise InvalidArgument(f"{name} must contain only finite numbers (float32 range)", field=name)
    if not vector.any():
        raise InvalidArgument(f"{name} must not be all zeros: its cosine similarity is undefined", field=name)
    return vector


def parse_embedding(value: Any, dim: int, name: str) -> Vector:
    """A JSON array of exactly ``dim`` finite numbers, as float32."""
    if not isinstance(value, list):
        raise InvalidArgument(f"{name} must be an array of {dim} numbers", field=name)
    if len(value) != dim:
        raise InvalidArgument(f"{name} must have {dim} dimensions, got {len(value)}", field=name)
    for v in value:
        # bool is an int in Python but not a number in JSON; strings would be converted by numpy.
        if type(v) is not float and type(v) is not int:
            raise InvalidArgument(f"{name} must contain only numbers", field=name)
    try:
        wide = np.array(value, dtype=np.float64)
    except OverflowError:
        raise InvalidArgument(f"{name} must contain only finite numbers (float32 range)", field=name) from None
    with np.errstate(over="ignore", invalid="ignore"):
        vector = wide.astype(np.float32)
    return _finite_vector(vector, name)


def parse_embedding_b64(value: Any, dim: int, name: str) -> Vector:
    """Base64 of ``dim`` little-endian float32 values, decoded with numpy."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a base64 string", field=name)
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"{name} is not valid base64", field=name) from None
    if len(raw) != dim * 4:
        raise InvalidArgument(
            f"{name} must hold {dim} little-endian float32 values ({dim * 4} bytes), got {len(raw)} bytes",
            field=name,
        )
    vector = np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=False)
    return _finite_vector(vector, name)


def encode_embedding(vector: Vector) -> str:
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


# ----------------------------------------------------------------------------- items


def parse_item(raw: Any, dim: int, name: str, *, vector: Vector | None = None) -> Item:
    """One item object; ``name`` prefixes the fields in errors (``items[3]``).

    ``vector``, when given, is the item's embedding from elsewhere (the bulk loader's ``.npy``).
    """
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{name} must be an object", field=name)
    if "id" not in raw:
        raise InvalidArgument(f"{name}.id is required", field=f"{name}.id")
    item_id = parse_id(raw["id"], f"{name}.id")
    has_list = raw.get("embedding") is not None
    has_b64 = raw.get("embedding_b64") is not None
    if vector is not None:
        if vector.shape != (dim,):
            raise InvalidArgument(f"{name}.embedding must have {dim} dimensions", field=f"{name}.embedding")
        vector = _finite_vector(np.asarray(vector, dtype=np.float32), f"{name}.embedding")
    elif has_list and has_b64:
        raise InvalidArgument(f"{name} must have embedding or embedding_b64, not both", field=f"{name}.embedding")
    elif has_b64:
        vector = parse_embedding_b64(raw["embedding_b64"], dim, f"{name}.embedding_b64")
    elif has_list:
        vector = parse_embedding(raw["embedding"], dim, f"{name}.embedding")
    else:
        raise InvalidArgument(f"{name}.embedding (or embedding_b64) is required", field=f"{name}.embedding")
    return Item(
        id=item_id,
        embedding=vector,
        category=_parse_category(raw.get("category"), f"{name}.category"),
        tags=_parse_tags(raw.get("tags"), f"{name}.tags"),
        metadata=_parse_metadata(raw.get("metadata"), f"{name}.metadata"),
    )


def parse_items(raw: Any, dim: int, *, name: str = "items", max_items: int | None = None) -> list[Item]:
    """A non-empty list of items with distinct ids.

    Duplicate ids in one batch are refused: one upsert cannot write a row twice, and which of
    the two should win is the producer's decision.
    """
    if not isinstance(raw, list):
        raise InvalidArgument(f"{name} must be a list of items", field=name)
    if not raw:
        raise InvalidArgument(f"{name} must not be empty", field=name)
    if max_items is not None and len(raw) > max_items:
        raise InvalidArgument(f"{name} must have at most {max_items} items, got {len(raw)}", field=name)
    items: list[Item] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(raw):
        item = parse_item(entry, dim, f"{name}[{i}]")
        first = seen.setdefault(item.id, i)
        if first != i:
            raise InvalidArgument(
                f"{name}[{i}].id {item.id!r} repeats {name}[{first}].id in the same batch", field=f"{name}[{i}].id"
            )
        items.append(item)
    return items


def parse_batch_document(doc: Any, dim: int, *, max_items: int | None = None) -> tuple[str | None, list[Item]]:
    """``{"batch_id"?, "items": [...]}``: the batch id if given, and the validated items."""
    if not isinstance(doc, dict):
        raise InvalidArgument("the batch must be a JSON object with items", field="body")
    batch_id = None if doc.get("batch_id") is None else parse_batch_id(doc["batch_id"])
    if "items" not in doc:
        raise InvalidArgument("items is required", field="items")
    return batch_id, parse_items(doc["items"], dim, max_items=max_items)


# ----------------------------------------------------------------------------- messages


def _parse_blob(value: Any) -> BlobRef:
    if not isinstance(value, str) or "/" not in value.strip("/"):
        raise InvalidArgument("blob must be '<container>/<name>'", field="blob")
    container, name = value.strip("/").split("/", 1)
    return BlobRef(container, name)


def message_key(doc: Any) -> tuple[str, int] | None:
    """``(batch_id, part)`` of a message document when they are valid, else ``None``.

    Used to record the failure of a message whose other fields are wrong.
    """
    if not isinstance(doc, dict):
        return None
    part = doc.get("part", 0)
    if type(part) is not int or part < 0:
        return None
    try:
        return parse_batch_id(doc.get("batch_id")), part
    except InvalidArgument:
        return None


def message_from_document(doc: Any) -> Message:
    """The envelope of a parsed queue message (the items stay raw until :func:`parse_items`).

    Raises :class:`InvalidArgument` (a permanent fault of the message) naming the field.
    """
    if not isinstance(doc, dict):
        raise InvalidArgument("message must be a JSON object", field="body")
    if doc.get("batch_id") is None:
        raise InvalidArgument("batch_id is required", field="batch_id")
    batch_id = parse_batch_id(doc["batch_id"])
    part = doc.get("part", 0)
    if type(part) is not int or part < 0:
        raise InvalidArgument("part must be a non-negative integer", field="part")
    has_items = doc.get("items") is not None
    has_blob = doc.get("blob") is not None
    if has_items == has_blob:
        raise InvalidArgument("message must have either items or blob", field="items")
    if has_blob:
        return Message(batch_id, part, blob=_parse_blob(doc["blob"]))
    items = doc["items"]
    if not isinstance(items, list):
        raise InvalidArgument("items must be a list of items", field="items")
    return Message(batch_id, part, items=items)


def parse_message(body: bytes | str) -> Message:
    """A queue message body (UTF-8 JSON, already base64-decoded) parsed into its envelope."""
    return message_from_document(decode_json(body))


def encode_item(item: Item) -> dict[str, Any]:
    """The wire form of a validated item (vectors as ``embedding_b64``, exact for float32)."""
    out: dict[str, Any] = {"id": item.id, "embedding_b64": encode_embedding(item.embedding)}
    if item.category is not None:
        out["category"] = item.category
    if item.tags:
        out["tags"] = item.tags
    if item.metadata:
        out["metadata"] = item.metadata
    return out


def encode_document(
    batch_id: str,
    part: int,
    *,
    items: Iterable[Item] | None = None,
    encoded_items: Sequence[dict[str, Any]] | None = None,
    blob: BlobRef | None = None,
) -> bytes:
    """A message (or blob) document as UTF-8 JSON."""
    doc: dict[str, Any] = {"batch_id": batch_id, "part": part}
    if blob is not None:
        doc["blob"] = str(blob)
    else:
        doc["items"] = list(encoded_items) if encoded_items is not None else [encode_item(i) for i in items or ()]
    return _dumps(doc).encode("utf-8")
