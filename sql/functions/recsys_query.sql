-- recsys_query: /similar and /recommendations with every filter and result control, in one
-- statement (queries.SEARCH), defined here once and applied by the migrations runner after the
-- numbered migrations whenever this file changes. It was defined by migration 070, whose
-- comments give the reasons for its rules; here the average_vector strategy scales q by
-- 1 / p_alpha rather than the negatives' mean by p_alpha, and the request's vector is scaled to
-- unit length before it takes the column's type (below). Its search is recsys_nearest
-- (functions/recsys_nearest.sql).
DO $migration$
DECLARE
    vec text := (
        SELECT t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
        WHERE a.attrelid = 'items'::regclass AND a.attname = 'embedding'
    );
    norm_fn text := CASE WHEN vec = 'halfvec' THEN 'l2_norm' ELSE 'vector_norm' END;
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
    -- The best_score ranking (best first, the best `pool`) of the rows @candidates@ names: every
    -- passing item for an exact request, else the candidates found near each positive example.
    rank text := $rank$SELECT s.id, recsys_best_score(s.best_positive, s.best_negative) AS score, 1 - s.best_positive AS distance
            FROM (
                SELECT i.id,
                       (SELECT max(1 - (i.embedding <=> v)) FROM unnest(positives) v) AS best_positive,
                       (SELECT max(1 - (i.embedding <=> v)) FROM unnest(negatives) v) AS best_negative
                FROM @candidates@
            ) s
            WHERE s.best_positive <> 'NaN'::double precision
            ORDER BY 2 DESC, 1
            LIMIT pool$rank$;
    template text;
BEGIN
    -- recsys_query: /similar (p_similar_to: the item whose embedding is the query, itself
    -- excluded) and /recommendations (p_positive, p_negative, p_vector) with every filter and
    -- result control, in one statement.
    --
    -- Strategies of a recommendation:
    -- * average_vector: q = mean(unit(v) for v in positives and p_vector)
    --                       - p_alpha * mean(unit(n) for n in negatives), then the nearest to q.
    --   Every input is scaled to unit length first (cosine ignores length, so one long vector
    --   must not outweigh the others).
    -- * best_score: each candidate is compared with every example; its score is
    --   recsys_best_score(best similarity to a positive, best similarity to a negative). The
    --   candidates are the nearest p_pool items to each positive example (through
    --   recsys_nearest: index or exact scan by the same cost model); with p_exact every passing
    --   item is scored.
    --
    -- Result controls: the best p_k + p_offset are ranked (so a page from offset n is rows
    -- n .. n+k-1 of the query asked with k + n); with p_diversity > 0 they are picked one by one
    -- from the best p_candidates by maximal marginal relevance, each time the one maximising
    -- (1 - p_diversity) * relevance - p_diversity * (highest similarity to an item already
    -- picked), and returned in pick order. Then the first p_offset are skipped and rows below
    -- p_score_threshold dropped.
    --
    -- Unknown ids raise no_data_found (P0002) with COLUMN 'id', 'positive' or 'negative' and
    -- DETAIL the JSON array of those ids; a query vector of length zero raises
    -- invalid_parameter_value (22023) naming the field at fault.
    template := $template$
CREATE OR REPLACE FUNCTION recsys_query(
    p_similar_to text,
    p_positive text[],
    p_negative text[],
    p_vector vector,
    p_strategy text,
    p_alpha double precision,
    p_k integer,
    p_offset integer,
    p_ef_search integer,
    p_categories text[],
    p_tags_any text[],
    p_tags_all text[],
    p_metadata jsonb,
    p_exclude text[],
    p_score_threshold double precision,
    p_exact boolean,
    p_with_vector boolean,
    p_diversity double precision,
    p_candidates integer,
    p_cost_ratio double precision
) RETURNS TABLE (
    id text, score double precision, distance double precision, category text, tags text[],
    metadata jsonb, embedding real[], method text
)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_custom_plan
AS $function$
#variable_conflict use_column
DECLARE
    missing text[];
    -- Which examples are looked for: 'positive', then 'negative'.
    examples_field text;
    positives @vec@[];
    negatives @vec@[];
    positive_mean @vec@;
    negative_mean @vec@;
    query_vector @vec@;
    asked integer := p_k + coalesce(p_offset, 0);
    pool integer;
    pool_ids text[];
    pool_scores double precision[];
    pool_distances double precision[];
    methods text[];
    chosen text;
    pool_vectors @vec@[];
    closest double precision[];
    taken boolean[];
    pick integer;
    picked integer[] := '{}';
    -- The item whose own vector is the query: /similar's, or a recommendation's one positive.
    self_id text;
    self_checked boolean := false;
    -- Where the search found that item, if it did.
    self_at integer;
BEGIN
    p_positive := coalesce(p_positive, '{}');
    p_negative := coalesce(p_negative, '{}');
    p_exclude := coalesce(p_exclude, '{}');
    pool := CASE WHEN coalesce(p_diversity, 0) > 0 THEN least(greatest(p_candidates, asked), 1000) ELSE asked END;

    IF p_similar_to IS NOT NULL THEN
        SELECT ARRAY[i.embedding] INTO positives FROM items i WHERE i.id = p_similar_to;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'no_data_found', COLUMN = 'id',
                MESSAGE = format('item %s not found', p_similar_to), DETAIL = json_build_array(p_similar_to)::text;
        END IF;
        p_exclude := array_append(p_exclude, p_similar_to);
        query_vector := positives[1];
        self_id := p_similar_to;
        IF @norm@(query_vector) = 0 OR @norm@(query_vector) = 'NaN'::double precision THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'id',
                MESSAGE = 'the item''s vector has length zero: cosine similarity is undefined';
        END IF;
    ELSE
        -- The positive examples first, then the negative ones.
        FOREACH examples_field IN ARRAY ARRAY['positive', 'negative'] LOOP
            SELECT array_agg(u.wanted ORDER BY u.n) INTO missing
            FROM unnest(CASE examples_field WHEN 'positive' THEN p_positive ELSE p_negative END)
                 WITH ORDINALITY AS u(wanted, n)
            WHERE NOT EXISTS (SELECT 1 FROM items i WHERE i.id = u.wanted);
            IF missing IS NOT NULL THEN
                RAISE EXCEPTION USING ERRCODE = 'no_data_found', COLUMN = examples_field,
                    MESSAGE = format('%s items not found: %s', examples_field, array_to_string(missing, ', ')),
                    DETAIL = to_json(missing)::text;
            END IF;
        END LOOP;
        p_exclude := p_exclude || p_positive || p_negative;

        SELECT array_agg(s.v ORDER BY s.n) INTO positives FROM (
            SELECT i.embedding AS v, u.n FROM unnest(p_positive) WITH ORDINALITY AS u(wanted, n)
            JOIN items i ON i.id = u.wanted
            UNION ALL
            -- Scaled to unit length before the column's type: a component past 65504 is out of
            -- range for halfvec (a 500), and every input is scaled so below anyway.
            SELECT l2_normalize(p_vector)::@vec@, 0 WHERE p_vector IS NOT NULL
        ) s;
        SELECT array_agg(i.embedding ORDER BY u.n) INTO negatives
        FROM unnest(p_negative) WITH ORDINALITY AS u(wanted, n) JOIN items i ON i.id = u.wanted;
        IF positives IS NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'positive',
                MESSAGE = 'at least one of positive or vector is required';
        END IF;

        IF p_strategy = 'best_score' THEN
            IF EXISTS (SELECT 1 FROM unnest(positives) v WHERE @norm@(v) = 0 OR @norm@(v) = 'NaN'::double precision) THEN
                RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                    COLUMN = CASE WHEN p_vector IS NULL THEN 'positive' ELSE 'vector' END,
                    MESSAGE = 'a positive example has length zero: cosine similarity is undefined';
            END IF;
        ELSE
            SELECT avg(l2_normalize(v)) INTO positive_mean FROM unnest(positives) v;
            IF @norm@(positive_mean) = 0 OR @norm@(positive_mean) = 'NaN'::double precision THEN
                RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                    COLUMN = CASE WHEN p_vector IS NULL THEN 'positive' ELSE 'vector' END,
                    MESSAGE = 'the positive items and the vector cancel out: their mean has length zero';
            END IF;
            query_vector := positive_mean;
            IF cardinality(p_positive) = 1 AND negatives IS NULL AND p_vector IS NULL THEN
                self_id := p_positive[1];
            END IF;
            IF negatives IS NOT NULL THEN
                SELECT avg(l2_normalize(v)) INTO negative_mean FROM unnest(negatives) v;
                -- q scaled by 1 / p_alpha where 0 < p_alpha <= 1, which leaves its direction as it
                -- is: a product by a factor under 1 can underflow to zero, which pgvector raises
                -- as an error (a negative example with a component of 1.4e-45 after l2_normalize,
                -- times 0.5), and one by a factor of 1 or more cannot.
                IF p_alpha > 0 AND p_alpha <= 1 THEN
                    query_vector := positive_mean
                        * array_fill((1 / p_alpha)::real, ARRAY[vector_dims(positive_mean)])::@vec@
                        - negative_mean;
                ELSE
                    query_vector := positive_mean
                        - negative_mean * array_fill(p_alpha::real, ARRAY[vector_dims(positive_mean)])::@vec@;
                END IF;
            END IF;
            IF @norm@(query_vector) = 0 OR @norm@(query_vector) = 'NaN'::double precision THEN
                RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', COLUMN = 'negative',
                    MESSAGE = 'the negative items cancel the positive ones: the query vector has length zero';
            END IF;
        END IF;
    END IF;

    -- The pool: the best `pool` candidates by relevance (score), best first.
    IF query_vector IS NOT NULL THEN
        -- An unfiltered search from an item's own vector searches for the item too: the graph's
        -- search finds it first, at distance 0, unless its greedy descent ended in another part
        -- of the graph, where it finds none of the item's neighbours either (a lost search: 4-6
        -- in 2,000 of a clustered catalogue of 200,000 items, `python -m recsys bench graph`).
        -- A lost search is answered by the exact scan.
        self_checked := self_id IS NOT NULL AND NOT coalesce(p_exact, false)
            AND p_categories IS NULL AND p_tags_any IS NULL AND p_tags_all IS NULL AND p_metadata IS NULL;
        SELECT array_agg(r.id ORDER BY r.n), array_agg(1 - r.distance ORDER BY r.n),
               array_agg(r.distance ORDER BY r.n), array_agg(DISTINCT r.method)
        INTO pool_ids, pool_scores, pool_distances, methods
        FROM recsys_nearest(
            query_vector, pool + self_checked::integer, p_ef_search, p_categories, p_tags_any, p_tags_all,
            p_metadata, CASE WHEN self_checked THEN array_remove(p_exclude, self_id) ELSE p_exclude END,
            p_exact, p_cost_ratio
        ) WITH ORDINALITY AS r(id, distance, method, n);
        self_at := array_position(pool_ids, self_id);
        IF self_checked AND (self_at IS NOT NULL OR pool_distances[1] < 1e-6) THEN
            -- Found (or an exact duplicate of it, nearer than any neighbour): the rest answer, the
            -- item left out, or else the row past `pool`.
            self_at := coalesce(self_at, pool + 1);
            pool_ids := pool_ids[:self_at - 1] || pool_ids[self_at + 1:pool + 1];
            pool_scores := pool_scores[:self_at - 1] || pool_scores[self_at + 1:pool + 1];
            pool_distances := pool_distances[:self_at - 1] || pool_distances[self_at + 1:pool + 1];
        ELSIF self_checked AND pool_ids IS NOT NULL THEN
            SELECT array_agg(r.id ORDER BY r.n), array_agg(1 - r.distance ORDER BY r.n),
                   array_agg(r.distance ORDER BY r.n)
            INTO pool_ids, pool_scores, pool_distances
            FROM recsys_nearest(
                query_vector, pool, p_ef_search, NULL, NULL, NULL, NULL, p_exclude, true, p_cost_ratio
            ) WITH ORDINALITY AS r(id, distance, method, n);
            methods := ARRAY['hnsw+exact'];
        END IF;
    ELSIF coalesce(p_exact, false) THEN
        SELECT array_agg(r.id ORDER BY r.score DESC, r.id), array_agg(r.score ORDER BY r.score DESC, r.id),
               array_agg(r.distance ORDER BY r.score DESC, r.id), ARRAY['exact']
        INTO pool_ids, pool_scores, pool_distances, methods
        FROM (
            @rank_passing@
        ) r;
    ELSE
        SELECT array_agg(DISTINCT n.id), array_agg(DISTINCT n.method) INTO pool_ids, methods
        FROM unnest(positives) AS e(v)
        CROSS JOIN LATERAL recsys_nearest(
            e.v, pool, p_ef_search, p_categories, p_tags_any, p_tags_all, p_metadata, p_exclude, false, p_cost_ratio
        ) AS n;
        SELECT array_agg(r.id ORDER BY r.score DESC, r.id), array_agg(r.score ORDER BY r.score DESC, r.id),
               array_agg(r.distance ORDER BY r.score DESC, r.id)
        INTO pool_ids, pool_scores, pool_distances
        FROM (
            @rank_pool@
        ) r;
    END IF;
    chosen := CASE
        WHEN methods IS NULL THEN NULL
        WHEN cardinality(methods) = 1 THEN methods[1]
        ELSE 'hnsw+exact'
    END;
    pool_ids := coalesce(pool_ids, '{}');

    IF coalesce(p_diversity, 0) > 0 AND cardinality(pool_ids) > 0 THEN
        -- Maximal marginal relevance over the pool, in the database: one pass over the pool
        -- per pick, keeping each candidate's highest similarity to the items picked so far.
        SELECT array_agg(i.embedding ORDER BY u.n) INTO pool_vectors
        FROM unnest(pool_ids) WITH ORDINALITY AS u(item_id, n) JOIN items i ON i.id = u.item_id;
        closest := array_fill(NULL::double precision, ARRAY[cardinality(pool_ids)]);
        taken := array_fill(false, ARRAY[cardinality(pool_ids)]);
        FOR step IN 1 .. least(asked, cardinality(pool_ids)) LOOP
            SELECT u.n INTO pick
            FROM unnest(pool_scores, closest, taken) WITH ORDINALITY AS u(relevance, nearest, used, n)
            WHERE NOT u.used
            ORDER BY (1 - p_diversity) * u.relevance - p_diversity * coalesce(u.nearest, 0) DESC, u.relevance DESC, u.n
            LIMIT 1;
            picked := picked || pick;
            taken[pick] := true;
            SELECT array_agg(greatest(u.nearest, 1 - (u.v <=> pool_vectors[pick])) ORDER BY u.n) INTO closest
            FROM unnest(pool_vectors, closest) WITH ORDINALITY AS u(v, nearest, n);
        END LOOP;
    ELSE
        picked := ARRAY(SELECT generate_series(1, least(asked, cardinality(pool_ids))));
    END IF;

    RETURN QUERY
        SELECT i.id, pool_scores[p.slot], pool_distances[p.slot], i.category, i.tags, i.metadata,
               CASE WHEN p_with_vector THEN i.embedding::real[] END, chosen
        FROM unnest(picked) WITH ORDINALITY AS p(slot, rank)
        JOIN items i ON i.id = pool_ids[p.slot]
        WHERE p.rank > coalesce(p_offset, 0)
          AND (p_score_threshold IS NULL OR pool_scores[p.slot] >= p_score_threshold)
        ORDER BY p.rank;
END
$function$
$template$;
    template := replace(template, '@rank_passing@', replace(rank, '@candidates@', $passing$items i
                WHERE @filter@$passing$));
    template := replace(template, '@rank_pool@', replace(rank, '@candidates@', $pool$unnest(pool_ids) AS c(item_id)
                JOIN items i ON i.id = c.item_id$pool$));
    EXECUTE replace(replace(replace(template, '@vec@', vec), '@norm@', norm_fn), '@filter@', filter);
END
$migration$;
