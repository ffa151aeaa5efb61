"""Batch documents and queue messages of the ingest path: parsing, validation, encoding.

Pure functions, no I/O: the HTTP producer, the queue loader, the CLI and the demo all validate
items here, so a batch the producer accepted is one the loader can load. Every error is an
:class:`~recsys.errors.InvalidArgument` naming the offending field (``items[3].embedding``);
for the loader it is a permanent fault of the message.

Wire format (README, "Queue message"): a UTF-8 JSON document
``{"batch_id", "part"?, "source"?, "stale"?, "items"?: [...], "delete"?: [...]}`` or
``{"batch_id", "part"?, "source"?, "stale"?, "blob": "<container>/<name>"}`` (the blob holding the same
document), base64-encoded on the queue (the Functions host's default ``messageEncoding``).
Each item and each deletion may carry a ``version`` (1 .. 2^53 - 1).
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
from recsys.search.params import HALFVEC_MAX, MAX_VECTOR_COMPONENT

__all__ = [
    "INLINE_MAX_BYTES",
    "MAX_BATCH_ENTRIES",
    "MAX_ID_LENGTH",
    "MAX_PART_BYTES",
    "MAX_PART_ENTRIES",
    "MAX_VERSION",
    "QUEUE_MESSAGE_MAX_BYTES",
    "BlobRef",
    "Delete",
    "Item",
    "Message",
    "Part",
    "decode_json",
    "dump_json",
    "encode_delete",
    "encode_document",
    "encode_item",
    "latest_items",
    "message_envelope",
    "message_from_document",
    "message_key",
    "new_batch_id",
    "parse_batch_document",
    "parse_batch_id",
    "parse_deletes",
    "parse_item",
    "parse_items",
    "parse_message",
    "parse_part",
    "parse_version",
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
#: Largest version: 2^53 - 1, the largest integer every JSON parser holds exactly.
MAX_VERSION = 2**53 - 1
#: Most entries (items and deletions) in one batch of the HTTP endpoint.
MAX_BATCH_ENTRIES = 50_000
#: Most entries (items and deletions) in one part, i.e. one queue message and one load
#: transaction, whoever produced it. The project's producers cut parts well below it.
MAX_PART_ENTRIES = 10_000
#: Largest part document in bytes (a blob's size): the loader refuses larger ones before
#: reading them, so one load holds at most this much JSON (and its parsed form) in memory.
MAX_PART_BYTES = 32 * 1024 * 1024

Vector = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Item:
    """One validated catalogue item, as the loader writes it."""

    id: str
    embedding: Vector
    category: str | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    #: ``None`` until a producer stamps it (or the loader, from the message's insertion time).
    version: int | None = None


@dataclass(frozen=True)
class Delete:
    """One deletion of an id, with its version (``None`` until stamped, as for items)."""

    id: str
    version: int | None = None


@dataclass(frozen=True)
class Part:
    """The validated content of one part: what one load transaction writes."""

    items: list[Item]
    deletes: list[Delete]

    def __len__(self) -> int:
        return len(self.items) + len(self.deletes)


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
    #: The raw ``delete`` list of an inline message.
    deletes: list[Any] | None = None
    #: ``enqueue:<token>`` from the project's producers; ``None`` from others.
    source: str | None = None
    #: Writes of the batch that its producer found stale before sending (repeats of an id it
    #: dropped for the entry that wins, :func:`latest_items`): the loader counts them ``stale``.
    stale: int = 0


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


def dump_json(value: Any) -> str:
    """``value`` as compact JSON, as every message and blob document is written."""
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
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 4401.0 in JSON is the integer 4401 (JSON Schema agrees)
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


def parse_version(value: Any, name: str) -> int | None:
    """A version: an integer 1 .. 2^53 - 1 (``None`` when absent)."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1e12 in JSON is an integer written as a float
    if type(value) is not int or not 1 <= value <= MAX_VERSION:
        raise InvalidArgument(f"{name} must be an integer between 1 and {MAX_VERSION}", field=name)
    return value


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
    size = len(dump_json(value).encode("utf-8"))
    if size > MAX_METADATA_BYTES:
        raise InvalidArgument(f"{name} must be at most {MAX_METADATA_BYTES} bytes as JSON, got {size}", field=name)
    return value


# ----------------------------------------------------------------------------- vectors


def _finite_vector(vector: Vector, name: str, limit: float = MAX_VECTOR_COMPONENT) -> Vector:
    """``vector`` if its components are finite, within ``limit`` and not all zero.

    ``limit``: ``MAX_VECTOR_COMPONENT``, or ``HALFVEC_MAX`` for a catalogue stored in half
    precision (``recsys.search.params.max_component``).
    """
    if not np.isfinite(vector).all():
        raise InvalidArgument(f"{name} must contain only finite numbers (float32 range)", field=name)
    if vector.size and float(np.abs(vector).max()) > limit:
        reason = "the catalogue stores half precision" if limit == HALFVEC_MAX else "cosine overflows past it"
        raise InvalidArgument(f"{name} must contain only numbers within ±{limit:g} ({reason})", field=name)
    if not vector.any():
        raise InvalidArgument(f"{name} must not be all zeros: its cosine similarity is undefined", field=name)
    return vector


def parse_embedding(value: Any, dim: int, name: str, limit: float = MAX_VECTOR_COMPONENT) -> Vector:
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
    return _finite_vector(vector, name, limit)


def parse_embedding_b64(value: Any, dim: int, name: str, limit: float = MAX_VECTOR_COMPONENT) -> Vector:
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
    return _finite_vector(vector, name, limit)


def encode_embedding(vector: Vector) -> str:
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


# ----------------------------------------------------------------------------- items


def parse_item(raw: Any, dim: int, name: str, *, vector: Vector | None = None,
               limit: float = MAX_VECTOR_COMPONENT) -> Item:
    """One item object; ``name`` prefixes the fields in errors (``items[3]``).

    ``vector``, when given, is the item's embedding from elsewhere (the bulk loader's ``.npy``).
    ``limit``: the largest magnitude of a component (``recsys.search.params.max_component``).
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
        vector = _finite_vector(np.asarray(vector, dtype=np.float32), f"{name}.embedding", limit)
    elif has_list and has_b64:
        raise InvalidArgument(f"{name} must have embedding or embedding_b64, not both", field=f"{name}.embedding")
    elif has_b64:
        vector = parse_embedding_b64(raw["embedding_b64"], dim, f"{name}.embedding_b64", limit)
    elif has_list:
        vector = parse_embedding(raw["embedding"], dim, f"{name}.embedding", limit)
    else:
        raise InvalidArgument(f"{name}.embedding (or embedding_b64) is required", field=f"{name}.embedding")
    return Item(
        id=item_id,
        embedding=vector,
        category=_parse_category(raw.get("category"), f"{name}.category"),
        tags=_parse_tags(raw.get("tags"), f"{name}.tags"),
        metadata=_parse_metadata(raw.get("metadata"), f"{name}.metadata"),
        version=parse_version(raw.get("version"), f"{name}.version"),
    )


def parse_items(raw: Any, dim: int, *, name: str = "items", max_items: int | None = None,
                limit: float = MAX_VECTOR_COMPONENT) -> list[Item]:
    """A non-empty list of items.

    An id may repeat: like two messages writing it, the entry with the highest version wins,
    and the last of them where versions are equal (an entry without a version counts at the
    one it is given: the time of enqueue, or the message's insertion time); the loader writes
    that one and counts the others stale (:func:`latest_items`).
    """
    if not isinstance(raw, list):
        raise InvalidArgument(f"{name} must be a list of items", field=name)
    if not raw:
        raise InvalidArgument(f"{name} must not be empty", field=name)
    if max_items is not None and len(raw) > max_items:
        raise InvalidArgument(f"{name} must have at most {max_items} items, got {len(raw)}", field=name)
    return [parse_item(entry, dim, f"{name}[{i}]", limit=limit) for i, entry in enumerate(raw)]


def latest_items(items: Sequence[Item]) -> tuple[list[Item], int]:
    """The entry that wins for each id of ``items`` (versions stamped), and how many lost.

    The winner is the entry with the highest version, the last of them where versions are
    equal, as the loader picks within one message. A producer that splits a batch into several
    messages keeps only the winners, so that an id's entries never race in two messages.
    """
    latest: dict[str, Item] = {}
    for item in items:
        held = latest.get(item.id)
        if held is None or (item.version or 0) >= (held.version or 0):
            latest[item.id] = item
    return list(latest.values()), len(items) - len(latest)


def parse_deletes(raw: Any, *, name: str = "delete", max_entries: int | None = None) -> list[Delete]:
    """A list of deletions: ids, or ``{"id", "version"?}`` objects.

    An id may repeat: deleting it twice is deleting it once at the higher of the two versions,
    whichever order they arrive in (the loader applies the highest and counts the others stale).
    """
    if not isinstance(raw, list):
        raise InvalidArgument(f"{name} must be a list of ids or {{id, version}} objects", field=name)
    if max_entries is not None and len(raw) > max_entries:
        raise InvalidArgument(f"{name} must have at most {max_entries} entries, got {len(raw)}", field=name)
    deletes: list[Delete] = []
    for i, entry in enumerate(raw):
        where = f"{name}[{i}]"
        if isinstance(entry, dict):
            if "id" not in entry:
                raise InvalidArgument(f"{where}.id is required", field=f"{where}.id")
            unknown = sorted(set(entry) - {"id", "version"})
            if unknown:
                raise InvalidArgument(f"{where} has unknown fields: {', '.join(unknown)}", field=where)
            version = parse_version(entry.get("version"), f"{where}.version")
            delete = Delete(parse_id(entry["id"], f"{where}.id"), version)
        else:
            delete = Delete(parse_id(entry, where))
        deletes.append(delete)
    return deletes


def parse_part(doc: Any, dim: int, *, max_entries: int | None = MAX_PART_ENTRIES,
               limit: float = MAX_VECTOR_COMPONENT) -> Part:
    """The ``items`` and ``delete`` lists of a batch document, message or blob, validated.

    At least one of the two must be non-empty, together they hold at most ``max_entries``
    entries, and an id may not be both upserted and deleted (400 naming ``delete``).
    """
    if not isinstance(doc, dict):
        raise InvalidArgument("the batch must be a JSON object with items or delete", field="body")
    raw_items, raw_deletes = doc.get("items"), doc.get("delete")
    if raw_items is None and raw_deletes is None:
        raise InvalidArgument("items or delete is required", field="items")
    for key, raw in (("items", raw_items), ("delete", raw_deletes)):
        if raw is not None and not isinstance(raw, list):
            raise InvalidArgument(f"{key} must be a list", field=key)
    count = len(raw_items or ()) + len(raw_deletes or ())
    if count == 0:
        raise InvalidArgument("items and delete must not both be empty", field="items")
    if max_entries is not None and count > max_entries:
        field = "items" if len(raw_items or ()) > len(raw_deletes or ()) else "delete"
        raise InvalidArgument(
            f"items and delete must hold at most {max_entries} entries in all, got {count}", field=field
        )
    items = parse_items(raw_items, dim, limit=limit) if raw_items else []
    deletes = parse_deletes(raw_deletes) if raw_deletes else []
    if items and deletes:
        upserted = {item.id for item in items}
        for i, delete in enumerate(deletes):
            if delete.id in upserted:
                raise InvalidArgument(
                    f"delete[{i}] {delete.id!r} is also in items: a batch may not upsert and delete the same id",
                    field="delete",
                )
    return Part(items, deletes)


def parse_batch_document(doc: Any, dim: int, *, max_entries: int | None = MAX_BATCH_ENTRIES,
                         limit: float = MAX_VECTOR_COMPONENT) -> tuple[str | None, Part]:
    """``{"batch_id"?, "items"?: [...], "delete"?: [...]}``: the batch id if given, and the content."""
    if not isinstance(doc, dict):
        raise InvalidArgument("the batch must be a JSON object with items or delete", field="body")
    batch_id = None if doc.get("batch_id") is None else parse_batch_id(doc["batch_id"])
    return batch_id, parse_part(doc, dim, max_entries=max_entries, limit=limit)


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
    """The envelope of a parsed queue message (the entries stay raw until :func:`parse_part`).

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
    source = doc.get("source")
    if source is not None and (not isinstance(source, str) or not 1 <= len(source) <= 200):
        raise InvalidArgument("source must be a string of 1 to 200 characters", field="source")
    stale = doc.get("stale", 0)
    if type(stale) is not int or not 0 <= stale <= MAX_BATCH_ENTRIES:
        raise InvalidArgument(f"stale must be an integer from 0 to {MAX_BATCH_ENTRIES}", field="stale")
    has_entries = doc.get("items") is not None or doc.get("delete") is not None
    has_blob = doc.get("blob") is not None
    if has_entries == has_blob:
        raise InvalidArgument("message must have either items (or delete) or blob", field="items")
    if has_blob:
        return Message(batch_id, part, blob=_parse_blob(doc["blob"]), source=source, stale=stale)
    for key in ("items", "delete"):
        if doc.get(key) is not None and not isinstance(doc[key], list):
            raise InvalidArgument(f"{key} must be a list", field=key)
    return Message(batch_id, part, items=doc.get("items"), deletes=doc.get("delete"), source=source, stale=stale)


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
    if item.version is not None:
        out["version"] = item.version
    return out


def encode_delete(delete: Delete) -> dict[str, Any] | str:
    return delete.id if delete.version is None else {"id": delete.id, "version": delete.version}


def message_envelope(batch_id: str, part: int, *, source: str | None = None, stale: int = 0) -> dict[str, Any]:
    """The fields of a message document beside its entries or blob: batch, part, and the optional
    ``source`` and ``stale``."""
    envelope: dict[str, Any] = {"batch_id": batch_id, "part": part}
    if source is not None:
        envelope["source"] = source
    if stale:
        envelope["stale"] = stale
    return envelope


def encode_document(
    batch_id: str,
    part: int,
    *,
    items: Iterable[Item] | None = None,
    deletes: Iterable[Delete] | None = None,
    blob: BlobRef | None = None,
    source: str | None = None,
    stale: int = 0,
) -> bytes:
    """A message (or blob) document as UTF-8 JSON."""
    doc = message_envelope(batch_id, part, source=source, stale=stale)
    if blob is not None:
        doc["blob"] = str(blob)
    else:
        doc["items"] = [encode_item(i) for i in items or ()]
        doc["delete"] = [encode_delete(d) for d in deletes or ()]
    return dump_json(doc).encode("utf-8")
