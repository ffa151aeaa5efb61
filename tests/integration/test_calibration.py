"""Recall calibration against a real database of its own (a catalogue no other test touches)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolClosed

from recsys.datasets import clustered_catalogue
from recsys.db.migrations import apply_migrations
from recsys.errors import NotCalibrated
from recsys.local.stack import Stack
from recsys.search import exact
from recsys.search.calibration import (
    HNSW_SQL,
    LADDER,
    RECOMMENDATION_SQL,
    Calibration,
    CalibrationError,
    CalibrationPoint,
    EfSearch,
    calibrate,
    calibrate_main,
    choose_ef_search,
    exact_neighbours,
    forget_calibrations,
    hnsw_neighbours,
    load_calibration,
    recommendation_mixes,
    recommendation_neighbours,
    store_calibration,
)
from recsys.search.exact import Mix

pytestmark = pytest.mark.integration

DATABASE = "recsys_calibration_test"
DIM = 32
CATALOGUE = clustered_catalogue(3000, DIM, clusters=30, spread=0.6, seed=11)


@pytest.fixture(scope="module")
def calibration_url(stack: Stack) -> Iterator[str]:
    """A database of this module's own, migrated, holding CATALOGUE; its URL through PgBouncer."""
    with psycopg.connect(stack.admin_conninfo("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DATABASE)))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER recsys").format(sql.Identifier(DATABASE)))
    with psycopg.connect(stack.admin_conninfo(DATABASE), autocommit=True) as conn:
        apply_migrations(conn, embedding_dim=DIM)
        register_vector(conn)
        copy_sql = "COPY items (id, embedding, category) FROM STDIN WITH (FORMAT BINARY)"
        with conn.cursor() as cur, cur.copy(copy_sql) as copy:
            copy.set_types(["text", "vector", "text"])
            for row in zip(CATALOGUE.ids, CATALOGUE.vectors, CATALOGUE.categories, strict=True):
                copy.write_row(row)
        conn.execute("ANALYZE items")
        # This database stands for any catalogue: the app role may read and write it.
        conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO recsys")
    yield stack.bouncer_url(database=DATABASE)
    with psycopg.connect(stack.admin_conninfo("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DATABASE)))


@pytest.fixture
async def conn(calibration_url: str, stack: Stack) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    with psycopg.connect(stack.admin_conninfo(DATABASE), autocommit=True) as admin:
        admin.execute("DELETE FROM recall_calibrations")
    forget_calibrations()
    async with await psycopg.AsyncConnection.connect(calibration_url, autocommit=True, prepare_threshold=None) as c:
        yield c
    forget_calibrations()


def _numpy_neighbours(item_id: str, k: int) -> list[str]:
    index = CATALOGUE.ids.index(item_id)
    similarity = CATALOGUE.vectors @ CATALOGUE.vectors[index]
    similarity[index] = -np.inf
    return [CATALOGUE.ids[i] for i in np.argsort(-similarity, kind="stable")[:k]]


async def test_without_a_calibration_a_recall_target_is_409_naming_the_command(
    conn: psycopg.AsyncConnection[Any],
) -> None:
    assert await load_calibration(conn) is None
    with pytest.raises(NotCalibrated) as caught:
        await choose_ef_search(conn, 0.9)
    assert caught.value.status == 409
    assert "python -m recsys calibrate" in caught.value.message


def _numpy_mix_neighbours(mix: Mix, k: int) -> list[str]:
    index = {item: i for i, item in enumerate(CATALOGUE.ids)}
    unit = CATALOGUE.vectors / np.linalg.norm(CATALOGUE.vectors, axis=1, keepdims=True)
    query = unit[[index[i] for i in mix.positive]].mean(axis=0)
    query = query - mix.alpha * unit[[index[i] for i in mix.negative]].mean(axis=0)
    similarity = unit @ query
    similarity[[index[i] for i in mix.positive + mix.negative]] = -np.inf
    return [CATALOGUE.ids[i] for i in np.argsort(-similarity, kind="stable")[:k]]


async def test_exact_reference_is_the_numpy_ground_truth(conn: psycopg.AsyncConnection[Any]) -> None:
    ids = CATALOGUE.ids[::150]
    found, _ = await exact_neighbours(conn, ids, 10)
    assert set(found) == set(ids)
    for item_id in ids:
        assert found[item_id] == _numpy_neighbours(item_id, 10)


async def test_exact_reference_of_recommendation_mixes_is_the_numpy_ground_truth(
    conn: psycopg.AsyncConnection[Any],
) -> None:
    ids = CATALOGUE.ids[3::200]
    mixes = [*recommendation_mixes(ids, 0.5), Mix("unknown", (ids[0], "no-such-item"), (ids[1],))]
    found, _ = await exact_neighbours(conn, ids, 10, mixes=mixes)
    # The items and the mixes in one pass; a mix with an unknown example is left out.
    assert set(found) == set(ids) | {m.name for m in mixes[:-1]}
    for mix in mixes[:-1]:
        assert found[mix.name] == _numpy_mix_neighbours(mix, 10)
    for item_id in ids:
        assert found[item_id] == _numpy_neighbours(item_id, 10)


async def test_hnsw_measurement_uses_the_index(conn: psycopg.AsyncConnection[Any]) -> None:
    async with conn.transaction():
        await conn.execute("SELECT set_config('hnsw.ef_search', '40', true)")
        rows = await (await conn.execute("EXPLAIN " + HNSW_SQL, {"ids": CATALOGUE.ids[:5], "k": 10})).fetchall()
    assert "items_embedding_cosine" in "\n".join(str(r[0]) for r in rows)


async def _rows_scanned(admin: psycopg.AsyncConnection[Any]) -> int:
    # Statistics reach shared memory when a backend goes idle, at most once a second unless
    # forced: force this backend's, then read them afresh.
    await admin.execute("SELECT pg_stat_force_next_flush()")
    await admin.execute("SELECT pg_stat_clear_snapshot()")
    row = await (await admin.execute("SELECT seq_tup_read FROM pg_stat_user_tables WHERE relname = 'items'")).fetchone()
    assert row is not None
    return int(row[0])


async def test_exact_reference_reads_the_table_once_for_the_whole_sample(
    stack: Stack, calibration_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small blocks: the rows of one block straddle COPY messages and the top-k is merged 30 times.
    monkeypatch.setattr(exact, "BLOCK_ROWS", 100)
    ids = CATALOGUE.ids[7::60]
    async with await psycopg.AsyncConnection.connect(stack.admin_conninfo(DATABASE), autocommit=True) as admin:
        before = await _rows_scanned(admin)
        found, _ = await exact_neighbours(admin, ids, 10)
        after = await _rows_scanned(admin)
    # 50 items, and the table read once by the COPY (plus once more if the planner fetches the
    # 50 sampled vectors of this small table by a sequential scan), not once per item.
    assert len(ids) == 50
    assert len(CATALOGUE.ids) <= after - before <= 2 * len(CATALOGUE.ids)
    for item_id in ids:
        assert found[item_id] == _numpy_neighbours(item_id, 10)


async def test_exact_reference_leaves_out_unknown_ids_and_zero_vectors(
    conn: psycopg.AsyncConnection[Any], stack: Stack
) -> None:
    with psycopg.connect(stack.admin_conninfo(DATABASE), autocommit=True) as admin:
        # A zero vector has no cosine similarity: never anybody's neighbour.
        admin.execute("INSERT INTO items (id, embedding) VALUES ('zero', %s::vector)", [str([0.0] * DIM)])
        try:
            found, _ = await exact_neighbours(conn, [CATALOGUE.ids[0], "no-such-item"], 5)
        finally:
            admin.execute("DELETE FROM items WHERE id = 'zero'")
    assert found == {CATALOGUE.ids[0]: _numpy_neighbours(CATALOGUE.ids[0], 5)}


async def test_calibrate_measures_recall_per_ef_search_and_stores_the_curve(
    conn: psycopg.AsyncConnection[Any],
) -> None:
    calibration = await calibrate(conn, sample_size=60, k=10)
    assert calibration.id is not None
    assert (calibration.k, calibration.sample_size, calibration.catalogue_size) == (10, 60, len(CATALOGUE.ids))
    assert [p.ef_search for p in calibration.points] == list(LADDER)
    recalls = [p.recall for p in calibration.points]
    assert all(0 <= r <= 1 for r in recalls)
    assert recalls[-1] >= 0.95
    assert recalls[-1] >= recalls[0]
    assert await load_calibration(conn) == calibration


async def test_stored_recall_is_the_recall_of_the_index_against_numpy(conn: psycopg.AsyncConnection[Any]) -> None:
    calibration = await calibrate(conn, sample_size=40, k=10, ladder=[10], seed="numpy")
    from recsys.search.calibration import SAMPLE_SQL

    rows = await (await conn.execute(SAMPLE_SQL, {"seed": "numpy", "n": 40})).fetchall()
    ids = [r[0] for r in rows]
    found, _ = await hnsw_neighbours(conn, ids, 10, 10)
    hits = sum(len(set(found[i]) & set(_numpy_neighbours(i, 10))) for i in ids)
    assert calibration.points[0].recall == pytest.approx(hits / (10 * len(ids)), abs=1e-4)


async def test_recall_target_picks_the_smallest_ef_search_of_the_latest_calibration(
    conn: psycopg.AsyncConnection[Any],
) -> None:
    curve = (CalibrationPoint(10, 0.80), CalibrationPoint(20, 0.90), CalibrationPoint(40, 0.96),
             CalibrationPoint(80, 0.99))
    await store_calibration(conn, Calibration(k=10, sample_size=100, catalogue_size=3000, points=curve))
    # 0.96 over 100 sampled items is not confidently above 0.95 (its lower bound is 0.928); 0.99 is.
    assert await choose_ef_search(conn, 0.95) == EfSearch(80, 0.99)
    assert await choose_ef_search(conn, 0.5) == EfSearch(10, 0.80)
    # Out of reach: the best calibrated value, with the lower recall it is expected to give.
    assert await choose_ef_search(conn, 0.999) == EfSearch(80, 0.99)

    newer = (CalibrationPoint(10, 0.70), CalibrationPoint(160, 0.97))
    await store_calibration(conn, Calibration(k=10, sample_size=100, catalogue_size=3000, points=newer))
    assert await choose_ef_search(conn, 0.95) == EfSearch(160, 0.97)

    # A large sample: the same curve's 0.96 is confidently above 0.95.
    await store_calibration(conn, Calibration(k=10, sample_size=20_000, catalogue_size=3000, points=curve))
    assert await choose_ef_search(conn, 0.95) == EfSearch(40, 0.96)


async def test_recommendation_recall_is_that_of_the_query_path_against_numpy(
    conn: psycopg.AsyncConnection[Any],
) -> None:
    calibration = await calibrate(conn, sample_size=30, k=10, ladder=[10, 160], seed="mixes")
    assert [p.ef_search for p in calibration.recommendation_points] == [10, 160]
    assert await load_calibration(conn) == calibration
    from recsys.search.calibration import SAMPLE_SQL

    rows = await (await conn.execute(SAMPLE_SQL, {"seed": "mixes", "n": 30})).fetchall()
    mixes = recommendation_mixes([r[0] for r in rows], 0.5)
    found, _ = await recommendation_neighbours(conn, mixes, 10, 10)
    hits = sum(len(set(found[m.name]) & set(_numpy_mix_neighbours(m, 10))) for m in mixes)
    assert calibration.recommendation_points[0].recall == pytest.approx(hits / (10 * len(mixes)), abs=1e-4)
    # The query path's own function gives them, and never an example back.
    for mix in mixes:
        assert len(found[mix.name]) == 10
        assert not set(found[mix.name]) & set(mix.positive + mix.negative)
    assert "recsys_query(" in RECOMMENDATION_SQL


async def test_recall_target_of_a_recommendation_goes_by_the_recommendation_curve(
    conn: psycopg.AsyncConnection[Any],
) -> None:
    items = (CalibrationPoint(10, 0.97), CalibrationPoint(40, 0.99))
    mixes = (CalibrationPoint(10, 0.70), CalibrationPoint(40, 0.90), CalibrationPoint(640, 0.99))
    await store_calibration(conn, Calibration(k=10, sample_size=20_000, catalogue_size=3000, points=items,
                                              recommendation_points=mixes))
    assert await choose_ef_search(conn, 0.95) == EfSearch(10, 0.97)
    assert await choose_ef_search(conn, 0.95, "recommendation") == EfSearch(640, 0.99)
    assert await choose_ef_search(conn, 0.85, "recommendation") == EfSearch(40, 0.90)


async def test_bad_calibration_options_are_refused(conn: psycopg.AsyncConnection[Any]) -> None:
    with pytest.raises(CalibrationError, match="ladder"):
        await calibrate(conn, ladder=[0, 10])
    with pytest.raises(CalibrationError, match="k must be between 1 and 1000"):
        await calibrate(conn, k=5000)
    assert await load_calibration(conn) is None


def test_calibrate_command_stores_a_calibration(
    calibration_url: str, stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    assert calibrate_main(["--url", calibration_url, "--sample", "20", "--ladder", "10,40"]) == 0
    out = capsys.readouterr().out
    assert "ef_search" in out and "recommendations" in out
    with psycopg.connect(stack.admin_conninfo(DATABASE), autocommit=True) as admin:
        rows = admin.execute(
            "SELECT shape, ef_search FROM recall_calibration_points"
            " WHERE calibration_id = (SELECT max(id) FROM recall_calibrations) ORDER BY shape, ef_search"
        ).fetchall()
    assert rows == [("item", 10), ("item", 40), ("recommendation", 10), ("recommendation", 40)]


async def test_a_pool_is_read_once_then_the_curve_comes_from_the_cache(
    conn: psycopg.AsyncConnection[Any], calibration_url: str
) -> None:
    curve = (CalibrationPoint(10, 0.90), CalibrationPoint(40, 0.97))
    await store_calibration(conn, Calibration(k=10, sample_size=20_000, catalogue_size=3000, points=curve))
    pool = AsyncConnectionPool(calibration_url, kwargs={"autocommit": True, "prepare_threshold": None},
                               min_size=1, max_size=1, open=False)
    await pool.open(wait=True)
    assert await choose_ef_search(pool, 0.95) == EfSearch(40, 0.97)
    await pool.close()
    # A request with recall_target costs no extra round trip: the closed pool is not touched.
    assert await choose_ef_search(pool, 0.89) == EfSearch(10, 0.90)
    forget_calibrations()
    with pytest.raises(PoolClosed):
        await choose_ef_search(pool, 0.9)
