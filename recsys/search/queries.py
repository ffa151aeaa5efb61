"""The SQL of the query path.

Every request is ONE simple-query message: a ``set_config('statement_timeout', ..., true)``
followed by the query, bound on the client (``psycopg.AsyncClientCursor``: psycopg quotes the
values, nothing is formatted by hand). On an autocommit connection PostgreSQL runs the
statements of one message as one implicit transaction, so:

- the timeout is transaction-local and applies to the query: PostgreSQL arms
  ``statement_timeout`` when each statement of the message starts, which is why it cannot be
  set inside the query function itself (the running statement would not see it);
- PgBouncer in transaction mode sees one transaction and frees the server connection after it;
- it costs one network round trip, with no BEGIN/SET/COMMIT exchanges and no prepared
  statements (which PgBouncer 1.18 cannot keep in transaction mode).

The query function (``sql/070_query_filters.sql``) applies ``hnsw.ef_search`` and
``hnsw.iterative_scan`` transaction-locally themselves.
"""

from __future__ import annotations

__all__ = [
    "GET_ITEM",
    "GET_ITEM_WITH_VECTOR",
    "LOOKUP_ITEMS",
    "LOOKUP_ITEMS_WITH_VECTOR",
    "SEARCH",
    "TIMEOUT_PREFIX",
]

#: First statement of every message; its parameter is the timeout in milliseconds, as text.
TIMEOUT_PREFIX = "SELECT set_config('statement_timeout', %(statement_timeout)s, true); "

_ITEM_COLUMNS = "id, category, tags, metadata, updated_at, version"
# real[] rather than the pgvector type: the values arrive as the shortest decimal that reads
# back as the same float32 (PostgreSQL's float4 output), for vector and halfvec alike.
_ITEM_COLUMNS_WITH_VECTOR = _ITEM_COLUMNS + ", embedding::real[] AS embedding"

GET_ITEM = f"SELECT {_ITEM_COLUMNS} FROM items WHERE id = %(id)s"
GET_ITEM_WITH_VECTOR = f"SELECT {_ITEM_COLUMNS_WITH_VECTOR} FROM items WHERE id = %(id)s"

#: One query whatever the number of ids; the caller restores the request's order.
LOOKUP_ITEMS = f"SELECT {_ITEM_COLUMNS} FROM items WHERE id = ANY(%(ids)s::text[])"
LOOKUP_ITEMS_WITH_VECTOR = f"SELECT {_ITEM_COLUMNS_WITH_VECTOR} FROM items WHERE id = ANY(%(ids)s::text[])"

#: /similar (``similar_to`` set) and /recommendations (``positive``, ``negative``, ``vector``),
#: every filter and result control as a parameter (sql/070_query_filters.sql).
SEARCH = (
    "SELECT id, score, distance, category, tags, metadata, embedding, method FROM recsys_query("
    "%(similar_to)s, %(positive)s::text[], %(negative)s::text[], %(vector)s::vector, %(strategy)s, %(alpha)s, "
    "%(k)s, %(offset)s, %(ef_search)s, %(categories)s::text[], %(tags_any)s::text[], %(tags_all)s::text[], "
    "%(metadata)s::jsonb, %(exclude)s::text[], %(score_threshold)s, %(exact)s, %(with_vector)s, "
    "%(diversity)s, %(candidates)s, %(cost_ratio)s)"
)
