-- Recall of the HNSW index per ef_search, measured by `python -m recsys calibrate` against exact
-- search on a sample of the catalogue (recsys/search/calibration.py). A request with
-- recall_target takes the smallest ef_search of the latest run expected to reach it.
-- Runs are kept (append-only): the history shows how recall moved as the catalogue grew.
CREATE TABLE recall_calibrations (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    measured_at timestamptz NOT NULL DEFAULT now(),
    k integer NOT NULL CHECK (k > 0),
    sample_size integer NOT NULL CHECK (sample_size > 0),
    catalogue_size bigint NOT NULL CHECK (catalogue_size >= 0),
    exact_ms double precision
);

CREATE TABLE recall_calibration_points (
    calibration_id bigint NOT NULL REFERENCES recall_calibrations (id) ON DELETE CASCADE,
    ef_search integer NOT NULL CHECK (ef_search BETWEEN 1 AND 1000),
    recall double precision NOT NULL CHECK (recall BETWEEN 0 AND 1),
    mean_ms double precision,
    PRIMARY KEY (calibration_id, ef_search)
);

-- The query path reads the curve; whoever calibrates (the loader role after a load, or the app
-- role locally) writes it. Roles are granted only where they exist (see 030 for the roles).
DO $grants$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'recsys_query') THEN
        GRANT SELECT ON recall_calibrations, recall_calibration_points TO recsys_query;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'recsys_loader') THEN
        GRANT SELECT, INSERT ON recall_calibrations, recall_calibration_points TO recsys_loader;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'recsys') THEN
        GRANT SELECT, INSERT ON recall_calibrations, recall_calibration_points TO recsys;
    END IF;
END
$grants$;
