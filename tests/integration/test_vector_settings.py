"""RECSYS_VECTOR_TYPE and the HNSW parameters: applied by the migrations and the bulk loader's index build."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import psycopg
import pytest
from psycopg import sql

from recsys.datasets import clustered_catalogue
from recsys.db.migrations import apply_migrations
from recsys.ingest.bulk import bulk_load
from recsys.ingest.messages import Item
from recsys.local.stack import Stack

pytestmark = pytest.mark.integration

DATABASE = "recsys_vector_settings_test"


@pytest.fixture
def database(stack: Stack) -> Iterator[str]:
    with psycopg.connect(stack.admin_conninfo("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DATABASE)))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER recsys").format(sql.Identifier(DATABASE)))
    yield DATABASE
    with psycopg.connect(stack.admin_conninfo("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DATABASE)))


def _schema(conn: psycopg.Connection) -> tuple[str, str]:
    row = conn.execute(
        "SELECT format_type(atttypid, atttypmod), pg_get_indexdef('items_embedding_cosine'::regclass)"
        " FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'embedding'"
    ).fetchone()
    assert row is not None
    return row


async def test_a_halfvec_catalogue_with_its_own_hnsw_parameters(stack: Stack, database: str) -> None:
    with psycopg.connect(stack.admin_conninfo(database), autocommit=True) as conn:
        apply_migrations(conn, embedding_dim=48, vector_type="halfvec", hnsw_m=8, hnsw_ef_construction=20)
        column, index = _schema(conn)
    assert column == "halfvec(48)"
    assert "halfvec_cosine_ops" in index and "m='8'" in index and "ef_construction='20'" in index

    # The bulk loader stages float32 vectors (cast to halfvec on insert) and rebuilds the index
    # with the parameters it is given.
    catalogue = clustered_catalogue(500, 48, clusters=5, seed=9)
    items = (Item(id=i, embedding=v, category=c, tags=[], metadata={})
             for i, v, c in zip(catalogue.ids, catalogue.vectors, catalogue.categories, strict=True))
    result = await bulk_load(stack.direct_url(user="postgres", database=database), items, dim=48,
                             chunk_size=200, build_index=True, workers=1, maintenance_work_mem="64MB",
                             hnsw_m=12, hnsw_ef_construction=30)
    assert (result.rows, result.chunks, result.index_rebuilt) == (500, 3, True)
    with psycopg.connect(stack.admin_conninfo(database), autocommit=True) as conn:
        column, index = _schema(conn)
        stored = conn.execute("SELECT embedding::real[] FROM items WHERE id = %s", [catalogue.ids[3]]).fetchone()
    assert column == "halfvec(48)"
    assert "halfvec_cosine_ops" in index and "m='12'" in index and "ef_construction='30'" in index
    assert stored is not None
    assert np.array_equal(np.asarray(stored[0], dtype=np.float32), catalogue.vectors[3].astype(np.float16))


def test_the_default_below_2001_dimensions_is_vector_with_the_default_hnsw_parameters(stack: Stack) -> None:
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        column, index = _schema(conn)
    assert column == f"vector({stack.config.embedding_dim})"
    assert "vector_cosine_ops" in index and "m='16'" in index and "ef_construction='128'" in index
