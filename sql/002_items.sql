-- The catalogue. The embedding's type and dimension come from RECSYS_EMBEDDING_DIM (set by the
-- migrations runner as recsys.embedding_dim): vector up to 2000 dimensions, halfvec above, since
-- pgvector's HNSW index accepts vector only up to 2000.
--
-- HNSW parameters: m = 16 links per node and ef_construction = 64 candidates while building;
-- pgvector's defaults, a good recall/size balance up to a few million rows. Raise
-- ef_construction (e.g. 128) for better recall at low ef_search, at the cost of build time.
DO $migration$
DECLARE
    dim int := current_setting('recsys.embedding_dim')::int;
    vector_type text := CASE WHEN dim > 2000 THEN 'halfvec' ELSE 'vector' END;
BEGIN
    EXECUTE format(
        'CREATE TABLE items (
            id text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 128),
            embedding %s(%s) NOT NULL,
            category text,
            tags text[] NOT NULL DEFAULT ''{}'',
            metadata jsonb NOT NULL DEFAULT ''{}'',
            updated_at timestamptz NOT NULL DEFAULT now()
        )', vector_type, dim);
    EXECUTE format(
        'CREATE INDEX items_embedding_cosine ON items USING hnsw (embedding %s_cosine_ops)
         WITH (m = 16, ef_construction = 64)', vector_type);
END
$migration$;

-- The category filter: exact match, and a count per category to choose between the index
-- and an exact scan for selective filters.
CREATE INDEX items_category ON items (category);
