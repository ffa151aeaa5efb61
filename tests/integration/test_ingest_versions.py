"""Versions and deletes through the queue-triggered loader, against the real stack.

The test plays the Functions host (see ``ingest_support``): messages are sent to Azurite as a
producer would, received, handed to ``loader_queue`` in the order the test chooses (the
orders at-least-once delivery can produce), and deleted once handled.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest
from ingest_support import IngestEnv, deliver_all, ingest_env, loader_handler, raw_items, to_function_message

from recsys.ingest.messages import MAX_PART_BYTES, MAX_PART_ENTRIES, parse_item
from recsys.ingest.producer import enqueue_document

pytestmark = pytest.mark.integration
__all__ = ["ingest_env"]


def versioned(raw: dict[str, object], version: int, **changes: object) -> dict[str, object]:
    return {**raw, **changes, "version": version}


def embedding_of(env: IngestEnv, item_id: str) -> tuple[float, ...]:
    return env.rows()[item_id][0]


def expected_embedding(raw: dict[str, object]) -> tuple[float, ...]:
    return tuple(parse_item(raw, 384, "item").embedding.tolist())


async def test_out_of_order_versions_and_a_delete_converge_to_the_newest(
    ingest_env: IngestEnv, app_pools: None
) -> None:
    env = ingest_env
    handler = loader_handler()
    one, two = raw_items(2, env.prefix, b64=False)
    item_id = str(one["id"])
    newer, older = versioned(one, 2, category="v2"), versioned(two, 1, id=item_id, category="v1")

    env.send_raw({"batch_id": f"{env.prefix}v2", "items": [newer]})
    assert await deliver_all(env, handler) == 1
    env.send_raw({"batch_id": f"{env.prefix}v1", "items": [older]})  # arrives after v2
    assert await deliver_all(env, handler) == 1

    assert env.versions() == {item_id: 2}
    assert env.rows()[item_id][1] == "v2" and embedding_of(env, item_id) == expected_embedding(newer)
    assert env.counts(f"{env.prefix}v2") == [(0, "loaded", 1, 0, 0)]
    assert env.counts(f"{env.prefix}v1") == [(0, "loaded", 0, 0, 1)]  # ignored, counted stale

    env.send_raw({"batch_id": f"{env.prefix}d3", "delete": [{"id": item_id, "version": 3}]})
    assert await deliver_all(env, handler) == 1
    env.send_raw({"batch_id": f"{env.prefix}u2", "items": [versioned(one, 2, category="back")]})
    assert await deliver_all(env, handler) == 1

    assert env.versions() == {}  # stays deleted
    assert env.tombstones() == {item_id: 3}
    assert env.counts(f"{env.prefix}d3") == [(0, "loaded", 0, 1, 0)]
    assert env.counts(f"{env.prefix}u2") == [(0, "loaded", 0, 0, 1)]

    # A delete at an equal version is stale too; an upsert above the tombstone brings it back.
    env.send_raw({"batch_id": f"{env.prefix}d3b", "delete": [{"id": item_id, "version": 3}]})
    env.send_raw({"batch_id": f"{env.prefix}u4", "items": [versioned(one, 4, category="v4")]})
    assert await deliver_all(env, handler) == 2
    assert env.counts(f"{env.prefix}d3b") == [(0, "loaded", 0, 0, 1)]
    assert env.versions() == {item_id: 4} and env.rows()[item_id][1] == "v4"


async def test_a_delete_older_than_the_item_is_stale_and_leaves_no_tombstone(
    ingest_env: IngestEnv, app_pools: None
) -> None:
    env = ingest_env
    (raw,) = raw_items(1, env.prefix)
    env.send_raw({"batch_id": f"{env.prefix}u5", "items": [versioned(raw, 5)]})
    env.send_raw({"batch_id": f"{env.prefix}d4", "delete": [{"id": raw["id"], "version": 4}]})
    assert await deliver_all(env, loader_handler()) == 2
    assert env.versions() == {raw["id"]: 5}
    assert env.tombstones() == {}
    assert env.counts(f"{env.prefix}d4") == [(0, "loaded", 0, 0, 1)]


async def test_an_id_deleted_several_times_in_one_message_is_deleted_once_at_its_highest_version(
    ingest_env: IngestEnv, app_pools: None
) -> None:
    env = ingest_env
    handler = loader_handler()
    gone, kept = raw_items(2, env.prefix)
    env.send_raw({"batch_id": f"{env.prefix}u5", "items": [versioned(gone, 5), versioned(kept, 5)]})
    assert await deliver_all(env, handler) == 1

    deletes = [{"id": gone["id"], "version": 4}, {"id": kept["id"], "version": 3}, {"id": gone["id"], "version": 7},
               {"id": kept["id"], "version": 5}, {"id": gone["id"], "version": 6}]
    env.send_raw({"batch_id": f"{env.prefix}d", "delete": deletes})
    assert await deliver_all(env, handler) == 1
    assert env.versions() == {kept["id"]: 5}
    assert env.tombstones() == {gone["id"]: 7}
    assert env.counts(f"{env.prefix}d") == [(0, "loaded", 0, 1, 4)]

    # Sent again at the tombstone's version, both deletions are stale; an upsert below it too.
    again = [{"id": gone["id"], "version": 7}, {"id": gone["id"], "version": 7}]
    env.send_raw({"batch_id": f"{env.prefix}d7", "delete": again, "items": [versioned(kept, 6)]})
    env.send_raw({"batch_id": f"{env.prefix}u6", "items": [versioned(gone, 6)]})
    assert await deliver_all(env, handler) == 2
    assert env.counts(f"{env.prefix}d7") == [(0, "loaded", 1, 0, 2)]
    assert env.counts(f"{env.prefix}u6") == [(0, "loaded", 0, 0, 1)]
    assert env.versions() == {kept["id"]: 6} and env.tombstones() == {gone["id"]: 7}


async def test_an_id_upserted_several_times_in_one_message_is_written_once_by_its_latest_entry(
    ingest_env: IngestEnv, app_pools: None
) -> None:
    env = ingest_env
    handler = loader_handler()
    first, second, third = raw_items(3, env.prefix)
    ranked, unversioned = str(first["id"]), str(second["id"])
    tie = {**third, "id": ranked}
    items = [versioned(first, 3, category="v3"), {**second, "category": "first"}, versioned(first, 5, category="v5"),
             versioned(tie, 4, category="v4"), {**second, "category": "second"}, versioned(tie, 5, category="v5 again")]
    env.send_raw({"batch_id": f"{env.prefix}r", "items": items})
    (message,) = env.receive()
    await handler(to_function_message(message))
    await handler(to_function_message(message))  # delivered twice
    env.delete(message)

    # The highest version wins, the last of two at that version; without versions, the last.
    rows = env.rows()
    assert rows[ranked][1] == "v5 again" and embedding_of(env, ranked) == expected_embedding(tie)
    assert rows[unversioned][1] == "second"
    assert env.versions() == {ranked: 5, unversioned: int(message.inserted_on.timestamp() * 1_000_000)}
    assert env.counts(f"{env.prefix}r") == [(0, "loaded", 2, 0, 4)]

    # Below the stored version, every entry of the id is stale.
    env.send_raw({"batch_id": f"{env.prefix}r4", "items": [versioned(first, 4), versioned(first, 2)]})
    assert await deliver_all(env, handler) == 1
    assert env.counts(f"{env.prefix}r4") == [(0, "loaded", 0, 0, 2)] and env.versions()[ranked] == 5


async def test_the_producer_sends_only_the_latest_entry_of_a_repeated_id_whatever_the_parts(
    ingest_env: IngestEnv, app_pools: None
) -> None:
    env = ingest_env
    a, b, c = raw_items(3, env.prefix)
    items = [{**a, "category": "a1"}, versioned(c, 10, category="c1"), b, {**a, "category": "a2"},
             versioned(c, 10, category="c2"), versioned(c, 9, category="c0")]
    enqueued = await enqueue_document({"batch_id": f"{env.prefix}p", "items": items}, settings=env.settings,
                                      part_items=1)
    assert (enqueued.items, enqueued.messages) == (6, 3)
    messages = env.receive()
    assert sorted(len(json.loads(base64.b64decode(m.content))["items"]) for m in messages) == [1, 1, 1]
    handler = loader_handler()
    for message in messages:  # in the order sent: the entries that lose would come first
        await handler(to_function_message(message))
        env.delete(message)

    rows = env.rows()
    assert (rows[str(a["id"])][1], rows[str(c["id"])][1]) == ("a2", "c2")
    assert env.versions()[str(c["id"])] == 10
    counts = env.counts(f"{env.prefix}p")
    assert [row[1] for row in counts] == ["loaded"] * 3
    assert (sum(row[2] for row in counts), sum(row[4] for row in counts)) == (3, 3)


async def test_an_old_message_redelivered_after_a_newer_one_changes_nothing(
    ingest_env: IngestEnv, app_pools: None
) -> None:
    env = ingest_env
    first = raw_items(20, env.prefix, seed=1)
    second = raw_items(20, env.prefix, seed=2)  # same ids, other vectors
    await enqueue_document({"batch_id": f"{env.prefix}old", "items": first}, settings=env.settings)
    await enqueue_document({"batch_id": f"{env.prefix}new", "items": second}, settings=env.settings)
    by_batch = {json.loads(base64.b64decode(m.content))["batch_id"]: m for m in env.receive()}
    old, new = by_batch[f"{env.prefix}old"], by_batch[f"{env.prefix}new"]
    handler = loader_handler()

    await handler(to_function_message(new))
    await handler(to_function_message(old))  # the older message, delivered late
    await handler(to_function_message(old))  # and again

    rows = env.rows()
    assert {i: rows[str(r["id"])][0] for i, r in enumerate(second)} == {
        i: expected_embedding(r) for i, r in enumerate(second)
    }
    assert env.counts(f"{env.prefix}new") == [(0, "loaded", 20, 0, 0)]
    assert env.counts(f"{env.prefix}old") == [(0, "loaded", 0, 0, 20)]


async def test_writes_without_versions_take_the_insertion_time_of_their_message(
    ingest_env: IngestEnv, app_pools: None
) -> None:
    env = ingest_env
    (raw,) = raw_items(1, env.prefix, b64=False)
    env.send_raw({"batch_id": f"{env.prefix}t1", "items": [{**raw, "category": "first"}]})
    time.sleep(1.1)  # Azure Storage stamps insertion times to the second
    env.send_raw({"batch_id": f"{env.prefix}t2", "items": [{**raw, "category": "second"}]})
    first, second = sorted(env.receive(), key=lambda m: m.inserted_on)
    handler = loader_handler()

    await handler(to_function_message(second))
    await handler(to_function_message(first))
    for message in (first, second):
        env.delete(message)

    assert env.rows()[str(raw["id"])][1] == "second"
    assert env.versions()[str(raw["id"])] == int(second.inserted_on.timestamp() * 1_000_000)
    assert env.counts(f"{env.prefix}t1") == [(0, "loaded", 0, 0, 1)]


@pytest.mark.parametrize("old_first", [True, False], ids=["old-message-first", "new-message-first"])
async def test_a_batch_id_sent_again_ends_with_its_new_content(
    ingest_env: IngestEnv, app_pools: None, old_first: bool
) -> None:
    env = ingest_env
    batch_id = f"{env.prefix}again"
    old_items, new_items = raw_items(30, env.prefix, seed=1), raw_items(30, env.prefix, seed=2)
    await enqueue_document({"batch_id": batch_id, "items": old_items}, settings=env.settings)
    (old,) = env.receive()
    await enqueue_document({"batch_id": batch_id, "items": new_items}, settings=env.settings)
    (new,) = env.receive()
    handler = loader_handler()

    order = [old, new, old] if old_first else [new, old, old]  # the old message redelivered late
    for message in order:
        await handler(to_function_message(message))

    rows = env.rows()
    assert all(rows[str(r["id"])][0] == expected_embedding(r) for r in new_items)
    assert env.counts(batch_id) == [(0, "loaded", 30, 0, 0)]


async def test_a_blob_part_over_the_byte_limit_fails_before_it_is_read(ingest_env: IngestEnv, app_pools: None) -> None:
    env = ingest_env
    container, name = env.settings.blob_container, "big/part.json"
    with env.blobs as blobs:
        blobs.create_container(container)
        blobs.get_blob_client(container, name).upload_blob(b" " * (MAX_PART_BYTES + 1))
    env.send_raw({"batch_id": f"{env.prefix}huge", "blob": f"{container}/{name}"})

    assert await deliver_all(env, loader_handler()) == 1

    ((_part, status, _, error),) = env.ledger(f"{env.prefix}huge")
    assert status == "failed"
    assert error == (f"blob {container}/{name} is {MAX_PART_BYTES + 1} bytes, more than the limit of "
                     f"{MAX_PART_BYTES} bytes for one part; split the batch into smaller parts")
    assert len(env.poisoned()) == 1


async def test_a_blob_part_over_the_entry_limit_fails_and_writes_nothing(
    ingest_env: IngestEnv, app_pools: None
) -> None:
    env = ingest_env
    kept = raw_items(3, env.prefix)
    env.send_raw({"batch_id": f"{env.prefix}kept", "items": [versioned(r, 1) for r in kept]})
    assert await deliver_all(env, loader_handler()) == 1
    doc = {
        "batch_id": f"{env.prefix}many",
        "items": [versioned(r, 9) for r in raw_items(2, env.prefix + "new-")],
        "delete": [{"id": str(r["id"]), "version": 9} for r in kept]
        + [f"{env.prefix}absent-{i}" for i in range(MAX_PART_ENTRIES)],
    }
    container, name = env.settings.blob_container, "many/part.json"
    with env.blobs as blobs:
        blobs.create_container(container)
        blobs.get_blob_client(container, name).upload_blob(json.dumps(doc).encode())
    env.send_raw({"batch_id": f"{env.prefix}many", "blob": f"{container}/{name}"})

    assert await deliver_all(env, loader_handler()) == 1

    ((_, status, _, error),) = env.ledger(f"{env.prefix}many")
    assert status == "failed"
    assert error == f"items and delete must hold at most {MAX_PART_ENTRIES} entries in all, got {MAX_PART_ENTRIES + 5}"
    assert sorted(env.versions()) == sorted(str(r["id"]) for r in kept)  # nothing deleted, nothing added
    assert env.tombstones() == {}


async def test_deletes_racing_upserts_of_the_same_ids_never_leave_an_item_behind_its_tombstone(
    ingest_env: IngestEnv, app_pools: None
) -> None:
    from recsys.ingest.loader import process_message

    env = ingest_env
    items = raw_items(200, env.prefix)
    ids = [str(r["id"]) for r in items]
    upsert = json.dumps({"batch_id": f"{env.prefix}up", "items": [versioned(r, 5) for r in items]}).encode()
    delete = json.dumps({"batch_id": f"{env.prefix}del", "delete": [{"id": i, "version": 6} for i in ids]}).encode()
    older = json.dumps({"batch_id": f"{env.prefix}up4", "items": [versioned(r, 4) for r in items]}).encode()

    await asyncio.gather(process_message(upsert), process_message(delete), process_message(older))

    assert env.versions() == {}
    assert env.tombstones() == dict.fromkeys(ids, 6)
