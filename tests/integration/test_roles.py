"""sql/030_roles.sql: each path's role can do its job and is refused everything else.

The rights are checked on a stack of this module's own, exactly as the migrations leave them
(fixtures of other areas may grant extra rights on the shared one). Connections go through
PgBouncer in transaction mode, as the functions do; whatever a test writes is rolled back.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors, sql

from recsys.db.pool import get_pool
from recsys.local.stack import Stack, StackConfig

pytestmark = pytest.mark.integration

DENIED = (errors.InsufficientPrivilege, errors.ReadOnlySqlTransaction)


def vector_literal(dim: int) -> str:
    return "[" + ",".join(["0.5"] * dim) + "]"


@pytest.fixture(scope="module")
def roles_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(StackConfig.ephemeral(Path(tmp_path_factory.mktemp("roles-stack"))))
    try:
        stack.up()
        yield stack
    finally:
        stack.down()


@pytest.fixture
def query_conn(roles_stack: Stack) -> Iterator[psycopg.Connection]:
    url = roles_stack.bouncer_url(user="recsys_query")
    with psycopg.connect(url, prepare_threshold=None, autocommit=True) as conn:
        yield conn


@pytest.fixture
def loader_conn(roles_stack: Stack) -> Iterator[psycopg.Connection]:
    url = roles_stack.bouncer_url(user="recsys_loader")
    with psycopg.connect(url, prepare_threshold=None, autocommit=True) as conn:
        yield conn


def refused(conn: psycopg.Connection, statement: str, params: list[object] | None = None,
            *, kinds: tuple[type[Exception], ...] = DENIED) -> None:
    with pytest.raises(kinds), conn.transaction(force_rollback=True):
        conn.execute(statement, params)  # type: ignore[arg-type]


def test_roles_exist_without_login_in_sql(roles_stack: Stack) -> None:
    with psycopg.connect(roles_stack.admin_conninfo()) as conn:
        rows: dict[str, bool] = dict(conn.execute(
            "SELECT rolname, rolsuper OR rolcreaterole OR rolcreatedb OR rolbypassrls FROM pg_roles"
            " WHERE rolname IN ('recsys_owner', 'recsys_query', 'recsys_loader')"
        ).fetchall())
        owner = conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'items'").fetchone()
    assert rows == {"recsys_owner": False, "recsys_query": False, "recsys_loader": False}
    assert owner == ("recsys_owner",)


def test_the_query_role_reads(query_conn: psycopg.Connection) -> None:
    assert query_conn.execute("SELECT current_user, count(*) >= 0 FROM items").fetchone() == ("recsys_query", True)
    assert query_conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO items (id, embedding) VALUES ('x', %s)",
        "UPDATE items SET category = 'x' WHERE id = 'nothing'",
        "DELETE FROM items WHERE id = 'nothing'",
        "TRUNCATE items",
        "DROP TABLE items",
        "ALTER TABLE items ADD COLUMN extra int",
        "CREATE TABLE public.intruder (id int)",
        "CREATE TEMP TABLE scratch (id int)",
        "CREATE INDEX ON items (updated_at)",
        "CREATE ROLE intruder",
    ],
)
def test_the_query_role_is_read_only(query_conn: psycopg.Connection, statement: str) -> None:
    params: list[object] | None = [vector_literal(384)] if "%s" in statement else None
    refused(query_conn, statement, params)


def test_the_query_role_cannot_write_even_in_a_read_write_transaction(query_conn: psycopg.Connection) -> None:
    # The read-only default is a safety net; the privileges are the wall.
    for statement in ("UPDATE items SET category = 'x' WHERE id = 'nothing'",
                      "DELETE FROM items WHERE id = 'nothing'",
                      "CREATE TEMP TABLE scratch (id int)"):
        with pytest.raises(errors.InsufficientPrivilege), query_conn.transaction(force_rollback=True):
            query_conn.execute("SET LOCAL transaction_read_only = off")
            query_conn.execute(statement)


def test_the_loader_stages_with_copy_and_upserts(loader_conn: psycopg.Connection, roles_stack: Stack) -> None:
    dim = roles_stack.config.embedding_dim
    item = f"role-test-{uuid.uuid4().hex}"
    with loader_conn.transaction(force_rollback=True):
        loader_conn.execute(
            "CREATE TEMP TABLE staging (id text, embedding text, category text) ON COMMIT DROP"
        )
        with loader_conn.cursor().copy("COPY staging (id, embedding, category) FROM STDIN") as copy:
            copy.write_row((item, vector_literal(dim), "first"))
        upsert = (
            "INSERT INTO items (id, embedding, category)"
            " SELECT id, embedding::vector, category FROM staging"
            " ON CONFLICT (id) DO UPDATE SET embedding = EXCLUDED.embedding, category = EXCLUDED.category,"
            " updated_at = now()"
        )
        loader_conn.execute(upsert)
        loader_conn.execute("UPDATE staging SET category = 'second'")
        loader_conn.execute(upsert)
        row = loader_conn.execute("SELECT category FROM items WHERE id = %s", [item]).fetchone()
    assert row == ("second",)
    assert loader_conn.execute("SELECT count(*) FROM items WHERE id = %s", [item]).fetchone() == (0,)


def test_the_loader_deletes_items_and_records_tombstones(loader_conn: psycopg.Connection, roles_stack: Stack) -> None:
    dim = roles_stack.config.embedding_dim
    item = f"role-test-{uuid.uuid4().hex}"
    with loader_conn.transaction(force_rollback=True):
        loader_conn.execute("INSERT INTO items (id, version, embedding) VALUES (%s, 5, %s::vector)",
                            [item, vector_literal(dim)])
        loader_conn.execute("INSERT INTO item_tombstones (id, version) VALUES (%s, 6)"
                            " ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version", [item])
        assert loader_conn.execute("DELETE FROM items WHERE id = %s", [item]).rowcount == 1


@pytest.mark.parametrize(
    "statement",
    [
        "TRUNCATE items",
        "TRUNCATE item_tombstones",
        "DELETE FROM item_tombstones WHERE id = 'nothing'",
        "DROP TABLE items",
        "ALTER TABLE items ADD COLUMN extra int",
        "ALTER TABLE items OWNER TO recsys_loader",
        "CREATE INDEX ON items (updated_at)",
        "CREATE TABLE public.intruder (id int)",
        "CREATE ROLE intruder",
        "ALTER ROLE recsys_loader CREATEROLE",
        "GRANT recsys_owner TO recsys_loader",
        "INSERT INTO schema_migrations (version, name) VALUES ('999', '999_x.sql')",
        "DELETE FROM schema_migrations",
    ],
)
def test_the_loader_is_refused_the_rest(loader_conn: psycopg.Connection, statement: str) -> None:
    refused(loader_conn, statement)


def test_rights_on_every_table_of_the_service(roles_stack: Stack, query_conn: psycopg.Connection,
                                             loader_conn: psycopg.Connection) -> None:
    # Whatever the areas' migrations created (items, the ingest ledger, ...), not just items.
    with psycopg.connect(roles_stack.admin_conninfo()) as conn:
        tables = [row[0] for row in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'schema_migrations'"
        )]
        rights = {
            (role, table, privilege): conn.execute(
                "SELECT has_table_privilege(%s, format('public.%%I', %s::text), %s)", [role, table, privilege]
            ).fetchone()[0]  # type: ignore[index]
            for role in ("recsys_query", "recsys_loader")
            for table in tables
            for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
        }
    assert "items" in tables
    for (role, table, privilege), granted in rights.items():
        expected = privilege == "SELECT" or (role == "recsys_loader" and privilege in ("INSERT", "UPDATE"))
        # The loader removes deleted items (sql/050); nothing else of any table.
        expected = expected or (role, table, privilege) == ("recsys_loader", "items", "DELETE")
        assert granted == expected, (role, table, privilege)
    assert {"item_tombstones", "ingest_batches"} <= set(tables)
    for table in tables:
        if table == "items":
            refused(query_conn, "DELETE FROM items")
            continue
        statement = sql.SQL("DELETE FROM {}").format(sql.Identifier(table))
        refused(query_conn, statement.as_string(query_conn))
        refused(loader_conn, statement.as_string(loader_conn))


def test_tables_of_later_migrations_get_the_same_rights(
    roles_stack: Stack, query_conn: psycopg.Connection, loader_conn: psycopg.Connection
) -> None:
    # A table created by the migrating login after 030 (an area's ledger merged later, say).
    name = f"later_{uuid.uuid4().hex[:12]}"
    table = sql.Identifier(name)
    with psycopg.connect(roles_stack.admin_conninfo(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE TABLE {} (id text PRIMARY KEY, status text)").format(table))
        try:
            with loader_conn.transaction(force_rollback=True):
                loader_conn.execute(sql.SQL("INSERT INTO {} VALUES ('b', 'queued')").format(table))
                loader_conn.execute(sql.SQL("UPDATE {} SET status = 'loaded'").format(table))
            refused(loader_conn, sql.SQL("DELETE FROM {}").format(table).as_string(loader_conn))
            assert query_conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone() == (0,)
            refused(query_conn, sql.SQL("INSERT INTO {} VALUES ('b', 'x')").format(table).as_string(query_conn))
        finally:
            admin.execute(sql.SQL("DROP TABLE {}").format(table))


async def test_each_path_connects_as_its_own_role(app_pools: None) -> None:
    query = await get_pool("query")
    loader = await get_pool("loader")
    async with query.connection() as conn:
        assert await (await conn.execute("SELECT current_user")).fetchone() == ("recsys_query",)
    async with loader.connection() as conn:
        assert await (await conn.execute("SELECT current_user")).fetchone() == ("recsys_loader",)
