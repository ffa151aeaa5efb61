-- The ledger of ingest batches: one row per (batch, part), a part being what one queue message
-- carries. The producer records parts as queued before it sends their messages, so that the
-- status is known as soon as the batch is accepted; the loader records them too (for producers
-- that do not write here), and marks each part loaded in the same transaction as its rows, which
-- is what makes a redelivered message a no-op.
--
-- `parts` is the number of parts the producer announced for the batch (NULL when only the loader
-- knows the part): a batch id sent again with fewer parts than before is judged on its new parts
-- alone, without deleting rows (the loader's role may insert and update, never delete).
CREATE TABLE ingest_batches (
    batch_id text NOT NULL CHECK (length(batch_id) BETWEEN 1 AND 128),
    part integer NOT NULL DEFAULT 0 CHECK (part >= 0),
    parts integer CHECK (parts > part),
    status text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'loaded', 'failed')),
    rows integer NOT NULL DEFAULT 0 CHECK (rows >= 0),
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    loaded_at timestamptz,
    PRIMARY KEY (batch_id, part)
);

-- Operators look for what is stuck or failed, most recent first.
CREATE INDEX ingest_batches_status ON ingest_batches (status, updated_at DESC) WHERE status <> 'loaded';
