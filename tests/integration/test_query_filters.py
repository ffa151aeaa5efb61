"""Filters and result controls of the query path, against ground truth computed here in numpy.

The catalogue (``query_catalogue``) carries nested filter tags at selectivities 50 %, 5 %, 0.5 %
and 0.05 % that never occur in the query items' cluster (anti-correlated: an index scan has to
walk past the whole neighbourhood), and correlated ones that surround it.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import AsyncIterator, Callable

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector
from query_catalogue import QUERY_CLUSTER, copy_items, ensure_catalogue, item_metadata, item_tags
from query_http import call

from recsys.datasets import SELECTIVITIES, Catalogue, selectivity_tag
from recsys.db.pool import configure_connection
from recsys.local.stack import Stack
from recsys.search import service
from recsys.search.params import RecommendationQuery, SimilarQuery

pytestmark = pytest.mark.integration

TIMEOUT_MS = 20_000
K = 10
QUERIES = 12
#: Query items of the recall tests: enough that one unlucky query (the HNSW graph is built anew,
#: with random levels, in every session) cannot decide the mean.
RECALL_QUERIES = 40

Passes = Callable[[int], bool]


@pytest.fixture
async def conn(stack: Stack, catalogue: Catalogue) -> AsyncIterator[psycopg.AsyncConnection]:
    connection = await psycopg.AsyncConnection.connect(stack.bouncer_url(), autocommit=True, prepare_threshold=None)
    await configure_connection(connection)
    yield connection
    await connection.close()


@pytest.fixture(scope="module")
def tags(catalogue: Catalogue) -> list[list[str]]:
    return item_tags(catalogue)


def query_items(catalogue: Catalogue, count: int = QUERIES) -> list[int]:
    members = np.flatnonzero(catalogue.clusters == QUERY_CLUSTER)
    return [int(i) for i in np.random.default_rng(3).choice(members, size=count, replace=False)]


def truth(catalogue: Catalogue, query: np.ndarray, k: int, passes: Passes, skip: set[int]) -> list[int]:
    """Exact top-k by cosine similarity among the items that pass (unit vectors: a dot product)."""
    scores = catalogue.vectors @ (query / np.linalg.norm(query))
    found = []
    for i in np.argsort(-scores, kind="stable"):
        if int(i) not in skip and passes(int(i)):
            found.append(int(i))
            if len(found) == k:
                break
    return found


def positions(catalogue: Catalogue, body: dict) -> list[int]:
    index = {item_id: i for i, item_id in enumerate(catalogue.ids)}
    return [index[r["id"]] for r in body["results"]]


@pytest.mark.parametrize("selectivity", SELECTIVITIES)
async def test_anti_correlated_filters_keep_recall_and_k_results(
    catalogue: Catalogue, tags: list[list[str]], conn: psycopg.AsyncConnection, selectivity: float
) -> None:
    tag = selectivity_tag(selectivity)
    members = {i for i, t in enumerate(tags) if tag in t}
    assert len(members) == round(selectivity * len(catalogue.ids))
    assert not members & set(np.flatnonzero(catalogue.clusters == QUERY_CLUSTER).tolist())
    recalls = []
    for q in query_items(catalogue, RECALL_QUERIES):
        expected = truth(catalogue, catalogue.vectors[q], K, members.__contains__, {q})
        body = await service.similar_items(
            conn, catalogue.ids[q], SimilarQuery(k=K, tags_any=(tag,)), timeout_ms=TIMEOUT_MS
        )
        found = positions(catalogue, body)
        assert len(found) == min(K, len(members))
        assert set(found) <= members
        recalls.append(len(set(found) & set(expected)) / len(expected))
    assert np.mean(recalls) >= 0.95, recalls


#: A cost ratio at which the walk (6,000 rows of the exact scan, twice that to answer) costs less
#: than the exact scan of the 50 % tag's 10,000 members.
WALKED = 0.5


async def _avoided_tag_search(catalogue: Catalogue, tags: list[list[str]], conn: psycopg.AsyncConnection,
                              selectivity: float, ef_search: int, cost_ratio: float,
                              count: int = RECALL_QUERIES) -> tuple[float, dict[str, int]]:
    """Mean recall@10 of the tag at ``selectivity`` for ``count`` query items, and how they were answered."""
    tag = selectivity_tag(selectivity)
    members = {i for i, t in enumerate(tags) if tag in t}
    recalls, searches = [], {}
    for q in query_items(catalogue, count):
        query = SimilarQuery(k=K, ef_search=ef_search, tags_any=(tag,))
        body = await service.similar_items(conn, catalogue.ids[q], query, timeout_ms=TIMEOUT_MS, cost_ratio=cost_ratio)
        found = positions(catalogue, body)
        assert len(found) == K and set(found) <= members and body["ef_search"] == ef_search
        searches[body["search"]] = searches.get(body["search"], 0) + 1
        expected = truth(catalogue, catalogue.vectors[q], K, members.__contains__, {q})
        recalls.append(len(set(found) & set(expected)) / K)
    return float(np.mean(recalls)), searches


@pytest.mark.parametrize("ef_search", [10, 100, 400])
async def test_an_avoided_filter_is_walked_only_where_its_exact_scan_would_cost_more_whatever_the_ef(
    catalogue: Catalogue, tags: list[list[str]], conn: psycopg.AsyncConnection, ef_search: int
) -> None:
    # The walk searches at ef_search 1,000 whatever the request's, for as much as the exact scan
    # of 1,000 x 6 x the cost ratio rows, and answers beyond twice that: 24,000 at the ratio 2,
    # more than the 10,000 members of the 50 % tag, which are scanned; 6,000 at the ratio 0.5,
    # fewer, and the tag is walked; the 5 % tag's 1,000 members are scanned either way.
    exact = {"exact", "hnsw+exact"}  # without or after the probe of the shared index
    ask = functools.partial(_avoided_tag_search, catalogue, tags, conn, ef_search=ef_search, count=QUERIES)
    recall, searches = await ask(0.5, cost_ratio=service.INDEX_COST_RATIO)
    assert set(searches) <= exact and recall == 1.0, searches
    recall, searches = await ask(0.05, cost_ratio=WALKED)
    assert set(searches) <= exact and recall == 1.0, searches
    recall, searches = await ask(0.5, cost_ratio=WALKED)
    assert searches.get("hnsw", 0) >= QUERIES - 1, searches


async def test_the_walk_of_an_avoided_filter_searches_at_its_widest_whatever_the_request_ef(
    catalogue: Catalogue, tags: list[list[str]], conn: psycopg.AsyncConnection
) -> None:
    # Walked (the cost ratio 0.5, above), the 50 % tag finds at ef_search 10 what it finds at 100:
    # both searches run at 1,000. Searched at ten times 10 it found recall@10 0.58; at 1,000,
    # 0.8975-0.9725 on the graphs of this catalogue built so far.
    narrow, searches = await _avoided_tag_search(catalogue, tags, conn, 0.5, 10, WALKED)
    wide, _ = await _avoided_tag_search(catalogue, tags, conn, 0.5, 100, WALKED)
    assert searches.get("hnsw", 0) >= RECALL_QUERIES - 2, searches
    assert narrow >= wide - 0.025 and narrow >= 0.8, (narrow, wide)


@pytest.mark.parametrize("selectivity", SELECTIVITIES)
async def test_correlated_filters_keep_recall_and_k_results(
    catalogue: Catalogue, tags: list[list[str]], conn: psycopg.AsyncConnection, selectivity: float
) -> None:
    tag = selectivity_tag(selectivity, correlated=True)
    members = {i for i, t in enumerate(tags) if tag in t}
    recalls = []
    for q in query_items(catalogue, RECALL_QUERIES):
        expected = truth(catalogue, catalogue.vectors[q], K, members.__contains__, {q})
        body = await service.similar_items(
            conn, catalogue.ids[q], SimilarQuery(k=K, tags_all=(tag,)), timeout_ms=TIMEOUT_MS
        )
        found = positions(catalogue, body)
        assert len(found) == min(K, len(members)) and set(found) <= members
        recalls.append(len(set(found) & set(expected)) / len(expected))
    assert np.mean(recalls) >= 0.95, recalls


#: Categories are drawn independently of the clusters: 1 % (within the budget: the exact scan), one
#: of 11 % (past it: the shared index's nearest, read on where fewer than k pass), and three and
#: seven of them (any of several: 33 % and 77 %).
INDEPENDENT_FILTERS = (("books",), ("music",), ("music", "movies", "games"),
                       ("music", "movies", "games", "garden", "kitchen", "sports", "toys"))


@pytest.mark.parametrize("categories", INDEPENDENT_FILTERS, ids=lambda c: "+".join(c))
async def test_filters_independent_of_the_vectors_keep_recall_and_k_results(
    catalogue: Catalogue, conn: psycopg.AsyncConnection, categories: tuple[str, ...]
) -> None:
    members = {i for i, c in enumerate(catalogue.categories) if c in categories}
    rows = np.random.default_rng(5).choice(len(catalogue.ids), size=RECALL_QUERIES, replace=False)
    recalls = []
    for q in (int(r) for r in rows):
        expected = truth(catalogue, catalogue.vectors[q], K, members.__contains__, {q})
        body = await service.similar_items(
            conn, catalogue.ids[q], SimilarQuery(k=K, categories=categories), timeout_ms=TIMEOUT_MS
        )
        found = positions(catalogue, body)
        assert len(found) == K and set(found) <= members
        recalls.append(len(set(found) & set(expected)) / len(expected))
    assert np.mean(recalls) >= 0.95, recalls
    # The probe searches wider than the request's ef_search, never past pgvector's 1,000.
    body = await service.similar_items(
        conn, catalogue.ids[int(rows[0])], SimilarQuery(k=K, ef_search=1000, categories=categories),
        timeout_ms=TIMEOUT_MS,
    )
    assert len(body["results"]) == K and body["ef_search"] == 1000


async def test_every_filter_combined_with_exclude_is_exact_when_asked(
    catalogue: Catalogue, tags: list[list[str]], conn: psycopg.AsyncConnection
) -> None:
    wide, narrow = selectivity_tag(0.5), selectivity_tag(0.05)
    categories = ("music", "movies", "books")

    def passes(i: int) -> bool:
        return (catalogue.categories[i] in categories and (wide in tags[i] or narrow in tags[i])
                and wide in tags[i] and item_metadata(i, tags[i])["rare"] is False)

    q = query_items(catalogue)[0]
    first = truth(catalogue, catalogue.vectors[q], 3, passes, {q})
    query = SimilarQuery(
        k=20, exact=True, categories=categories, tags_any=(wide, narrow), tags_all=(wide,),
        metadata={"rare": False}, exclude=tuple(catalogue.ids[i] for i in first),
    )
    body = await service.similar_items(conn, catalogue.ids[q], query, timeout_ms=TIMEOUT_MS)
    assert body["search"] == "exact"
    assert positions(catalogue, body) == truth(catalogue, catalogue.vectors[q], 20, passes, {q, *first})
    for r in body["results"]:
        i = catalogue.ids.index(r["id"])
        assert r["category"] in categories and wide in r["tags"] and r["metadata"]["rare"] is False
        assert r["score"] == pytest.approx(float(catalogue.vectors[i] @ catalogue.vectors[q]), abs=1e-5)
    # Without exact, the path the cost model chooses keeps recall.
    indexed = await service.similar_items(
        conn, catalogue.ids[q], SimilarQuery(**{**query.__dict__, "exact": False}), timeout_ms=TIMEOUT_MS
    )
    assert all(passes(i) and i not in first for i in positions(catalogue, indexed))
    assert len(set(positions(catalogue, indexed)) & set(positions(catalogue, body))) >= 19, indexed["search"]


async def test_metadata_filter_matches_values_exactly(
    catalogue: Catalogue, tags: list[list[str]], conn: psycopg.AsyncConnection
) -> None:
    q = query_items(catalogue)[1]
    rare = {i for i, t in enumerate(tags) if item_metadata(i, t)["rare"]}
    body = await service.similar_items(
        conn, catalogue.ids[q], SimilarQuery(k=K, metadata={"rare": True}), timeout_ms=TIMEOUT_MS
    )
    assert positions(catalogue, body) == truth(catalogue, catalogue.vectors[q], K, rare.__contains__, {q})
    one = await service.similar_items(
        conn, catalogue.ids[q], SimilarQuery(k=K, metadata={"n": 17}), timeout_ms=TIMEOUT_MS
    )
    assert positions(catalogue, one) == [17]
    # "true" (a string) is not true (a boolean); 17.0 equals 17.
    none = await service.similar_items(
        conn, catalogue.ids[q], SimilarQuery(k=K, metadata={"rare": "true"}), timeout_ms=TIMEOUT_MS
    )
    assert none["results"] == []
    same = await service.similar_items(
        conn, catalogue.ids[q], SimilarQuery(k=K, metadata={"n": 17.0}), timeout_ms=TIMEOUT_MS
    )
    assert positions(catalogue, same) == [17]


#: What has written to ``items`` (the statistics' counters, by the time they are flushed) and what is
#: running against the database besides the test: the index's graph changes under writes and vacuums.
_ACTIVITY = (
    "SELECT (SELECT row(n_tup_ins, n_tup_upd, n_tup_del, vacuum_count, autovacuum_count)::text"
    "          FROM pg_stat_user_tables WHERE relid = 'items'::regclass),"
    "       (SELECT array_agg(coalesce(backend_type, '') || ': ' || left(query, 80))"
    "          FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND state IS DISTINCT FROM 'idle'"
    "           AND backend_type IN ('client backend', 'autovacuum worker'))"
)


@pytest.mark.parametrize("options", [{}, {"tags_any": (selectivity_tag(0.05),)}, {"diversity": 0.3, "candidates": 120}])
async def test_offset_pages_concatenate_to_the_larger_query(
    stack: Stack, catalogue: Catalogue, conn: psycopg.AsyncConnection, options: dict
) -> None:
    q = catalogue.ids[query_items(catalogue)[2]]
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as admin:
        differences = []
        for _ in range(2):
            before = admin.execute(_ACTIVITY).fetchone()
            whole = await service.similar_items(conn, q, SimilarQuery(k=30, **options), timeout_ms=TIMEOUT_MS)
            pages, ways = [], [(whole["search"], whole["ef_search"])]
            for offset in (0, 10, 20):
                page = await service.similar_items(conn, q, SimilarQuery(k=10, offset=offset, **options),
                                                   timeout_ms=TIMEOUT_MS)
                pages += [r["id"] for r in page["results"]]
                ways.append((page["search"], page["ef_search"]))
            during = admin.execute(_ACTIVITY).fetchone()
            assert len(pages) == 30
            if pages == [r["id"] for r in whole["results"]]:
                break
            # Whether the larger query itself still answers as it did tells a search that changed
            # between the requests from pages that differ from it; the activity, a change of the graph.
            again = await service.similar_items(conn, q, SimilarQuery(k=30, **options), timeout_ms=TIMEOUT_MS)
            time.sleep(1.0)  # the statistics' counters are flushed about every second
            after = admin.execute(_ACTIVITY).fetchone()
            differences.append(
                f"pages {pages} differ from the larger query's {[r['id'] for r in whole['results']]}; asked again:"
                f" {[r['id'] for r in again['results']]}; (search, ef_search) per request: {ways}; items' counters"
                f" and other activity before, during and after: {before}, {during}, {after}"
            )
            # Seen twice in many runs, never reproduced: the first page once lacked a result that the
            # larger query held both before and after it. A search that differs again on a second
            # round is a fault of the paging; one that does not is reported, not failed.
            warnings.warn(f"offset pages differed once: {differences[-1]}", stacklevel=1)
        else:
            pytest.fail(" / ".join(differences))


async def test_score_threshold_never_returns_a_lower_score(
    catalogue: Catalogue, conn: psycopg.AsyncConnection
) -> None:
    q = catalogue.ids[query_items(catalogue)[3]]
    plain = await service.similar_items(conn, q, SimilarQuery(k=50), timeout_ms=TIMEOUT_MS)
    threshold = plain["results"][20]["score"]
    cut = await service.similar_items(conn, q, SimilarQuery(k=50, score_threshold=threshold), timeout_ms=TIMEOUT_MS)
    assert all(r["score"] >= threshold for r in cut["results"])
    assert cut["results"] == [r for r in plain["results"] if r["score"] >= threshold]
    assert len(cut["results"]) >= 21
    empty = await service.similar_items(conn, q, SimilarQuery(k=50, score_threshold=1.0), timeout_ms=TIMEOUT_MS)
    assert empty["results"] == []


async def test_exact_recommendations_equal_the_ground_truth_and_with_vector_returns_embeddings(
    catalogue: Catalogue, tags: list[list[str]], conn: psycopg.AsyncConnection
) -> None:
    positive, negative = [query_items(catalogue)[4], 77], [query_items(catalogue)[5]]
    tag = selectivity_tag(0.005)
    query_vector = np.mean([catalogue.vectors[i] for i in positive], axis=0) - service.NEGATIVE_WEIGHT * np.mean(
        [catalogue.vectors[i] for i in negative], axis=0
    )
    members = {i for i, t in enumerate(tags) if tag in t}
    body = await service.recommend(
        conn,
        RecommendationQuery(positive=tuple(catalogue.ids[i] for i in positive),
                            negative=tuple(catalogue.ids[i] for i in negative),
                            k=K, exact=True, with_vector=True, tags_any=(tag,)),
        timeout_ms=TIMEOUT_MS,
    )
    assert body["search"] == "exact" and body["strategy"] == "average_vector"
    found = positions(catalogue, body)
    assert found == truth(catalogue, query_vector, K, members.__contains__, {*positive, *negative})
    for i, r in zip(found, body["results"], strict=True):
        assert np.array_equal(np.asarray(r["embedding"], dtype=np.float32), catalogue.vectors[i])


def mmr(catalogue: Catalogue, pool: list[int], relevance: dict[int, float], k: int, diversity: float) -> list[int]:
    """Maximal marginal relevance, as API.md defines it, over a pool of catalogue positions."""
    picked: list[int] = []
    rest = list(pool)
    while rest and len(picked) < k:
        def value(i: int) -> float:
            nearest = max((float(catalogue.vectors[i] @ catalogue.vectors[j]) for j in picked), default=0.0)
            return (1 - diversity) * relevance[i] - diversity * nearest
        best = max(rest, key=value)
        picked.append(best)
        rest.remove(best)
    return picked


def mean_pairwise_similarity(catalogue: Catalogue, found: list[int]) -> float:
    vectors = catalogue.vectors[found]
    sims = vectors @ vectors.T
    return float((sims.sum() - np.trace(sims)) / (len(found) * (len(found) - 1)))


async def test_diversity_zero_is_plain_search_and_half_spreads_results_within_filters(
    catalogue: Catalogue, tags: list[list[str]], conn: psycopg.AsyncConnection
) -> None:
    tag = selectivity_tag(0.5)
    members = {i for i, t in enumerate(tags) if tag in t}
    spreads = []
    for q in query_items(catalogue, 4):
        plain = await service.similar_items(conn, catalogue.ids[q], SimilarQuery(k=K, tags_any=(tag,)),
                                            timeout_ms=TIMEOUT_MS)
        zero = await service.similar_items(conn, catalogue.ids[q], SimilarQuery(k=K, tags_any=(tag,), diversity=0.0),
                                           timeout_ms=TIMEOUT_MS)
        assert zero["results"] == plain["results"]
        half = await service.similar_items(
            conn, catalogue.ids[q], SimilarQuery(k=K, tags_any=(tag,), diversity=0.5, exact=True),
            timeout_ms=TIMEOUT_MS,
        )
        diverse = positions(catalogue, half)
        assert len(diverse) == K and set(diverse) <= members
        # The picks follow the definition over the exact best max(4k, 50) candidates.
        pool = truth(catalogue, catalogue.vectors[q], 50, members.__contains__, {q})
        relevance = {i: float(catalogue.vectors[i] @ catalogue.vectors[q]) for i in pool}
        assert diverse == mmr(catalogue, pool, relevance, K, 0.5)
        for i, r in zip(diverse, half["results"], strict=True):
            assert r["score"] == pytest.approx(relevance[i], abs=1e-5)
        spreads.append((mean_pairwise_similarity(catalogue, positions(catalogue, plain)),
                        mean_pairwise_similarity(catalogue, diverse)))
    assert all(after < before for before, after in spreads), spreads


async def test_a_diversity_too_small_to_move_a_score_is_plain_search(
    catalogue: Catalogue, conn: psycopg.AsyncConnection
) -> None:
    # MMR multiplies the weight by similarities, and PostgreSQL raises an error where a product
    # of doubles underflows: 5e-324 times any similarity under 0.5, as among the 840 candidates of
    # a page at offset 200. Under service.MIN_DIVERSITY the request is plain search.
    for q in query_items(catalogue, 3):
        plain = await service.similar_items(conn, catalogue.ids[q], SimilarQuery(k=K, offset=200),
                                            timeout_ms=TIMEOUT_MS)
        for tiny in (5e-324, 1e-300, service.MIN_DIVERSITY / 2):
            answer = await service.similar_items(conn, catalogue.ids[q],
                                                 SimilarQuery(k=K, offset=200, diversity=tiny), timeout_ms=TIMEOUT_MS)
            assert answer["results"] == plain["results"], tiny
        least = await service.similar_items(
            conn, catalogue.ids[q], SimilarQuery(k=K, offset=200, diversity=service.MIN_DIVERSITY),
            timeout_ms=TIMEOUT_MS,
        )
        assert len(least["results"]) == K


def best_score(catalogue: Catalogue, i: int, positive: list[np.ndarray], negative: list[np.ndarray]) -> float:
    """Qdrant's best_score, written from its definition."""
    def sigmoid(x: float) -> float:
        return 0.5 * (x / (1 + abs(x)) + 1)

    best_positive = max(float(catalogue.vectors[i] @ p) for p in positive)
    best_negative = max((float(catalogue.vectors[i] @ n) for n in negative), default=-np.inf)
    return sigmoid(best_positive) if best_positive > best_negative else -sigmoid(best_negative)


async def test_best_score_ranks_as_defined(
    catalogue: Catalogue, tags: list[list[str]], conn: psycopg.AsyncConnection
) -> None:
    q = query_items(catalogue)
    positive_ids, negative_ids = [q[6], q[7]], [q[8], q[9]]
    extra = catalogue.vectors[q[10]] * 3
    positive = [catalogue.vectors[i] for i in positive_ids] + [extra / np.linalg.norm(extra)]
    negative = [catalogue.vectors[i] for i in negative_ids]
    skip = {*positive_ids, *negative_ids}
    query = RecommendationQuery(positive=tuple(catalogue.ids[i] for i in positive_ids),
                                negative=tuple(catalogue.ids[i] for i in negative_ids),
                                vector=extra, k=K, strategy="best_score")
    scores = {i: best_score(catalogue, i, positive, negative) for i in range(len(catalogue.ids)) if i not in skip}
    expected = sorted(scores, key=lambda i: (-scores[i], catalogue.ids[i]))

    exact = await service.recommend(conn, RecommendationQuery(**{**query.__dict__, "exact": True, "k": 300}),
                                    timeout_ms=TIMEOUT_MS)
    assert exact["strategy"] == "best_score" and exact["search"] == "exact"
    ranked = positions(catalogue, exact)
    assert len(set(ranked)) == 300 and not set(ranked) & skip
    # Position by position, the item returned has the best score the definition gives there. Two
    # items whose scores tie to within float32 rounding may come in either order: PostgreSQL and
    # numpy round differently (pgvector's SIMD sums depend on the CPU).
    assert [scores[i] for i in ranked] == pytest.approx([scores[i] for i in expected[:300]], abs=1e-6)
    assert {i for i in expected if scores[i] > scores[expected[299]] + 1e-6} <= set(ranked)
    assert [r["score"] for r in exact["results"]] == pytest.approx([scores[i] for i in expected[:300]], abs=1e-5)
    # Items nearer to a negative than to every positive come after every item that is not.
    dominated = [r["score"] < 0 for r in exact["results"]]
    assert dominated == sorted(dominated)

    indexed = await service.recommend(conn, query, timeout_ms=TIMEOUT_MS)
    found = positions(catalogue, indexed)
    assert [r["score"] for r in indexed["results"]] == pytest.approx([scores[i] for i in found], abs=1e-5)
    assert len(set(found) & set(expected[:K])) >= 9

    tag = selectivity_tag(0.05)
    filtered = await service.recommend(
        conn, RecommendationQuery(**{**query.__dict__, "tags_any": (tag,)}), timeout_ms=TIMEOUT_MS
    )
    assert len(filtered["results"]) == K and all(tag in r["tags"] for r in filtered["results"])


async def test_http_takes_repeated_categories_and_names_bad_fields(
    catalogue: Catalogue, app_pools: None
) -> None:
    item = catalogue.ids[query_items(catalogue)[0]]
    path = "/api/items/{id}/similar"
    query = [("category", "books"), ("category", "music"), ("k", "20"), ("tags_any", "far-0.5,far-0.05"),
             ("metadata", '{"rare": false}'), ("with_vector", "true")]
    answer = (await call("similar_get", route_params={"id": item}, query=query)).check(path, "GET")
    assert answer.status == 200 and len(answer.body["results"]) == 20
    assert {r["category"] for r in answer.body["results"]} == {"books", "music"}
    assert all(len(r["embedding"]) == len(catalogue.vectors[0]) for r in answer.body["results"])
    for bad_query, field in (([("offset", "999")], "offset"), ([("diversity", "2")], "diversity"),
                             ([("metadata", "x")], "metadata"), ([("exact", "true"), ("ef_search", "5")], "ef_search"),
                             ([("score_threshold", "-3")], "score_threshold"), ([("category", "")], "category")):
        bad = (await call("similar_get", route_params={"id": item}, query=bad_query)).check(path, "GET")
        assert (bad.status, bad.body["field"]) == (400, field)
    body = {"positive": [item], "strategy": "best_score", "diversity": 0.2, "offset": 3, "k": 4,
            "category": ["books", "music"], "score_threshold": -1}
    answer = (await call("recommendations_post", method="POST", json_body=body)).check("/api/recommendations", "POST")
    assert answer.status == 200 and answer.body["strategy"] == "best_score" and len(answer.body["results"]) == 4
    bad = await call("recommendations_post", method="POST", json_body={"positive": [item], "strategy": "nearest"})
    assert (bad.status, bad.body["field"]) == (400, "strategy")


async def test_a_catalogue_not_yet_analysed_is_searched_as_once_it_is(
    stack: Stack, catalogue: Catalogue, conn: psycopg.AsyncConnection
) -> None:
    """Right after TRUNCATE and COPY, before autovacuum has analysed the table, pg_class holds no
    row count (reltuples -1). The choice between the index and an exact scan still goes by the
    catalogue's size: the planner's estimate from the table's pages."""
    q = query_items(catalogue)[0]
    subset = sorted({*range(4000), q})
    wide, narrow = selectivity_tag(0.5), selectivity_tag(0.05)
    queries = {
        "unfiltered": SimilarQuery(k=K),
        "anti 50 %": SimilarQuery(k=K, tags_any=(wide,)),
        "combined": SimilarQuery(k=20, categories=("music", "movies", "books"), tags_any=(wide, narrow),
                                 tags_all=(wide,), metadata={"rare": False}),
    }
    try:
        with psycopg.connect(stack.admin_conninfo(), autocommit=True) as admin:
            register_vector(admin)
            admin.execute("ALTER TABLE items SET (autovacuum_enabled = off)")
            with admin.transaction():
                admin.execute("TRUNCATE items")
                copy_items(admin, catalogue, subset)
            assert admin.execute("SELECT reltuples FROM pg_class WHERE oid = 'items'::regclass").fetchone() == (-1,)
            before = {name: await service.similar_items(conn, catalogue.ids[q], query, timeout_ms=TIMEOUT_MS)
                      for name, query in queries.items()}
            admin.execute("ANALYZE items")
            after = {name: await service.similar_items(conn, catalogue.ids[q], query, timeout_ms=TIMEOUT_MS)
                     for name, query in queries.items()}
    finally:
        with psycopg.connect(stack.admin_conninfo(), autocommit=True) as admin:
            admin.execute("ALTER TABLE items RESET (autovacuum_enabled)")
        ensure_catalogue(stack)
    assert {name: body["search"] for name, body in before.items()} == {
        name: body["search"] for name, body in after.items()}
    assert after["unfiltered"]["search"] == "hnsw"
    for name, body in before.items():
        assert len(body["results"]) == queries[name].k, name
