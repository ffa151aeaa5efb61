-- recsys_nearest: the search of every query function (010, 070), defined here once and applied
-- by the migrations runner after the numbered migrations whenever this file changes. Its earlier
-- revisions were migrations, whose comments give the reasons for its rules: 070 (filters), 071
-- and 072 (the estimate of the passing items and the budget), 073 (the walk), 090 (filter
-- indexes and the judgement of rare filters). Numbered migrations no longer restate it. A filter
-- index covers a request that asks for its category alone, that requires its tag, or (095) whose
-- metadata filter contains its metadata pair. A request for several categories, or for any of
-- several tags, each with a filter index, is answered where the shared index's probe finds fewer
-- than k passing by the union of the requests for each value alone (this function called once
-- per value), when those searches cost less than the exact scan; and before any probe where the
-- values' calibrated sweeps together read at most twice what one sweep first may read, in this
-- call where a request for each value alone would be answered by its sweep first.
--
-- The filter indexes' exact copies (091): where the exact scan answers a filter that a filter
-- index covers and that index has a valid copy, the copy is read instead of the table. The copy
-- holds the members' unit vectors in half precision (half the pages of single precision, whatever
-- the column's type); its nearest members, a margin more than asked, are ordered again by their
-- distance and id, as the exact scan orders them, and they are the exact scan's answer when the
-- last of them lies farther than any rounding can move the asked-for nearest: otherwise the table
-- is read after all (members that tie or nearly tie across the margin). The exact scan then costs
-- about a quarter of a table row per member, and that is the cost the filter index's way is
-- weighed against: the probe of the shared index's ef nearest (which 090 left out of it, copy or
-- not) and the filter index's search. A covered filter whose copy's scan costs less is answered by
-- the copy at once, without the probe. The budget, which decides between the exact scan and the
-- probe of the shared index, still counts table rows: the probe is cheaper than a copy's scan of a
-- common value, and answers by itself a filter that surrounds the query (a 5 % tag around the
-- query on 200,000 items, answered by the copy at once: 9.3 ms at p95, by the probe: 5.1 ms, in
-- two runs of `bench filters`); so does `reach`, the bound on the exact scan of an anti-correlated
-- filter. `exact` requests still scan the table.
--
-- The copy is partitioned: an IVFFlat index with about sqrt(members) lists, all of them probed
-- by the exact scan. A filter that avoids the query's neighbourhood beyond `reach`, where the
-- filter index's graph finds its members' nearest poorly (every member lies about as far as the
-- next) even at its widest search, is answered by the sweep: the members of the lists whose
-- centres lie nearest the query, as many as the graph's search at ef would score, ordered by the
-- table's distances; the widest search answers when the sweep would read every list. Where
-- `filter-index create` calibrated the sweep (092, 093), it reads the calibrated width instead,
-- found on items drawn at random and on items whose nearest hold no member, at an ef of at
-- least the calibration's 100 for every ten results asked. A calibrated sweep
-- that reads at most twice as many members as the probe scores answers first and alone, whether
-- the filter surrounds the query or avoids it, within `reach` or beyond: the probe, the filter
-- index's search and the copy's exact scan are left out (a 5 % tag avoiding the query on 200,000
-- items, 6 of its 100 lists: recall@10 0.987 at 1.1-1.3 ms at p50 through the service, against
-- 8.5-8.9 ms for the probe and the copy's exact scan).
DO $definition$
DECLARE
    -- The column's type (vector or halfvec); with its dimension, e.g. vector(384): a filter index
    -- is built on an expression, which an HNSW index accepts only with a dimension; and the
    -- copies' type, half precision of that dimension.
    vec text;
    col text;
    copy_col text;
    -- The filter, fixed text: the values are the function's parameters (072).
    filter text := $filter$
            (p_categories IS NULL OR i.category = ANY (p_categories))
            AND (p_tags_any IS NULL OR i.tags && p_tags_any)
            AND (p_tags_all IS NULL OR i.tags @> p_tags_all)
            AND (p_metadata IS NULL OR i.metadata @> p_metadata)
            AND i.id <> ALL (p_exclude)$filter$;
    -- The filter among the members of the covering filter index, whose graph or copy is read:
    -- the constant kind folds the other kinds' predicates away and leaves its own, the partial
    -- index's (a metadata pair's as jsonb, 095). Zero vectors (distance NaN) have no cosine similarity.
    members text := $members$(index_kind <> 'category' OR i.category = index_value)
                  AND (index_kind <> 'tag' OR i.tags && ARRAY[index_value])
                  AND (index_kind <> 'metadata' OR i.metadata @> index_pair)
                  AND @filter@
                  AND (i.embedding <=> p_query) <> 'NaN'::double precision$members$;
    explain_filter text;
    template text;
BEGIN
    SELECT t.typname, format_type(a.atttypid, a.atttypmod), format('halfvec(%s)', a.atttypmod)
    INTO vec, col, copy_col
    FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
    WHERE a.attrelid = 'items'::regclass AND a.attname = 'embedding';
    explain_filter := replace(replace(replace(replace(replace(filter,
        'p_categories', '$1'), 'p_tags_any', '$2'), 'p_tags_all', '$3'), 'p_metadata', '$4'), 'p_exclude', '$5');

    -- recsys_nearest: the p_n items nearest to p_query (cosine distance) among those that pass the
    -- filters, nearest first, and how they were found (method): 'hnsw', 'filter_index', 'exact', or 'hnsw+exact'
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
    -- The probe of a filtered request searches this many times wider than the request's ef: its
    -- nearest passing items are the unfiltered search's nearest to a depth of about k over the
    -- share passing, where an HNSW search at ef finds fewer of them than of its first k.
    -- Categories drawn independently of the vectors, 20,000 items, five graph builds each:
    -- recall@10 at ef 100 of an 11 % category 0.935-0.97 with a probe at ef, 0.98-0.985 at 2 ef;
    -- three categories (33 %) 0.9475-0.9775 and 0.995-0.9975.
    probe_width constant integer := 2;
    -- A filter index that covers the filter (090), its size, and the cost of its search.
    index_kind text;
    index_value text;
    index_pair jsonb;
    index_rows double precision;
    -- Several categories, or several tags of which any will do, each with a filter index where
    -- none covers the filter alone: the union's parts, of that kind, and what each part answered.
    -- The filter indexes found of each kind, and their calibrated sweeps' widths together (NULL
    -- where one has none, or no valid copy).
    parts text[];
    parts_kind text;
    parts_width double precision;
    category_parts integer := 0;
    category_widths double precision := 0;
    tag_parts integer := 0;
    tag_widths double precision := 0;
    -- The union asked before any probe, where its parts' calibrated sweeps read together at most
    -- twice `first_width`.
    union_first boolean := false;
    -- The filter indexes found that do not cover the filter alone, each with its copy's lists, the
    -- lists its calibrated sweep reads, and whether a request for its value alone would be answered
    -- by that sweep first: a union asked first sweeps its parts from these.
    part_kinds text[] := '{}';
    part_values text[] := '{}';
    part_lists integer[] := '{}';
    part_probes integer[] := '{}';
    part_first boolean[] := '{}';
    part_probe integer;
    part_ids text[];
    part_distances double precision[];
    part_no integer;
    swept boolean;
    found_index record;
    part_methods text[];
    united boolean := false;
    use_index boolean := false;
    -- The filter index's exact copy (091) is valid: the exact scan reads it instead of the table.
    use_copy boolean := false;
    -- Its lists (the copy is an IVFFlat index): all of them probed for the exact scan; the nearest
    -- few for the sweep, the search of a filter that avoids the query beyond `reach`.
    copy_lists integer;
    sweep_probes integer;
    sweep boolean := false;
    -- Members the sweep reads per unit of ef: the width calibrated for the filter index (092), or
    -- as many as its graph's search at that ef scores (each node it expands has up to 2 m = 32
    -- neighbours in the graph's bottom layer). The probe of the shared index at ef scores about as
    -- many tuples, and a sweep of as many members costs about as much: 1.3-1.4 ms at p50 for the
    -- 3,160 members of 10 of a 50 % tag's 316 lists, against 1.0-1.3 ms for the unfiltered search
    -- at ef 100 (200,000 items, side by side).
    default_width constant integer := 32;
    calibrated_width double precision;
    -- The sweep first answers where it reads at most twice as many members as the probe scores
    -- tuples: a query the filter surrounds, which the probe would answer alone, then costs at most
    -- about two probes, and one it avoids is spared the probe and the exact scan or sweep that
    -- would follow it (an anti-correlated 5 % tag on 200,000 items whose sweep was calibrated at
    -- 39 of its 100 lists, above one probe's worth: the probe and the copy's exact scan, p95 5.6
    -- times the unfiltered, 2026-12-05 06:49).
    first_width constant integer := 2 * default_width;
    -- The calibration's ef and k: a calibrated sweep reads its width times the request's ef,
    -- never fewer members than at this ef for every `calibration_k` results asked. Fewer lists
    -- lose recall faster than a smaller ef loses it in a graph (an 11 % category's sweep at ef 10,
    -- one list of its 47: recall@10 0.41, where the shared index found 0.9), and more results
    -- need more lists (a 31-member category's sweep at k 20, 4 of its 6 lists: recall@20 0.9 to
    -- 0.95, where its graph found 1).
    calibration_ef constant integer := 100;
    calibration_k constant integer := 10;
    sweep_members double precision;
    -- The ef at which a calibrated sweep reads its width.
    sweep_ef double precision := greatest(ef, calibration_ef * greatest(p_n, calibration_k)
                                              / calibration_k::double precision);
    -- Rows more than asked that the copy's scan returns, to be ordered again as the exact scan does.
    margin constant integer := 32;
    -- How far the cosine distance between the copy's vectors may lie from that between the
    -- table's: rounding to half precision turns each unit vector by at most about 2^-11 (plus 2^-25
    -- per dimension for components below 2^-14), their cosine by at most about 2^-10; the
    -- single-precision sums of both add about sqrt(dimensions) x 2^-24 each, which 2^-16 covers
    -- up to 4,000 dimensions.
    rounding constant double precision := 2.0 ^ -10 + 2.0 ^ -16;
    copy_read integer;
    copy_farthest double precision;
    -- A member read from the copy costs about a quarter of a row of the table's exact scan (10,000
    -- members of a 5 % tag on 200,000 items: 4.6 ms in single precision, 3.9-4.7 ms in half,
    -- against 17 ms): the exact scan's cost in rows of the table, against which the filter
    -- index's search is weighed.
    copy_cost constant double precision := 0.25;
    exact_cost double precision;
    -- How much wider than ef the probe may read to judge a rare filter, and that widest probe.
    widen constant integer := 10;
    widest integer := greatest(ef, least(ef * widen, 1000));
    -- The search of a filter that avoids the query's neighbourhood, by the shared index's walk or
    -- a filter index's graph: at the widest ef_search pgvector allows, whatever the request's ef.
    -- It must get past the whole neighbourhood before it finds a member, and a narrow search
    -- leaves it toward the wrong ones: the 50 % tag of the tests' catalogue (20,000 items, 40
    -- queries) at ef_search 10, searched at ten times that, found recall@10 0.58 by the walk and
    -- 0.62 by its filter index's graph; at 1,000, 0.97 and 0.957.
    walk_ef constant integer := 1000;
    -- What the walk costs, in rows of the exact scan: its search reads about this many tuples per
    -- unit of walk_ef, each weighed at p_cost_ratio rows. Measured side by side through the
    -- service on 200,000 items (60 query items, docs/filter-measurements.md): the walk at 1,000
    -- cost as much as the exact scan of about 12,000 rows (a 30 % tag avoiding the query: walk
    -- 25.5 / 34.7 ms at p50 / p95, exact scan of its 60,000 rows 118.9 / 184.3 ms; a 5 % tag:
    -- walk 45.4 / 56.1 ms, exact scan of its 10,000 rows 24.6 / 31.2 ms). A search at walk_ef
    -- costs that whatever the request's ef, so a filter without a filter index that avoids the
    -- query is walked only when its exact scan would read more than twice as many rows: near the
    -- walk's cost the exact scan costs at most twice the walk and answers exactly (the walk found
    -- recall@10 0.96 there), and an estimate of the passing rows off by as much as half (a table
    -- grown since its statistics, or rows deleted) still finds each filter its way.
    walk_tuples_per_ef constant double precision := 6;
    -- Members expected among the tuples probed (at random) for their absence to mean anything:
    -- none of them is found with probability exp(-5), 0.7 %. A query misjudged so gets the exact
    -- scan: right, but slow, and with exp(-3) (5 %) the misjudged set the p95 (1 % category at
    -- 1,000,000 items: p95 9.4-11.1 ms against 8.2-8.4 ms, the same recall).
    significant constant double precision := 5;
    index_ef integer;
    -- Tuples the walk may visit before the exact scan is the cheaper way to finish.
    allowance double precision;
    -- Tuples the probe reads before finding no member says that the filter avoids the query's
    -- neighbourhood: the ef nearest; without a filter index, more where fewer than `significant`
    -- members were to be expected among them, as long as that reads fewer tuples than the widest
    -- search.
    decide double precision;
    -- The rank below which `significant` members were to be expected at random (with a filter
    -- index, when it lies beyond the probe), and the rank estimated for the filter index's nearest
    -- member from the probe's distances: how many positive distances it read, the largest, and the
    -- sum of their logarithms.
    expected double precision;
    -- Tuples of the catalogue per passing item: how far apart members are to be expected at random.
    spacing double precision;
    positives integer := 0;
    farthest double precision := 0;
    log_sum double precision := 0;
    dimension double precision;
    rank_estimate double precision;
    -- The filter index's search at ef is to be judged by its nearest member's estimated rank.
    judge boolean := false;
    searched boolean := false;
    visited integer := 0;
    -- Nothing passed among the ef nearest: the filter avoids the query's neighbourhood.
    anti boolean := false;
    -- An iterative scan of the passing items: for an unfiltered query, and for an anti-correlated
    -- filter beyond `reach` budgets.
    walk boolean;
    candidate record;
    probe refcursor;
    plan json;
    estimate double precision;
    found_ids text[] := '{}';
    found_distances double precision[] := '{}';
    -- found_ids hold the answer: p_n found by a search, or the copy's rows, proven to be the exact
    -- scan's.
    settled boolean := false;
    chosen text := 'exact';
    answered text := 'hnsw';
    sort_setting text;
BEGIN
    p_exclude := coalesce(p_exclude, '{}');
    IF NOT coalesce(p_exact, false) THEN
        -- The catalogue's size as the planner reckons it: the density of the last VACUUM or ANALYZE
        -- times the pages the table has now, so that rows loaded since count. A table never
        -- analysed (reltuples -1, e.g. just after TRUNCATE and COPY, before autovacuum) is asked
        -- of the planner, which then estimates from its pages and row width.
        SELECT c.reltuples / c.relpages * (pg_relation_size(c.oid) / current_setting('block_size')::double precision)
        INTO catalogue FROM pg_class c WHERE c.oid = 'items'::regclass AND c.reltuples >= 0 AND c.relpages > 0;
        IF catalogue IS NULL THEN
            EXECUTE 'EXPLAIN (FORMAT JSON) SELECT 1 FROM items' INTO plan;
            catalogue := (plan -> 0 -> 'Plan' ->> 'Plan Rows')::double precision;
        END IF;
        catalogue := greatest(catalogue, 1);
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
        IF filtered THEN
            -- The covering filter index: a plan made once per session (the statement reads the
            -- filter_indexes records and the catalogue, whatever the values), where planning it
            -- anew cost 0.3-0.5 ms of each filtered query (100 queries on 200,000 items, side by side).
            PERFORM set_config('plan_cache_mode', 'force_generic_plan', true);
            -- The same statement finds the filter indexes of the union's parts (below), if any.
            FOR found_index IN
                SELECT f.kind, f.value, CASE WHEN c.reltuples < 0 THEN passing ELSE c.reltuples END AS rows,
                       cp.lists, f.sweep_width, v.covers
                FROM filter_indexes f
                JOIN pg_class c ON c.relname = f.index_name AND c.relnamespace = 'public'::regnamespace
                JOIN pg_index x ON x.indexrelid = c.oid AND x.indisvalid AND x.indisready
                LEFT JOIN LATERAL (
                    SELECT coalesce((SELECT o.option_value::integer FROM pg_options_to_table(cc.reloptions) o
                                     WHERE o.option_name = 'lists'), 100) AS lists
                    FROM pg_class cc
                    JOIN pg_index cx ON cx.indexrelid = cc.oid AND cx.indisvalid AND cx.indisready
                    -- A copy of an earlier kind (single precision; Euclidean distance) orders by
                    -- another expression: `filter-index create` replaces it.
                    JOIN pg_opclass co ON co.oid = cx.indclass[0] AND co.opcname = 'halfvec_cosine_ops'
                    WHERE cc.relname = f.copy_name AND cc.relnamespace = 'public'::regnamespace
                ) cp ON true
                CROSS JOIN LATERAL (
                    SELECT coalesce((f.kind = 'category' AND cardinality(p_categories) = 1 AND f.value = p_categories[1])
                                    OR (f.kind = 'tag' AND (f.value = ANY (p_tags_all)
                                                            OR (cardinality(p_tags_any) = 1 AND f.value = p_tags_any[1])))
                                    OR p_metadata @> CASE WHEN f.kind = 'metadata' THEN f.value::jsonb END, false) AS covers
                ) v
                WHERE v.covers
                   OR (f.kind = 'category' AND cardinality(p_categories) > 1 AND f.value = ANY (p_categories))
                   OR (f.kind = 'tag' AND cardinality(p_tags_any) > 1 AND f.value = ANY (p_tags_any))
                ORDER BY v.covers DESC, c.reltuples, f.kind, f.value
            LOOP
                IF found_index.covers THEN
                    -- The smallest covering filter index, the first row: no union is asked then.
                    index_kind := found_index.kind;
                    index_value := found_index.value;
                    index_rows := found_index.rows;
                    copy_lists := found_index.lists;
                    calibrated_width := found_index.sweep_width;
                    EXIT;
                END IF;
                part_kinds := part_kinds || found_index.kind;
                part_values := part_values || found_index.value;
                part_lists := part_lists || found_index.lists;
                -- As the sweep of a covering filter index (below): more members than the budget, a
                -- sweep no wider than `first_width` that leaves lists unread.
                part_probe := ceil(found_index.lists
                                   * least(found_index.sweep_width * sweep_ef / greatest(found_index.rows, 1), 1));
                part_probes := part_probes || part_probe;
                part_first := part_first || coalesce(found_index.rows > budget
                    AND found_index.sweep_width * sweep_ef <= first_width * ef AND part_probe < found_index.lists, false);
                IF found_index.kind = 'category' THEN
                    category_parts := category_parts + 1;
                    category_widths := category_widths
                        + CASE WHEN found_index.lists IS NOT NULL THEN found_index.sweep_width END;
                ELSE
                    tag_parts := tag_parts + 1;
                    tag_widths := tag_widths + CASE WHEN found_index.lists IS NOT NULL THEN found_index.sweep_width END;
                END IF;
            END LOOP;
            index_pair := CASE WHEN index_kind = 'metadata' THEN index_value::jsonb END;
            -- The copy's scan reads every member, whatever else the filter asks: the table is read
            -- instead where the rest of the filter leaves fewer rows than that costs.
            PERFORM set_config('plan_cache_mode', 'force_custom_plan', true);
            use_copy := copy_lists IS NOT NULL AND index_rows * copy_cost < passing;
            sweep_members := CASE WHEN calibrated_width IS NULL THEN default_width * ef
                                  ELSE calibrated_width * sweep_ef END;
            sweep_probes := ceil(copy_lists * least(sweep_members / greatest(index_rows, 1), 1));
        END IF;
        exact_cost := CASE WHEN use_copy THEN index_rows * copy_cost ELSE passing END;
        -- The union's parts: the categories, else the tags of which any will do, where there are
        -- several, none covers the filter alone and each has a valid filter index, and where their
        -- searches, about (2 ef + p_n) tuples each, cost less than the exact scan.
        IF filtered AND index_kind IS NULL THEN
            IF cardinality(p_categories) > 1
               AND category_parts = (SELECT count(DISTINCT v.value) FROM unnest(p_categories) v(value)) THEN
                parts_kind := 'category';
                parts := p_categories;
                parts_width := category_widths;
            ELSIF cardinality(p_tags_any) > 1
                  AND tag_parts = (SELECT count(DISTINCT v.value) FROM unnest(p_tags_any) v(value)) THEN
                parts_kind := 'tag';
                parts := p_tags_any;
                parts_width := tag_widths;
            END IF;
            IF NOT coalesce(cardinality(parts) * p_cost_ratio * (2 * ef + p_n) < exact_cost, false) THEN
                parts := NULL;
            END IF;
            -- The union first, as the sweep first: where each part's sweep is calibrated and all of
            -- them together read at most twice `first_width` members per unit of ef, the parts
            -- answer without the probe. A filter that surrounds the query, which the probe would
            -- answer alone, then costs at most about four probes; one that avoids it is spared the
            -- probe, which finds nothing (any of two tags avoiding the query on 200,000 items:
            -- 6.6 ms at p50 in SQL, of which 2.0 ms the probe and 0.5 ms the search for the parts
            -- then asked apart; 4.6 ms without them).
            union_first := coalesce(passing > budget AND parts IS NOT NULL
                                    AND parts_width * sweep_ef <= 2 * first_width * ef, false);
        END IF;
        -- The filter index's way: the probe of the shared index's ef nearest, then its own search
        -- (090 counted the search alone, and a 0.5 % tag answered by that way took 4.4 ms at p95
        -- where the exact scan took 3.3 ms, 2026-12-04 20:12).
        use_index := index_kind IS NOT NULL
            AND exact_cost > p_cost_ratio * (ef + (ef + p_n) * greatest(index_rows / greatest(passing, 1), 1));
        -- The sweep first: where a search answers rather than the exact scan, and the calibrated
        -- sweep reads no more than `first_width` members per unit of ef, the sweep answers alone,
        -- whether the filter surrounds the query or avoids it: no probe is needed to tell which.
        sweep := coalesce((passing > budget OR use_index) AND use_copy AND calibrated_width IS NOT NULL
                          AND sweep_members <= first_width * ef AND sweep_probes < copy_lists, false);
        IF (passing > budget OR use_index) AND NOT sweep THEN
            PERFORM set_config('hnsw.ef_search', ef::text, true);
            -- Only the index can then give the rows in distance order without a sort: the planner
            -- cannot trade it for a scan of the filter indexes followed by a sort of every row.
            sort_setting := current_setting('enable_sort');
            PERFORM set_config('enable_sort', 'off', true);
            PERFORM set_config('hnsw.iterative_scan', 'relaxed_order', true);
            IF filtered AND NOT union_first THEN
                allowance := greatest(ef, exact_cost / greatest(p_cost_ratio, 1e-9));
                spacing := catalogue / greatest(passing, 1);
                expected := significant * spacing;
                decide := greatest(ef, ceil(expected));
                IF use_index OR decide > least(widest, allowance) THEN
                    decide := ef;
                END IF;
                -- Fetched a row at a time: a FOR loop fetches ahead (10 rows, then 50), and a row
                -- fetched past the iterative scan's first ef starts its next search (the probe of
                -- a 5 % tag on 200,000 items: 1.1 ms at p50 so, 1.5-1.8 ms by a FOR loop).
                -- The filter index's way keeps the probe at ef: there the probe tells the way, and
                -- the filter index answers.
                PERFORM set_config('hnsw.ef_search',
                                   CASE WHEN use_index THEN ef ELSE least(probe_width * ef, widest) END::text, true);
                OPEN probe FOR
                    SELECT i.id, i.embedding <=> p_query AS distance, (@filter@) AS passes
                    FROM items i
                    ORDER BY i.embedding <=> p_query;
                LOOP
                    FETCH probe INTO candidate;
                    EXIT WHEN NOT FOUND;
                    visited := visited + 1;
                    IF candidate.distance > 0 AND candidate.distance <> 'NaN'::double precision THEN
                        positives := positives + 1;
                        farthest := greatest(farthest, candidate.distance);
                        log_sum := log_sum + ln(candidate.distance);
                    END IF;
                    IF candidate.passes THEN
                        found_ids := found_ids || candidate.id;
                        found_distances := found_distances || candidate.distance;
                    END IF;
                    IF visited = decide THEN
                        anti := cardinality(found_ids) = 0;
                        EXIT WHEN anti;
                    END IF;
                    -- Among the ef nearest, or past them: pgvector's iterative scan returns batches
                    -- each in order and, as a whole, farther than the batch before (relaxed order),
                    -- so the first p_n passing rows answer. (Reading on until 2 p_n passed gave the
                    -- same recall at 1,000,000 items, 0.983 against 0.982, for p95 14 ms against 9 ms.
                    -- On real sentence embeddings, a genre asked from verses of the other genres
                    -- (`bench embeddings`), reading on so once past the ef nearest raised recall@10
                    -- by 0.004-0.018 (0.946 to 0.964 for the worst genre), for 1.2-1.9 times the
                    -- p95 of those series, side by side in two rounds; a wider `ef_search` raises it
                    -- too, for every query: 0.964 at 200, 0.990 at 400 for that genre, by a replica
                    -- of the probe.)
                    EXIT WHEN visited >= ef AND cardinality(found_ids) >= p_n;
                    -- With a filter index, the shared index reads on past the ef nearest only
                    -- while the members still missing are to be expected within as many more
                    -- tuples as the filter index's search reads (ef + p_n): a common value (10 %)
                    -- finds them there sooner, a rare one (1 %) would read hundreds in vain.
                    EXIT WHEN use_index AND visited >= ef
                        AND (visited >= 2 * ef + p_n
                             OR (p_n - cardinality(found_ids)) * spacing > 2 * ef + p_n - visited);
                    EXIT WHEN visited >= allowance;
                END LOOP;
                CLOSE probe;
                PERFORM set_config('hnsw.ef_search', ef::text, true);
            END IF;
            -- The union: where the probe found fewer than p_n passing (or was left out), each part is
            -- asked alone, as a request for its value would be (its filter index's way, or the
            -- exact scan of its members), and the nearest p_n of all they found answer (an item with
            -- two of the tags found twice counts once).
            --
            -- Asked first, a union whose every part a request for its value alone would answer by
            -- its sweep, first and alone (`part_first`), reads those sweeps here, each in turn,
            -- where a call of this function for each part weighed its estimate, its filter index
            -- and its way anew (any of two tags avoiding the query on 200,000 items, side by side
            -- in SQL over four rounds: 4.4-5.3 ms at p50 so, 5.0-5.9 ms by the calls).
            swept := union_first;
            FOR part_no IN 1 .. cardinality(part_values) LOOP
                swept := swept AND (part_kinds[part_no] <> parts_kind OR part_first[part_no]);
            END LOOP;
            IF swept THEN
                index_kind := parts_kind;
                PERFORM set_config('ivfflat.iterative_scan', 'relaxed_order', true);
                FOR part_no IN 1 .. cardinality(part_values) LOOP
                    CONTINUE WHEN part_kinds[part_no] <> parts_kind;
                    index_value := part_values[part_no];
                    PERFORM set_config('ivfflat.max_probes', part_lists[part_no]::text, true);
                    PERFORM set_config('ivfflat.probes', part_probes[part_no]::text, true);
                    SELECT array_agg(r.id), array_agg(r.distance)
                    INTO part_ids, part_distances
                    FROM (
                        SELECT i.id, i.embedding <=> p_query AS distance
                        FROM items i
                        WHERE @members@
                        ORDER BY l2_normalize(i.embedding)::@copy_column@ <=> l2_normalize(p_query)::@copy_column@
                        LIMIT p_n
                    ) r;
                    found_ids := found_ids || coalesce(part_ids, '{}');
                    found_distances := found_distances || coalesce(part_distances, '{}');
                END LOOP;
                PERFORM set_config('ivfflat.iterative_scan', 'off', true);
                PERFORM set_config('enable_sort', sort_setting, true);
                index_kind := NULL;
                index_value := NULL;
                -- The nearest p_n of all the parts found, an item found twice counting once.
                SELECT array_agg(u.id ORDER BY u.distance, u.id), array_agg(u.distance ORDER BY u.distance, u.id)
                INTO found_ids, found_distances
                FROM (
                    SELECT d.id, d.distance
                    FROM (
                        SELECT DISTINCT ON (f.id) f.id, f.distance
                        FROM unnest(found_ids, found_distances) AS f(id, distance)
                        ORDER BY f.id, f.distance
                    ) d
                    ORDER BY d.distance, d.id
                    LIMIT p_n
                ) u;
                found_ids := coalesce(found_ids, '{}');
                found_distances := coalesce(found_distances, '{}');
                answered := 'filter_index';
                united := true;
            ELSIF parts IS NOT NULL AND cardinality(found_ids) < p_n THEN
                PERFORM set_config('enable_sort', sort_setting, true);
                SELECT array_agg(u.id ORDER BY u.distance, u.id), array_agg(u.distance ORDER BY u.distance, u.id),
                       array_agg(DISTINCT u.method)
                INTO found_ids, found_distances, part_methods
                FROM (
                    SELECT d.id, d.distance, d.method
                    FROM (
                        SELECT DISTINCT ON (n.id) n.id, n.distance, n.method
                        FROM unnest(parts) AS part(value)
                        CROSS JOIN LATERAL recsys_nearest(
                            p_query, p_n, p_ef_search,
                            CASE WHEN parts_kind = 'category' THEN ARRAY[part.value] ELSE p_categories END,
                            CASE WHEN parts_kind = 'tag' THEN ARRAY[part.value] ELSE p_tags_any END,
                            p_tags_all, p_metadata, p_exclude, false, p_cost_ratio) AS n
                        ORDER BY n.id, n.distance
                    ) d
                    ORDER BY d.distance, d.id
                    LIMIT p_n
                ) u;
                answered := CASE WHEN cardinality(part_methods) = 1 THEN part_methods[1]
                                 WHEN 'filter_index' = ANY (part_methods) THEN 'filter_index'
                                 ELSE 'hnsw+exact' END;
                united := true;
            END IF;
            -- Past the walk's cost (without a filter index) or beyond `reach` budgets (with one:
            -- its copy's exact scan reads packed pages, its sweep or graph answers beyond) an
            -- exact scan would cost more than searching past the neighbourhood.
            walk := NOT united AND (NOT filtered OR (anti AND CASE
                WHEN use_index THEN estimate > budget * reach
                ELSE estimate > 2 * walk_ef * walk_tuples_per_ef * greatest(p_cost_ratio, 0) END));
            IF use_index AND cardinality(found_ids) < p_n THEN
                IF NOT anti THEN
                    index_ef := ef;
                ELSIF expected > ef THEN
                    -- No member among the ef nearest, where fewer than `significant` were to be
                    -- expected: the search at ef, judged by where its nearest member lies.
                    index_ef := ef;
                    judge := true;
                ELSIF walk AND use_copy AND sweep_probes < copy_lists THEN
                    sweep := true;
                    walk := false;
                ELSIF walk THEN
                    index_ef := walk_ef;
                END IF;
                -- Otherwise the filter avoids the query's neighbourhood, within the walk's cost or
                -- `reach` budgets: the exact scan answers, as the members are about equally far
                -- from the query.
            END IF;
            WHILE index_ef IS NOT NULL LOOP
                walk := false;
                searched := true;
                PERFORM set_config('hnsw.ef_search', index_ef::text, true);
                answered := 'filter_index';
                -- The index orders the unit vectors by inner product (the order of cosine
                -- distance), an ORDER BY that the shared index cannot serve: the planner's
                -- estimates of the two graphs are close, and it must not pick the other.
                SELECT array_agg(r.id ORDER BY r.distance, r.id), array_agg(r.distance ORDER BY r.distance, r.id)
                INTO found_ids, found_distances
                FROM (
                    SELECT i.id, i.embedding <=> p_query AS distance
                    FROM items i
                    WHERE @members@
                    ORDER BY l2_normalize(i.embedding)::@column@ <#> l2_normalize(p_query)::@column@
                    LIMIT p_n
                ) r;
                index_ef := NULL;
                IF judge THEN
                    judge := false;
                    -- The rank of its nearest member: positives * (d / farthest)^(dimension / 2),
                    -- the distance being cosine, the square of a chord's length over two.
                    IF positives >= 2 AND positives * ln(farthest) - log_sum > 0 THEN
                        dimension := (positives - 1) / (0.5 * (positives * ln(farthest) - log_sum));
                    END IF;
                    IF coalesce(cardinality(found_ids), 0) > 0 THEN
                        IF found_distances[1] <= farthest THEN
                            rank_estimate := positives;
                        ELSIF dimension IS NOT NULL THEN
                            -- The exponent held under 700: probe distances within a hair of each
                            -- other (near-duplicates around the query) estimate a dimension in the
                            -- tens of thousands, and exp past 709 is an error (a 500), where any
                            -- rank above 1e300 says the same: far beyond.
                            rank_estimate := positives
                                * exp(least(dimension / 2 * ln(found_distances[1] / farthest), 700));
                        END IF;
                    END IF;
                    IF rank_estimate IS NULL OR rank_estimate > 2 * expected THEN
                        -- The filter avoids the query's neighbourhood: as for a probe that found
                        -- no member where five were to be expected.
                        found_ids := '{}';
                        found_distances := '{}';
                        IF estimate > budget * reach AND use_copy AND sweep_probes < copy_lists THEN
                            sweep := true;
                        ELSIF estimate > budget * reach THEN
                            index_ef := walk_ef;
                        ELSE
                            searched := false;
                        END IF;
                    END IF;
                END IF;
            END LOOP;
            IF walk THEN
                -- A filter that avoids the query's neighbourhood, beyond `reach`: the walk searches
                -- at its widest, as a filter index's graph does there, where its members all lie
                -- about equally far (a 50 % tag avoiding the query on 200,000 items, side by side
                -- in SQL over two rounds: recall@10 0.969 at p95 22-24 ms, against 0.850 at
                -- 15-16 ms at ef; on the tests' 20,000 items 0.95 against 0.72).
                IF filtered THEN
                    PERFORM set_config('hnsw.ef_search', walk_ef::text, true);
                END IF;
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
            -- Each part of a union answers p_n whenever p_n of its members pass.
            settled := united OR coalesce(cardinality(found_ids), 0) >= p_n;
            IF NOT settled AND (walk OR searched OR NOT anti) THEN
                chosen := 'hnsw+exact';
            END IF;
        END IF;
    END IF;

    IF use_copy AND NOT settled THEN
        -- The copy's scan: every member in order of distance, every list probed; the sort over
        -- the whole table is what it replaces, so the planner must not choose it. Or the sweep:
        -- the members of the lists nearest the query, and of lists further on while fewer than
        -- p_n of them pass the rest of the filter, until every list is read. A graph's search
        -- wanders when every member lies about as far as the next, as for a filter that avoids
        -- the query's neighbourhood (a 50 % tag on 200,000 items: recall@10 0.70 at ef 1,000),
        -- where lists of members ranked by their centre find the nearest (0.985 from the 11 of
        -- its 316 lists nearest the query, 3,200 of its 100,000 members).
        IF sweep THEN
            PERFORM set_config('ivfflat.probes', sweep_probes::text, true);
            PERFORM set_config('ivfflat.iterative_scan', 'relaxed_order', true);
            PERFORM set_config('ivfflat.max_probes', copy_lists::text, true);
        ELSE
            PERFORM set_config('ivfflat.probes', copy_lists::text, true);
        END IF;
        sort_setting := current_setting('enable_sort');
        PERFORM set_config('enable_sort', 'off', true);
        SELECT array_agg(r.id ORDER BY r.distance, r.id), array_agg(r.distance ORDER BY r.distance, r.id),
               count(*), max(r.distance)
        INTO found_ids, found_distances, copy_read, copy_farthest
        FROM (
            SELECT i.id, i.embedding <=> p_query AS distance
            FROM items i
            WHERE @members@
            ORDER BY l2_normalize(i.embedding)::@copy_column@ <=> l2_normalize(p_query)::@copy_column@
            LIMIT CASE WHEN sweep THEN p_n ELSE p_n + margin END
        ) r;
        PERFORM set_config('enable_sort', sort_setting, true);
        PERFORM set_config('ivfflat.iterative_scan', 'off', true);
        -- The sweep's p_n (fewer when every list was read). The exact scan's: every passing member
        -- read, or the p_n-th nearest nearer than any member left unread can be. The copy read its
        -- rows in order of their rounded cosine distances, each within `rounding` of the table's:
        -- an unread member lies no nearer than the farthest row read, less twice that.
        settled := sweep OR copy_read < p_n + margin OR found_distances[p_n] < copy_farthest - 2 * rounding;
        answered := CASE WHEN sweep THEN 'filter_index' ELSE chosen END;
    END IF;

    IF settled THEN
        RETURN QUERY
            SELECT u.item_id, u.distance, answered
            FROM unnest(found_ids, found_distances) AS u(item_id, distance)
            ORDER BY u.distance, u.item_id
            LIMIT p_n;
        RETURN;
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
    EXECUTE replace(replace(replace(replace(replace(replace(template, '@copy_column@', copy_col), '@column@', col), '@vec@', vec),
        '@explain_filter@', explain_filter), '@members@', members), '@filter@', filter);
END
$definition$;
