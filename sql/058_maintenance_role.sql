-- The housekeeping role (recsys/maintenance.py, the maintenance_timer function).
--
--   recsys_maintainer  prunes the service's own bookkeeping past its retention: ledger rows,
--                      deletion memories, old recall calibrations; fails ledger parts whose
--                      messages can no longer arrive; stores a fresh recall calibration.
--                      It reads the catalogue but can never write or delete an item, and the
--                      loader and query roles still cannot delete bookkeeping.
--
-- NOLOGIN like the other roles: on Azure an Entra principal (its own managed identity, or the
-- loader's) is made a member of it (README, "Housekeeping").
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'recsys_maintainer') THEN
        CREATE ROLE recsys_maintainer NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
    END IF;
END
$roles$;

ALTER ROLE recsys_maintainer SET idle_in_transaction_session_timeout = '60s';

DO $grants$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO recsys_maintainer', current_database());
END
$grants$;
GRANT USAGE ON SCHEMA public TO recsys_maintainer;

GRANT SELECT ON items TO recsys_maintainer;
GRANT SELECT, UPDATE, DELETE ON ingest_batches TO recsys_maintainer;
GRANT SELECT, DELETE ON item_tombstones TO recsys_maintainer;
GRANT SELECT, INSERT, DELETE ON recall_calibrations, recall_calibration_points TO recsys_maintainer;
GRANT USAGE ON SEQUENCE recall_calibrations_id_seq TO recsys_maintainer;
