-- Exact copies of filter indexes: next to each filter index's graph, a partial IVFFlat index with
-- a single list over the same members (`python -m recsys filter-index create` builds both). With
-- one list and one probe its scan reads every member and orders them all exactly by distance, from
-- the index's own pages: the vectors packed one after another, where the exact scan of the table
-- reads a heap page for nearly every member (a 5 % tag on 200,000 items: 2,002 index pages against
-- 9,249 heap pages, 4.6 ms against 17 ms). It orders the unit vectors by Euclidean distance (the
-- order of cosine distance), an ORDER BY that neither the shared index nor the filter index's graph
-- serves, so the planner cannot mistake one for the other.
ALTER TABLE filter_indexes
    ADD COLUMN copy_name text UNIQUE CHECK (copy_name ~ '^items_copy_[a-z]+_[0-9a-f]{16}$');

-- recsys_nearest itself, which reads the copies, is defined from now on in
-- sql/functions/recsys_nearest.sql, applied after the migrations whenever it changes.
