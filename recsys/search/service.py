"""The query service: items by id, similar items, recommendations.

Every function takes a :data:`~recsys.db.retry.Database` (the pool, or one connection) and plain
values, and returns JSON-ready dicts; nothing here knows Azure Functions. With the pool, reads
are retried on transient connection faults within the pool timeout (``recsys.db.retry``).
Each call is one round trip (see ``recsys.search.queries``).

Raises :class:`~recsys.errors.NotFound` (unknown item, unknown positive/negative ids, with the
field), :class:`~recsys.errors.InvalidArgument`, :class:`~recsys.errors.NotCalibrated`; lets
``psycopg.errors.QueryCanceled`` (statement timeout), ``psycopg_pool.PoolTimeout`` and
``psycopg.OperationalError`` through for the caller to map (504 / 503).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.types.json import Jsonb

from recsys.db.retry import Database, run_read
from recsys.errors import InvalidArgument, NotFound, RecsysError
from recsys.search import queries
from recsys.search.calibration import choose_ef_search
from recsys.search.params import MIN_DIVERSITY, NEGATIVE_WEIGHT, RecommendationQuery, SearchOptions, SimilarQuery
from recsys.telemetry import database_span, record_ef_search

__all__ = [
    "DEFAULT_EF_SEARCH",
    "INDEX_COST_RATIO",
    "MIN_DIVERSITY",
    "NEGATIVE_WEIGHT",
    "EfChoice",
    "UnknownItems",
    "get_item",
    "lookup_items",
    "recommend",
    "recommend_batch",
    "resolve_ef_search",
    "similar_items",
    "similar_params",
]

#: ``hnsw.ef_search`` when a request gives neither ``ef_search`` nor ``recall_target``.
#: pgvector's own default is 40; 100 keeps recall@10 above 0.95 on clustered catalogues at
#: about 1-3 ms per query (see README, Queries).
DEFAULT_EF_SEARCH = 100

#: Cost of a tuple visited by the HNSW iterative scan, in exact-scan rows: the cost model that
#: chooses between the index and an exact scan of the items passing the filters (see
#: sql/070_query_filters.sql and README, Queries): a visited tuple costs a few distance computations
#: to graph neighbours plus a heap fetch, a scored row one distance (about 1.7 µs here).
INDEX_COST_RATIO = 2.0

#: Values of a response's ``search`` for which an exact scan found the results.
EXACT_METHODS = frozenset({"exact", "hnsw+exact"})

#: Seconds a request waits for the database beyond its statement timeout before giving up:
#: past that, the statement never reached PostgreSQL (which would have cancelled it).
ANSWER_GRACE = 1.0

Row = dict[str, Any]


def _limit(timeout_ms: int) -> float:
    return timeout_ms / 1000 + ANSWER_GRACE


@dataclass(frozen=True)
class EfChoice:
    """The ``hnsw.ef_search`` a request runs with, and the recall expected from it (if known)."""

    ef_search: int
    expected_recall: float | None = None


async def resolve_ef_search(
    db: Database, *, k: int, ef_search: int | None, recall_target: float | None, shape: str = "item"
) -> EfChoice:
    """The ``ef_search`` to use for a request asking for ``k`` results.

    An explicit ``ef_search`` below ``k`` is raised to ``k`` (HNSW cannot return more rows
    than its candidate list holds). ``recall_target`` takes the smallest calibrated
    ``ef_search`` expected to reach it, with that expected recall, from the curve of queries of
    ``shape`` (``recsys.search.calibration``; the curve is cached per worker, so this costs no
    round trip while it is fresh). Raises :class:`NotCalibrated` when the catalogue has no
    calibration.
    """
    if recall_target is not None:
        chosen = await choose_ef_search(db, recall_target, shape)
        record_ef_search(max(k, chosen.ef_search), recall_target)
        return EfChoice(ef_search=max(k, chosen.ef_search), expected_recall=chosen.expected_recall)
    return EfChoice(ef_search=max(k, ef_search if ef_search is not None else DEFAULT_EF_SEARCH))


def _operation(query: str) -> str:
    """A short name of the statement for its span: the function it calls, or the table it reads."""
    match = re.search(r"\bFROM\s+([a-z_]+)", query)
    return match.group(1) if match else "select"


async def _fetch(conn: psycopg.AsyncConnection[Any], query: str, params: dict[str, Any], timeout_ms: int) -> list[Row]:
    """Rows of ``query`` as dicts, sent in one message behind the statement timeout."""
    async with psycopg.AsyncClientCursor(conn) as cur:
        try:
            with database_span(_operation(query), query):
                await cur.execute(queries.TIMEOUT_PREFIX + query, {"statement_timeout": str(timeout_ms), **params})
        except pg_errors.NoDataFound as exc:
            raise _not_found(exc) from None
        except pg_errors.InvalidParameterValue as exc:
            raise InvalidArgument(exc.diag.message_primary or str(exc), field=exc.diag.column_name) from None
        cur.nextset()  # past the set_config() result, to the query's
        names = [column.name for column in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]


class UnknownItems(NotFound):
    """Ids a request refers to that are not in the catalogue; the body lists them as ``missing``."""

    def __init__(self, message: str, *, field: str | None, missing: list[str]) -> None:
        super().__init__(message, field=field)
        self.missing = missing

    def to_body(self) -> dict[str, Any]:  # type: ignore[override]
        return {**super().to_body(), "missing": self.missing}


def _not_found(exc: psycopg.Error) -> NotFound:
    """The domain error of a ``no_data_found`` raised by the query functions."""
    message = exc.diag.message_primary or "not found"
    try:
        missing = json.loads(exc.diag.message_detail or "null")
    except ValueError:
        missing = None
    if isinstance(missing, list):
        return UnknownItems(message, field=exc.diag.column_name, missing=[str(m) for m in missing])
    return NotFound(message, field=exc.diag.column_name)


def _item(row: Row) -> Row:
    item = {
        "id": row["id"],
        "category": row["category"],
        "tags": list(row["tags"] or []),
        "metadata": row["metadata"],
        "updated_at": row["updated_at"].isoformat(),
        "version": row["version"],
    }
    if "embedding" in row:
        item["embedding"] = row["embedding"]
    return item


async def get_item(db: Database, item_id: str, *, include_vector: bool = False, timeout_ms: int) -> Row:
    """The item ``item_id`` (with ``embedding`` if asked); :class:`NotFound` when absent."""
    query = queries.GET_ITEM_WITH_VECTOR if include_vector else queries.GET_ITEM

    async def operation(conn: psycopg.AsyncConnection[Any]) -> list[Row]:
        return await _fetch(conn, query, {"id": item_id}, timeout_ms)

    rows = await run_read(db, operation, limit=_limit(timeout_ms))
    if not rows:
        raise NotFound(f"item {item_id} not found", field="id")
    return _item(rows[0])


async def lookup_items(
    db: Database, ids: Sequence[str], *, include_vector: bool = False, timeout_ms: int
) -> dict[str, list[Any]]:
    """``{"items": [...], "missing": [...]}`` for ``ids``, in the order asked, with one query.

    An id asked twice appears twice.
    """
    query = queries.LOOKUP_ITEMS_WITH_VECTOR if include_vector else queries.LOOKUP_ITEMS
    unique = list(dict.fromkeys(ids))

    async def operation(conn: psycopg.AsyncConnection[Any]) -> list[Row]:
        return await _fetch(conn, query, {"ids": unique}, timeout_ms)

    rows = await run_read(db, operation, limit=_limit(timeout_ms)) if unique else []
    found = {row["id"]: _item(row) for row in rows}
    return {
        "items": [found[i] for i in ids if i in found],
        "missing": [i for i in ids if i not in found],
    }


def _result(row: Row) -> Row:
    result = {
        "id": row["id"],
        "score": row["score"],
        "distance": row["distance"],
        "category": row["category"],
        "tags": list(row["tags"] or []),
        "metadata": row["metadata"],
    }
    if row["embedding"] is not None:
        result["embedding"] = row["embedding"]
    return result


def _response(rows: list[Row], choice: EfChoice, took_ms: float, *, exact_is_exact: bool = True) -> Row:
    body: Row = {"results": [_result(row) for row in rows], "ef_search": choice.ef_search, "took_ms": round(took_ms, 3)}
    if rows:
        body["search"] = rows[0]["method"]
    if choice.expected_recall is not None:
        # An exact scan answered (a filter passing few items, or a lost search): its results are
        # the true nearest, whatever the calibration expected of the index.
        exact = exact_is_exact and body.get("search") in EXACT_METHODS
        body["expected_recall"] = 1.0 if exact else choice.expected_recall
    return body


async def _search(db: Database, params: dict[str, Any], choice: EfChoice, timeout_ms: int, *,
                  exact_is_exact: bool = True) -> Row:
    """Run one query statement (retried on a lost connection) and shape its response.

    ``exact_is_exact``: whether candidates found by an exact scan make the results exact (not so
    for ``best_score`` with negative examples, which ranks the candidates around each positive
    example by their distances to the negatives as well).
    """

    async def operation(conn: psycopg.AsyncConnection[Any]) -> list[Row]:
        return await _fetch(conn, queries.SEARCH, params, timeout_ms)

    started = time.perf_counter()
    rows = await run_read(db, operation, limit=_limit(timeout_ms))
    return _response(rows, choice, (time.perf_counter() - started) * 1000, exact_is_exact=exact_is_exact)


def similar_params(
    item_id: str, query: SimilarQuery, ef_search: int, *, cost_ratio: float = INDEX_COST_RATIO
) -> dict[str, Any]:
    """The parameters of ``queries.SEARCH`` for ``GET .../similar`` (also for raw benchmarks)."""
    return {
        "similar_to": item_id,
        "positive": [],
        "negative": [],
        "vector": None,
        "strategy": "average_vector",
        "alpha": 0.0,
        **_option_params(query, ef_search, cost_ratio),
    }


def _option_params(query: SearchOptions, ef_search: int, cost_ratio: float) -> dict[str, Any]:
    """The parameters of ``queries.SEARCH`` that come from the filters and result controls."""
    return {
        "k": query.k,
        "offset": query.offset,
        "ef_search": ef_search,
        "categories": list(query.categories) if query.categories is not None else None,
        "tags_any": list(query.tags_any) if query.tags_any is not None else None,
        "tags_all": list(query.tags_all) if query.tags_all is not None else None,
        "metadata": Jsonb(dict(query.metadata)) if query.metadata is not None else None,
        "exclude": list(query.exclude),
        "score_threshold": query.score_threshold,
        "exact": query.exact,
        "with_vector": query.with_vector,
        "diversity": query.mmr_weight,
        "candidates": query.pool,
        "cost_ratio": float(cost_ratio),
    }


async def _choose(db: Database, query: SearchOptions, shape: str = "item") -> EfChoice:
    # The index is asked for every candidate the request ranks or picks from.
    wanted = query.pool if query.mmr_weight else query.ranked
    return await resolve_ef_search(
        db, k=wanted, ef_search=query.ef_search, recall_target=query.recall_target, shape=shape)


def _shape(query: RecommendationQuery) -> str:
    """The calibrated curve a recommendation goes by: a mix of examples searched as one vector is
    recommendation-shaped; one positive item alone, or best_score (a search around each positive
    item), is item-shaped."""
    examples = len(query.positive) + len(query.negative) + (query.vector is not None)
    return "recommendation" if query.strategy == "average_vector" and examples > 1 else "item"


async def similar_items(
    db: Database,
    item_id: str,
    query: SimilarQuery,
    *,
    timeout_ms: int,
    cost_ratio: float = INDEX_COST_RATIO,
) -> Row:
    """The ``query.k`` items most similar to ``item_id``: the body of ``GET .../similar``.

    ``cost_ratio`` tunes the choice between the index and an exact scan (``INDEX_COST_RATIO``):
    0 always takes the index, a huge value always scans. :class:`NotFound` (field ``id``) when
    the item is absent.
    """
    choice = await _choose(db, query)
    params = similar_params(item_id, query, choice.ef_search, cost_ratio=cost_ratio)
    return {"id": item_id, **await _search(db, params, choice, timeout_ms)}


async def recommend(
    db: Database,
    query: RecommendationQuery,
    *,
    timeout_ms: int,
    cost_ratio: float = INDEX_COST_RATIO,
    alpha: float = NEGATIVE_WEIGHT,
) -> Row:
    """Recommendations for ``query``: the body of ``POST /api/recommendations``.

    With ``average_vector`` the query vector is computed in the database, in the same statement
    as the search: ``q = mean(unit(v) for v in positives + [vector]) - alpha * mean(unit(n) for n
    in negatives)``. With ``best_score`` each candidate is scored against every example
    (``recsys_best_score`` in sql/070_query_filters.sql). :class:`NotFound` names ``positive`` or
    ``negative`` when some of their ids are unknown.
    """
    choice = await _choose(db, query, _shape(query))
    params = {
        "similar_to": None,
        "positive": list(query.positive),
        "negative": list(query.negative),
        "vector": query.vector,
        "strategy": query.strategy,
        "alpha": float(alpha),
        **_option_params(query, choice.ef_search, cost_ratio),
    }
    exact_is_exact = query.strategy != "best_score" or not query.negative
    return {**await _search(db, params, choice, timeout_ms, exact_is_exact=exact_is_exact), "strategy": query.strategy}


def _error_entry(error: RecsysError) -> Row:
    return {"status": error.status, **error.to_body()}


async def recommend_batch(
    db: Database,
    batch: Sequence[RecommendationQuery | RecsysError],
    *,
    timeout_ms: int,
    cost_ratio: float = INDEX_COST_RATIO,
) -> Row:
    """Answer several recommendation queries concurrently; ``{"results": [...]}`` in order.

    Each entry is ``{"status": 200, "results": ..., "ef_search": ..., "took_ms": ...}`` or, for
    a query that failed on its own (invalid, unknown ids, not calibrated, statement timeout),
    ``{"status": <4xx|504>, "error", "code"[, "field"]}``; an entry of ``batch`` that is
    already an error is reported as such. A busy pool or an unreachable database fails the whole
    batch (the exception propagates, the remaining queries are cancelled).
    """

    async def one(entry: RecommendationQuery | RecsysError) -> Row:
        if isinstance(entry, RecsysError):
            return _error_entry(entry)
        try:
            return {"status": 200, **await recommend(db, entry, timeout_ms=timeout_ms, cost_ratio=cost_ratio)}
        except RecsysError as exc:
            return _error_entry(exc)
        except pg_errors.QueryCanceled:
            return {"status": 504, "error": "the query exceeded the statement timeout", "code": "timeout"}

    started = time.perf_counter()
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(entry)) for entry in batch]
    except ExceptionGroup as failed:
        # Queries waiting on the same pool or database fail together (several PoolTimeouts at
        # once): the batch fails as the first of them did, which the HTTP layer maps to 503,
        # not as a group it cannot map (500).
        raise failed.exceptions[0] from None
    return {"results": [task.result() for task in tasks], "took_ms": round((time.perf_counter() - started) * 1000, 3)}

