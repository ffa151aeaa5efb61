"""Outages and poison through the local host, with host.json's own queue settings.

PostgreSQL is stopped for longer than ``maxDequeueCount`` × ``visibilityTimeout`` (host.json:
5 × 5 s), the time after which the Functions host would move a raising message to the poison
queue; the loader's own delayed retries carry every message over it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueClient
from ingest_support import raw_items

from recsys.config import settings_environment
from recsys.local import tools
from recsys.local.cli import build_host
from recsys.local.host import load_host_config, serve_in_thread
from recsys.local.stack import Stack, free_port

#: Generous bound for every message to load once PostgreSQL is back (the retry delay is capped
#: at 3 s in this test; PgBouncer's server_login_retry adds up to 15 s after a restart).
RECOVERY_BOUND = 90.0


@pytest.fixture
def short_retry_host(stack_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """A local host of the test's own, started with the loader's retry delay capped at 3 s and
    listening on a queue of its own; yields its app settings."""
    private = {"RECSYS_LOADER_RETRY_MAX_DELAY": "3", "RECSYS_QUEUE_NAME": f"outage-{uuid.uuid4().hex[:10]}"}
    with settings_environment(private), serve_in_thread(build_host(), free_port()):
        yield {**stack_env, **private}
    for name in (private["RECSYS_QUEUE_NAME"], f"{private['RECSYS_QUEUE_NAME']}-poison"):
        with QueueClient.from_connection_string(stack_env["AzureWebJobsStorage"], name) as queue, \
                contextlib.suppress(ResourceNotFoundError):
            queue.delete_queue()


@pytest.fixture
def prefix(stack: Stack) -> Iterator[str]:
    token = f"o{uuid.uuid4().hex[:10]}-"
    yield token
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        conn.execute("DELETE FROM items WHERE starts_with(id, %s)", [token])
        conn.execute("DELETE FROM ingest_batches WHERE starts_with(batch_id, %s)", [token])


def send(env: dict[str, str], document: dict[str, Any]) -> None:
    with QueueClient.from_connection_string(env["AzureWebJobsStorage"], env["RECSYS_QUEUE_NAME"]) as queue:
        queue.send_message(base64.b64encode(json.dumps(document).encode()).decode())


def poisoned(env: dict[str, str], prefix: str) -> list[bytes]:
    """Bodies in the poison queue that mention ``prefix``."""
    name = f"{env['RECSYS_QUEUE_NAME']}-poison"
    with QueueClient.from_connection_string(env["AzureWebJobsStorage"], name) as queue:
        bodies = [base64.b64decode(m.content) for m in queue.peek_messages(max_messages=32)]
    return [b for b in bodies if prefix.encode() in b]


def ledger(stack: Stack, prefix: str) -> dict[str, tuple[str, int, str | None]]:
    """The parts of the test's batches by ``batch_id/part``."""
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT batch_id, part, status, rows, error FROM ingest_batches WHERE starts_with(batch_id, %s)", [prefix]
        ).fetchall()
    return {f"{r[0]}/{r[1]}": (r[2], r[3], r[4]) for r in rows}


def wait_for(check: Any, bound: float) -> Any:
    deadline = time.monotonic() + bound
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def test_an_outage_longer_than_the_hosts_retries_loses_nothing_and_needs_no_manual_step(
    stack: Stack, short_retry_host: dict[str, str], prefix: str
) -> None:
    app_settings = short_retry_host
    queues = load_host_config(tools.project_root() / "host.json").queues
    host_gives_up_after = queues.max_dequeue_count * queues.visibility_timeout
    outage = host_gives_up_after + 5

    blob_container = f"outage-{uuid.uuid4().hex[:8]}"
    blobs = BlobServiceClient.from_connection_string(app_settings["AzureWebJobsStorage"])
    blobs.create_container(blob_container)
    stack.stop_postgres()
    stopped = time.monotonic()
    try:
        # Sent while the database is down: inline parts, a claim-check part, a delete-only part.
        send(app_settings, {"batch_id": f"{prefix}a", "items": raw_items(3, f"{prefix}a")})
        send(app_settings, {"batch_id": f"{prefix}b", "part": 0, "items": raw_items(2, f"{prefix}b", b64=False)})
        blobs.get_blob_client(blob_container, "b1.json").upload_blob(
            json.dumps({"items": raw_items(200, f"{prefix}b1")}).encode()
        )
        send(app_settings, {"batch_id": f"{prefix}b", "part": 1, "blob": f"{blob_container}/b1.json"})
        send(app_settings, {"batch_id": f"{prefix}c", "delete": [f"{prefix}gone"]})
        while time.monotonic() - stopped < outage:
            time.sleep(1)
            # Nothing reaches the poison queue during the outage, whatever its length.
            assert poisoned(app_settings, prefix) == []
    finally:
        stack.start_postgres()

    def all_loaded() -> bool:
        rows = ledger(stack, prefix)
        return len(rows) == 4 and all(status == "loaded" for status, _, _ in rows.values())

    assert wait_for(all_loaded, RECOVERY_BOUND), ledger(stack, prefix)
    assert poisoned(app_settings, prefix) == []
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        count = conn.execute("SELECT count(*) FROM items WHERE starts_with(id, %s)", [prefix]).fetchone()
    assert count == (205,)
    # The claim-check blob is spent once its part has loaded.
    assert [b.name for b in blobs.get_container_client(blob_container).list_blobs()] == []
    blobs.delete_container(blob_container)
    blobs.close()


def test_a_poisoned_message_marks_its_batch_failed_with_the_reason(
    stack: Stack, stack_env: dict[str, str], local_host: str, prefix: str
) -> None:
    wrong_dimension = {"id": f"{prefix}x", "embedding": [0.5] * 3}
    send(stack_env, {"batch_id": f"{prefix}dim", "items": [wrong_dimension]})
    with QueueClient.from_connection_string(stack_env["AzureWebJobsStorage"], stack_env["RECSYS_QUEUE_NAME"]) as q:
        q.send_message(base64.b64encode(b'{"batch_id": "' + prefix.encode() + b'json", "items": [').decode())

    def failed() -> dict[str, tuple[str, int, str | None]]:
        rows = ledger(stack, prefix)
        return rows if rows.get(f"{prefix}dim/0", ("",))[0] == "failed" else {}

    rows = wait_for(failed, 30)
    status, count, error = rows[f"{prefix}dim/0"]
    assert (status, count) == ("failed", 0)
    assert error is not None and "items[0].embedding must have" in error
    # Both messages are in the poison queue, at once (no retries spent on them).
    assert wait_for(lambda: len(poisoned(stack_env, prefix)) == 2, 10), poisoned(stack_env, prefix)
    assert json.loads(next(b for b in poisoned(stack_env, prefix) if b.endswith(b"}")))["batch_id"] == f"{prefix}dim"
