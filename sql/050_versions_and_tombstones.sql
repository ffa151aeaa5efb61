-- Versions and deletes (README, "Catalogue writes").
--
-- Every write of an id carries a version (1 .. 2^53 - 1, safe in JSON). A write applies only
-- when its version is greater than the one stored for the id, counting the version of a
-- deletion, so messages delivered late or twice never overwrite newer data.
--
-- items.version: the version of the row's content. Rows written before versions existed, and
-- rows written by tools that do not state one (a direct COPY), count as version 1, the oldest:
-- any versioned write replaces them.
ALTER TABLE items ADD COLUMN version bigint NOT NULL DEFAULT 1
    CONSTRAINT items_version_range CHECK (version BETWEEN 1 AND 9007199254740991);

-- A delete removes the row from items and records (or raises) its tombstone here: the
-- version of the deletion, kept at least RECSYS_TOMBSTONE_RETENTION_DAYS, so that an older
-- upsert arriving later cannot bring the item back. Reads never look at this table.
CREATE TABLE item_tombstones (
    id text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 128),
    version bigint NOT NULL CHECK (version BETWEEN 1 AND 9007199254740991),
    deleted_at timestamptz NOT NULL DEFAULT now()
);
-- Pruning past the retention period scans by age.
CREATE INDEX item_tombstones_deleted_at ON item_tombstones (deleted_at);
ALTER TABLE item_tombstones OWNER TO recsys_owner;

-- Per part: deletions applied, and writes ignored because a newer version was already there.
-- `source` names the content a part's row stands for: `enqueue:<token>` for the project's
-- producers (one token per enqueue, recorded before its messages are sent), `message:<id>` for
-- a message of another producer (its queue message id, the same on every redelivery). A
-- redelivery of the content already loaded is skipped; a message of an older enqueue of the
-- same batch id is recognised as superseded instead of being mistaken for a redelivery.
ALTER TABLE ingest_batches
    ADD COLUMN deleted integer NOT NULL DEFAULT 0 CHECK (deleted >= 0),
    ADD COLUMN stale integer NOT NULL DEFAULT 0 CHECK (stale >= 0),
    ADD COLUMN source text;

-- The loader removes deleted items (and only that: no TRUNCATE, no DDL). The tombstones get
-- the default rights of 030 (SELECT for both paths; INSERT, UPDATE for the loader).
GRANT DELETE ON items TO recsys_loader;
