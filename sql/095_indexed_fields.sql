-- Metadata filter indexes and indexed fields.
--
-- A filter index (090) may stand for one metadata pair as well as for a category or a tag: its
-- value is the pair as a JSON object of one key (`{"brand": "acme"}`, a string, number or
-- boolean), its members the items whose metadata contains it, and it covers every request whose
-- `metadata` filter asks for that pair among others.
--
-- Indexed fields: every category, every tag, or every value of one metadata key, that holds at
-- least `min_members` items gets a filter index and its copy (091), as a payload index on a field
-- does in dedicated vector databases, without naming each value. `python -m recsys filter-index
-- create --every-tag` records the rule and builds the filter indexes of the values that reach it;
-- `filter-index refresh` builds those of values that have reached it since and drops the indexes
-- the rule made (`automatic`) for values that fell below half of it (so that a value near the
-- bound is not built and dropped by turns); the maintenance run names both
-- (recsys/search/filter_indexes.py). A filter index created by name is never `automatic`: no rule
-- drops it. `key` is the metadata key of a rule of kind 'metadata', '' for the others.
ALTER TABLE filter_indexes DROP CONSTRAINT filter_indexes_kind_check,
    ADD CONSTRAINT filter_indexes_kind_check CHECK (kind IN ('category', 'tag', 'metadata')),
    ADD CONSTRAINT filter_indexes_metadata_pair CHECK (kind <> 'metadata' OR jsonb_typeof(value::jsonb) = 'object'),
    ADD COLUMN automatic boolean NOT NULL DEFAULT false;

CREATE TABLE indexed_fields (
    kind text NOT NULL CHECK (kind IN ('category', 'tag', 'metadata')),
    key text NOT NULL DEFAULT '' CHECK ((kind = 'metadata') = (key <> '') AND length(key) <= 256),
    min_members bigint NOT NULL CHECK (min_members >= 1),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, key)
);
ALTER TABLE indexed_fields OWNER TO recsys_owner;
GRANT SELECT ON indexed_fields TO recsys_maintainer;
