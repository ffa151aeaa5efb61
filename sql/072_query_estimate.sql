-- The cost model of recsys_nearest (071), revised after the filters benchmark at 200,000 items
-- on a quiet machine: the bounded count of the passing items cost up to `budget` heap rows
-- (6,600 there, about 15 ms, three times an unfiltered query) before every filtered query whose
-- planner estimate was under twice the budget. The choice now rests on the planner's estimate
-- (its statistics of categories and tag elements) alone, except for metadata filters: PostgreSQL
-- keeps no statistics inside jsonb, so their estimate is a fixed guess and the bounded count
-- stays. A wrong estimate costs time, never results: the exact scan scores every passing item,
-- and the index path falls back to it when the iterative scan finds fewer than p_n.
-- Same signature: recsys_query (070) calls it unchanged.
DO $migration$
DECLARE
    vec text := (
        SELECT t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
        WHERE a.attrelid = 'items'::regclass AND a.attname = 'embedding'
    );
    -- The filter of every query below, fixed text: the values are the function's parameters.
    -- The functions run with plan_cache_mode = force_custom_plan, so each statement is planned
    -- with the values of the call: the conditions of absent filters (NULL) fold away and the
    -- planner sees the real selectivity of the others.
    filter text := $filter$
            (p_categories IS NULL OR i.category = ANY (p_categories))
            AND (p_tags_any IS NULL OR i.tags && p_tags_any)
            AND (p_tags_all IS NULL OR i.tags @> p_tags_all)
            AND (p_metadata IS NULL OR i.metadata @> p_metadata)
            AND i.id <> ALL (p_exclude)$filter$;
    -- The same filter for EXPLAIN, with the values as $1 .. $5.
    explain_filter text;
    template text;
BEGIN
    explain_filter := replace(replace(replace(replace(replace(filter,
        'p_categories', '$1'), 'p_tags_any', '$2'), 'p_tags_all', '$3'), 'p_metadata', '$4'), 'p_exclude', '$5');

    -- recsys_nearest: the p_n items nearest to p_query (cosine distance) among those that pass the
    -- filters, nearest first, and how they were found (method):
    --
    -- 1. The estimate. With N items in the catalogue (planner statistics: pg_class.reltuples)
    --    and P of them passing, an exact scan scores P rows; a filtered index scan visits about
    --    (ef + n) * N / P tuples, each costing p_cost_ratio times a scored row (the distances to
    --    its graph neighbours, a heap fetch to check the filter). The two are equal at
    --    P = sqrt(p_cost_ratio * (ef + n) * N): the budget, which grows with the square root of
    --    the catalogue, so the choice holds at any size. P is the planner's estimate (EXPLAIN of
    --    the filter: the statistics of categories and tag elements), read from statistics
    --    without touching the table. At most `budget` passing -> exact: every passing item is
    --    scored. A metadata filter has no statistics (a fixed guess): under twice the budget
    --    by that guess, its passing items are counted, up to budget + 1 rows.
    -- 2. The probe (filters only). That estimate assumes the passing items are spread like the
    --    others. The index's ef nearest items, unfiltered (one ordinary HNSW search), tell how
    --    many pass right around the query:
    --    * at least p_n: the answer is among them (method hnsw);
    --    * some: pgvector's iterative scan (relaxed order, re-sorted here) walks on until ef rows
    --      pass, and the best p_n of them answer (hnsw);
    --    * none: the filter avoids the query's neighbourhood (anti-correlated). The iterative
    --      scan would have to walk past all of it and, out where every item is about equally
    --      far, it can find the nearest passing items poorly. Up to `reach` (10) times the
    --      budget passing (by the planner's estimate), the exact scan answers (exact); beyond,
    --      the iterative scan (hnsw).
    -- 3. If the iterative scan stops (hnsw.max_scan_tuples) with fewer than p_n rows, the exact
    --    scan answers (hnsw+exact), so p_n rows come back whenever p_n items pass.
    -- p_exact skips all this: exact. p_cost_ratio is INDEX_COST_RATIO (recsys/search/service.py).
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
    -- Under a filter the iterative scan is asked for ef_search passing rows, not just p_n: the
    -- first rows it finds past a neighbourhood where nothing passes are not always the nearest
    -- (relaxed order), and the best p_n of ef_search of them are.
    filtered boolean := NOT (p_categories IS NULL AND p_tags_any IS NULL AND p_tags_all IS NULL AND p_metadata IS NULL);
    wanted integer := CASE WHEN filtered THEN ef ELSE p_n END;
    near integer := 0;
    walk boolean;
    -- How far past the budget an exact scan still answers a filter that avoids the query's
    -- neighbourhood (see the probe below).
    reach constant integer := 10;
    plan json;
    estimate double precision;
    found_ids text[];
    found_distances double precision[];
    chosen text := 'exact';
    sort_setting text;
BEGIN
    p_exclude := coalesce(p_exclude, '{}');
    IF NOT coalesce(p_exact, false) THEN
        SELECT greatest(c.reltuples, 1) INTO catalogue FROM pg_class c WHERE c.oid = 'items'::regclass;
        budget := ceil(sqrt(greatest(p_cost_ratio, 0) * (ef + p_n) * catalogue));
        -- The planner's estimate of the passing items (its statistics of tags and categories).
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
            IF filtered THEN
                -- The probe: the ef nearest items by the index, unfiltered, and those that pass.
                PERFORM set_config('hnsw.iterative_scan', 'off', true);
                SELECT array_agg(r.id ORDER BY r.distance, r.id) FILTER (WHERE r.passes),
                       array_agg(r.distance ORDER BY r.distance, r.id) FILTER (WHERE r.passes)
                INTO found_ids, found_distances
                FROM (
                    SELECT i.id, i.embedding <=> p_query AS distance, (@filter@) AS passes
                    FROM items i
                    ORDER BY i.embedding <=> p_query
                    LIMIT ef
                ) r;
                near := coalesce(cardinality(found_ids), 0);
            END IF;
            -- The iterative scan walks on unfiltered, when some pass around the query but fewer
            -- than p_n, and when nothing passes around it: up to `reach` times the budget the
            -- exact scan answers that (exactly, at a bounded multiple of its cost at the budget);
            -- beyond, an exact scan would cost more than walking past the neighbourhood.
            walk := NOT filtered OR (near > 0 AND near < p_n) OR (near = 0 AND estimate > budget * reach);
            IF walk THEN
                PERFORM set_config('hnsw.iterative_scan', 'relaxed_order', true);
                SELECT array_agg(r.id ORDER BY r.distance, r.id), array_agg(r.distance ORDER BY r.distance, r.id)
                INTO found_ids, found_distances
                FROM (
                    SELECT i.id, i.embedding <=> p_query AS distance
                    FROM items i
                    WHERE @filter@
                    ORDER BY i.embedding <=> p_query
                    LIMIT wanted
                ) r;
            END IF;
            PERFORM set_config('enable_sort', sort_setting, true);
            IF coalesce(cardinality(found_ids), 0) >= p_n THEN
                RETURN QUERY
                    SELECT u.item_id, u.distance, 'hnsw'::text
                    FROM unnest(found_ids, found_distances) WITH ORDINALITY AS u(item_id, distance, n)
                    ORDER BY u.n
                    LIMIT p_n;
                RETURN;
            END IF;
            IF walk THEN
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
