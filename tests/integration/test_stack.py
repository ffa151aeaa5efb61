"""The local stack starts, stops and starts again cleanly, and its parts are what API.md says."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psycopg
import pytest
from azure.storage.queue import QueueClient

from recsys.db.migrations import MIGRATIONS_DIR, apply_migrations, function_definitions
from recsys.local.stack import LOCAL_PASSWORD, Stack, StackConfig, _port_open

pytestmark = pytest.mark.integration


def live_processes_under(root: Path) -> list[str]:
    """Command lines of running (not zombie) processes that mention the stack's folder."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "?")
        if state != "Z" and str(root) in cmdline and int(entry.name) != os.getpid():
            found.append(cmdline)
    return found


def assert_healthy(stack: Stack) -> None:
    with psycopg.connect(stack.bouncer_url(), prepare_threshold=None, connect_timeout=5) as conn:
        assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone() == ("0.8.1",)
    queue = QueueClient.from_connection_string(stack.storage_connection_string(), "stack-check")
    queue.create_queue()
    queue.send_message("ping")
    assert [m.content for m in queue.receive_messages()] == ["ping"]
    queue.delete_queue()


def assert_new_server_login_works(stack: Stack) -> None:
    """PgBouncer logs in to PostgreSQL anew with the SCRAM keys of a client that just logged in."""
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE usename = ANY('{recsys,recsys_query,recsys_loader}') AND pid <> pg_backend_pid()"
        )
    for user in ("recsys", "recsys_query"):
        # The first attempt may meet a server connection PgBouncer has not yet seen die.
        for attempt in range(2):
            try:
                with psycopg.connect(stack.bouncer_url(user=user), prepare_threshold=None, connect_timeout=5) as conn:
                    assert conn.execute("SELECT current_user").fetchone() == (user,)
                break
            except psycopg.OperationalError:
                if attempt:
                    raise


def assert_stopped(stack: Stack) -> None:
    c = stack.config
    assert stack.status() == {"postgres": False, "pgbouncer": False, "azurite": False}
    for port in (c.pg_port, c.bouncer_port, c.blob_port, c.queue_port, c.table_port):
        assert not _port_open(c.host, port), f"port {port} still open"
    assert live_processes_under(stack.root) == []


def test_up_down_up_is_healthy_and_leaves_nothing_behind(tmp_path: Path) -> None:
    stack = Stack(StackConfig.ephemeral(tmp_path / "stack"))
    try:
        stack.up()
        assert all(stack.status().values())
        assert_healthy(stack)
        stack.up()  # idempotent: already running (the secrets PgBouncer holds stay valid)
        assert_healthy(stack)
        assert_new_server_login_works(stack)
        stack.down()
        assert_stopped(stack)
        stack.up()  # same data folder, started again
        assert_healthy(stack)
    finally:
        stack.down()
    assert_stopped(stack)
    stack.down()  # idempotent when already down


def test_migrations_are_recorded_once(stack: Stack) -> None:
    applied_again = stack.migrate()
    assert applied_again == []
    with psycopg.connect(stack.admin_conninfo()) as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions[:2] == ["001", "002"]
    assert len(versions) == len(set(versions))


def test_a_function_definition_is_applied_again_when_its_file_changes(stack: Stack, tmp_path: Path) -> None:
    sql = tmp_path / "sql"
    shutil.copytree(MIGRATIONS_DIR, sql)
    definition = sql / "functions" / "recsys_nearest.sql"
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        recorded = conn.execute("SELECT version, name FROM schema_migrations WHERE version LIKE 'fn:%'"
                                " ORDER BY name").fetchall()
        assert [name for _, name in recorded] == ["functions/recsys_nearest.sql", "functions/recsys_query.sql"]
        assert [version for version, _ in recorded] == [v for v, _ in function_definitions(MIGRATIONS_DIR)]
        definition.write_text(definition.read_text() + "-- revised\n")
        try:
            dim = stack.config.embedding_dim
            assert apply_migrations(conn, embedding_dim=dim, directory=sql) == ["functions/recsys_nearest.sql"]
            assert apply_migrations(conn, embedding_dim=dim, directory=sql) == []
        finally:
            # The project's file again: the text applied before is applied once more, being no
            # longer the one applied last.
            assert stack.migrate() == ["functions/recsys_nearest.sql"]
            conn.execute("DELETE FROM schema_migrations WHERE version = %s", [function_definitions(sql)[0][0]])
    assert stack.migrate() == []


def test_pgbouncer_runs_in_transaction_mode_with_a_readable_admin_console(stack: Stack) -> None:
    # PgBouncer lists a pool once a client has used it: use it, so the test holds on its own.
    with psycopg.connect(stack.bouncer_url(), autocommit=True, prepare_threshold=None) as client:
        client.execute("SELECT 1")
    with psycopg.connect(stack.bouncer_admin_url(), autocommit=True, prepare_threshold=None) as admin:
        config = {row[0]: row[1] for row in admin.execute("SHOW CONFIG")}
        pools = admin.execute("SHOW POOLS").fetchall()
    assert config["pool_mode"] == "transaction"
    assert config["listen_port"] == str(stack.config.bouncer_port)
    assert any(row[0] == "recsys" and row[-1] == "transaction" for row in pools), pools


def test_postgres_verifies_passwords(stack: Stack) -> None:
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        psycopg.connect(stack.direct_url(password="wrong"), connect_timeout=5)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(stack.bouncer_url(password="wrong"), connect_timeout=5)


def test_postgres_runs_as_an_unprivileged_user(stack: Stack) -> None:
    with psycopg.connect(stack.admin_conninfo()) as conn:
        data_directory = conn.execute("SHOW data_directory").fetchone()[0]  # type: ignore[index]
    owner = Path(data_directory).stat().st_uid
    assert owner != 0 or os.geteuid() != 0


def test_pgbouncer_verifies_logins_from_scram_secrets(stack: Stack) -> None:
    """The auth file holds PostgreSQL's own SCRAM secrets: no password, no PBKDF2 per login."""
    lines = (stack.bouncer_dir / "userlist.txt").read_text().splitlines()
    secrets = dict(tuple(part.strip('"') for part in line.split(" ", 1)) for line in lines)
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as admin:
        stored = dict(admin.execute(
            "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY('{recsys,recsys_query,recsys_loader}')"
        ).fetchall())
    assert set(stored) == {"recsys", "recsys_query", "recsys_loader"}
    for role, secret in stored.items():
        assert secrets[role] == secret and secret.startswith("SCRAM-SHA-256$")
        assert LOCAL_PASSWORD not in secrets[role]
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        psycopg.connect(stack.bouncer_url(user="recsys_query", password="not-the-password"), connect_timeout=5)
    assert_new_server_login_works(stack)
