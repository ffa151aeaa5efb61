-- recsys_nearest (072) revised after the scale benchmark at 1,000,000 items: a category of 10 %
-- cut at random across the clusters took p50 16 ms and p95 150 ms against 4.4 ms unfiltered.
-- When fewer than p_n of the ef nearest items passed, 072 started a second index scan from the
-- query and asked it for ef_search passing rows (100 at the default), about ten times the rows
-- the answer needs: at 10 % a thousand visited tuples and more. Here the probe and the walk are
-- one scan: the index's items in distance order, unfiltered, each marked as passing or not, read
-- as far as needed and no farther:
-- * the ef nearest are read (one ordinary HNSW search); if p_n of them pass, they answer, as in
--   072;
-- * if some pass, the same scan reads on (pgvector's iterative scan) until p_n rows pass;
-- * if none do, the filter avoids the query's neighbourhood and 072's choice follows: the exact
--   scan up to `reach` times the budget, beyond it an iterative scan of the passing items;
-- * the walk stops when it has cost what the exact scan of the passing items would (p_cost_ratio
--   per visited tuple against one per passing item), and the exact scan answers: never more than
--   twice the cheaper of the two, whatever the filter does around the query.
-- Measured at 1,000,000 items (README, "A million items on two cores"). Same signature.
DO $migration$
DECLARE
    vec text := (
        SELECT t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
        WHERE a.attrelid = 'items'::regclass AND a.attname = 'embedding'
    );
    -- The filter, fixed text: the values are the function's parameters (072).
    filter text := $filter$
            (p_categories IS NULL OR i.category = ANY (p_categories))
            AND (p_tags_any IS NULL OR i.tags && p_tags_any)
            AND (p_tags_all IS NULL OR i.tags @> p_tags_all)
            AND (p_metadata IS NULL OR i.metadata @> p_metadata)
            AND i.id <> ALL (p_exclude)$filter$;
    explain_filter text;
    template text;
BEGIN
    explain_filter := replace(replace(replace(replace(replace(filter,
        'p_categories', '$1'), 'p_tags_any', '$2'), 'p_tags_all', '$3'), 'p_metadata', '$4'), 'p_exclude', '$5');

    -- recsys_nearest: the p_n items nearest to p_query (cosine distance) among those that pass the
    -- filters, nearest first, and how they were found (method): 'hnsw', 'exact', or 'hnsw+exact'
    -- when the index was read and the exact scan answered. The estimate of the passing items and
    -- the budget are 072's.
    template := $template$
CREATE OR REPLACE FUNCTION recsys_nearest(
    p_query @vec@,
    p_n integer,
    p_ef_search integer,
    p_categories text[],
    p_tags_any text[],
    p_tags_all text[],
    p_metadata jsonb,
    p_exclude text[],
    p_exact boolean,
    p_cost_ratio double precision
) RETURNS TABLE (id text, distance double precision, method text)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_custom_plan
AS $function$
#variable_conflict use_column
DECLARE
    catalogue double precision;
    budget bigint;
    passing bigint;
    ef integer := least(greatest(p_ef_search, p_n), 1000);
    filtered boolean := NOT (p_categories IS NULL AND p_tags_any IS NULL AND p_tags_all IS NULL AND p_metadata IS NULL);
    -- How far past the budget an exact scan still answers a filter that avoids the query's
    -- neighbourhood (072).
    reach constant integer := 10;
    -- Tuples the walk may visit before the exact scan is the cheaper way to finish.
    allowance double precision;
    visited integer := 0;
    -- Nothing passed among the ef nearest: the filter avoids the query's neighbourhood.
    anti boolean := false;
    -- An iterative scan of the passing items: for an unfiltered query, and for an anti-correlated
    -- filter beyond `reach` budgets.
    walk boolean;
    candidate record;
    plan json;
    estimate double precision;
    found_ids text[] := '{}';
    found_distances double precision[] := '{}';
    chosen text := 'exact';
    sort_setting text;
BEGIN
    p_exclude := coalesce(p_exclude, '{}');
    IF NOT coalesce(p_exact, false) THEN
        SELECT greatest(c.reltuples, 1) INTO catalogue FROM pg_class c WHERE c.oid = 'items'::regclass;
        budget := ceil(sqrt(greatest(p_cost_ratio, 0) * (ef + p_n) * catalogue));
        IF filtered THEN
            EXECUTE 'EXPLAIN (FORMAT JSON) SELECT 1 FROM items i WHERE @explain_filter@'
                INTO plan USING p_categories, p_tags_any, p_tags_all, p_metadata, p_exclude;
            estimate := (plan -> 0 -> 'Plan' ->> 'Plan Rows')::double precision;
        ELSE
            estimate := catalogue;
        END IF;
        IF p_metadata IS NOT NULL AND estimate <= 2 * budget THEN
            SELECT count(*) INTO passing FROM (SELECT 1 FROM items i WHERE @filter@ LIMIT budget + 1) s;
        ELSE
            passing := ceil(estimate);
        END IF;
        IF passing > budget THEN
            PERFORM set_config('hnsw.ef_search', ef::text, true);
            -- Only the index can then give the rows in distance order without a sort: the planner
            -- cannot trade it for a scan of the filter indexes followed by a sort of every row.
            sort_setting := current_setting('enable_sort');
            PERFORM set_config('enable_sort', 'off', true);
            PERFORM set_config('hnsw.iterative_scan', 'relaxed_order', true);
            IF filtered THEN
                allowance := greatest(ef, passing / greatest(p_cost_ratio, 1e-9));
                FOR candidate IN
                    SELECT i.id, i.embedding <=> p_query AS distance, (@filter@) AS passes
                    FROM items i
                    ORDER BY i.embedding <=> p_query
                LOOP
                    visited := visited + 1;
                    IF candidate.passes THEN
                        found_ids := found_ids || candidate.id;
                        found_distances := found_distances || candidate.distance;
                    END IF;
                    IF visited = ef THEN
                        anti := cardinality(found_ids) = 0;
                        EXIT WHEN anti;
                    END IF;
                    -- Among the ef nearest, or past them: pgvector's iterative scan returns batches
                    -- each in order and, as a whole, farther than the batch before (relaxed order),
                    -- so the first p_n passing rows answer. (Reading on until 2 p_n passed gave the
                    -- same recall at 1,000,000 items, 0.983 against 0.982, for p95 14 ms against 9 ms.)
                    EXIT WHEN visited >= ef AND cardinality(found_ids) >= p_n;
                    EXIT WHEN visited >= allowance;
                END LOOP;
            END IF;
            -- Beyond `reach` budgets an exact scan would cost more than walking past the
            -- neighbourhood.
            walk := NOT filtered OR (anti AND estimate > budget * reach);
            IF walk THEN
                SELECT array_agg(r.id ORDER BY r.distance, r.id), array_agg(r.distance ORDER BY r.distance, r.id)
                INTO found_ids, found_distances
                FROM (
                    SELECT i.id, i.embedding <=> p_query AS distance
                    FROM items i
                    WHERE @filter@
                    ORDER BY i.embedding <=> p_query
                    LIMIT CASE WHEN filtered THEN ef ELSE p_n END
                ) r;
            END IF;
            PERFORM set_config('enable_sort', sort_setting, true);
            IF coalesce(cardinality(found_ids), 0) >= p_n THEN
                RETURN QUERY
                    SELECT u.item_id, u.distance, 'hnsw'::text
                    FROM unnest(found_ids, found_distances) AS u(item_id, distance)
                    ORDER BY u.distance, u.item_id
                    LIMIT p_n;
                RETURN;
            END IF;
            IF walk OR NOT anti THEN
                chosen := 'hnsw+exact';
            END IF;
        END IF;
    END IF;

    -- MATERIALIZED keeps the planner from answering the ORDER BY ... LIMIT from the HNSW index:
    -- every passing item is scored. Zero vectors (distance NaN) have no cosine similarity.
    RETURN QUERY
        WITH scored AS MATERIALIZED (
            SELECT i.id, i.embedding <=> p_query AS distance
            FROM items i
            WHERE @filter@
        )
        SELECT s.id, s.distance, chosen
        FROM scored s
        WHERE s.distance <> 'NaN'::double precision
        ORDER BY s.distance, s.id
        LIMIT p_n;
END
$function$
$template$;
    EXECUTE replace(replace(replace(template, '@vec@', vec), '@explain_filter@', explain_filter), '@filter@', filter);
END
$migration$;
