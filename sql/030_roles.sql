-- Least-privilege roles.
--
--   recsys_owner   owns the schema's objects; the login that applies migrations is a member.
--   recsys_query   the query path: SELECT only, read-only transactions.
--   recsys_loader  the ingest path: COPY into a temporary staging table, upsert into the
--                  service's tables (INSERT, UPDATE, SELECT); no DELETE, TRUNCATE or DDL.
--
-- All three are created NOLOGIN, which works on Azure Database for PostgreSQL too: there the
-- login roles are Entra principals (pgaadauth_create_principal) made members of these (see the
-- README, "Security"); the local stack gives recsys_query and recsys_loader a development
-- password. Roles are cluster-wide and may already exist (another database of the cluster).
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'recsys_owner') THEN
        CREATE ROLE recsys_owner NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'recsys_query') THEN
        CREATE ROLE recsys_query NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'recsys_loader') THEN
        CREATE ROLE recsys_loader NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
    END IF;
END
$roles$;

-- The migrating login (the local superuser, or the Azure server admin) may act as the owner.
GRANT recsys_owner TO CURRENT_USER;

-- Defence in depth for the query role: every transaction is read-only unless it says
-- otherwise, and a runaway statement is stopped even if a request forgot its own limit (the
-- request path sets a tighter statement_timeout per transaction, since PgBouncer rejects the
-- `options` startup parameter). Role settings apply to the login role only: Azure principals
-- get the same settings (README).
ALTER ROLE recsys_query SET default_transaction_read_only = on;
ALTER ROLE recsys_query SET statement_timeout = '30s';
ALTER ROLE recsys_query SET idle_in_transaction_session_timeout = '60s';
ALTER ROLE recsys_loader SET idle_in_transaction_session_timeout = '60s';

DO $grants$
DECLARE
    obj record;
BEGIN
    -- Temporary tables only for the loader's staging table (PUBLIC has TEMP by default).
    EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO recsys_loader', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO recsys_query', current_database());

    -- What earlier migrations created (whichever area they come from) belongs to the owner.
    FOR obj IN
        SELECT c.relname, c.relkind FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
          AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                          AND d.objid = c.oid AND d.deptype IN ('e', 'a', 'i'))
    LOOP
        EXECUTE format(
            'ALTER %s %I OWNER TO recsys_owner',
            CASE obj.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
                             WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'TABLE' END,
            obj.relname);
    END LOOP;
    FOR obj IN
        SELECT p.oid::regprocedure AS signature, p.prokind FROM pg_proc p
        WHERE p.pronamespace = 'public'::regnamespace
          AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                          AND d.objid = p.oid AND d.deptype = 'e')
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO recsys_owner',
                       CASE obj.prokind WHEN 'p' THEN 'PROCEDURE' WHEN 'a' THEN 'AGGREGATE' ELSE 'FUNCTION' END,
                       obj.signature);
    END LOOP;

    -- Rows of the service's tables: read for both, written (never deleted) by the loader.
    -- The migrations ledger stays the owner's.
    FOR obj IN
        SELECT c.relname FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm')
          AND c.relname <> 'schema_migrations'
          AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                          AND d.objid = c.oid AND d.deptype = 'e')
    LOOP
        EXECUTE format('GRANT SELECT ON %I TO recsys_query, recsys_loader', obj.relname);
        IF (SELECT relkind FROM pg_class WHERE oid = format('public.%I', obj.relname)::regclass) IN ('r', 'p') THEN
            EXECUTE format('GRANT INSERT, UPDATE ON %I TO recsys_loader', obj.relname);
        END IF;
    END LOOP;
    FOR obj IN
        SELECT c.relname FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'S'
    LOOP
        EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %I TO recsys_loader', obj.relname);
    END LOOP;
END
$grants$;

GRANT USAGE ON SCHEMA public TO recsys_query, recsys_loader;
GRANT USAGE, CREATE ON SCHEMA public TO recsys_owner;

-- Tables created by later migrations (for instance an area's ledger applied after this file)
-- get the same rights, whether the migrating login or the owner role creates them.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO recsys_query, recsys_loader;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT INSERT, UPDATE ON TABLES TO recsys_loader;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO recsys_loader;
ALTER DEFAULT PRIVILEGES FOR ROLE recsys_owner IN SCHEMA public GRANT SELECT ON TABLES TO recsys_query, recsys_loader;
ALTER DEFAULT PRIVILEGES FOR ROLE recsys_owner IN SCHEMA public GRANT INSERT, UPDATE ON TABLES TO recsys_loader;
ALTER DEFAULT PRIVILEGES FOR ROLE recsys_owner IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO recsys_loader;
