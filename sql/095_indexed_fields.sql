-- Indexed fields: every category, or every tag, that holds at least `min_members` items gets a
-- filter index (090) and its copy (091), as a payload index on a field does in dedicated vector
-- databases, without naming each value. `python -m recsys filter-index create --every-tag` records
-- the rule and builds the filter indexes of the values that reach it; `filter-index refresh` builds
-- those of values that have reached it since and drops the indexes the rule made (`automatic`) for
-- values that fell below half of it (so that a value near the bound is not built and dropped by
-- turns); the maintenance run names both (recsys/search/filter_indexes.py). A filter index created
-- by name is never `automatic`: no rule drops it.
CREATE TABLE indexed_fields (
    kind text PRIMARY KEY CHECK (kind IN ('category', 'tag')),
    min_members bigint NOT NULL CHECK (min_members >= 1),
    created_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE indexed_fields OWNER TO recsys_owner;
GRANT SELECT ON indexed_fields TO recsys_maintainer;

ALTER TABLE filter_indexes ADD COLUMN automatic boolean NOT NULL DEFAULT false;
