"""The queue-triggered loader against the real stack (Azurite, PgBouncer, PostgreSQL).

The test plays the Functions host (see ``ingest_support``): receive, decode, call
``loader_queue``, delete on return.
"""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from ingest_support import IngestEnv, deliver_all, ingest_env, loader_handler, raw_items, to_function_message

from recsys.ingest.messages import QUEUE_MESSAGE_MAX_BYTES, parse_item
from recsys.ingest.producer import enqueue_document

pytestmark = pytest.mark.integration
__all__ = ["ingest_env"]


def assert_rows_match(env: IngestEnv, items: list[dict[str, object]]) -> None:
    rows = env.rows()
    assert sorted(rows) == sorted(str(i["id"]) for i in items)
    for raw in items:
        item = parse_item(raw, 384, "item")
        embedding, category, tags, metadata, _ = rows[item.id]
        assert embedding == tuple(item.embedding.tolist())
        assert (category, tags, metadata) == (item.category, item.tags, item.metadata)


async def test_an_enqueued_batch_loads_and_reports_loaded(ingest_env: IngestEnv, app_pools: None) -> None:
    env = ingest_env
    items = raw_items(5, env.prefix, b64=False)
    enqueued = await enqueue_document({"batch_id": f"{env.prefix}small", "items": items}, settings=env.settings)
    assert (enqueued.batch_id, enqueued.items, enqueued.messages, enqueued.blobs) == (f"{env.prefix}small", 5, 1, 0)
    assert env.ledger(enqueued.batch_id) == [(0, "queued", 0, None)]

    assert await deliver_all(env, loader_handler()) == 1

    assert env.ledger(enqueued.batch_id) == [(0, "loaded", 5, None)]
    assert_rows_match(env, items)
    assert env.poisoned() == []


async def test_a_batch_over_64_kib_travels_through_blob_storage(ingest_env: IngestEnv, app_pools: None) -> None:
    env = ingest_env
    items = raw_items(300, env.prefix)  # ~650 KB of JSON
    assert len(json.dumps(items)) > QUEUE_MESSAGE_MAX_BYTES
    enqueued = await enqueue_document({"batch_id": f"{env.prefix}big", "items": items}, settings=env.settings)
    assert (enqueued.messages, enqueued.blobs) == (1, 1)

    (message,) = env.receive()
    assert len(message.content) < 1024  # a claim-check, not the batch
    pointer = json.loads(base64.b64decode(message.content))
    container, name = pointer["blob"].split("/", 1)
    assert container == env.settings.blob_container
    with env.blobs as blobs:
        stored = json.loads(blobs.get_blob_client(container, name).download_blob().readall())
    assert [i["id"] for i in stored["items"]] == [i["id"] for i in items]

    await loader_handler()(to_function_message(message))
    env.delete(message)

    assert env.ledger(enqueued.batch_id) == [(0, "loaded", 300, None)]
    assert_rows_match(env, items)
    with env.blobs as blobs:  # loaded: the claim-check blob is no longer needed
        assert not blobs.get_blob_client(container, name).exists()


async def test_a_message_delivered_twice_in_turn_loads_once(ingest_env: IngestEnv, app_pools: None) -> None:
    env = ingest_env
    items = raw_items(4, env.prefix)
    await enqueue_document({"batch_id": f"{env.prefix}twice", "items": items}, settings=env.settings)
    (message,) = env.receive()
    handler = loader_handler()

    await handler(to_function_message(message))
    first = env.rows()
    await handler(to_function_message(message))  # the host lost the delete: delivered again

    assert env.rows() == first  # not rewritten: same updated_at
    assert env.ledger(f"{env.prefix}twice") == [(0, "loaded", 4, None)]


async def test_a_blob_message_delivered_again_after_its_blob_is_gone_is_a_no_op(
    ingest_env: IngestEnv, app_pools: None
) -> None:
    env = ingest_env
    items = raw_items(100, env.prefix)
    await enqueue_document({"batch_id": f"{env.prefix}late", "items": items}, settings=env.settings)
    (message,) = env.receive()
    handler = loader_handler()
    await handler(to_function_message(message))
    await handler(to_function_message(message))

    assert env.ledger(f"{env.prefix}late") == [(0, "loaded", 100, None)]
    assert env.poisoned() == []


async def test_a_message_delivered_twice_at_once_loads_once(ingest_env: IngestEnv, app_pools: None) -> None:
    env = ingest_env
    items = raw_items(200, env.prefix)
    await enqueue_document({"batch_id": f"{env.prefix}both", "items": items}, settings=env.settings)
    (message,) = env.receive()
    handler = loader_handler()

    await asyncio.gather(handler(to_function_message(message)), handler(to_function_message(message)))

    assert env.ledger(f"{env.prefix}both") == [(0, "loaded", 200, None)]
    assert_rows_match(env, items)
    assert env.poisoned() == []
