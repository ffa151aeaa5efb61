-- The sweep's width is now calibrated on two samples: items drawn at random from the catalogue
-- and, where enough are found, items whose nearest hold no member; and a calibrated sweep narrow
-- enough answers before the shared index is probed, whether the filter surrounds the query or
-- avoids it (sql/functions/recsys_nearest.sql). A width calibrated before, on the second sample
-- alone, can be far too narrow for a query among the members (one list of 316 for a 50 % tag
-- around the query, where three were needed): it is cleared, the default width applies beyond
-- reach as before, and `python -m recsys filter-index create` calibrates again.
UPDATE filter_indexes SET sweep_width = NULL;
