-- What a filter index's copy was built for: its members when `python -m recsys filter-index create`
-- made the copy's lists (about sqrt(members), by k-means over those members), and when. The lists
-- and the sweep's width calibrated on them stand for the members of that day; once more than a
-- tenth of the members have been written since, or their number has moved by more than a tenth,
-- `filter-index refresh` builds the copy again and calibrates it again, and the maintenance run
-- names the filter indexes due (recsys/search/filter_indexes.py). NULL for a copy built before:
-- its lists stand for about lists^2 members, built when the filter index was created.
ALTER TABLE filter_indexes
    ADD COLUMN copy_members bigint CHECK (copy_members >= 0),
    ADD COLUMN copy_built_at timestamptz;
