"""Recall calibration: what ``ef_search`` a request needs for the recall it asks for.

``python -m recsys calibrate`` samples items of the live catalogue, finds their exact ``k``
nearest neighbours (one pass over the table for the whole sample, see :mod:`recsys.search.exact`)
and, for each ``ef_search`` of
a fixed ladder, the neighbours the HNSW index returns with the query path's settings
(iterative scan, ``ef_search`` at least ``k``, the query item excluded). The recall@k per
``ef_search`` is stored (``sql/040_recall_calibration.sql``); :func:`choose_ef_search` turns a
request's ``recall_target`` into the smallest calibrated ``ef_search`` expected to reach it.

The curve of a process's database is cached for :data:`CACHE_SECONDS`, so that a request with
``recall_target`` stays one round trip; a missing calibration is never cached.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from psycopg_pool import AsyncConnectionPool

from recsys.config import Settings, get_settings
from recsys.errors import NotCalibrated
from recsys.search.exact import Mix, exact_neighbours
from recsys.search.params import NEGATIVE_WEIGHT

__all__ = [
    "CACHE_SECONDS",
    "LADDER",
    "RECOMMENDATION_SQL",
    "SHAPES",
    "Calibration",
    "CalibrationError",
    "CalibrationPoint",
    "EfSearch",
    "calibrate",
    "calibrate_catalogue",
    "calibrate_main",
    "choose_ef_search",
    "exact_neighbours",
    "forget_calibrations",
    "hnsw_neighbours",
    "load_calibration",
    "measure_recall",
    "pick_ef_search",
    "recall_lower_bound",
    "recommendation_mixes",
    "recommendation_neighbours",
    "store_calibration",
]

log = logging.getLogger("recsys")

#: The ``ef_search`` values measured: doubling steps over the useful range of pgvector's HNSW.
LADDER: tuple[int, ...] = (10, 20, 40, 80, 160, 320, 640)
DEFAULT_K = 10
DEFAULT_SAMPLE = 200
#: How long a process trusts the curve it read; a new calibration reaches every worker within it.
CACHE_SECONDS = 60.0
#: Query items per statement while measuring (bounds each statement's run time).
CHUNK = 50
COMMAND = "python -m recsys calibrate"

# A deterministic sample: the same seed picks the same items while the catalogue is unchanged.
SAMPLE_SQL = "SELECT id FROM items ORDER BY md5(id || %(seed)s) LIMIT %(n)s"
COUNT_SQL = "SELECT count(*) FROM items"

# The neighbours of each sampled item, one subquery per item (the index is used per item).
HNSW_SQL = """
SELECT q.id, ARRAY(
    SELECT i.id FROM items i
    WHERE i.id <> q.id
    ORDER BY i.embedding <=> q.embedding
    LIMIT %(k)s)
FROM items q WHERE q.id = ANY(%(ids)s::text[])
"""

# The recommendations of each mix (two positive items, one negative) by the query path itself
# (recsys_query, average_vector: the examples excluded), index only (cost ratio 0).
RECOMMENDATION_SQL = """
SELECT m.name, ARRAY(
    SELECT r.id FROM recsys_query(
        NULL, ARRAY[m.first, m.second], ARRAY[m.negative], NULL, 'average_vector', m.alpha, %(k)s, 0,
        %(ef_search)s, NULL, NULL, NULL, NULL, '{}', NULL, false, false, 0, %(k)s, 0) r)
FROM unnest(%(names)s::text[], %(firsts)s::text[], %(seconds)s::text[], %(negatives)s::text[],
            %(alphas)s::double precision[])
    AS m(name, first, second, negative, alpha)
"""

#: The shapes of query a calibration measures: an item's own vector (``/similar``, and a
#: recommendation from one positive item) and a recommendation's mix of examples.
SHAPES = ("item", "recommendation")

LATEST_SQL = """
SELECT c.id, c.measured_at, c.k, c.sample_size, c.catalogue_size, c.exact_ms,
       p.ef_search, p.recall, p.mean_ms, p.shape
FROM (SELECT * FROM recall_calibrations ORDER BY id DESC LIMIT 1) c
JOIN recall_calibration_points p ON p.calibration_id = c.id
ORDER BY p.shape, p.ef_search
"""


class CalibrationError(ValueError):
    """The catalogue cannot be calibrated (for instance: too few items)."""


@dataclass(frozen=True)
class CalibrationPoint:
    ef_search: int
    recall: float
    mean_ms: float | None = None


@dataclass(frozen=True)
class Calibration:
    """One calibration run: recall@``k`` per ``ef_search`` over ``sample_size`` sampled items.

    ``points`` for the sampled items' own vectors; ``recommendation_points`` for as many
    recommendation-shaped queries made of them (empty in calibrations made before they were
    measured: recommendations then go by ``points``).
    """

    k: int
    sample_size: int
    catalogue_size: int
    points: tuple[CalibrationPoint, ...]
    exact_ms: float | None = None
    id: int | None = None
    measured_at: datetime | None = None
    recommendation_points: tuple[CalibrationPoint, ...] = ()

    def curve(self, shape: str) -> tuple[CalibrationPoint, ...]:
        """The points for queries of ``shape`` (one of :data:`SHAPES`)."""
        if shape == "recommendation" and self.recommendation_points:
            return self.recommendation_points
        return self.points


class EfSearch(NamedTuple):
    """The ``ef_search`` chosen for a recall target, and the recall calibrated for it."""

    ef_search: int
    expected_recall: float


def _not_calibrated() -> NotCalibrated:
    return NotCalibrated(
        f"this catalogue has no recall calibration, so recall_target cannot be honoured: run `{COMMAND}` "
        "(or pass ef_search instead)"
    )


#: One-sided 95 % normal quantile: how many standard errors below its sampled mean a point's
#: recall may lie before it no longer counts as reaching a target.
CONFIDENCE_Z = 1.645


def recall_lower_bound(recall: float, sample_size: int) -> float:
    """A one-sided 95 % lower confidence bound of a recall measured as the mean over ``sample_size`` items.

    Each sampled item's recall lies in [0, 1], so its variance is at most ``recall * (1 - recall)``
    whatever its distribution: the bound uses that largest variance.
    """
    if sample_size <= 0:
        return recall
    return recall - CONFIDENCE_Z * math.sqrt(max(recall * (1.0 - recall), 0.0) / sample_size)


def pick_ef_search(
    points: Sequence[CalibrationPoint], recall_target: float, sample_size: int | None = None
) -> EfSearch:
    """The smallest ``ef_search`` expected to reach ``recall_target``.

    With ``sample_size`` (the calibration's sampled items), a point reaches the target when the
    lower confidence bound of its recall (:func:`recall_lower_bound`) does: the smallest sampled
    mean at or above the target is, by chance, often above the recall of the queries that were
    not sampled. If no bound reaches the target, the smallest ``ef_search`` whose mean does.
    When no mean reaches it either, the point of highest recall (the smallest such
    ``ef_search``), with its recall, which is then below the target: the caller reports it as
    ``expected_recall``. Raises :class:`NotCalibrated` when there are no points.
    """
    if not points:
        raise _not_calibrated()
    reaching = [p for p in points if p.recall >= recall_target]
    if sample_size is not None:
        confident = [p for p in reaching if recall_lower_bound(p.recall, sample_size) >= recall_target]
        reaching = confident or reaching
    if reaching:
        best = min(reaching, key=lambda p: p.ef_search)
    else:
        best = max(points, key=lambda p: (p.recall, -p.ef_search))
        log.warning(
            "recall target %.3f is above every calibrated recall; using ef_search %d (recall %.3f)",
            recall_target, best.ef_search, best.recall,
        )
    return EfSearch(best.ef_search, best.recall)


# ----------------------------------------------------------------------------- measuring


async def _neighbours(
    conn: psycopg.AsyncConnection[Any], statement: str, chunks: Sequence[dict[str, Any]], settings: dict[str, str]
) -> tuple[dict[str, list[str]], float]:
    """Neighbours by ``statement`` for each chunk of parameters, ``settings`` applied transaction-locally."""
    found: dict[str, list[str]] = {}
    elapsed = 0.0
    for params in chunks:
        async with conn.transaction():
            for name, value in settings.items():
                await conn.execute("SELECT set_config(%s, %s, true)", [name, value])
            started = time.perf_counter()
            cursor = await conn.execute(statement, params)
            rows = await cursor.fetchall()
            elapsed += time.perf_counter() - started
        found.update({str(row[0]): list(row[1]) for row in rows})
    return found, elapsed


def _index_settings(k: int, ef_search: int, statement_timeout_ms: int) -> dict[str, str]:
    return {
        "hnsw.ef_search": str(min(max(ef_search, k), 1000)),
        "hnsw.iterative_scan": "relaxed_order",
        "statement_timeout": str(statement_timeout_ms),
    }


async def hnsw_neighbours(
    conn: psycopg.AsyncConnection[Any], ids: Sequence[str], k: int, ef_search: int, *,
    statement_timeout_ms: int = 600_000,
) -> tuple[dict[str, list[str]], float]:
    """The ``k`` neighbours the HNSW index returns at ``ef_search`` with the query path's settings.

    As the query functions do: ``ef_search`` at least ``k``, iterative scan in relaxed order
    (so the excluded query item does not cost a result).
    """
    chunks = [{"ids": list(ids[start:start + CHUNK]), "k": k} for start in range(0, len(ids), CHUNK)]
    return await _neighbours(conn, HNSW_SQL, chunks, _index_settings(k, ef_search, statement_timeout_ms))


def recommendation_mixes(ids: Sequence[str], alpha: float) -> list[Mix]:
    """Recommendation-shaped queries made of sampled items: each item and the next as positive
    examples, the one after as the negative (in sample order, wrapping round); none for fewer than
    three items."""
    n = len(ids)
    if n < 3:
        return []
    return [Mix(f"mix:{ids[i]}", (ids[i], ids[(i + 1) % n]), (ids[(i + 2) % n],), alpha) for i in range(n)]


async def recommendation_neighbours(
    conn: psycopg.AsyncConnection[Any], mixes: Sequence[Mix], k: int, ef_search: int, *,
    statement_timeout_ms: int = 600_000,
) -> tuple[dict[str, list[str]], float]:
    """The ``k`` recommendations of each of ``mixes`` (two positive examples, one negative) by the
    query path's own function through the index at ``ef_search``, by mix name."""
    chunks = []
    for start in range(0, len(mixes), CHUNK):
        chunk = mixes[start:start + CHUNK]
        chunks.append({
            "names": [m.name for m in chunk], "firsts": [m.positive[0] for m in chunk],
            "seconds": [m.positive[1] for m in chunk], "negatives": [m.negative[0] for m in chunk],
            "alphas": [m.alpha for m in chunk], "k": k, "ef_search": ef_search,
        })
    return await _neighbours(conn, RECOMMENDATION_SQL, chunks, _index_settings(k, ef_search, statement_timeout_ms))


def _recall(found: dict[str, list[str]], truth: dict[str, list[str]], k: int) -> float:
    hits = sum(len(set(found.get(item, [])[:k]) & set(neighbours[:k])) for item, neighbours in truth.items())
    return hits / (k * len(truth))


async def measure_recall(
    conn: psycopg.AsyncConnection[Any],
    *,
    sample_size: int = DEFAULT_SAMPLE,
    k: int = DEFAULT_K,
    ladder: Sequence[int] = LADDER,
    seed: str = "recsys",
    statement_timeout_ms: int = 600_000,
    recommendations: bool = True,
) -> Calibration:
    """Measure recall@``k`` of the HNSW index per ``ef_search`` of ``ladder`` on a sample.

    With ``recommendations``, also of as many recommendation-shaped queries made of the sampled
    items (:func:`recommendation_mixes`), through the query path's function; their exact
    reference comes from the same single pass over the table.

    Raises :class:`CalibrationError` when the catalogue has ``k`` items or fewer.
    """
    if not 1 <= k <= 1000:
        raise CalibrationError("k must be between 1 and 1000")
    if sample_size < 1:
        raise CalibrationError("the sample must hold at least one item")
    if not ladder or any(not 1 <= ef <= 1000 for ef in ladder):
        raise CalibrationError("every ef_search of the ladder must be between 1 and 1000")
    row = await (await conn.execute(COUNT_SQL)).fetchone()
    catalogue_size = int(row[0]) if row else 0
    if catalogue_size <= k:
        raise CalibrationError(
            f"the catalogue holds {catalogue_size} items; calibrating recall@{k} needs more than {k}"
        )
    rows = await (await conn.execute(SAMPLE_SQL, {"seed": seed, "n": sample_size})).fetchall()
    ids = [str(r[0]) for r in rows]
    mixes = recommendation_mixes(ids, NEGATIVE_WEIGHT) if recommendations else []
    truth, exact_s = await exact_neighbours(conn, ids, k, mixes=mixes, statement_timeout_ms=statement_timeout_ms)
    item_truth = {item: truth[item] for item in ids if item in truth}
    mix_truth = {m.name: truth[m.name] for m in mixes if m.name in truth}
    points, mix_points = [], []
    for ef in sorted(set(ladder)):
        found, spent = await hnsw_neighbours(conn, ids, k, ef, statement_timeout_ms=statement_timeout_ms)
        points.append(CalibrationPoint(ef, round(_recall(found, item_truth, k), 4), round(spent * 1000 / len(ids), 3)))
        log.info("ef_search %d: recall@%d %.4f", ef, k, points[-1].recall)
        if mix_truth:
            found, spent = await recommendation_neighbours(
                conn, mixes, k, ef, statement_timeout_ms=statement_timeout_ms)
            mix_points.append(CalibrationPoint(
                ef, round(_recall(found, mix_truth, k), 4), round(spent * 1000 / len(mixes), 3)))
            log.info("ef_search %d: recommendations recall@%d %.4f", ef, k, mix_points[-1].recall)
    return Calibration(
        k=k, sample_size=len(ids), catalogue_size=catalogue_size, points=tuple(points),
        exact_ms=round(exact_s * 1000 / len(ids), 3), recommendation_points=tuple(mix_points),
    )


# ----------------------------------------------------------------------------- storing, reading


async def store_calibration(conn: psycopg.AsyncConnection[Any], calibration: Calibration) -> Calibration:
    """Record ``calibration`` as the latest run (one transaction); return it with its id and time."""
    async with conn.transaction():
        cursor = await conn.execute(
            "INSERT INTO recall_calibrations (k, sample_size, catalogue_size, exact_ms)"
            " VALUES (%s, %s, %s, %s) RETURNING id, measured_at",
            [calibration.k, calibration.sample_size, calibration.catalogue_size, calibration.exact_ms],
        )
        row = await cursor.fetchone()
        assert row is not None
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO recall_calibration_points (calibration_id, shape, ef_search, recall, mean_ms)"
                " VALUES (%s, %s, %s, %s, %s)",
                [(row[0], shape, p.ef_search, p.recall, p.mean_ms)
                 for shape, points in (("item", calibration.points),
                                       ("recommendation", calibration.recommendation_points))
                 for p in points],
            )
    forget_calibrations()
    return replace(calibration, id=int(row[0]), measured_at=row[1])


async def calibrate(conn: psycopg.AsyncConnection[Any], **options: Any) -> Calibration:
    """:func:`measure_recall` then :func:`store_calibration`; ``options`` as for the former."""
    return await store_calibration(conn, await measure_recall(conn, **options))


async def load_calibration(conn: psycopg.AsyncConnection[Any]) -> Calibration | None:
    """The latest calibration of the catalogue, or ``None`` when there is none (one query)."""
    rows = await (await conn.execute(LATEST_SQL)).fetchall()
    if not rows:
        return None
    first = rows[0]

    def points(shape: str) -> tuple[CalibrationPoint, ...]:
        return tuple(CalibrationPoint(int(r[6]), float(r[7]), r[8]) for r in rows if r[9] == shape)

    return Calibration(
        id=int(first[0]), measured_at=first[1], k=int(first[2]), sample_size=int(first[3]),
        catalogue_size=int(first[4]), exact_ms=first[5], points=points("item"),
        recommendation_points=points("recommendation"),
    )


Source = psycopg.AsyncConnection[Any] | AsyncConnectionPool
_cache: dict[tuple[Any, ...], tuple[float, Calibration]] = {}


def forget_calibrations() -> None:
    """Drop the cached curves, so that the next request reads the latest calibration."""
    _cache.clear()


def _cache_key(source: Source) -> tuple[Any, ...]:
    if isinstance(source, AsyncConnectionPool):
        # A pool's connections all reach one database; a conninfo built per connection (a
        # callable) leaves only the pool itself to tell databases apart.
        conninfo = source.conninfo
        return ("pool", conninfo) if isinstance(conninfo, str) else ("pool", id(source))
    return ("connection", str(source.info.host), int(source.info.port), str(source.info.dbname))


async def _load(source: Source) -> Calibration | None:
    if isinstance(source, AsyncConnectionPool):
        async with source.connection() as conn:
            return await load_calibration(conn)
    return await load_calibration(source)


async def choose_ef_search(source: Source, recall_target: float, shape: str = "item") -> EfSearch:
    """The smallest calibrated ``ef_search`` expected to reach ``recall_target``, and its recall.

    ``shape`` is the kind of query (:data:`SHAPES`): its own curve decides (a recommendation
    goes by the item curve when the calibration has none of its own).

    ``source`` is a connection or a pool; the curve is read at most once per
    :data:`CACHE_SECONDS` per database (a pool's connection is borrowed only then). If no
    calibrated value reaches the target, the one of highest recall (its recall then says so).
    Raises :class:`NotCalibrated` (409) when the catalogue has no calibration.
    """
    key = _cache_key(source)
    cached = _cache.get(key)
    if cached is None or time.monotonic() - cached[0] > CACHE_SECONDS:
        calibration = await _load(source)
        if calibration is None:
            raise _not_calibrated()
        cached = (time.monotonic(), calibration)
        _cache[key] = cached
    return pick_ef_search(cached[1].curve(shape), recall_target, cached[1].sample_size)


# ----------------------------------------------------------------------------- entry points


async def calibrate_catalogue(settings: Settings | None = None, **options: Any) -> Calibration:
    """Calibrate the catalogue of the configured database over the process's loader pool."""
    from recsys.db.pool import get_pool

    pool = await get_pool("loader", settings or get_settings())
    async with pool.connection() as conn:
        calibration = await calibrate(conn, **options)
    log.info("recall calibration %s stored: %s", calibration.id,
             ", ".join(f"ef_search {p.ef_search}: {p.recall:.3f}" for p in calibration.points))
    return calibration


def _print(calibration: Calibration) -> None:
    print(f"recall@{calibration.k} on {calibration.sample_size} sampled items of {calibration.catalogue_size} "
          f"(calibration {calibration.id}); exact reference {calibration.exact_ms} ms per sampled item, one pass")
    mixes = {p.ef_search: p for p in calibration.recommendation_points}
    print(f"{'ef_search':>9}  {'recall':>6}  {'ms/query':>8}  {'recommendations':>15}  {'ms/query':>8}")
    for p in calibration.points:
        m = mixes.get(p.ef_search)
        print(f"{p.ef_search:>9}  {p.recall:>6.3f}  {p.mean_ms if p.mean_ms is not None else '':>8}  "
              f"{f'{m.recall:.3f}' if m else '':>15}  {m.mean_ms if m and m.mean_ms is not None else '':>8}")


def calibrate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"{COMMAND}", description="measure recall per ef_search and store it")
    parser.add_argument("--url", help="database URL (default: RECSYS_DATABASE_URL, through PgBouncer)")
    parser.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, help="items sampled as queries")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="recall@k (default 10)")
    parser.add_argument("--ladder", default=",".join(map(str, LADDER)), help="ef_search values, comma-separated")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        ladder = [int(v) for v in args.ladder.split(",") if v.strip()]
    except ValueError:
        parser.error("--ladder must be comma-separated integers")
    options = {"sample_size": args.sample, "k": args.k, "ladder": ladder}

    async def main() -> Calibration:
        if args.url:
            from recsys.db.pool import configure_connection

            async with await psycopg.AsyncConnection.connect(args.url, autocommit=True, prepare_threshold=None) as conn:
                await configure_connection(conn)
                return await calibrate(conn, **options)
        from recsys.db.pool import close_pools

        try:
            return await calibrate_catalogue(**options)
        finally:
            await close_pools()

    try:
        calibration = asyncio.run(main())
    except CalibrationError as exc:
        print(f"recsys calibrate: {exc}", file=sys.stderr)
        return 1
    _print(calibration)
    return 0
