"""Housekeeping (as the recsys_maintainer role, through PgBouncer), its timer, and replay."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
import pytest
from azure.storage.blob import BlobServiceClient
from ingest_support import IngestEnv, deliver_all, ingest_env, loader_handler, raw_items
from pgvector.psycopg import register_vector

from recsys.config import load_settings, settings_environment
from recsys.ingest.replay import replay
from recsys.local import tools
from recsys.local.host import FunctionHost, HostConfig
from recsys.local.stack import BOUNCER_QUERY_WAIT_TIMEOUT, Stack
from recsys.maintenance import housekeeping

__all__ = ["ingest_env"]


@pytest.fixture
def prefix(stack: Stack) -> Iterator[str]:
    token = f"m{uuid.uuid4().hex[:10]}-"
    yield token
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        conn.execute("DELETE FROM items WHERE starts_with(id, %s)", [token])
        conn.execute("DELETE FROM item_tombstones WHERE starts_with(id, %s)", [token])
        conn.execute("DELETE FROM ingest_batches WHERE starts_with(batch_id, %s)", [token])


def add_part(conn: psycopg.Connection[Any], batch_id: str, part: int, status: str, updated_at: datetime) -> None:
    conn.execute(
        "INSERT INTO ingest_batches (batch_id, part, status, created_at, updated_at) VALUES (%s, %s, %s, %s, %s)",
        [batch_id, part, status, updated_at, updated_at],
    )


def add_calibration(conn: psycopg.Connection[Any], measured_at: datetime, size: int) -> int:
    row = conn.execute(
        "INSERT INTO recall_calibrations (measured_at, k, sample_size, catalogue_size) VALUES (%s, 10, 100, %s)"
        " RETURNING id", [measured_at, size],
    ).fetchone()
    assert row is not None
    conn.execute("INSERT INTO recall_calibration_points (calibration_id, ef_search, recall) VALUES (%s, 40, 0.9)",
                 [row[0]])
    return int(row[0])


async def test_housekeeping_removes_exactly_what_is_past_retention(
    stack: Stack, stack_env: dict[str, str], app_pools: None, prefix: str
) -> None:
    container = f"maint-{uuid.uuid4().hex[:8]}"
    blobs = BlobServiceClient.from_connection_string(stack_env["AzureWebJobsStorage"])
    blobs.create_container(container)
    box = blobs.get_container_client(container)
    box.upload_blob("batches/old/00000.json", b"{}")
    time.sleep(1.1)  # blob times have one-second resolution
    box.upload_blob("batches/new/00000.json", b"{}")
    old_blob = next(b for b in box.list_blobs() if "old" in b.name)

    with settings_environment({"RECSYS_BLOB_CONTAINER": container}):
        settings = load_settings()
    # The run's clock: the ledger retention (30 days) after the old blob, half a second on.
    now = old_blob.last_modified + timedelta(days=settings.ledger_retention_days, seconds=0.5)
    day = timedelta(days=1)
    p = prefix
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        register_vector(conn)
        add_part(conn, f"{p}old-loaded", 0, "loaded", now - 31 * day)
        add_part(conn, f"{p}old-failed", 0, "failed", now - 31 * day)
        add_part(conn, f"{p}recent", 0, "loaded", now - 29 * day)
        add_part(conn, f"{p}mixed", 0, "loaded", now - 31 * day)   # one part recent: the batch stays
        add_part(conn, f"{p}mixed", 1, "loaded", now - day)
        add_part(conn, f"{p}stale", 0, "queued", now - 9 * day)    # past 7 days + the 24 h retry window
        add_part(conn, f"{p}waiting", 0, "queued", now - 7 * day)  # its message may still come
        conn.execute("INSERT INTO item_tombstones (id, version, deleted_at) VALUES (%s, 5, %s), (%s, 5, %s)",
                     [f"{p}t-old", now - 9 * day, f"{p}t-new", now - 7 * day])
        rng = np.random.default_rng(3)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO items (id, embedding) VALUES (%s, %s)",
                [(f"{p}i{i}", rng.standard_normal(settings.embedding_dim).astype(np.float32)) for i in range(50)],
            )
        size = conn.execute("SELECT count(*) FROM items").fetchone()[0]  # type: ignore[index]
        old_calibration = add_calibration(conn, now - 40 * day, size)
        latest = add_calibration(conn, now - 29 * day, size)  # unchanged catalogue since: no recalibration

    report = await housekeeping(settings, now=now)
    assert report.errors == []

    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        ledger = conn.execute(
            "SELECT batch_id, part, status, error IS NOT NULL FROM ingest_batches WHERE starts_with(batch_id, %s)"
            " ORDER BY 1, 2", [p],
        ).fetchall()
        tombstones = conn.execute("SELECT id FROM item_tombstones WHERE starts_with(id, %s)", [p]).fetchall()
        calibrations = {r[0] for r in conn.execute("SELECT id FROM recall_calibrations WHERE id = ANY(%s)",
                                                   [[old_calibration, latest]])}
        points = conn.execute("SELECT count(*) FROM recall_calibration_points WHERE calibration_id = %s",
                              [old_calibration]).fetchone()
    assert ledger == [
        (f"{p}mixed", 0, "loaded", False),
        (f"{p}mixed", 1, "loaded", False),
        (f"{p}recent", 0, "loaded", False),
        (f"{p}stale", 0, "failed", True),
        (f"{p}waiting", 0, "queued", False),
    ]
    assert tombstones == [(f"{p}t-new",)]
    assert calibrations == {latest} and points == (0,)
    assert [b.name for b in box.list_blobs()] == ["batches/new/00000.json"]
    assert report.ledger_rows_deleted >= 2 and report.tombstones_deleted >= 1 and report.blobs_deleted == 1
    assert report.failed_stale_parts >= 1 and report.calibrations_deleted >= 1
    assert not report.recalibrated

    # More than a tenth of the catalogue changed since the latest calibration: a new one is made.
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        conn.execute("UPDATE recall_calibrations SET catalogue_size = %s WHERE id = %s", [size * 2 + 100, latest])
    report = await housekeeping(settings, now=now)
    assert report.errors == [] and report.recalibrated, report
    assert report.recalibration_reason is not None and "changed since the calibration" in report.recalibration_reason
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        newest = conn.execute("SELECT max(id), (array_agg(catalogue_size ORDER BY id DESC))[1]"
                              " FROM recall_calibrations").fetchone()
    assert newest is not None and newest[0] > latest and newest[1] == size
    blobs.delete_container(container)
    blobs.close()


#: The steps that read or write the database, as ``Report.errors`` names them.
DATABASE_STEPS = ("failed_stale_parts", "ledger_rows_deleted", "tombstones_deleted", "calibrations_deleted",
                  "recalibration", "filter_indexes_due")


async def test_housekeeping_while_the_database_is_down_reports_each_step_in_time_and_the_next_run_does_them(
    stack: Stack, stack_env: dict[str, str], app_pools: None
) -> None:
    settings = load_settings()
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:  # nothing to recalibrate
        size = conn.execute("SELECT count(*) FROM items").fetchone()[0]  # type: ignore[index]
        add_calibration(conn, datetime.now(UTC), size)
    assert (await housekeeping(settings)).errors == []  # the maintenance pool's connections in use
    stack.stop_postgres()
    try:
        started = time.monotonic()
        down = await housekeeping(settings)
        took = time.monotonic() - started
    finally:
        stack.start_postgres()
    deadline = time.monotonic() + 15
    while (after := await housekeeping(settings)).errors and time.monotonic() < deadline:
        await asyncio.sleep(0.5)  # PgBouncer retries the server login every second
    # Every step that reads or writes the database, and only those: the blobs are still pruned.
    assert {error.split(":")[0] for error in down.errors} == set(DATABASE_STEPS), down.errors
    # Each connection is checked within the connect timeout, where PgBouncer would hold a
    # statement for its query_wait_timeout.
    assert took < BOUNCER_QUERY_WAIT_TIMEOUT / 2, took
    assert after.errors == []


async def test_the_housekeeping_timer_fires_from_the_local_host(
    stack: Stack, stack_env: dict[str, str], app_pools: None, caplog: pytest.LogCaptureFixture
) -> None:
    root = str(tools.project_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    import function_app

    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:  # nothing to recalibrate
        size = conn.execute("SELECT count(*) FROM items").fetchone()[0]  # type: ignore[index]
        add_calibration(conn, datetime.now(UTC), size)
    caplog.set_level(logging.INFO, logger="recsys")
    with settings_environment({"RECSYS_MAINTENANCE_SCHEDULE": "*/2 * * * * *"}):
        host = FunctionHost(function_app.app, HostConfig(), run_queues=False, run_timers=True)
        assert [t.name for t in host.timer_functions] == ["maintenance_timer"]
        await host.start()
        try:
            for _ in range(80):
                if any(r.getMessage().startswith("housekeeping: ") for r in caplog.records):
                    break
                await asyncio.sleep(0.1)
        finally:
            await host.stop()
    runs = [json.loads(r.getMessage().removeprefix("housekeeping: ")) for r in caplog.records
            if r.getMessage().startswith("housekeeping: ")]
    assert runs and runs[0]["errors"] == [] and runs[0]["recalibrated"] is False


async def test_replay_records_a_message_the_host_poisoned_then_reloads_it(
    ingest_env: IngestEnv, app_pools: None
) -> None:
    env = ingest_env
    batch = f"{env.prefix}r"
    items = raw_items(3, env.prefix)
    with env.connect() as conn:
        add_part(conn, batch, 0, "queued", datetime.now(UTC))
    # As the Functions host does when it gives up: the message, as it was, in the poison queue.
    with env.poison as poison:
        poison.send_message(base64.b64encode(json.dumps({"batch_id": batch, "items": items}).encode()).decode())

    listed = await replay(env.settings, list_only=True)
    assert listed.listed == [f"{batch}/0"] and listed.marked_failed == [f"{batch}/0"]
    (row,) = env.ledger(batch)
    assert row[1] == "failed" and "poison queue" in row[3]

    replayed = await replay(env.settings, batch_ids={batch})
    assert replayed.replayed == [f"{batch}/0"]
    assert env.poisoned() == []
    assert env.ledger(batch)[0][1] == "queued"
    assert await deliver_all(env, loader_handler()) == 1
    assert env.ledger(batch)[0][1:3] == ("loaded", 3)
    assert len(env.rows()) == 3


async def test_replay_sends_a_message_sent_without_base64_back_encoded_and_it_loads(
    ingest_env: IngestEnv, app_pools: None
) -> None:
    env = ingest_env
    batch = f"{env.prefix}plain"
    # Another producer forgot the queue's base64 encoding: the host moves the message, unread, to
    # the poison queue as it is.
    with env.poison as poison:
        poison.send_message(json.dumps({"batch_id": batch, "items": raw_items(2, env.prefix)}))
    listed = await replay(env.settings, list_only=True)
    assert listed.listed == [f"{batch}/0"] and listed.skipped == 0
    replayed = await replay(env.settings)
    assert replayed.replayed == [f"{batch}/0"]
    assert await deliver_all(env, loader_handler()) == 1
    assert env.ledger(batch)[0][1:3] == ("loaded", 2)
    assert len(env.rows()) == 2


def test_the_maintainer_role_cannot_write_or_delete_items(stack: Stack, stack_env: dict[str, str]) -> None:
    with psycopg.connect(stack_env["RECSYS_MAINTENANCE_DATABASE_URL"], autocommit=True,
                         prepare_threshold=None) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("recsys_maintainer",)
        conn.execute("SELECT count(*) FROM items, ingest_batches, item_tombstones")
        for statement in ("DELETE FROM items WHERE id = 'x'", "UPDATE items SET category = 'x' WHERE id = 'x'",
                          "TRUNCATE ingest_batches", "CREATE TABLE maintainer_probe (x int)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
