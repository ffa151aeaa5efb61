-- The query path: similarity search and recommendations as functions, so that a request is one
-- statement (one round trip, one implicit transaction through PgBouncer in transaction mode).
--
-- The HNSW settings are applied with set_config(..., true): transaction-local, so they end with
-- the statement's implicit transaction and never reach the next client of the server connection.
-- The statement timeout cannot be applied here: PostgreSQL arms statement_timeout when a statement
-- starts, so a set_config inside the function would not limit the function itself. The client
-- sends it as the first statement of the same simple-query message (see recsys/search/queries.py).
--
-- The functions are written for the embedding column's type (vector up to 2000 dimensions,
-- halfvec above, see 002_items.sql): the templates below name it @vec@.
DO $migration$
DECLARE
    vec text := (
        SELECT t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
        WHERE a.attrelid = 'items'::regclass AND a.attname = 'embedding'
    );
    norm_fn text := CASE WHEN vec = 'halfvec' THEN 'l2_norm' ELSE 'vector_norm' END;
    template text;
BEGIN
    -- recsys_search: the k items nearest to p_query (cosine distance), optionally within one
    -- category and never among p_exclude, nearest first.
    --
    -- Strategy, chosen per call:
    -- * exact: when at most p_exact_limit items pass the category filter (counted with a bounded
    --   scan that stops at p_exact_limit + 1 rows, so the count is cheap whatever the catalogue),
    --   every candidate is scored. Scoring a few thousand rows costs about what an HNSW search
    --   costs, and it is exact.
    -- * hnsw: otherwise the HNSW index with pgvector 0.8's iterative scan (relaxed_order), which
    --   keeps walking the graph until p_k rows pass the filter; the rows are then re-sorted by
    --   distance since relaxed order may return them slightly out of order.
    -- * hnsw+exact: if the index still returns fewer than p_k rows (the iterative scan stops at
    --   hnsw.max_scan_tuples), the exact scan answers, so k rows come back whenever k exist.
    template := $template$
CREATE OR REPLACE FUNCTION recsys_search(
    p_query @vec@,
    p_k integer,
    p_ef_search integer,
    p_category text DEFAULT NULL,
    p_exclude text[] DEFAULT '{}',
    p_exact_limit integer DEFAULT 2000
) RETURNS TABLE (id text, distance double precision, category text, metadata jsonb, strategy text)
LANGUAGE plpgsql VOLATILE
AS $function$
#variable_conflict use_column
DECLARE
    candidates bigint;
    found_ids text[];
    found_distances double precision[];
    chosen text := 'exact';
BEGIN
    IF @norm@(p_query) = 0 OR @norm@(p_query) = 'NaN'::double precision THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'the query vector has length zero: cosine similarity is undefined';
    END IF;
    p_exclude := coalesce(p_exclude, '{}');
    PERFORM set_config('hnsw.ef_search', least(greatest(p_ef_search, p_k), 1000)::text, true);
    PERFORM set_config('hnsw.iterative_scan', 'relaxed_order', true);

    IF p_category IS NULL THEN
        SELECT count(*) INTO candidates FROM (SELECT 1 FROM items LIMIT p_exact_limit + 1) s;
    ELSE
        SELECT count(*) INTO candidates
        FROM (SELECT 1 FROM items i WHERE i.category = p_category LIMIT p_exact_limit + 1) s;
    END IF;

    IF candidates > p_exact_limit THEN
        SELECT array_agg(r.id ORDER BY r.distance, r.id), array_agg(r.distance ORDER BY r.distance, r.id)
        INTO found_ids, found_distances
        FROM (
            SELECT i.id, i.embedding <=> p_query AS distance
            FROM items i
            WHERE (p_category IS NULL OR i.category = p_category) AND i.id <> ALL (p_exclude)
            ORDER BY i.embedding <=> p_query
            LIMIT p_k
        ) r;
        IF coalesce(cardinality(found_ids), 0) >= p_k THEN
            RETURN QUERY
                SELECT i.id, u.distance, i.category, i.metadata, 'hnsw'::text
                FROM unnest(found_ids, found_distances) WITH ORDINALITY AS u(item_id, distance, n)
                JOIN items i ON i.id = u.item_id
                ORDER BY u.n;
            RETURN;
        END IF;
        chosen := 'hnsw+exact';
    END IF;

    -- MATERIALIZED keeps the planner from answering the ORDER BY ... LIMIT from the HNSW index:
    -- every candidate is scored. Zero vectors (distance NaN) have no cosine similarity.
    RETURN QUERY
        WITH scored AS MATERIALIZED (
            SELECT i.id, i.embedding <=> p_query AS distance
            FROM items i
            WHERE (p_category IS NULL OR i.category = p_category) AND i.id <> ALL (p_exclude)
        ), top AS (
            SELECT s.id, s.distance FROM scored s
            WHERE s.distance <> 'NaN'::double precision
            ORDER BY s.distance, s.id
            LIMIT p_k
        )
        SELECT i.id, t.distance, i.category, i.metadata, chosen
        FROM top t JOIN items i ON i.id = t.id
        ORDER BY t.distance, t.id;
END
$function$
$template$;
    EXECUTE replace(replace(template, '@vec@', vec), '@norm@', norm_fn);

    -- recsys_similar: recsys_search around an item's own embedding, the item itself excluded.
    -- An unknown item raises no_data_found (P0002) with COLUMN 'id'.
    template := $template$
CREATE OR REPLACE FUNCTION recsys_similar(
    p_id text,
    p_k integer,
    p_ef_search integer,
    p_category text DEFAULT NULL,
    p_exclude text[] DEFAULT '{}',
    p_exact_limit integer DEFAULT 2000
) RETURNS TABLE (id text, distance double precision, category text, metadata jsonb, strategy text)
LANGUAGE plpgsql VOLATILE
AS $function$
#variable_conflict use_column
DECLARE
    query_vector @vec@;
BEGIN
    SELECT i.embedding INTO query_vector FROM items i WHERE i.id = p_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found', COLUMN = 'id',
            MESSAGE = format('item %s not found', p_id), DETAIL = json_build_array(p_id)::text;
    END IF;
    RETURN QUERY SELECT * FROM recsys_search(
        query_vector, p_k, p_ef_search, p_category, array_append(coalesce(p_exclude, '{}'), p_id), p_exact_limit
    );
END
$function$
$template$;
    EXECUTE replace(template, '@vec@', vec);

    -- recsys_recommend: the query vector of a recommendation, then recsys_search around it.
    --
    --   q = mean(unit(v) for v in positives and p_vector) - p_alpha * mean(unit(n) for n in negatives)
    --
    -- Every input is scaled to unit length first (cosine ignores length, so one long vector must
    -- not outweigh the others). q's own length does not matter to the cosine distance. Positive,
    -- negative and excluded ids are all excluded from the results. Unknown ids raise no_data_found
    -- (P0002) with COLUMN 'positive' or 'negative' and DETAIL the JSON array of those ids; a query
    -- vector of length zero raises invalid_parameter_value (22023) naming the field at fault.
    template := $template$
CREATE OR REPLACE FUNCTION recsys_recommend(
    p_positive text[],
    p_negative text[],
    p_vector vector,
    p_alpha double precision,
    p_k integer,
    p_ef_search integer,
    p_category text DEFAULT NULL,
    p_exclude text[] DEFAULT '{}',
    p_exact_limit integer DEFAULT 2000
) RETURNS TABLE (id text, distance double precision, category text, metadata jsonb, strategy text)
LANGUAGE plpgsql VOLATILE
AS $function$
#variable_conflict use_column
DECLARE
    missing text[];
    positive_mean @vec@;
    negative_mean @vec@;
    query_vector @vec@;
BEGIN
    p_positive := coalesce(p_positive, '{}');
    p_negative := coalesce(p_negative, '{}');
    SELECT array_agg(u.wanted ORDER BY u.n) INTO missing
    FROM unnest(p_positive) WITH ORDINALITY AS u(wanted, n)
    WHERE NOT EXISTS (SELECT 1 FROM items i WHERE i.id = u.wanted);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found', COLUMN = 'positive',
            MESSAGE = format('positive items not found: %s', array_to_string(missing, ', ')),
            DETAIL = to_json(missing)::text;
    END IF;
    SELECT array_agg(u.wanted ORDER BY u.n) INTO missing
    FROM unnest(p_negative) WITH ORDINALITY AS u(wanted, n)
    WHERE NOT EXISTS (SELECT 1 FROM items i WHERE i.id = u.wanted);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found', COLUMN = 'negative',
            MESSAGE = format('negative items not found: %s', array_to_string(missing, ', ')),
            DETAIL = to_json(missing)::text;
    END IF;

    SELECT avg(s.v) INTO positive_mean FROM (
        SELECT l2_normalize(i.embedding) AS v FROM items i WHERE i.id = ANY (p_positive)
        UNION ALL
        SELECT l2_normalize(p_vector::@vec@) WHERE p_vector IS NOT NULL
    ) s;
    IF positive_mean IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'positive',
            MESSAGE = 'at least one of positive or vector is required';
    END IF;
    IF @norm@(positive_mean) = 0 OR @norm@(positive_mean) = 'NaN'::double precision THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            COLUMN = CASE WHEN p_vector IS NULL THEN 'positive' ELSE 'vector' END,
            MESSAGE = 'the positive items and the vector cancel out: their mean has length zero';
    END IF;
    query_vector := positive_mean;
    IF cardinality(p_negative) > 0 THEN
        SELECT avg(l2_normalize(i.embedding)) INTO negative_mean FROM items i WHERE i.id = ANY (p_negative);
        query_vector := positive_mean
            - negative_mean * array_fill(p_alpha::real, ARRAY[vector_dims(positive_mean)])::@vec@;
    END IF;
    IF @norm@(query_vector) = 0 OR @norm@(query_vector) = 'NaN'::double precision THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'negative',
            MESSAGE = 'the negative items cancel the positive ones: the query vector has length zero';
    END IF;
    RETURN QUERY SELECT * FROM recsys_search(
        query_vector, p_k, p_ef_search, p_category,
        coalesce(p_exclude, '{}') || p_positive || p_negative, p_exact_limit
    );
END
$function$
$template$;
    EXECUTE replace(replace(template, '@vec@', vec), '@norm@', norm_fn);
END
$migration$;
