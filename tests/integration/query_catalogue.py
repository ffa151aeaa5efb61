"""A clustered test catalogue in the ``items`` table, shared by the query tests of a session.

Loaded with binary COPY into an emptied table, with the HNSW index dropped during the load
and rebuilt after it (much faster than inserting into the graph row by row). A later module
reuses the rows if nothing has touched the table since.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import psycopg
from pgvector import HalfVector
from pgvector.psycopg import register_vector
from psycopg.types.json import Jsonb

from recsys.datasets import Catalogue, clustered_catalogue, selectivity_tag, selectivity_tags
from recsys.local.stack import Stack

__all__ = ["QUERY_CLUSTER", "RARE_CATEGORY", "SIZE", "copy_items", "ensure_catalogue", "item_metadata", "item_tags",
           "make_catalogue"]

SIZE = 20_000
#: 1 % of the catalogue; the nine other categories share the rest.
RARE_CATEGORY = "books"
_WEIGHTS = (1.0,) + (11.0,) * 9

#: The cluster the filter tests take their query items from: the anti-correlated filter tags
#: (``recsys.datasets.selectivity_tags``) never occur in it, the correlated ones surround it.
QUERY_CLUSTER = 0

_loaded: dict[str, object] = {}


def make_catalogue(dim: int) -> Catalogue:
    # Ten wide clusters: hard enough that ef_search visibly trades recall for work (about 0.91
    # at ef_search 10 vs 0.99 at 100), not so hard that a less lucky HNSW build (the graph's
    # levels are random) drops recall at 100 below 0.95, as spread 1.5 did.
    return clustered_catalogue(SIZE, dim, clusters=10, spread=1.0, seed=7, category_weights=_WEIGHTS)


def item_tags(catalogue: Catalogue) -> list[list[str]]:
    """Each item's tags: the anti-correlated then the correlated selectivity tags."""
    far = selectivity_tags(catalogue, around=QUERY_CLUSTER, correlated=False)
    near = selectivity_tags(catalogue, around=QUERY_CLUSTER, correlated=True)
    return [a + b for a, b in zip(far, near, strict=True)]


def item_metadata(i: int, tags: list[str]) -> dict[str, object]:
    """Each item's metadata: its position, and ``rare`` for the anti-correlated 0.5 % tag."""
    return {"n": i, "rare": selectivity_tag(0.005) in tags}


def _fingerprint(conn: psycopg.Connection) -> object:
    return conn.execute("SELECT count(*), max(updated_at), max(xmin::text::bigint) FROM items").fetchone()


def copy_items(conn: psycopg.Connection, catalogue: Catalogue, rows: Iterable[int], *, halfvec: bool = False) -> None:
    """The catalogue's items at positions ``rows`` into ``items``, with their tags and metadata, by
    binary COPY (``conn`` has the pgvector types registered)."""
    tags = item_tags(catalogue)
    statement = "COPY items (id, embedding, category, tags, metadata) FROM STDIN WITH (FORMAT BINARY)"
    with conn.cursor().copy(statement) as copy:
        copy.set_types(["text", "halfvec" if halfvec else "vector", "text", "text[]", "jsonb"])
        for i in rows:
            vector = catalogue.vectors[i]
            copy.write_row((catalogue.ids[i], HalfVector(vector) if halfvec else vector, catalogue.categories[i],
                            tags[i], Jsonb(item_metadata(i, tags[i]))))


def ensure_catalogue(stack: Stack) -> Catalogue:
    """The test catalogue, loaded into the stack's ``items`` table unless it is there already.

    In a ``halfvec`` catalogue the vectors are those stored: rounded to float16.
    """
    catalogue = make_catalogue(stack.config.embedding_dim)
    key = f"{stack.root}/{stack.config.database}"
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        column = conn.execute("SELECT t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
                              " WHERE a.attrelid = 'items'::regclass AND a.attname = 'embedding'").fetchone()
        halfvec = column == ("halfvec",)
        if halfvec:
            catalogue = dataclasses.replace(catalogue, vectors=catalogue.vectors.astype(np.float16).astype(np.float32))
        if _loaded.get(key) == _fingerprint(conn):
            # Items other tests wrote and deleted since leave the table larger than its statistics
            # say, and the planner reckons its rows as their density times its pages now: a
            # filter's estimated rows grow with the dead space (a 50 % tag's 10,000 past the
            # 12,000 rows where the walk answers instead of the exact scan). Autovacuum would
            # catch up in its own time, and meanwhile clean the graph under a running test.
            grown = conn.execute("SELECT pg_relation_size('items') / current_setting('block_size')::int > relpages"
                                 " FROM pg_class WHERE oid = 'items'::regclass").fetchone()
            if grown is not None and grown[0]:
                conn.execute("VACUUM (ANALYZE) items")
            return catalogue
        register_vector(conn)
        index = conn.execute("SELECT pg_get_indexdef('items_embedding_cosine'::regclass)").fetchone()
        assert index is not None
        with conn.transaction():
            conn.execute("TRUNCATE items")
            conn.execute("DROP INDEX items_embedding_cosine")
            copy_items(conn, catalogue, range(len(catalogue.ids)), halfvec=halfvec)
            conn.execute(index[0])
        conn.execute("ANALYZE items")
        # The app reads as recsys_query (sql/030_roles.sql); some tests read as the login
        # `recsys` on a connection of their own, which the roles migration grants nothing.
        conn.execute("GRANT SELECT ON items TO recsys")
        _loaded[key] = _fingerprint(conn)
    return catalogue
