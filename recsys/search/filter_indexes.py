"""Filter indexes: a partial HNSW index over the items of one category or of one tag, and its copy.

The shared HNSW index serves every filter by reading on past the items that fail it
(``recsys_nearest``). Two kinds of filter make that costly: a rare value spread across the
catalogue (a 1 % category: about a hundred tuples read for each one that passes), and a value
that avoids the query's neighbourhood (anti-correlated: no passing item among the nearest, so the
exact scan of every passing item answers). A filter index is a graph of the members alone, so its
search reads passing items only; ``recsys_nearest`` uses it when the request's filter requires its
value and its search costs less than the exact scan (``sql/090_filter_indexes.sql``). Beside the
graph, a copy: a partial IVFFlat index over the same members' unit vectors in half precision,
in about sqrt(members) lists. Probing every list orders every member, from packed index pages
instead of a heap page per member: where ``recsys_nearest`` answers a covered filter by the exact
scan, it reads the copy, and orders its nearest again by the table's distances
(``sql/091_filter_index_copies.sql``, ``sql/functions/recsys_nearest.sql``). Probing the lists
nearest the query is the sweep, which answers a filter that avoids the query's neighbourhood
where the exact scan would cost more than ten budgets: the graph's search finds such members'
nearest poorly. ``create`` calibrates the sweep's width on the catalogue's items
(``calibrate_sweep``); a calibrated sweep that reads at most twice as many members as the shared
index's probe scores answers first, before any other search, whatever the filter's place around
the query.

The copy's lists, and the sweep's width calibrated on them, stand for the members of the day the
copy was built: once more than a tenth of them have been written since, or their number has moved
by more than a tenth (``refresh_reason``), ``refresh`` builds the copy again, and the maintenance
run names the filter indexes due (``sql/094_filter_index_refresh.sql``).

An indexed field (``create --every-tag``, ``sql/095_indexed_fields.sql``) is a rule: every value
of the field with at least so many members has a filter index. ``refresh`` applies the rules
(``FIELD_PLAN``): it builds the filter indexes of values that reached the bound, and drops those a
rule made once their value falls under half of it.

``python -m recsys filter-index create --category books`` builds both with ``CREATE INDEX
CONCURRENTLY`` (writes go on meanwhile) and the catalogue's HNSW parameters and operator class,
then records them in ``filter_indexes``, which the query function reads. The value becomes the
index predicate, so it is quoted by psycopg as a literal; the index names are derived from a hash
of kind and value, never from the value's text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from recsys.config import DEFAULT_HNSW_EF_CONSTRUCTION, DEFAULT_HNSW_M
from recsys.maintenance import RECALIBRATE_FRACTION

__all__ = [
    "DEFAULT_MIN_MEMBERS",
    "DRIFT",
    "DRIFT_PARAMS",
    "FIELD_PLAN",
    "KINDS",
    "FilterIndex",
    "IndexedField",
    "apply_indexed_fields",
    "copy_index_name",
    "copy_lists",
    "create_filter_index",
    "drop_filter_index",
    "field_plan_reason",
    "filter_index_main",
    "filter_index_name",
    "filter_indexes_due",
    "list_filter_indexes",
    "list_indexed_fields",
    "metadata_pair",
    "refresh_reason",
    "set_indexed_field",
    "unset_indexed_field",
]

log = logging.getLogger("recsys.filter_indexes")

#: The filter a partial index can stand for -> the column its predicate reads. A metadata filter
#: index stands for one pair (``metadata_pair``), which requests ask for among others.
KINDS = {"category": "category", "tag": "tags", "metadata": "metadata"}
#: The index orders unit vectors by inner product (``l2_normalize(embedding) <#> ...``), the order
#: of cosine distance: an ORDER BY that the shared cosine index cannot serve, so that the planner
#: never takes the shared index for a filter index's search.
_OPERATOR_CLASSES = {"vector": "vector_ip_ops", "halfvec": "halfvec_ip_ops"}
#: The copy orders the unit vectors, in half precision whatever the column's type (half the pages
#: to read), by cosine distance: IVFFlat's cosine operator class builds its lists around centres of
#: unit length (spherical k-means) and ranks them by inner product with the query, where Euclidean
#: distance would favour the shortest centres. The operator differs from the graph's (``<=>``, not
#: ``<#>``), so that on a halfvec column, where both index the same expression, neither index can
#: be taken for the other. A copy of another operator class (single precision, or Euclidean, made
#: before) is not valid: ``create`` replaces it.
COPY_OPERATOR_CLASS = "halfvec_cosine_ops"
_PREDICATES = {
    # The forms recsys_nearest writes, so that the planner proves the index applies.
    "category": sql.SQL("category = {value}"),
    "tag": sql.SQL("tags && ARRAY[{value}]::text[]"),
    "metadata": sql.SQL("metadata @> {value}::jsonb"),
}
MAX_VALUE_LENGTH = 256
#: The sweep's calibration (``calibrate_sweep``): items sampled to find those with no member among
#: their ``CALIBRATION_EF`` nearest, the items of each of its samples, the results compared, and
#: the recall@10 it asks on them: well above the 0.95 the service aims for, so that other queries
#: reach that too. Asked 0.97 of 36 such items, four builds of a 5 % tag's copy on 200,000 items
#: gave 0.935-0.978 on 100 others; asked 0.99, three of them 0.953-0.995 (the fourth needed
#: between 23 and 32 lists, where the 100 found 0.935 at 22 and 0.990 at 32).
CALIBRATION_SAMPLE = 2000
CALIBRATION_QUERIES = 50
#: The fewest items with no member among their nearest (or members with only members there) that
#: make a sample of their own: fewer stand for a neighbourhood too small to weigh (under 0.5 % of
#: the items sampled).
CALIBRATION_AVOIDED = 10
#: Members expected at random among the nearest of an item that the filter avoids: an item counts
#: as avoided when none lies among its nearest ``AVOIDED_EXPECTED`` × catalogue ÷ members (at least
#: ``CALIBRATION_EF``, at most ``AVOIDED_DEPTH``), where chance alone leaves none with probability
#: e^-10. Counted among the nearest ``CALIBRATION_EF`` alone, a 5 % tag that avoids one cluster of
#: 100 (200,000 items) let in items of the other clusters whose next members lay just beyond
#: (e^-5 of them, 12 of the 35 found), each easy for the sweep: their mean reached 0.99 at 25 lists
#: where the avoided cluster's own items needed 32, and queries from it found 0.90 at 20.
AVOIDED_EXPECTED = 10
AVOIDED_DEPTH = 1000
#: The ef and k of the calibration: ``recsys_nearest`` reads a calibrated sweep at an ef of at
#: least ``CALIBRATION_EF`` for every ``CALIBRATION_K`` results asked (its ``calibration_ef``
#: and ``calibration_k``).
CALIBRATION_EF = 100
CALIBRATION_K = 10
SWEEP_RECALL = 0.99
#: The widest calibrated sweep that answers first and alone, in members per unit of ef_search
#: (``recsys_nearest``'s ``first_width``: twice the 32 tuples a graph's search scores per unit of
#: ef); a wider one answers after the probe of the shared index, at about twice the cost.
FIRST_WIDTH = 64
#: Builds of a copy in all, while its calibrated sweep is wider than ``FIRST_WIDTH``: each build's
#: k-means draws its own lists, and the width needed for a recall varies with them (6 to 73 of
#: the 100 lists of a 5 % tag that avoids the query cluster, in ten builds on the benchmark's
#: catalogue; above 64, beyond the bound, in one).
COPY_BUILDS = 3
#: Share of a copy's members that must have changed since it was built (written, or their number
#: moved) for ``refresh`` to build it again: the same share as the recall calibration's.
REFRESH_FRACTION = RECALIBRATE_FRACTION
_EVERY_ITEM = sql.SQL("true")


@dataclass(frozen=True)
class FilterIndex:
    kind: str
    value: str
    index_name: str
    members: int
    size_bytes: int
    valid: bool
    #: The exact copy (None for a filter index recorded before copies existed, not valid for one in
    #: single precision: ``create`` adds or replaces it).
    copy_name: str | None
    copy_size_bytes: int
    copy_valid: bool
    #: The copy's lists (0 without a copy).
    copy_lists: int
    #: The sweep's calibrated width, in members per unit of ef_search (None: not calibrated).
    sweep_width: float | None
    #: The members the copy's lists were made for, and when (UTC, ISO 8601); None for a copy built
    #: before they were recorded.
    copy_members: int | None
    copy_built_at: str | None
    #: Made by the rule of an indexed field (``IndexedField``), which drops it once its value falls
    #: below half the rule's bound; False for one created by name, which no rule drops.
    automatic: bool


def filter_index_name(kind: str, value: str) -> str:
    """The index's name: the kind and a hash of the value (any text is a valid value)."""
    return f"items_filter_{kind}_{_digest(kind, value)}"


def copy_index_name(kind: str, value: str) -> str:
    """The name of the index's exact copy."""
    return f"items_copy_{kind}_{_digest(kind, value)}"


def _digest(kind: str, value: str) -> str:
    _check(kind, value)
    return hashlib.sha256(f"{kind}\0{value}".encode()).hexdigest()[:16]


def _check(kind: str, value: str) -> None:
    _value(kind, value)


def metadata_pair(text: str) -> str:
    """A metadata filter index's value: ``text``, a JSON object of one key to a string, a finite
    number or a boolean (what a request's ``metadata`` filter may ask), written as the index is
    recorded: ``{"brand": "acme"}``."""
    shape = 'a metadata pair must be a JSON object of one key, e.g. {"brand": "acme"}'
    try:
        pair = json.loads(text)
    except ValueError:
        raise ValueError(shape) from None
    if not isinstance(pair, dict) or len(pair) != 1:
        raise ValueError(shape)
    ((key, value),) = pair.items()
    if not key:
        raise ValueError("a metadata pair's key must not be empty")
    if value is None or isinstance(value, dict | list) or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"the value of metadata key {key!r} must be a string, a finite number or a boolean")
    return json.dumps(pair, ensure_ascii=False)


def _value(kind: str, value: str) -> str:
    """The value as recorded (a metadata pair written as ``metadata_pair`` writes it), checked."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    recorded = metadata_pair(value) if kind == "metadata" else value
    if not 1 <= len(recorded) <= MAX_VALUE_LENGTH:
        raise ValueError(f"a {kind} must be 1 to {MAX_VALUE_LENGTH} characters long")
    return recorded


def list_filter_indexes(conn: psycopg.Connection[Any]) -> list[FilterIndex]:
    """The recorded filter indexes, with their member count (the index's tuples) and sizes."""
    rows = conn.execute(
        "SELECT f.kind, f.value, f.index_name, coalesce(greatest(c.reltuples, 0), 0)::bigint,"
        " coalesce(pg_relation_size(c.oid), 0), coalesce(x.indisvalid, false),"
        " f.copy_name, coalesce(pg_relation_size(cc.oid), 0),"
        " coalesce(cx.indisvalid AND co.opcname = %s, false),"
        " coalesce((SELECT o.option_value::integer FROM pg_options_to_table(cc.reloptions) o"
        "           WHERE o.option_name = 'lists'), 0),"
        " f.sweep_width, f.copy_members,"
        " to_char(f.copy_built_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), f.automatic"
        " FROM filter_indexes f"
        " LEFT JOIN pg_class c ON c.relname = f.index_name AND c.relnamespace = 'public'::regnamespace"
        " LEFT JOIN pg_index x ON x.indexrelid = c.oid"
        " LEFT JOIN pg_class cc ON cc.relname = f.copy_name AND cc.relnamespace = 'public'::regnamespace"
        " LEFT JOIN pg_index cx ON cx.indexrelid = cc.oid"
        " LEFT JOIN pg_opclass co ON co.oid = cx.indclass[0]"
        " ORDER BY f.kind, f.value",
        [COPY_OPERATOR_CLASS],
    ).fetchall()
    return [FilterIndex(*row) for row in rows]


def create_filter_index(
    conn: psycopg.Connection[Any],
    kind: str,
    value: str,
    *,
    m: int = DEFAULT_HNSW_M,
    ef_construction: int = DEFAULT_HNSW_EF_CONSTRUCTION,
    maintenance_work_mem: str = "1GB",
    rebuild_copy: bool = False,
    automatic: bool | None = False,
) -> FilterIndex:
    """Build the filter index of ``kind`` = ``value`` and its exact copy, each unless a valid one
    exists, and record them.

    ``conn``: a direct autocommit connection of the table's owner (``CREATE INDEX CONCURRENTLY``
    cannot run in a transaction, nor through PgBouncer in transaction mode). A build that fails
    leaves no index behind.

    ``rebuild_copy`` (``refresh``): the copy is built again on the members of now, and its sweep
    calibrated again. The record lets go of the old copy first, then it is dropped: until the new
    one is recorded, requests filtered on the value are answered without a copy (the graph, or the
    exact scan of the table), never by a copy whose lists the record does not describe. A build
    that fails leaves the filter index without a copy, due to be refreshed.

    ``automatic``: made by an indexed field's rule (True), or by name (False: an automatic filter
    index so created becomes one that no rule drops); None keeps what the record says (a new
    record: by name).
    """
    value = _value(kind, value)
    name, copy = filter_index_name(kind, value), copy_index_name(kind, value)
    if rebuild_copy:
        conn.execute(
            "UPDATE filter_indexes SET copy_name = NULL, sweep_width = NULL, copy_members = NULL,"
            " copy_built_at = NULL WHERE kind = %s AND value = %s",
            [kind, value],
        )
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(copy)))
    row = conn.execute(
        "SELECT t.typname, format_type(a.atttypid, a.atttypmod), a.atttypmod"
        " FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
        " WHERE a.attrelid = 'public.items'::regclass AND a.attname = 'embedding'"
    ).fetchone()
    if row is None:
        raise psycopg.ProgrammingError("the items table has no embedding column")
    vector_type, column_type, dimension = str(row[0]), str(row[1]), int(row[2])
    # The column's own type from the catalogue, e.g. vector(384): an index on an expression
    # needs its dimension.
    normalized = sql.SQL("(l2_normalize(embedding)::{})").format(sql.SQL(column_type))
    predicate = _PREDICATES[kind].format(value=sql.Literal(value))
    graph = sql.SQL("hnsw ({normalized} {opclass}) WITH (m = {m}, ef_construction = {ef})").format(
        normalized=normalized, opclass=sql.SQL(_OPERATOR_CLASSES[vector_type]),
        m=sql.Literal(int(m)), ef=sql.Literal(int(ef_construction)),
    )
    # Taken before the count: a member written during the build counts as written since.
    counted = conn.execute(
        sql.SQL("SELECT clock_timestamp(), count(*) FROM items WHERE {}").format(predicate)
    ).fetchone()
    assert counted is not None
    started, members = counted[0], int(counted[1])
    lists = copy_lists(members)
    copy_method = sql.SQL("ivfflat ((l2_normalize(embedding)::halfvec({dimension})) {opclass}) WITH (lists = {lists})")
    exact_copy = copy_method.format(dimension=sql.Literal(dimension), opclass=sql.SQL(COPY_OPERATOR_CLASS),
                                    lists=sql.Literal(lists))
    built = False
    copy_built = False
    for index, method, operator_class in ((name, graph, None), (copy, exact_copy, COPY_OPERATOR_CLASS)):
        if _valid(conn, index, operator_class):
            continue
        _build(conn, index, method, predicate, maintenance_work_mem, f"for {kind} {value!r}")
        built = True
        copy_built = index == copy
    if built:
        conn.execute("ANALYZE items")
    # The copy's own lists: a valid copy built before the members changed keeps those it has.
    width = calibrate_sweep(conn, predicate, dimension, members, _lists(conn, copy))
    builds = 1
    while copy_built and builds < COPY_BUILDS and (width is None or width > FIRST_WIDTH):
        builds += 1
        reads = "every list" if width is None else f"{width:.1f} members per unit of ef_search"
        log.info("the sweep of %s %r needs %s, more than %d members per unit: its copy built again"
                 " (%d of at most %d)", kind, value, reads, FIRST_WIDTH, builds, COPY_BUILDS)
        _build(conn, copy, exact_copy, predicate, maintenance_work_mem, f"for {kind} {value!r} again")
        width = calibrate_sweep(conn, predicate, dimension, members, _lists(conn, copy))
    conn.execute(
        "INSERT INTO filter_indexes"
        " (kind, value, index_name, copy_name, sweep_width, copy_members, copy_built_at, automatic)"
        " VALUES (%(kind)s, %(value)s, %(name)s, %(copy)s, %(width)s, %(members)s, %(built_at)s,"
        "         coalesce(%(automatic)s, false))"
        " ON CONFLICT (kind, value) DO UPDATE SET copy_name = EXCLUDED.copy_name, sweep_width = EXCLUDED.sweep_width,"
        " copy_members = coalesce(EXCLUDED.copy_members, filter_indexes.copy_members),"
        " copy_built_at = coalesce(EXCLUDED.copy_built_at, filter_indexes.copy_built_at),"
        " automatic = coalesce(%(automatic)s, filter_indexes.automatic)",
        {"kind": kind, "value": value, "name": name, "copy": copy, "width": width,
         "members": members if copy_built else None, "built_at": started if copy_built else None,
         "automatic": automatic},
    )
    return next(i for i in list_filter_indexes(conn) if i.index_name == name)


def _build(conn: psycopg.Connection[Any], index: str, method: sql.Composable, predicate: sql.Composable,
           maintenance_work_mem: str, purpose: str) -> None:
    """``CREATE INDEX CONCURRENTLY index ON items USING method WHERE predicate``, in place of any
    index of that name; none is left behind where it fails."""
    # Also what a failed concurrent build leaves: an invalid index that writes still maintain.
    conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(index)))
    conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", [maintenance_work_mem])
    log.info("building %s %s", index, purpose)
    try:
        conn.execute(sql.SQL("CREATE INDEX CONCURRENTLY {index} ON items USING {method} WHERE {predicate}").format(
            index=sql.Identifier(index), method=method, predicate=predicate,
        ))
    except psycopg.Error:
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(index)))
        raise
    finally:
        conn.execute("RESET maintenance_work_mem")


def calibrate_sweep(
    conn: psycopg.Connection[Any], predicate: sql.Composable, dimension: int, members: int, lists: int
) -> float | None:
    """The sweep's width for the copy, in ``lists`` lists, of the ``members`` items that
    ``predicate`` selects, in members per unit of ef_search, or None.

    Up to three samples of the catalogue, each reproducible: ``CALIBRATION_QUERIES`` items drawn at
    random (the queries the service sees, members or not); as many items that fail the predicate
    and have no member among their nearest, as far as ``AVOIDED_EXPECTED`` members were to be
    expected at random (the filter avoids their neighbourhood, the queries a graph's search serves
    worst, and the sweep too: the members nearest them lie about equally far, in many lists); and
    as many members whose nearest are all members (the filter surrounds them: where members are
    densest, the ten nearest lie in lists whose centres are about as near, and a sweep calibrated
    on the others alone read too few of them: a 50 % tag around the benchmark's query cluster, 4 of
    its 316 lists, recall@10 0.91 there in one build of three). Each of the last two counts where at least
    ``CALIBRATION_AVOIDED`` are found among ``CALIBRATION_SAMPLE``. For each item the copy's exact
    scan (every list) gives its ten nearest members; the sweep reads the fewest lists nearest the
    query whose members hold them at ``SWEEP_RECALL`` on average over each sample. None where
    every list was needed.
    """
    if lists < 2:
        return None
    samples = [_sample(conn, CALIBRATION_QUERIES, seed=0.24)]
    counts = {"drawn at random": len(samples[0]), "avoided": 0, "surrounded": 0}
    row = conn.execute("SELECT count(*) FROM items").fetchone()
    depth = avoided_depth(int(row[0]) if row else 0, members)
    for surrounded in (False, True):
        found = _queries_the_filter_avoids_or_surrounds(conn, predicate, CALIBRATION_EF if surrounded else depth,
                                                        surrounded=surrounded)
        if len(found) >= CALIBRATION_AVOIDED:
            samples.append(found)
            counts["surrounded" if surrounded else "avoided"] = len(found)
    if len(samples) == 1:
        log.info("calibrated on sampled items only: of %d sampled items, none enough with no member among their"
                 " %d nearest, and of as many members none enough with only members among their %d nearest",
                 CALIBRATION_SAMPLE, depth, CALIBRATION_EF)
    order = sql.SQL(
        "SELECT i.id FROM items i WHERE {predicate} AND i.id <> %(q)s ORDER BY"
        " l2_normalize(i.embedding)::halfvec({dim}) <=> l2_normalize((SELECT embedding FROM items WHERE id = %(q)s))"
        "::halfvec({dim}) LIMIT %(k)s"
    ).format(predicate=predicate, dim=sql.Literal(dimension))

    def nearest(q: str, probes: int) -> list[str]:
        with conn.transaction():
            conn.execute("SELECT set_config('ivfflat.probes', %s, true), set_config('enable_sort', 'off', true)",
                         [str(probes)])
            return [r[0] for r in conn.execute(order, {"q": q, "k": CALIBRATION_K}).fetchall()]

    truths = [{q: set(nearest(q, lists)) for q in sample} for sample in samples]

    def recall(probes: int) -> float:
        """The lower of the samples' mean recalls with ``probes`` lists read."""
        return min(
            sum(len(set(nearest(q, probes)) & best) / max(len(best), 1) for q, best in truth.items()) / len(truth)
            for truth in truths
        )

    # The fewest probes at the recall asked: doubling, then halving the interval.
    low, high = 0, 1
    # (Every list probed is the exact scan, whose recall is 1.)
    while high < lists and recall(high) < SWEEP_RECALL:
        low, high = high, min(2 * high, lists)
    while high - low > 1:
        middle = (low + high) // 2
        if recall(middle) >= SWEEP_RECALL:
            high = middle
        else:
            low = middle
    if high >= lists:
        return None
    width = high * members / lists / CALIBRATION_EF
    log.info("sweep calibrated on %d items (%s): %d of %d lists, %.1f members per unit of ef_search",
             sum(len(t) for t in truths), ", ".join(f"{n} {name}" for name, n in counts.items()), high, lists, width)
    return width


def avoided_depth(catalogue: int, members: int) -> int:
    """How many of an item's nearest must hold no member for the filter to avoid it: as many as
    hold ``AVOIDED_EXPECTED`` of ``members`` at random in a catalogue of ``catalogue`` items."""
    return min(AVOIDED_DEPTH, max(CALIBRATION_EF, math.ceil(AVOIDED_EXPECTED * catalogue / max(members, 1))))


def _sample(conn: psycopg.Connection[Any], n: int, *, seed: float, where: sql.Composable = _EVERY_ITEM) -> list[str]:
    """``n`` items drawn at random among those ``where`` selects (the same for the same rows and seed)."""
    conn.execute("SELECT setseed(%s)", [seed])
    return [r[0] for r in conn.execute(
        sql.SQL("SELECT id FROM items WHERE {} ORDER BY random() LIMIT %s").format(where), [n],
    ).fetchall()]


def _queries_the_filter_avoids_or_surrounds(
    conn: psycopg.Connection[Any], predicate: sql.Composable, depth: int, *, surrounded: bool
) -> list[str]:
    """Up to ``CALIBRATION_QUERIES`` sampled items with no member among their ``depth`` nearest, or
    sampled members with nothing but members among them.

    The shared index's iterative scan reads each item's nearest (at ef_search ``CALIBRATION_EF``,
    as the probe does) only until one of the other side turns up: most items are told apart by
    the first search, and only those that qualify cost a walk as deep as ``depth`` (1,000 for a
    filter of 1 % on 20,000 items; a search at that ef_search for each of the 2,000 sampled cost
    the calibration 25 s there)."""
    where = predicate if surrounded else sql.SQL("NOT ({})").format(predicate)
    sample = _sample(conn, CALIBRATION_SAMPLE, seed=0.63 if surrounded else 0.42, where=where)
    other_side = sql.SQL(
        "SELECT EXISTS (SELECT FROM (SELECT category, tags, metadata FROM items"
        " ORDER BY embedding <=> (SELECT embedding FROM items WHERE id = %s) LIMIT %s) n"
        " WHERE coalesce({predicate}, false) <> %s)"
    ).format(predicate=predicate)
    found: list[str] = []
    for q in sample:
        with conn.transaction():
            conn.execute("SELECT set_config('hnsw.ef_search', %s, true), set_config('hnsw.iterative_scan', %s, true)",
                         [str(CALIBRATION_EF), "relaxed_order"])
            row = conn.execute(other_side, [q, depth, surrounded]).fetchone()
        if row and not row[0]:
            found.append(q)
            if len(found) == CALIBRATION_QUERIES:
                break
    return found


def copy_lists(members: int) -> int:
    """The copy's lists for ``members`` items: about sqrt(members), so that a list holds as many
    members as there are lists (1 to 32,768, IVFFlat's bounds)."""
    return max(1, min(32_768, round(math.sqrt(max(members, 0)))))


def _lists(conn: psycopg.Connection[Any], index: str) -> int:
    """The lists of the IVFFlat index ``index``."""
    row = conn.execute(
        "SELECT o.option_value::integer FROM pg_class c, pg_options_to_table(c.reloptions) o"
        " WHERE c.relname = %s AND c.relnamespace = 'public'::regnamespace AND o.option_name = 'lists'",
        [index],
    ).fetchone()
    return int(row[0]) if row else 0


def _valid(conn: psycopg.Connection[Any], index: str, operator_class: str | None) -> bool:
    """``index`` exists, is valid and, if ``operator_class`` is given, orders by it."""
    row = conn.execute(
        "SELECT x.indisvalid AND (%s::text IS NULL OR o.opcname = %s)"
        " FROM pg_class c JOIN pg_index x ON x.indexrelid = c.oid JOIN pg_opclass o ON o.oid = x.indclass[0]"
        " WHERE c.relname = %s AND c.relnamespace = 'public'::regnamespace",
        [operator_class, operator_class, index],
    ).fetchone()
    return bool(row and row[0])


def drop_filter_index(conn: psycopg.Connection[Any], kind: str, value: str) -> bool:
    """Forget the filter index of ``kind`` = ``value`` and drop it and its copy; False when there was none.

    The record goes first, so that no query is planned for an index about to go.
    """
    value = _value(kind, value)
    forgotten = conn.execute("DELETE FROM filter_indexes WHERE kind = %s AND value = %s", [kind, value]).rowcount
    dropped = False
    for index in (filter_index_name(kind, value), copy_index_name(kind, value)):
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [f"public.{index}"]).fetchone()
        if exists and exists[0]:
            conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(index)))
            dropped = True
    return dropped or forgotten > 0


#: Per filter index: whether its copy is valid, the members its lists were made for (about lists^2
#: for a copy built before they were recorded), when, and the members now and written since. Each
#: count reads only the index of its own kind (the others' condition is false before any row).
DRIFT = """
SELECT f.kind, f.value,
       coalesce(cx.indisvalid AND co.opcname = %(opclass)s, false),
       coalesce(f.copy_members,
                (SELECT power(o.option_value::integer, 2)::bigint FROM pg_options_to_table(cc.reloptions) o
                  WHERE o.option_name = 'lists')),
       coalesce(f.copy_built_at, f.created_at),
       c.members + t.members + m.members, c.written + t.written + m.written
  FROM filter_indexes f
  LEFT JOIN pg_class cc ON cc.relname = f.copy_name AND cc.relnamespace = 'public'::regnamespace
  LEFT JOIN pg_index cx ON cx.indexrelid = cc.oid
  LEFT JOIN pg_opclass co ON co.oid = cx.indclass[0]
 CROSS JOIN LATERAL (
       SELECT count(*) AS members,
              count(*) FILTER (WHERE i.updated_at > coalesce(f.copy_built_at, f.created_at)) AS written
         FROM items i WHERE f.kind = 'category' AND i.category = f.value) c
 CROSS JOIN LATERAL (
       SELECT count(*) AS members,
              count(*) FILTER (WHERE i.updated_at > coalesce(f.copy_built_at, f.created_at)) AS written
         FROM items i WHERE f.kind = 'tag' AND i.tags && ARRAY[f.value]) t
 CROSS JOIN LATERAL (
       SELECT count(*) AS members,
              count(*) FILTER (WHERE i.updated_at > coalesce(f.copy_built_at, f.created_at)) AS written
         FROM items i
        WHERE f.kind = 'metadata' AND i.metadata @> CASE WHEN f.kind = 'metadata' THEN f.value::jsonb END) m
 ORDER BY f.kind, f.value
"""
DRIFT_PARAMS = {"opclass": COPY_OPERATOR_CLASS}


def refresh_reason(copy_valid: bool, built: int | None, built_at: datetime, members: int, written: int) -> str | None:
    """Why a filter index's copy is due to be built again (a row of ``DRIFT``), or None."""
    if not copy_valid or built is None:
        return f"no valid copy of its {members} members"
    changed = max(abs(members - built), written)
    if changed > REFRESH_FRACTION * max(built, 1):
        return (f"{changed} of the {built} members its copy was built for changed since {built_at.isoformat()}"
                f" ({written} written, now {members})")
    return None


def filter_indexes_due(drift: Iterable[Sequence[Any]]) -> list[tuple[str, str, str]]:
    """Of the rows of ``DRIFT`` (with ``DRIFT_PARAMS``), the filter indexes whose copy is due to
    be built again: kind, value and why."""
    return [(kind, value, reason) for kind, value, *row in drift if (reason := refresh_reason(*row))]


#: The bound of an indexed field's rule when none is given: an exact scan of 2,000 members costs
#: about twice the unfiltered search at 200,000 items warm (a 0.5 % tag's 1,000 members: 0.9
#: times, ``bench filters``), and it is the members of values above such a bound that an
#: anti-correlated filter leaves to the exact scan or to a walk past the query's neighbourhood.
DEFAULT_MIN_MEMBERS = 2000


@dataclass(frozen=True)
class IndexedField:
    """A rule: every value of ``kind`` (of metadata ``key``) with at least ``min_members`` items has
    a filter index."""

    kind: str
    #: The metadata key of a rule of kind ``metadata``; "" for the others.
    key: str
    min_members: int
    created_at: str


#: The filter indexes the rules ask for and lack ('create'), and those they made that their value
#: no longer earns ('drop': under half the bound, or the rule is gone): action, kind, the rule's
#: metadata key, value, its members now and the rule's bound (NULL without a rule). A tag counts
#: once per item however often the item names it; a metadata key's values are its strings, numbers
#: and booleans, each as a pair (numbers equal as jsonb, 1.5 and 1.50, are one value); a value
#: longer than a filter index's is left out.
FIELD_PLAN = """
WITH counts AS (
    SELECT 'category'::text AS kind, ''::text AS key, i.category AS value, count(*) AS members
      FROM items i
     WHERE i.category IS NOT NULL AND EXISTS (SELECT FROM indexed_fields r WHERE r.kind = 'category')
     GROUP BY i.category
    UNION ALL
    SELECT 'tag', '', u.value, count(*)
      FROM items i CROSS JOIN LATERAL (SELECT DISTINCT t FROM unnest(i.tags) t) u(value)
     WHERE EXISTS (SELECT FROM indexed_fields r WHERE r.kind = 'tag')
     GROUP BY u.value
    UNION ALL
    SELECT 'metadata', r.key, jsonb_build_object(r.key, i.metadata -> r.key)::text, count(*)
      FROM indexed_fields r JOIN items i ON i.metadata ? r.key
     WHERE r.kind = 'metadata' AND jsonb_typeof(i.metadata -> r.key) IN ('string', 'number', 'boolean')
     GROUP BY r.key, i.metadata -> r.key
), indexes AS (
    SELECT f.kind, f.value, f.automatic,
           CASE WHEN f.kind = 'metadata' THEN (SELECT k FROM jsonb_object_keys(f.value::jsonb) k LIMIT 1)
                ELSE '' END AS key
      FROM filter_indexes f
)
SELECT 'create' AS action, c.kind, c.key, c.value, c.members, r.min_members
  FROM counts c JOIN indexed_fields r ON r.kind = c.kind AND r.key = c.key
 WHERE c.members >= r.min_members AND length(c.value) BETWEEN 1 AND 256
   AND NOT EXISTS (SELECT FROM indexes f
                    WHERE f.kind = c.kind AND f.key = c.key
                      AND (f.value = c.value OR (f.kind = 'metadata' AND f.value::jsonb = c.value::jsonb)))
UNION ALL
SELECT 'drop', f.kind, f.key, f.value, coalesce(c.members, 0), r.min_members
  FROM indexes f
  LEFT JOIN indexed_fields r ON r.kind = f.kind AND r.key = f.key
  LEFT JOIN counts c ON c.kind = f.kind AND c.key = f.key
        AND (c.value = f.value OR (f.kind = 'metadata' AND c.value::jsonb = f.value::jsonb))
 WHERE f.automatic AND (r.kind IS NULL OR coalesce(c.members, 0) * 2 < r.min_members)
 ORDER BY 1, 2, 3, 5 DESC, 4
"""


def _field(kind: str, key: str) -> str:
    return f"value of metadata key {key!r}" if kind == "metadata" else kind


def field_plan_reason(action: str, kind: str, key: str, value: str, members: int, bound: int | None) -> str:
    """Why a row of ``FIELD_PLAN`` asks to build or drop a filter index."""
    if action == "create":
        return f"{members} members: every {_field(kind, key)} of {bound} members or more has a filter index"
    if bound is None:
        return f"made for the rule of every {_field(kind, key)}, which is gone"
    return f"{members} members, under half the {bound} of the rule that made it"


def _rule(kind: str, key: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}")
    if (kind == "metadata") != bool(key) or len(key) > MAX_VALUE_LENGTH:
        raise ValueError(f"a rule of every value of a metadata key needs the key (1 to {MAX_VALUE_LENGTH}"
                         " characters); the others take none")


def set_indexed_field(conn: psycopg.Connection[Any], kind: str, min_members: int, *, key: str = "") -> IndexedField:
    """Record (or change) the rule of ``kind`` (of metadata ``key``)."""
    _rule(kind, key)
    if min_members < 1:
        raise ValueError("min_members must be at least 1")
    conn.execute(
        "INSERT INTO indexed_fields (kind, key, min_members) VALUES (%s, %s, %s)"
        " ON CONFLICT (kind, key) DO UPDATE SET min_members = EXCLUDED.min_members",
        [kind, key, min_members],
    )
    return next(f for f in list_indexed_fields(conn) if (f.kind, f.key) == (kind, key))


def list_indexed_fields(conn: psycopg.Connection[Any]) -> list[IndexedField]:
    rows = conn.execute(
        "SELECT kind, key, min_members,"
        " to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
        " FROM indexed_fields ORDER BY kind, key"
    ).fetchall()
    return [IndexedField(str(kind), str(key), int(bound), str(created)) for kind, key, bound, created in rows]


def apply_indexed_fields(conn: psycopg.Connection[Any], *, build: dict[str, Any],
                         field: tuple[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """Build the filter indexes the rules ask for and drop those they no longer earn (of the rule
    ``field``, kind and key, alone, if given), the largest values first; yield a line for each,
    what was done and why."""
    for action, kind, key, value, members, bound in conn.execute(FIELD_PLAN).fetchall():
        if field is not None and (kind, key) != field:
            continue
        reason = field_plan_reason(action, kind, key, value, members, bound)
        line: dict[str, Any] = {"action": action, "kind": kind, "value": value, "reason": reason}
        log.info("%s the filter index of %s %r: %s", "building" if action == "create" else "dropping",
                 kind, value, reason)
        if action == "create":
            line["index"] = asdict(create_filter_index(conn, kind, value, automatic=True, **build))
        else:
            line["dropped"] = drop_filter_index(conn, kind, value)
        yield line


def unset_indexed_field(conn: psycopg.Connection[Any], kind: str, *, key: str = "") -> bool:
    """Forget the rule of ``kind`` (of metadata ``key``); False when there was none. The filter
    indexes it made go at the next ``apply_indexed_fields``."""
    _rule(kind, key)
    return conn.execute("DELETE FROM indexed_fields WHERE kind = %s AND key = %s", [kind, key]).rowcount > 0


def filter_index_main(argv: list[str]) -> int:
    """``python -m recsys filter-index create|drop|list|fields|refresh``."""
    parser = argparse.ArgumentParser(prog="python -m recsys filter-index",
                                     description="partial HNSW indexes for a category or a tag, and exact copies")
    parser.add_argument("action", choices=["create", "drop", "list", "fields", "refresh"],
                        help="fields: the indexed fields' rules; refresh: apply the rules, then build again the"
                             " copies due (every filter index's, or the one named)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--category", help="the category whose items the index holds")
    which.add_argument("--tag", help="the tag whose items the index holds")
    which.add_argument("--metadata", help='the metadata pair whose items the index holds, as JSON: {"brand": "acme"}')
    which.add_argument("--every-category", action="store_true",
                       help="create: a filter index for every category of --min-members items or more, now and as"
                            " they grow (applied by refresh); drop: forget that rule and drop the indexes it made")
    which.add_argument("--every-tag", action="store_true", help="the same for every tag")
    which.add_argument("--every-metadata-key", metavar="KEY",
                       help="the same for every value (string, number or boolean) of the metadata key KEY")
    parser.add_argument("--min-members", type=int, default=None,
                        help=f"with create --every-*: the rule's bound (default {DEFAULT_MIN_MEMBERS})")
    parser.add_argument("--url", help="a direct (not PgBouncer) URL of the table's owner, e.g. on Azure")
    parser.add_argument("--root", help="folder of the local stack (default: .stack/)")
    parser.add_argument("--maintenance-work-mem", default="1GB", help="memory for the build (default 1GB)")
    parser.add_argument("--force", action="store_true", help="refresh: build the named copy again even if not due")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    chosen = [(kind, getattr(args, kind)) for kind in KINDS if getattr(args, kind) is not None]
    field = (("category", "") if args.every_category else ("tag", "") if args.every_tag
             else ("metadata", args.every_metadata_key) if args.every_metadata_key is not None else None)
    if args.action in ("create", "drop") and not chosen and field is None:
        parser.error("create and drop need --category, --tag, --metadata or one of --every-*")
    if field is not None and args.action not in ("create", "drop"):
        parser.error("--every-category, --every-tag and --every-metadata-key are for create and drop")
    if args.min_members is not None and not (args.action == "create" and field is not None):
        parser.error("--min-members is for create --every-category, --every-tag or --every-metadata-key")
    if args.min_members is not None and args.min_members < 1:
        parser.error("--min-members must be at least 1")
    if args.force and not (args.action == "refresh" and chosen):
        parser.error("--force is for refresh, with --category or --tag")
    from recsys.config import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"recsys filter-index: {exc}", file=sys.stderr)
        return 2
    if args.url:
        url = args.url
    else:
        from recsys.local.stack import Stack, StackConfig

        url = Stack(StackConfig.local(Path(args.root) if args.root else None)).admin_conninfo()
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            if args.action == "list":
                print(json.dumps([asdict(i) for i in list_filter_indexes(conn)], indent=2))
                return 0
            if args.action == "fields":
                print(json.dumps([asdict(f) for f in list_indexed_fields(conn)], indent=2))
                return 0
            build = {"m": settings.hnsw_m, "ef_construction": settings.hnsw_ef_construction,
                     "maintenance_work_mem": args.maintenance_work_mem}
            if field is not None:
                kind, key = field
                if args.action == "create":
                    rule = set_indexed_field(conn, kind, args.min_members or DEFAULT_MIN_MEMBERS, key=key)
                    print(json.dumps({"rule": asdict(rule)}))
                else:
                    dropped = unset_indexed_field(conn, kind, key=key)
                    print(json.dumps({"kind": kind, "key": key, "rule_dropped": dropped}))
                for line in apply_indexed_fields(conn, build=build, field=field):
                    print(json.dumps(line))
                return 0
            if args.action == "refresh":
                if not chosen:
                    for line in apply_indexed_fields(conn, build=build):
                        print(json.dumps(line))
                return _refresh(conn, chosen[0] if chosen else None, force=args.force, build=build)
            kind, value = chosen[0][0], _value(*chosen[0])
            if args.action == "create":
                print(json.dumps(asdict(create_filter_index(conn, kind, value, **build))))
                return 0
            dropped = drop_filter_index(conn, kind, value)
            print(json.dumps({"kind": kind, "value": value, "dropped": dropped}))
            return 0
    except (ValueError, LookupError) as exc:
        print(f"recsys filter-index: {exc}", file=sys.stderr)
        return 2
    except psycopg.Error as exc:
        print(f"recsys filter-index: {exc}", file=sys.stderr)
        return 1


def _refresh(
    conn: psycopg.Connection[Any], chosen: tuple[str, str] | None, *, force: bool, build: dict[str, Any]
) -> int:
    """``refresh``: one JSON line per filter index considered, refreshed or not, and why."""
    due = {(kind, value): reason
           for kind, value, reason in filter_indexes_due(conn.execute(DRIFT, DRIFT_PARAMS).fetchall())}
    if chosen is None:
        considered = list(due)
    else:
        chosen = (chosen[0], _value(*chosen))
        if not conn.execute("SELECT true FROM filter_indexes WHERE kind = %s AND value = %s", list(chosen)).fetchone():
            raise LookupError(f"there is no filter index for {chosen[0]} {chosen[1]!r}")
        considered = [chosen]
    for kind, value in considered:
        reason = due.get((kind, value)) or ("asked for (--force)" if force else None)
        line: dict[str, Any] = {"kind": kind, "value": value, "refreshed": reason is not None, "reason": reason}
        if reason is not None:
            log.info("refreshing the filter index of %s %r: %s", kind, value, reason)
            line["index"] = asdict(create_filter_index(conn, kind, value, rebuild_copy=True, automatic=None, **build))
        print(json.dumps(line))
    return 0
