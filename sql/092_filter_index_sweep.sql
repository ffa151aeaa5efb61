-- The sweep of a filter index's copy, calibrated when `python -m recsys filter-index create`
-- builds or finds the copy: on items of the catalogue whose nearest hold no member (queries for
-- which the filter avoids their neighbourhood), the fewest of the copy's lists nearest the query
-- whose members hold the exact answer's ten nearest at the recall the calibration asks for.
-- sweep_width is what they hold in members per unit of ef_search at ef_search 100: the sweep
-- reads that many times the request's ef_search. NULL where no such item was found or where every
-- list was needed: the sweep then reads 32 members per unit of ef_search
-- (sql/functions/recsys_nearest.sql).
ALTER TABLE filter_indexes
    ADD COLUMN sweep_width double precision CHECK (sweep_width > 0);
