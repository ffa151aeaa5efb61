"""Validation of query parameters and bodies into typed values; errors name the field.

Pure functions (no database, no Azure): the HTTP layer passes query-string values (``str``)
or parsed JSON, and gets back values the service can use, or :class:`InvalidArgument` with
``field`` set to the offending top-level field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from recsys.errors import InvalidArgument

__all__ = [
    "MAX_BATCH_QUERIES",
    "MAX_IDS",
    "MAX_K",
    "MAX_VECTOR_COMPONENT",
    "NEGATIVE_WEIGHT",
    "RecommendationQuery",
    "SearchOptions",
    "SimilarQuery",
    "check_text",
    "parse_bool",
    "parse_id",
    "parse_ids",
    "parse_int",
    "parse_lookup",
    "parse_recommendation",
    "parse_similar",
]

MAX_K = 1000
MAX_EF_SEARCH = 1000
MAX_IDS = 1000
MAX_ID_LENGTH = 128
MAX_BATCH_QUERIES = 32
MAX_OFFSET = 1000
#: ``offset + k`` at most this: deep pages cost as much as asking for every result before them.
MAX_RANKED = 1000
MAX_CANDIDATES = 1000
#: Values per list filter (``category``, ``tags_any``, ``tags_all``) and keys of ``metadata``.
MAX_FILTER_VALUES = 100
MAX_METADATA_KEYS = 32
MAX_FILTER_TEXT = 256
STRATEGIES = ("average_vector", "best_score")
DEFAULT_K = 10
RECALL_TARGET_RANGE = (0.5, 0.999)
#: Largest magnitude a float32 (pgvector's element type) holds.
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Largest magnitude of a vector component. pgvector sums squares in float32 for cosine
#: distances: components near FLOAT32_MAX overflow to inf and the distance to NaN (which no JSON
#: answer can carry). 1e17 keeps the sum of squares finite up to 16,000 dimensions.
MAX_VECTOR_COMPONENT = 1e17
#: Largest magnitude a halfvec (float16) element holds: a catalogue stored in half precision
#: takes no component beyond it (pgvector refuses the cast).
HALFVEC_MAX = 65504.0


def max_component(vector_type: str) -> float:
    """The largest magnitude of a stored component in a catalogue of ``vector_type``."""
    return HALFVEC_MAX if vector_type == "halfvec" else MAX_VECTOR_COMPONENT

#: alpha of the recommendation query vector: q = mean(positives) - alpha * mean(negatives).
NEGATIVE_WEIGHT = 0.5
#: Smallest ``diversity`` that picks by MMR; below it the request is plain search (MMR would move
#: no score by more than the weight). PostgreSQL raises an error where a product of doubles
#: underflows to zero, and MMR multiplies the weight by similarities: the cosine similarity of
#: float32 vectors within ±1e17 is 0 or about 1e-82 and more in magnitude, so from this weight on
#: no product comes near underflow (5e-324 times a similarity under 0.5 did: a 500).
MIN_DIVERSITY = 1e-9

_INTEGER = re.compile(r"[+-]?[0-9]{1,18}")
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


@dataclass(frozen=True)
class SearchOptions:
    """Tuning, filters and result controls shared by ``/similar`` and ``/recommendations``.

    A filter left ``None`` is absent; present filters combine with AND (and with ``exclude``).
    """

    k: int = DEFAULT_K
    ef_search: int | None = None
    recall_target: float | None = None
    categories: tuple[str, ...] | None = None
    tags_any: tuple[str, ...] | None = None
    tags_all: tuple[str, ...] | None = None
    metadata: Mapping[str, str | int | float | bool] | None = None
    exclude: tuple[str, ...] = ()
    offset: int = 0
    score_threshold: float | None = None
    exact: bool = False
    with_vector: bool = False
    diversity: float = 0.0
    candidates: int | None = None

    @property
    def ranked(self) -> int:
        """How many results are ranked: the page and the ``offset`` results before it."""
        return self.k + self.offset

    @property
    def mmr_weight(self) -> float:
        """The ``diversity`` that MMR picks with: 0 (plain search) under ``MIN_DIVERSITY``."""
        return self.diversity if self.diversity >= MIN_DIVERSITY else 0.0

    @property
    def pool(self) -> int:
        """Candidates that diversity picks from: ``candidates``, by default max(4 * ranked, 50)."""
        chosen = self.candidates if self.candidates is not None else max(4 * self.ranked, 50)
        return min(max(chosen, self.ranked), MAX_CANDIDATES)


@dataclass(frozen=True)
class SimilarQuery(SearchOptions):
    pass


@dataclass(frozen=True)
class RecommendationQuery(SearchOptions):
    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    vector: npt.NDArray[np.float32] | None = field(default=None, compare=False)
    strategy: str = "average_vector"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_int(value: Any, name: str, low: int, high: int, *, text: bool = False) -> int:
    """An integer in ``[low, high]``: a JSON number, or with ``text`` a query-string value."""
    if isinstance(value, str) and text:
        digits = value.strip()
        if not _INTEGER.fullmatch(digits):
            raise InvalidArgument(f"{name} must be an integer, got {value!r}", field=name)
        value = int(digits)
    elif isinstance(value, float) and value.is_integer() and math.isfinite(value):
        value = int(value)
    if not _is_int(value):
        raise InvalidArgument(f"{name} must be an integer", field=name)
    if not low <= value <= high:
        raise InvalidArgument(f"{name} must be between {low} and {high}", field=name)
    return int(value)


def parse_number(value: Any, name: str, low: float, high: float, *, text: bool = False) -> float:
    """A finite number in ``[low, high]``: a JSON number, or with ``text`` a query-string value."""
    if isinstance(value, str) and text:
        try:
            value = float(value.strip())
        except ValueError:
            raise InvalidArgument(f"{name} must be a number, got {value!r}", field=name) from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number", field=name)
    if not low <= value <= high:
        raise InvalidArgument(f"{name} must be between {low:g} and {high:g}", field=name)
    return float(value)


def parse_bool(value: Any, name: str, *, text: bool = False) -> bool:
    """A JSON boolean, or with ``text`` ``true``/``false``/``1``/``0``/``yes``/``no``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and text:
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise InvalidArgument(f"{name} must be true or false", field=name)


def check_text(value: str, name: str) -> str:
    """``value`` unless it holds what PostgreSQL cannot store: NUL, or a lone surrogate.

    A lone surrogate (``"\\ud800"`` in JSON; or from a host that decodes URLs leniently) has
    no UTF-8 encoding, so the driver would fail on it with ``UnicodeEncodeError``.
    """
    if "\x00" in value:
        raise InvalidArgument(f"{name} must not contain NUL characters", field=name)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument(f"{name} is not valid Unicode (it holds a lone surrogate)", field=name) from None
    return value


def parse_id(value: Any, name: str = "id") -> str:
    """An item id: a string of 1-128 characters, or a JSON integer taken as its decimal string."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 4401.0 in JSON is the integer 4401 (JSON Schema agrees)
    if _is_int(value):
        value = str(value)
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a string or an integer", field=name)
    if not 1 <= len(value) <= MAX_ID_LENGTH:
        raise InvalidArgument(f"{name} must be 1 to {MAX_ID_LENGTH} characters long", field=name)
    return check_text(value, name)


def parse_ids(value: Any, name: str, *, limit: int = MAX_IDS) -> tuple[str, ...]:
    """A JSON array of at most ``limit`` ids; duplicates are kept (the caller decides)."""
    if not isinstance(value, list):
        raise InvalidArgument(f"{name} must be an array of ids", field=name)
    if len(value) > limit:
        raise InvalidArgument(f"{name} holds {len(value)} ids, the limit is {limit}", field=name)
    ids = []
    for index, item in enumerate(value):
        try:
            ids.append(parse_id(item, name))
        except InvalidArgument as exc:
            raise InvalidArgument(f"{name}[{index}]: {exc.message}", field=name) from None
    return tuple(ids)


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_FILTER_TEXT:
        raise InvalidArgument(f"{name} values must be strings of 1 to {MAX_FILTER_TEXT} characters", field=name)
    return check_text(value, name)


def parse_texts(value: Any, name: str) -> tuple[str, ...]:
    """A non-empty JSON array of at most ``MAX_FILTER_VALUES`` strings (duplicates dropped)."""
    if not isinstance(value, list) or not value:
        raise InvalidArgument(f"{name} must be a non-empty array of strings", field=name)
    if len(value) > MAX_FILTER_VALUES:
        raise InvalidArgument(f"{name} holds {len(value)} values, the limit is {MAX_FILTER_VALUES}", field=name)
    return tuple(dict.fromkeys(_text(v, name) for v in value))


def parse_categories(value: Any) -> tuple[str, ...] | None:
    """``category``: one string or a non-empty array of them."""
    if value is None:
        return None
    return parse_texts([value] if isinstance(value, str) else value, "category")


def parse_metadata(value: Any, *, text: bool = False) -> dict[str, str | int | float | bool] | None:
    """``metadata``: an object of key -> string, number or boolean (with ``text``, as JSON text)."""
    if value is None:
        return None
    if text:
        try:
            value = json.loads(value, parse_constant=_reject_constant)
        except (ValueError, TypeError):
            raise InvalidArgument("metadata must be a JSON object, as text", field="metadata") from None
    if not isinstance(value, dict):
        raise InvalidArgument("metadata must be an object of key to string, number or boolean", field="metadata")
    if len(value) > MAX_METADATA_KEYS:
        message = f"metadata holds {len(value)} keys, the limit is {MAX_METADATA_KEYS}"
        raise InvalidArgument(message, field="metadata")
    for key, item in value.items():
        _text(key, "metadata")
        if isinstance(item, str):
            check_text(item, "metadata")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidArgument("metadata numbers must be finite", field="metadata")
        elif not isinstance(item, int):  # bool is an int
            raise InvalidArgument(
                f"metadata value of {key!r} must be a string, a number or a boolean", field="metadata"
            )
    return dict(value)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number")


def parse_vector(value: Any, dim: int, name: str = "vector") -> npt.NDArray[np.float32]:
    """A JSON array of exactly ``dim`` finite numbers, not all zero, as float32."""
    if not isinstance(value, list):
        raise InvalidArgument(f"{name} must be an array of {dim} numbers", field=name)
    if len(value) != dim:
        raise InvalidArgument(f"{name} has {len(value)} dimensions, expected {dim}", field=name)
    for x in value:
        if isinstance(x, bool) or not isinstance(x, int | float):
            raise InvalidArgument(f"{name} must hold only numbers", field=name)
        if not math.isfinite(x) or abs(x) > MAX_VECTOR_COMPONENT:
            raise InvalidArgument(f"{name} must hold only finite numbers within ±{MAX_VECTOR_COMPONENT:g}", field=name)
    array = np.asarray(value, dtype=np.float32)
    if not np.any(array):
        raise InvalidArgument(f"{name} must not be all zeros: cosine similarity is undefined", field=name)
    return array


def _options(get: Mapping[str, Any], *, text: bool) -> dict[str, Any]:
    """The fields of :class:`SearchOptions` but the filters that differ between query string and body."""
    k = DEFAULT_K
    if get.get("k") is not None:
        k = parse_int(get["k"], "k", 1, MAX_K, text=text)
    ef_search = None
    if get.get("ef_search") is not None:
        ef_search = parse_int(get["ef_search"], "ef_search", 1, MAX_EF_SEARCH, text=text)
    recall_target = None
    if get.get("recall_target") is not None:
        recall_target = parse_number(get["recall_target"], "recall_target", *RECALL_TARGET_RANGE, text=text)
        if ef_search is not None:
            raise InvalidArgument("give either ef_search or recall_target, not both", field="recall_target")
    offset = 0
    if get.get("offset") is not None:
        offset = parse_int(get["offset"], "offset", 0, MAX_OFFSET, text=text)
        if offset + k > MAX_RANKED:
            raise InvalidArgument(f"offset + k must be at most {MAX_RANKED}", field="offset")
    score_threshold = None
    if get.get("score_threshold") is not None:
        score_threshold = parse_number(get["score_threshold"], "score_threshold", -1.0, 1.0, text=text)
    exact = parse_bool(get["exact"], "exact", text=text) if get.get("exact") is not None else False
    if exact and ef_search is not None:
        raise InvalidArgument("ef_search is not allowed with exact: an exact search uses no index", field="ef_search")
    if exact and recall_target is not None:
        message = "recall_target is not allowed with exact: an exact search has recall 1"
        raise InvalidArgument(message, field="recall_target")
    with_vector = False
    if get.get("with_vector") is not None:
        with_vector = parse_bool(get["with_vector"], "with_vector", text=text)
    diversity = 0.0
    if get.get("diversity") is not None:
        diversity = parse_number(get["diversity"], "diversity", 0.0, 1.0, text=text)
    candidates = None
    if get.get("candidates") is not None:
        candidates = parse_int(get["candidates"], "candidates", 1, MAX_CANDIDATES, text=text)
    return {
        "k": k,
        "ef_search": ef_search,
        "recall_target": recall_target,
        "offset": offset,
        "score_threshold": score_threshold,
        "exact": exact,
        "with_vector": with_vector,
        "diversity": diversity,
        "candidates": candidates,
    }


def _split(value: str, name: str) -> tuple[str, ...]:
    if not value:
        raise InvalidArgument(f"{name} must not be empty", field=name)
    return parse_texts(value.split(","), name)


def parse_similar(params: Mapping[str, str], pairs: Sequence[tuple[str, str]] | None = None) -> SimilarQuery:
    """The query string of ``GET /api/items/{id}/similar``.

    ``pairs`` is the whole query string as (name, value) pairs, for the repeated ``category``;
    without it ``params`` gives one. ``exclude``, ``tags_any`` and ``tags_all`` are
    comma-separated (so their values cannot contain commas here; the POST endpoints take JSON
    arrays), ``metadata`` is JSON text. Unknown parameters are ignored: the Functions host adds
    its own (``code``, the function key).
    """
    options = _options(params, text=True)
    raw_categories = [v for n, v in pairs if n == "category"] if pairs is not None else None
    if raw_categories is None and params.get("category") is not None:
        raw_categories = [params["category"]]
    exclude: tuple[str, ...] = ()
    raw_exclude = params.get("exclude")
    if raw_exclude:
        exclude = parse_ids(raw_exclude.split(","), "exclude")
    return SimilarQuery(
        **options,
        categories=parse_texts(raw_categories, "category") if raw_categories else None,
        tags_any=_split(params["tags_any"], "tags_any") if params.get("tags_any") is not None else None,
        tags_all=_split(params["tags_all"], "tags_all") if params.get("tags_all") is not None else None,
        metadata=parse_metadata(params.get("metadata"), text=True),
        exclude=exclude,
    )


_RECOMMENDATION_FIELDS = frozenset(
    (
        "positive", "negative", "vector", "k", "ef_search", "recall_target", "exclude", "category",
        "tags_any", "tags_all", "metadata", "offset", "score_threshold", "exact", "with_vector",
        "diversity", "candidates", "strategy",
    )
)


def _object(body: Any, allowed: frozenset[str], name: str = "body") -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise InvalidArgument(f"{name} must be a JSON object", field=name)
    for key in body:
        if key not in allowed:
            raise InvalidArgument(f"unknown field {key!r}; allowed: {', '.join(sorted(allowed))}", field=key)
    return body


def parse_recommendation(body: Any, dim: int) -> RecommendationQuery:
    """The body of ``POST /api/recommendations`` (and each query of the batch endpoint)."""
    data = _object(body, _RECOMMENDATION_FIELDS)
    positive = parse_ids(data["positive"], "positive") if data.get("positive") is not None else ()
    negative = parse_ids(data["negative"], "negative") if data.get("negative") is not None else ()
    vector = parse_vector(data["vector"], dim) if data.get("vector") is not None else None
    if not positive and vector is None:
        raise InvalidArgument("at least one of positive or vector is required", field="positive")
    options = _options(data, text=False)
    exclude = parse_ids(data["exclude"], "exclude") if data.get("exclude") is not None else ()
    strategy = data.get("strategy", "average_vector")
    if strategy is None:
        strategy = "average_vector"
    if strategy not in STRATEGIES:
        raise InvalidArgument(f"strategy must be one of {', '.join(STRATEGIES)}", field="strategy")
    return RecommendationQuery(
        **options,
        positive=tuple(dict.fromkeys(positive)),
        negative=tuple(dict.fromkeys(negative)),
        vector=vector,
        categories=parse_categories(data.get("category")),
        tags_any=parse_texts(data["tags_any"], "tags_any") if data.get("tags_any") is not None else None,
        tags_all=parse_texts(data["tags_all"], "tags_all") if data.get("tags_all") is not None else None,
        metadata=parse_metadata(data.get("metadata")),
        exclude=tuple(dict.fromkeys(exclude)),
        strategy=strategy,
    )


def parse_batch(body: Any) -> list[Any]:
    """The ``queries`` array of ``POST /api/recommendations/batch`` (each query parsed later)."""
    data = _object(body, frozenset(("queries",)))
    queries = data.get("queries")
    if not isinstance(queries, list) or not queries:
        raise InvalidArgument("queries must be a non-empty array of recommendation queries", field="queries")
    if len(queries) > MAX_BATCH_QUERIES:
        message = f"queries holds {len(queries)} queries, the limit is {MAX_BATCH_QUERIES}"
        raise InvalidArgument(message, field="queries")
    return queries


def parse_lookup(body: Any) -> tuple[tuple[str, ...], bool]:
    """The body of ``POST /api/items/lookup``: the ids (order kept) and ``include_vector``."""
    data = _object(body, frozenset(("ids", "include_vector")))
    if "ids" not in data:
        raise InvalidArgument("ids is required", field="ids")
    ids = parse_ids(data["ids"], "ids")
    include_vector = parse_bool(data["include_vector"], "include_vector") if "include_vector" in data else False
    return ids, include_vector
