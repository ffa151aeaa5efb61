"""The queue-triggered loader against the real stack (Azurite, PgBouncer, PostgreSQL).

The test plays the Functions host (see ``ingest_support``): receive, decode, call
``loader_queue``, delete on return.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time

import psycopg
import pytest
from azure.functions.queue import QueueMessage
from ingest_support import (
    IngestEnv,
    deliver_all,
    deliver_until_empty,
    ingest_env,
    loader_handler,
    raw_items,
    to_function_message,
)

from recsys.ingest import loader
from recsys.ingest.loader import process_message
from recsys.ingest.messages import QUEUE_MESSAGE_MAX_BYTES, parse_item
from recsys.ingest.producer import enqueue_document
from recsys.local.stack import BOUNCER_QUERY_WAIT_TIMEOUT

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


def _fault_documents(env: IngestEnv) -> dict[str, tuple[str, str]]:
    """Permanent faults: name -> (message text as sent, expected reason fragment)."""
    good = raw_items(2, env.prefix, b64=False)

    def batch(name: str, items: list[dict[str, object]]) -> str:
        return json.dumps({"batch_id": f"{env.prefix}{name}", "items": items})  # NaN/Infinity as Python writes them

    short = {**good[1], "embedding": [0.5, 0.25, 1.0]}
    nan = {**good[1], "embedding": [float("nan"), *good[1]["embedding"][1:]]}  # type: ignore[index]
    inf = {**good[1], "embedding": [*good[1]["embedding"][:-1], float("inf")]}  # type: ignore[index]
    long_id = {**good[1], "id": env.prefix + "x" * 128}
    container = env.settings.blob_container
    return {
        "wrong-dimension": (batch("wrong-dimension", [good[0], short]), "items[1].embedding must have 384 dimensions"),
        "nan": (batch("nan", [good[0], nan]), "items[1].embedding must contain only finite numbers"),
        "infinity": (batch("infinity", [good[0], inf]), "items[1].embedding must contain only finite numbers"),
        "id-too-long": (batch("id-too-long", [good[0], long_id]), "items[1].id must be 1 to 128 characters"),
        "missing-blob": (
            json.dumps({"batch_id": f"{env.prefix}missing-blob", "blob": f"{container}/nowhere.json"}),
            f"blob {container}/nowhere.json not found",
        ),
        "malformed-blob": (
            json.dumps({"batch_id": f"{env.prefix}malformed-blob", "blob": f"{container}/malformed.json"}),
            f"blob {container}/malformed.json is not valid JSON",
        ),
    }


@pytest.mark.parametrize(
    "fault", ["wrong-dimension", "nan", "infinity", "id-too-long", "missing-blob", "malformed-blob"]
)
async def test_a_permanent_fault_fails_the_batch_and_poisons_the_message_at_once(
    ingest_env: IngestEnv, app_pools: None, fault: str
) -> None:
    env = ingest_env
    text, reason = _fault_documents(env)[fault]
    if fault == "malformed-blob":
        with env.blobs as blobs:
            blobs.create_container(env.settings.blob_container)
            blobs.get_blob_client(env.settings.blob_container, "malformed.json").upload_blob(b'{"items": [{"id": ')
    env.send_raw(text)

    assert await deliver_all(env, loader_handler()) == 1  # returned normally: the host deletes it

    assert env.waiting() == 0
    assert env.poisoned() == [text.encode()]
    ((part, status, rows, error),) = env.ledger(f"{env.prefix}{fault}")
    assert (part, status, rows) == (0, "failed", 0)
    assert reason in error
    assert env.rows() == {}  # the valid item of the batch was not written either


async def test_a_message_that_is_not_json_goes_to_poison_at_once(ingest_env: IngestEnv, app_pools: None) -> None:
    env = ingest_env
    env.send_raw("this is not {json")

    assert await deliver_all(env, loader_handler()) == 1

    assert env.waiting() == 0
    assert env.poisoned() == [b"this is not {json"]


async def test_a_failed_batch_reports_its_reason_and_other_messages_still_load(
    ingest_env: IngestEnv, app_pools: None
) -> None:
    env = ingest_env
    good = raw_items(3, env.prefix)
    await enqueue_document({"batch_id": f"{env.prefix}good", "items": good}, settings=env.settings)
    env.send_raw(_fault_documents(env)["wrong-dimension"][0])
    await enqueue_document({"batch_id": f"{env.prefix}good-too", "items": raw_items(3, env.prefix + "b")},
                           settings=env.settings)

    assert await deliver_all(env, loader_handler()) == 3

    assert env.ledger(f"{env.prefix}good") == [(0, "loaded", 3, None)]
    assert env.ledger(f"{env.prefix}good-too") == [(0, "loaded", 3, None)]
    assert env.ledger(f"{env.prefix}wrong-dimension")[0][1] == "failed"
    assert len(env.rows()) == 6


async def test_two_deliveries_at_once_one_loads_the_other_finds_it_loaded(
    ingest_env: IngestEnv, app_pools: None
) -> None:
    env = ingest_env
    await enqueue_document({"batch_id": f"{env.prefix}race", "items": raw_items(50, env.prefix)}, settings=env.settings)
    (message,) = env.receive()
    body = base64.b64decode(message.content)

    outcomes = await asyncio.gather(process_message(body), process_message(body))

    assert sorted(o.status for o in outcomes) == ["loaded", "skipped"]
    assert env.ledger(f"{env.prefix}race") == [(0, "loaded", 50, None)]


async def test_a_producer_other_than_the_project_is_loaded_the_same_way(
    ingest_env: IngestEnv, app_pools: None
) -> None:
    env = ingest_env
    items = raw_items(3, env.prefix, b64=False)
    items[0]["id"] = 12345  # a JSON integer id is taken as its decimal string
    env.send_raw({"batch_id": f"{env.prefix}ext-0001", "items": items})

    assert await deliver_all(env, loader_handler()) == 1

    assert env.ledger(f"{env.prefix}ext-0001") == [(0, "loaded", 3, None)]
    rows = env.rows()
    assert sorted(rows) == sorted(str(i["id"]) for i in items[1:])  # the prefix-less integer id aside
    with env.connect() as conn:
        assert conn.execute("SELECT count(*) FROM items WHERE id = '12345'").fetchone() == (1,)
        conn.execute("DELETE FROM items WHERE id = '12345'")


async def test_messages_waiting_while_the_database_is_down_are_sent_again_later_and_load(
    ingest_env: IngestEnv, app_pools: None
) -> None:
    env = ingest_env
    await enqueue_document({"batch_id": f"{env.prefix}a", "items": raw_items(3, env.prefix + "a")},
                           settings=env.settings)
    await enqueue_document({"batch_id": f"{env.prefix}b", "items": raw_items(300, env.prefix + "b")},
                           settings=env.settings)
    env.send_raw({"batch_id": f"{env.prefix}c", "items": raw_items(2, env.prefix + "c", b64=False)})
    handler = loader_handler()

    env.stack.stop_postgres()
    try:
        messages = env.receive()
        assert len(messages) == 3
        started = time.monotonic()
        results = await asyncio.gather(*(handler(to_function_message(m)) for m in messages), return_exceptions=True)
        # Transient: every delivery returned normally after sending a delayed copy of its message,
        # so the host deletes the originals without counting a failed attempt.
        assert results == [None, None, None], results
        # Within the connect timeout (2 s here) and the retry's own work: a new connection is
        # checked before the load, where PgBouncer would hold its first statement for its
        # query_wait_timeout.
        assert time.monotonic() - started < BOUNCER_QUERY_WAIT_TIMEOUT / 2
        for message in messages:
            env.delete(message)
        assert env.waiting() == 3
    finally:
        env.stack.start_postgres()

    assert env.poisoned() == []
    await asyncio.sleep(2.5)  # the first retry's delay: 1 to 2 s
    copies = env.receive()
    assert len(copies) == 3
    bodies = [json.loads(base64.b64decode(m.content)) for m in copies]
    assert all(b["retry"]["attempt"] == 1 and b["retry"]["error"] for b in bodies), bodies
    by_batch = {b["batch_id"]: b for b in bodies}
    original = messages[[json.loads(base64.b64decode(m.content))["batch_id"] for m in messages].index(
        f"{env.prefix}c")]
    # The foreign producer's message keeps its first delivery's id and insertion time (its version).
    assert by_batch[f"{env.prefix}c"]["origin"] == {
        "message_id": original.id, "inserted_us": int(original.inserted_on.timestamp() * 1_000_000)
    }
    for copy in copies:
        env.release(copy)
    assert await deliver_until_empty(env, handler) == 3
    assert [env.ledger(f"{env.prefix}{b}")[0][1:3] for b in "abc"] == [("loaded", 3), ("loaded", 300), ("loaded", 2)]
    assert len(env.rows()) == 305


async def load_directly(message: QueueMessage) -> None:
    """The loader without the queue function's retry: a transient fault raises."""
    await process_message(message.get_body(), message_id=message.id, inserted_at=message.insertion_time)


async def test_a_load_whose_backend_is_terminated_leaves_nothing_and_loads_fully_when_redelivered(
    ingest_env: IngestEnv, app_pools: None
) -> None:
    env = ingest_env
    items = raw_items(1000, env.prefix)
    await enqueue_document({"batch_id": f"{env.prefix}cut", "items": items}, settings=env.settings)
    (message,) = env.receive()
    handler = load_directly
    admin = env.stack.admin_conninfo()

    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as locker, \
            await psycopg.AsyncConnection.connect(admin, autocommit=True) as watcher:
        # Hold a lock that the upsert into items must wait for: the loader's transaction then sits
        # with its ledger row claimed and its 1000 rows COPYed into staging, deterministically.
        await locker.execute("BEGIN")
        await locker.execute("LOCK TABLE items IN SHARE MODE")
        load = asyncio.create_task(handler(to_function_message(message)))
        pid = None
        for _ in range(600):
            cur = await watcher.execute(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                ["%INSERT INTO items%ingest_staging%"],
            )
            row = await cur.fetchone()
            if row is not None:
                pid = row[0]
                break
            await asyncio.sleep(0.05)
        assert pid is not None, "the loader never reached the upsert"
        await watcher.execute("SELECT pg_terminate_backend(%s)", [pid])
        with pytest.raises(psycopg.OperationalError):
            await load
        await locker.execute("ROLLBACK")

    assert env.rows() == {}
    assert env.ledger(f"{env.prefix}cut") == [(0, "queued", 0, None)]  # the producer's row, as it was

    await handler(to_function_message(message))  # the host delivers it again

    assert env.ledger(f"{env.prefix}cut") == [(0, "loaded", 1000, None)]
    assert_rows_match(env, items)


async def test_a_load_whose_backend_is_terminated_mid_copy_leaves_nothing_and_loads_fully_when_redelivered(
    ingest_env: IngestEnv, app_pools: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = ingest_env
    total = 5000  # one part, whose COPY is held halfway below
    items = raw_items(total, env.prefix)
    await enqueue_document({"batch_id": f"{env.prefix}mid", "items": items}, settings=env.settings)
    (message,) = env.receive()
    handler = load_directly
    caught: list[int] = []
    stop = threading.Event()
    terminated = threading.Event()
    rows_of = loader.part_rows

    def held_halfway(*args: object, **kwargs: object) -> object:
        # The rows stream as the loader writes them; halfway, with the first half sent to the
        # server, the source waits until the watcher has ended the backend, so the COPY is caught
        # partway through however fast the machine is.
        for n, row in enumerate(rows_of(*args, **kwargs)):  # type: ignore[arg-type]
            if n == total // 2:
                terminated.wait(30)
            yield row

    monkeypatch.setattr(loader, "part_rows", held_halfway)

    def terminate_mid_copy() -> None:
        # A thread of its own polls COPY progress while the loader streams rows on the test's
        # event loop, and ends the loader's backend as soon as the COPY is partway through.
        with psycopg.connect(env.stack.admin_conninfo(), autocommit=True) as watcher:
            while not stop.is_set():
                row = watcher.execute(
                    "SELECT p.pid, p.tuples_processed FROM pg_stat_progress_copy p"
                    " JOIN pg_stat_activity a USING (pid) WHERE p.type = 'PIPE' AND a.usename = 'recsys_loader'"
                    " AND p.tuples_processed BETWEEN 1 AND %s",
                    [total - 1],
                ).fetchone()
                if row is not None:
                    watcher.execute("SELECT pg_terminate_backend(%s)", [row[0]])
                    caught.append(int(row[1]))
                    terminated.set()
                    return

    watcher = threading.Thread(target=terminate_mid_copy)
    watcher.start()
    try:
        with pytest.raises(psycopg.OperationalError):
            await handler(to_function_message(message))
    finally:
        stop.set()
        terminated.set()
        watcher.join(30)
    assert caught and 0 < caught[0] < total, caught  # terminated with the COPY partway through
    assert env.rows() == {}
    assert env.ledger(f"{env.prefix}mid") == [(0, "queued", 0, None)]

    await handler(to_function_message(message))  # the host delivers it again

    assert env.ledger(f"{env.prefix}mid") == [(0, "loaded", total, None)]
    assert_rows_match(env, items)
