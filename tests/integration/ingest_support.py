"""Shared pieces of the ingest tests: a private queue per test, delivery as the host does it, checks.

Until a test goes through the local host, it plays the Functions host itself: it receives
messages from Azurite, base64-decodes them (the default ``messageEncoding``), calls the
``loader_queue`` handler with an ``azure.functions`` ``QueueMessage``, and deletes the message
only when the handler returned (a raise leaves it in the queue for a later delivery).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.functions.queue import QueueMessage
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueClient
from azure.storage.queue import QueueMessage as StorageMessage
from pgvector.psycopg import register_vector

from recsys.config import Settings, load_settings, settings_environment
from recsys.datasets import clustered_catalogue
from recsys.ingest.messages import encode_embedding
from recsys.local import tools
from recsys.local.stack import Stack

Handler = Callable[[QueueMessage], Awaitable[None]]


def loader_handler() -> Handler:
    """``loader_queue`` as registered in ``function_app.app`` (discovered once per app)."""
    root = str(tools.project_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    import function_app
    from recsys.local.host import discover

    _, queues = discover(function_app.app)
    (function,) = [f for f in queues if f.name == "loader_queue"]
    assert function.queue_name == "%RECSYS_QUEUE_NAME%" and function.connection == "AzureWebJobsStorage"
    return function.handler  # type: ignore[no-any-return]


def raw_items(n: int, prefix: str, *, dim: int = 384, seed: int = 7, b64: bool = True) -> list[dict[str, Any]]:
    """``n`` items as a client sends them (``embedding_b64`` or JSON arrays)."""
    catalogue = clustered_catalogue(n, dim, clusters=max(1, n // 20), seed=seed, id_prefix=prefix)
    items = []
    for i, item_id in enumerate(catalogue.ids):
        vector = catalogue.vectors[i]
        item: dict[str, Any] = {
            "id": item_id,
            "category": catalogue.categories[i],
            "tags": [f"cluster-{int(catalogue.clusters[i])}"],
            "metadata": {"n": i, "title": f"item {i}"},
        }
        if b64:
            item["embedding_b64"] = encode_embedding(vector)
        else:
            item["embedding"] = [float(x) for x in vector]
        items.append(item)
    return items


@dataclass
class IngestEnv:
    """A private queue, poison queue and blob container for one test, and the stack behind them."""

    stack: Stack
    settings: Settings
    prefix: str

    @property
    def queue(self) -> QueueClient:
        return QueueClient.from_connection_string(self.settings.storage_connection, self.settings.queue_name)

    @property
    def poison(self) -> QueueClient:
        return QueueClient.from_connection_string(self.settings.storage_connection, self.settings.poison_queue_name)

    @property
    def blobs(self) -> BlobServiceClient:
        return BlobServiceClient.from_connection_string(self.settings.storage_connection)

    def send_raw(self, document: Any) -> None:
        """As a producer other than the project: plain QueueClient, base64 JSON (``API.md``)."""
        text = document if isinstance(document, str) else json.dumps(document)
        with self.queue as queue:
            queue.send_message(base64.b64encode(text.encode()).decode())

    def receive(self, visibility_timeout: int = 120) -> list[StorageMessage]:
        with self.queue as queue:
            return list(queue.receive_messages(max_messages=32, visibility_timeout=visibility_timeout))

    def release(self, message: StorageMessage) -> None:
        """Make a received message visible again at once (a failed delivery)."""
        with self.queue as queue:
            queue.update_message(message, visibility_timeout=0)

    def delete(self, message: StorageMessage) -> None:
        with self.queue as queue:
            queue.delete_message(message)

    def poisoned(self) -> list[bytes]:
        with self.poison as poison:
            return [base64.b64decode(m.content) for m in poison.peek_messages(max_messages=32)]

    def waiting(self) -> int:
        with self.queue as queue:
            return int(queue.get_queue_properties().approximate_message_count)

    # ---- the database, directly (not through the app's pools)

    def connect(self) -> psycopg.Connection[Any]:
        """The superuser over the Unix socket: it sees and cleans whatever the app's roles wrote."""
        conn = psycopg.connect(self.stack.admin_conninfo(), autocommit=True)
        register_vector(conn)
        return conn

    def rows(self) -> dict[str, tuple[Any, ...]]:
        """The test's items by id: (embedding as a tuple of floats, category, tags, metadata, updated_at)."""
        with self.connect() as conn:
            cur = conn.execute(
                "SELECT id, embedding, category, tags, metadata, updated_at FROM items WHERE starts_with(id, %s)",
                [self.prefix],
            )
            return {r[0]: (tuple(r[1].to_numpy().tolist()), *r[2:]) for r in cur}

    def versions(self) -> dict[str, int]:
        """The test's items by id: their stored version."""
        with self.connect() as conn:
            cur = conn.execute("SELECT id, version FROM items WHERE starts_with(id, %s)", [self.prefix])
            return {r[0]: r[1] for r in cur}

    def tombstones(self) -> dict[str, int]:
        with self.connect() as conn:
            cur = conn.execute("SELECT id, version FROM item_tombstones WHERE starts_with(id, %s)", [self.prefix])
            return {r[0]: r[1] for r in cur}

    def counts(self, batch_id: str) -> list[tuple[Any, ...]]:
        """Per part: (part, status, rows, deleted, stale)."""
        with self.connect() as conn:
            return conn.execute(
                "SELECT part, status, rows, deleted, stale FROM ingest_batches WHERE batch_id = %s ORDER BY part",
                [batch_id],
            ).fetchall()

    def ledger(self, batch_id: str) -> list[tuple[Any, ...]]:
        with self.connect() as conn:
            return conn.execute(
                "SELECT part, status, rows, error FROM ingest_batches WHERE batch_id = %s ORDER BY part", [batch_id]
            ).fetchall()


def to_function_message(message: StorageMessage) -> QueueMessage:
    """What the Functions host hands to the trigger: the base64-decoded body."""
    return QueueMessage(
        id=message.id, body=base64.b64decode(message.content), dequeue_count=message.dequeue_count,
        pop_receipt=message.pop_receipt, insertion_time=message.inserted_on,
    )


async def deliver_all(env: IngestEnv, handler: Handler) -> int:
    """Deliver every waiting message once, as the host does; returns how many were handled."""
    handled = 0
    while messages := env.receive():
        for message in messages:
            await handler(to_function_message(message))
            env.delete(message)
            handled += 1
    return handled


async def deliver_until_empty(env: IngestEnv, handler: Handler, attempts: int = 60) -> int:
    """Deliver until the queue is empty; a delivery that raises comes back, as with the host.

    Returns the number of deliveries made (failed ones included).
    """
    deliveries = 0
    for _ in range(attempts):
        messages = env.receive()
        if not messages:
            return deliveries
        for message in messages:
            deliveries += 1
            try:
                await handler(to_function_message(message))
            except Exception:
                env.release(message)
                await asyncio.sleep(0.5)
            else:
                env.delete(message)
    raise AssertionError(f"messages still waiting after {attempts} rounds of delivery")


@pytest.fixture
def ingest_env(stack: Stack, stack_env: dict[str, str]) -> Iterator[IngestEnv]:
    """Settings pointing at a queue and container of this test alone; cleans up after it."""
    token = uuid.uuid4().hex[:10]
    private = {"RECSYS_QUEUE_NAME": f"ingest-{token}", "RECSYS_BLOB_CONTAINER": f"ingest-{token}"}
    with settings_environment(private):
        env = IngestEnv(stack=stack, settings=load_settings(os.environ), prefix=f"t{token}-")
        for client in (env.queue, env.poison):  # as the host's queue listener does when it starts
            with client:
                client.create_queue()
        try:
            yield env
        finally:
            _clean_up(env)


def _clean_up(env: IngestEnv) -> None:
    for client in (env.queue, env.poison):
        with client, contextlib.suppress(ResourceNotFoundError):
            client.delete_queue()
    with env.blobs as blobs, contextlib.suppress(ResourceNotFoundError):
        blobs.delete_container(env.settings.blob_container)
    with env.connect() as conn:
        forget(conn, env.prefix)


@contextlib.contextmanager
def id_prefix(stack: Stack, letter: str) -> Iterator[str]:
    """A fresh id and batch id prefix for one test; its rows and ledger entries are deleted after it."""
    token = f"{letter}{uuid.uuid4().hex[:10]}-"
    yield token
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        forget(conn, token)


def forget(conn: psycopg.Connection[Any], prefix: str) -> None:
    """Delete the items, tombstones and ledger rows whose ids start with ``prefix``."""
    conn.execute("DELETE FROM items WHERE starts_with(id, %s)", [prefix])
    conn.execute("DELETE FROM item_tombstones WHERE starts_with(id, %s)", [prefix])
    conn.execute("DELETE FROM ingest_batches WHERE starts_with(batch_id, %s)", [prefix])


def count_items(stack: Stack, prefix: str) -> int:
    """Rows of ``items`` whose id starts with ``prefix``."""
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM items WHERE starts_with(id, %s)", [prefix]).fetchone()
        return int(row[0]) if row else 0
