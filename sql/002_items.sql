-- The catalogue. The embedding's dimension and type come from RECSYS_EMBEDDING_DIM and
-- RECSYS_VECTOR_TYPE (set by the migrations runner as recsys.embedding_dim and
-- recsys.vector_type): vector (float32) by default up to 2000 dimensions, halfvec (float16) above,
-- since pgvector's HNSW index accepts vector only up to 2000 dimensions (halfvec up to 4000).
--
-- HNSW parameters from RECSYS_HNSW_M and RECSYS_HNSW_EF_CONSTRUCTION (recsys.hnsw_m,
-- recsys.hnsw_ef_construction): by default m = 16 links per node and ef_construction = 128
-- candidates while building. pgvector's own ef_construction, 64, loses more searches on clustered
-- catalogues (the greedy descent ends in another cluster); 128 costs builds 1.3-1.5x as long.
-- A runner that sets none of them gets those defaults.
DO $migration$
DECLARE
    dim int := current_setting('recsys.embedding_dim')::int;
    vector_type text := coalesce(
        nullif(current_setting('recsys.vector_type', true), ''),
        CASE WHEN dim > 2000 THEN 'halfvec' ELSE 'vector' END);
    m int := coalesce(nullif(current_setting('recsys.hnsw_m', true), ''), '16')::int;
    ef_construction int := coalesce(nullif(current_setting('recsys.hnsw_ef_construction', true), ''), '128')::int;
BEGIN
    IF vector_type NOT IN ('vector', 'halfvec') THEN
        RAISE EXCEPTION 'recsys.vector_type must be vector or halfvec, got %', vector_type;
    END IF;
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
         WITH (m = %s, ef_construction = %s)', vector_type, m, ef_construction);
END
$migration$;

-- The category filter: exact match, and a count per category to choose between the index
-- and an exact scan for selective filters.
CREATE INDEX items_category ON items (category);
