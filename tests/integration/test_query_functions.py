"""recsys_nearest: the exact fallback of a filtered index scan, its cost model, and halfvec catalogues."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psycopg
import pytest
from pgvector import HalfVector
from pgvector.psycopg import register_vector
from psycopg.types.json import Jsonb
from query_catalogue import QUERY_CLUSTER, RARE_CATEGORY, ensure_catalogue, item_tags

from recsys.datasets import clustered_catalogue, selectivity_tag
from recsys.db.pool import configure_connection
from recsys.local.stack import Stack, StackConfig
from recsys.search import service
from recsys.search.filter_indexes import create_filter_index
from recsys.search.params import RecommendationQuery, SimilarQuery

pytestmark = pytest.mark.integration


def test_an_index_scan_that_runs_dry_is_completed_by_an_exact_scan(stack: Stack) -> None:
    catalogue = ensure_catalogue(stack)
    members = [i for i, c in enumerate(catalogue.categories) if c == RARE_CATEGORY]
    rare = np.isin(np.arange(len(catalogue.ids)), members)

    def near_members(i: int) -> int:
        nearest = np.argsort(-(catalogue.vectors @ catalogue.vectors[i]))[1:11]
        return int(rare[nearest].sum())

    with psycopg.connect(stack.bouncer_url(), prepare_threshold=None) as conn:

        def found_by_its_search(i: int) -> bool:
            # A lost search (its descent ends elsewhere in the graph, as a build now and then does
            # to an item) finds none of the item's neighbours: the probe would find no member.
            with conn.transaction():
                conn.execute("SET LOCAL hnsw.ef_search = 20")
                first = conn.execute("SELECT id FROM items ORDER BY embedding <=> (SELECT embedding FROM items"
                                     " WHERE id = %s) LIMIT 1", [catalogue.ids[i]]).fetchone()
            return first == (catalogue.ids[i],)

        # An item with a member of the category among its 10 nearest (so the probe of the index
        # finds one and the iterative scan runs), but fewer than 10.
        item = next(i for i in range(len(catalogue.ids))
                    if not rare[i] and 0 < near_members(i) < 10 and found_by_its_search(i))
        scores = catalogue.vectors @ catalogue.vectors[item]
        truth = [catalogue.ids[i] for i in sorted(members, key=lambda i: -scores[i])[:10]]
        conn.commit()
        # The iterative scan gives up after max_scan_tuples (beyond its first ef_search candidates),
        # which at 1 % selectivity hold a row of the category or none: an exact scan must finish.
        # (Without bitmap scans and sorts the planner cannot answer from the category index.)
        for setting in ("hnsw.max_scan_tuples = 1", "enable_bitmapscan = off", "enable_sort = off"):
            conn.execute(f"SET LOCAL {setting}")
        rows = conn.execute(
            "SELECT id, method FROM recsys_nearest((SELECT embedding FROM items WHERE id = %s), 10, 10,"
            " ARRAY[%s], NULL, NULL, NULL, ARRAY[%s], false, 0)",
            [catalogue.ids[item], RARE_CATEGORY, catalogue.ids[item]],
        ).fetchall()
    assert [r[0] for r in rows] == truth
    assert {r[1] for r in rows} == {"hnsw+exact"}


async def test_the_functions_serve_a_halfvec_catalogue_above_2000_dimensions(tmp_path: Path) -> None:
    dim = 2048
    catalogue = clustered_catalogue(300, dim, clusters=5, seed=3)
    big = Stack(StackConfig.ephemeral(tmp_path / "halfvec", embedding_dim=dim))
    try:
        big.up()
        with psycopg.connect(big.admin_conninfo(), autocommit=True) as admin:
            register_vector(admin)
            kind = admin.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                                 "WHERE attrelid = 'items'::regclass AND attname = 'embedding'").fetchone()
            assert kind == (f"halfvec({dim})",)
            with admin.cursor().copy("COPY items (id, embedding, category) FROM STDIN WITH (FORMAT BINARY)") as copy:
                copy.set_types(["text", "halfvec", "text"])
                for item_id, vector, category in zip(catalogue.ids, catalogue.vectors, catalogue.categories,
                                                     strict=True):
                    copy.write_row((item_id, HalfVector(vector), category))
            admin.execute("ANALYZE items")
            admin.execute("GRANT SELECT ON items TO recsys")
        conn = await psycopg.AsyncConnection.connect(big.bouncer_url(), autocommit=True, prepare_threshold=None)
        await configure_connection(conn)
        try:
            halves = catalogue.vectors.astype(np.float16).astype(np.float32)
            scores = halves @ halves[0] / np.linalg.norm(halves, axis=1) / np.linalg.norm(halves[0])
            truth = [catalogue.ids[i] for i in np.argsort(-scores)[1:6]]
            for cost_ratio, strategy in ((1e9, "exact"), (0.0, "hnsw")):
                body = await service.similar_items(
                    conn, catalogue.ids[0], SimilarQuery(k=5), timeout_ms=5000, cost_ratio=cost_ratio
                )
                assert body["search"] == strategy
                assert [r["id"] for r in body["results"]] == truth
            # A filter index on a halfvec column: built on the column's type with its dimension.
            category = catalogue.categories[0]
            members = [i for i, c in enumerate(catalogue.categories) if c == category and i != 0]
            with psycopg.connect(big.admin_conninfo(), autocommit=True) as admin:
                index = create_filter_index(admin, "category", category, maintenance_work_mem="64MB")
            assert index.valid and index.members == len(members) + 1
            body = await service.similar_items(
                conn, catalogue.ids[0], SimilarQuery(k=20, ef_search=20, categories=(category,)), timeout_ms=5000,
                cost_ratio=0.0,
            )
            assert body["search"] == "filter_index"
            in_category = [catalogue.ids[i] for i in sorted(members, key=lambda i: -scores[i])[:20]]
            assert len({r["id"] for r in body["results"]} & set(in_category)) >= 19
            # Its exact copy, on the same type: the exact scan of the category reads it.
            assert index.copy_valid
            exact = await service.similar_items(
                conn, catalogue.ids[0], SimilarQuery(k=5, categories=(category,)), timeout_ms=5000, cost_ratio=1e9
            )
            assert exact["search"] == "exact"
            assert [r["id"] for r in exact["results"]] == in_category[:5]
            recommended = await service.recommend(
                conn,
                RecommendationQuery(positive=(catalogue.ids[0],), negative=(catalogue.ids[1],),
                                    vector=catalogue.vectors[2] * 1e5, k=5),
                timeout_ms=5000,
            )
            assert len(recommended["results"]) == 5
            # A component past halfvec's largest, 65504: the vector is scaled to unit length first.
            far = catalogue.vectors[2].copy()
            far[0] = 1e5
            beyond = await service.recommend(conn, RecommendationQuery(vector=far, k=5), timeout_ms=5000)
            assert len(beyond["results"]) == 5
            item = await service.get_item(conn, catalogue.ids[0], include_vector=True, timeout_ms=5000)
            assert np.array_equal(np.asarray(item["embedding"], dtype=np.float32), halves[0])
        finally:
            await conn.close()
    finally:
        big.down()


#: Reads of the items table in the current transaction other than the HNSW index and lookups by
#: id: sequential scans and scans of the filter indexes (categories, tags, metadata).
FILTER_READS = (
    "SELECT pg_stat_get_xact_numscans('items'::regclass)"
    " + coalesce(sum(pg_stat_get_xact_numscans(x.indexrelid)), 0) FROM pg_index x"
    " WHERE x.indrelid = 'items'::regclass"
    " AND x.indexrelid::regclass::text NOT IN ('items_pkey', 'items_embedding_cosine')"
)


def test_the_choice_rests_on_statistics_and_counts_only_under_a_metadata_filter(stack: Stack) -> None:
    catalogue = ensure_catalogue(stack)
    tags = item_tags(catalogue)
    tag = selectivity_tag(0.05, correlated=True)
    members = sum(tag in t for t in tags)
    carries = np.array([tag in t for t in tags])

    def carriers_around(i: int) -> int:
        return int(carries[np.argsort(-(catalogue.vectors @ catalogue.vectors[i]))[1:41]].sum())

    # An item with the tag on most of its 40 nearest, so that the probe finds k of them whatever
    # graph this session's HNSW build drew.
    item = next(i for i in np.flatnonzero(carries & (catalogue.clusters == QUERY_CLUSTER))
                if carriers_around(int(i)) >= 30)
    item = int(item)
    # A cost ratio that puts the budget just under the tag's members (1,000 of 20,000 at k 10,
    # ef_search 40): the planner's estimate is then within twice the budget, where the bounded count
    # ran before every such query; the items around the query carry the tag, so the probe answers.
    budget = 0.7 * members
    ratio = budget**2 / ((40 + 10) * len(catalogue.ids))
    call = ("SELECT id, method FROM recsys_nearest((SELECT embedding FROM items WHERE id = %s), 10, 40,"
            " NULL, %s, NULL, %s, ARRAY[%s], false, %s)")

    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        conn.execute("ANALYZE items")

    def filter_reads(metadata: Jsonb | None) -> tuple[int, list[tuple[str, str]]]:
        # Counted in the calling transaction itself: no other session's statistics can mix in.
        with psycopg.connect(stack.admin_conninfo(), prepare_threshold=None) as conn:
            rows = conn.execute(call, [catalogue.ids[item], [tag], metadata, catalogue.ids[item], ratio]).fetchall()
            reads = conn.execute(FILTER_READS).fetchone()
        assert reads is not None
        return int(reads[0]), rows

    # Tags only: the estimate decides; the table is read through the HNSW index alone.
    reads, rows = filter_reads(None)
    assert reads == 0
    assert len(rows) == 10 and {r[1] for r in rows} == {"hnsw"}
    # A metadata filter has no statistics: its passing items are counted first.
    reads, rows = filter_reads(Jsonb({"rare": False}))
    assert reads >= 1
    assert len(rows) == 10


def test_a_walk_that_costs_what_the_exact_scan_would_hands_over_to_it(stack: Stack) -> None:
    catalogue = ensure_catalogue(stack)
    tags = item_tags(catalogue)
    common, few = selectivity_tag(0.5), selectivity_tag(0.0005, correlated=True)
    # tags_any of the two: half of the items outside the query cluster, and the ten items at the
    # centre of the query cluster. Asked from among those ten (one excluded), the nine others
    # pass near the query, but the tenth result lies past the whole cluster: a walk through the
    # index would read about its 2,000 items to reach it.
    passes = np.array([common in t or few in t for t in tags])
    centre = np.flatnonzero(np.array([few in t for t in tags]))
    query = catalogue.vectors[centre].mean(axis=0)
    excluded = catalogue.ids[int(centre[0])]
    passes[centre[0]] = False
    scores = catalogue.vectors @ (query / np.linalg.norm(query))
    truth = [catalogue.ids[i] for i in sorted(np.flatnonzero(passes), key=lambda i: -scores[i])[:10]]
    assert sum(i in {catalogue.ids[int(c)] for c in centre} for i in truth) == 9
    # k 10, ef_search 10 and a cost ratio of 100: the budget, sqrt(100 * 20 * 20,000) = 6,325, is
    # under the ~10,000 passing items, so the index is walked; the walk may visit 10,000 / 100 =
    # 100 tuples, the cost of the exact scan, and then hands over to it.
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        conn.execute("ANALYZE items")
        register_vector(conn)
        rows = conn.execute(
            "SELECT id, method FROM recsys_nearest(%s, 10, 10, NULL, %s, NULL, NULL, %s, false, 100)",
            [query, [common, few], [excluded]],
        ).fetchall()
    assert [r[0] for r in rows] == truth
    assert {r[1] for r in rows} == {"hnsw+exact"}
