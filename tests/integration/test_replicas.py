"""Reads served by a streaming standby, through libpq's multi-host URL, on a stack of their own.

The stack has one standby (``StackConfig(replicas=1)``): PostgreSQL copied by ``pg_basebackup``
and streaming the primary's WAL, behind a PgBouncer of its own. The function app is served by the
local host with the stack's settings: the query path lists the standby's PgBouncer, then the
primary's (``target_session_attrs=prefer-standby``); the loader, the ledger and the batch status
use the primary. Faults are real: the primary's PostgreSQL is stopped, then the whole standby.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg.types.json import Jsonb
from stack_support import stack_folder

from recsys.config import settings_environment
from recsys.datasets import clustered_catalogue
from recsys.db.pool import close_pools, get_pool
from recsys.local.replicas import Replica
from recsys.local.stack import Stack, StackConfig, free_port

pytestmark = pytest.mark.integration

#: Seconds a request waits for a pooled connection (and connects) in this module; the fallback
#: bounds below are stated in these terms.
POOL_TIMEOUT = 3.0
CONNECT_TIMEOUT = 2
#: A generous bound for a change committed on the primary to reach the standby here.
REPLICATION_BOUND = 20.0
SIZE = 300


@pytest.fixture(scope="module")
def replicated() -> Iterator[Stack]:
    """A stack with one standby, a small catalogue loaded on the primary and seen by the standby."""
    with stack_folder("replicated") as root:
        stack = Stack(StackConfig.ephemeral(root, replicas=1))
        try:
            stack.up()
            _load_catalogue(stack)
            _wait_replayed(stack)
            yield stack
        finally:
            stack.down()


@pytest.fixture(scope="module")
def host(replicated: Stack) -> Iterator[str]:
    """``function_app.app`` served with the replicated stack's settings (HTTP and the loader queue)."""
    from recsys.local.cli import build_host
    from recsys.local.host import serve_in_thread

    env = {
        **replicated.app_environment(),
        "RECSYS_POOL_TIMEOUT": str(POOL_TIMEOUT),
        "RECSYS_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT),
    }
    with settings_environment(env), serve_in_thread(build_host(), free_port()) as url:
        yield url


def _standby(stack: Stack) -> Replica:
    (replica,) = stack.replicas()
    return replica


def _load_catalogue(stack: Stack) -> None:
    catalogue = clustered_catalogue(SIZE, stack.config.embedding_dim, clusters=5, seed=11, id_prefix="r-")
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        register_vector(conn)
        statement = "COPY items (id, embedding, category, metadata) FROM STDIN WITH (FORMAT BINARY)"
        with conn.cursor().copy(statement) as copy:
            copy.set_types(["text", "vector", "text", "jsonb"])
            for i, (item_id, vector, category) in enumerate(
                zip(catalogue.ids, catalogue.vectors, catalogue.categories, strict=True)
            ):
                copy.write_row((item_id, vector, category, Jsonb({"n": i})))
        conn.execute("ANALYZE items")


def _wait_replayed(stack: Stack) -> float:
    """Seconds until the standby has replayed everything the primary has inserted into its WAL so far."""
    started = time.monotonic()
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as primary:
        row = primary.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    with psycopg.connect(_standby(stack).admin_conninfo(), autocommit=True) as standby:
        while True:
            done = standby.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [row[0]]).fetchone()
            if done and done[0]:
                return time.monotonic() - started
            assert time.monotonic() - started < REPLICATION_BOUND, "the standby did not catch up"
            time.sleep(0.02)


def _queries_through(admin_url: str) -> int:
    """Queries PgBouncer has passed to the ``recsys`` database (``SHOW STATS``, refreshed every second)."""
    with psycopg.connect(admin_url, autocommit=True, prepare_threshold=None) as conn:
        cur = conn.execute("SHOW STATS")
        names = [d.name for d in cur.description or []]
        for row in cur.fetchall():
            stats = dict(zip(names, row, strict=True))
            if stats["database"] == "recsys":
                return int(stats["total_query_count"])
    return 0


def _serving_backend_in_recovery(url: str) -> bool:
    """``pg_is_in_recovery()`` on a connection the app's query pool opens now (a fresh pool)."""

    async def ask() -> bool:
        try:
            pool = await get_pool("query")
            async with pool.connection() as conn:
                row = await (await conn.execute("SELECT pg_is_in_recovery()")).fetchone()
                assert row is not None
                return bool(row[0])
        finally:
            await close_pools()

    return asyncio.run(ask())


def _get(url: str, path: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{url}/api{path}", params=params, timeout=30)


def _read_all(url: str) -> list[tuple[int, float]]:
    """Each read endpoint once: (status, seconds)."""
    answers = []
    for call in (
        lambda: _get(url, "/items/r-000001/similar", k=5),
        lambda: httpx.post(f"{url}/api/recommendations", json={"positive": ["r-000002"], "k": 5}, timeout=30),
        lambda: _get(url, "/items/r-000003"),
        lambda: _get(url, "/health"),
    ):
        started = time.monotonic()
        response = call()
        answers.append((response.status_code, time.monotonic() - started))
    return answers


def test_the_standby_streams_and_refuses_writes(replicated: Stack) -> None:
    replica = _standby(replicated)
    assert replica.streaming()
    assert replicated.status()["replica-1.postgres"] and replicated.status()["replica-1.pgbouncer"]
    with psycopg.connect(replicated.admin_conninfo(), autocommit=True) as conn:
        written = conn.execute("SELECT count(*), pg_current_wal_insert_lsn()::text FROM items").fetchone()
    assert written is not None
    with psycopg.connect(replica.admin_conninfo(), autocommit=True) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("DELETE FROM items")
        # Streaming is asynchronous: the standby shows the rows once it has replayed the WAL
        # the primary had inserted when they were counted there: its insert position, as the local
        # stack commits asynchronously (synchronous_commit off), and the write position can still
        # lie before the commit records. The rows are counted in a
        # statement of their own, after the replay position was seen: a statement's snapshot is
        # taken when it starts, so one that also read the position could count before the replay
        # it then reports.
        deadline = time.monotonic() + 30
        while True:
            replayed = conn.execute("SELECT pg_last_wal_replay_lsn()::text, pg_last_wal_replay_lsn() >= %s::pg_lsn",
                                    [written[1]]).fetchone()
            assert replayed is not None
            if replayed[1] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert replayed[1], f"the standby did not replay up to {written[1]} in 30 s: {replayed}"
        seen = conn.execute("SELECT count(*) FROM items").fetchone()
    assert seen is not None
    assert seen[0] == written[0] == SIZE, f"standby {seen} at {replayed[0]}, primary {written}"


def test_queries_are_answered_by_the_standby(replicated: Stack, host: str) -> None:
    standby_admin = _standby(replicated).bouncer_url(database="pgbouncer")
    primary_admin = replicated.bouncer_admin_url()
    _read_all(host)  # the pool's connections exist before counting
    time.sleep(1.2)
    before = (_queries_through(standby_admin), _queries_through(primary_admin))
    requests = 20
    for i in range(requests):
        response = _get(host, f"/items/r-{i:06d}/similar", k=10)
        assert response.status_code == 200, response.text
        assert len(response.json()["results"]) == 10
    time.sleep(1.2)  # stats_period = 1
    after = (_queries_through(standby_admin), _queries_through(primary_admin))
    assert after[0] - before[0] >= requests
    assert after[1] - before[1] == 0
    assert _serving_backend_in_recovery(host)


def test_an_item_loaded_on_the_primary_becomes_visible_on_the_standby(replicated: Stack, host: str) -> None:
    vector = [0.0] * replicated.config.embedding_dim
    vector[7] = 1.0
    batch = {"batch_id": "replica-visible", "items": [{"id": "fresh-1", "embedding": vector, "category": "new"}]}
    response = httpx.post(f"{host}/api/embeddings/batches", json=batch, timeout=30)
    assert response.status_code == 202, response.text
    deadline = time.monotonic() + 60
    status: dict[str, Any] = {}
    while time.monotonic() < deadline and status.get("status") != "loaded":
        status = _get(host, "/embeddings/batches/replica-visible").json()  # read on the primary
        time.sleep(0.05)
    assert status["status"] == "loaded", status
    loaded = time.monotonic()
    while (item := _get(host, "/items/fresh-1")).status_code == 404:
        assert time.monotonic() - loaded < REPLICATION_BOUND
        time.sleep(0.01)
    assert item.status_code == 200 and item.json()["category"] == "new"
    similar = _get(host, "/items/r-000000/similar", k=SIZE + 1).json()["results"]
    assert "fresh-1" in {r["id"] for r in similar}
    with psycopg.connect(_standby(replicated).admin_conninfo(), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM items WHERE id = 'fresh-1'").fetchone() == (1,)


def test_with_the_primary_stopped_queries_keep_answering_from_the_standby(replicated: Stack, host: str) -> None:
    replicated.stop_postgres()  # its PgBouncer stays up, as the standby's streaming stops
    try:
        assert not replicated.postgres_running()
        for _ in range(3):
            for status, _seconds in _read_all(host):
                assert status == 200
        # New connections too: a fresh pool finds the standby while the primary is down.
        assert _serving_backend_in_recovery(host)
    finally:
        replicated.start_postgres()
    _standby(replicated).wait_streaming()


def test_with_the_standby_stopped_queries_fall_back_to_the_primary(replicated: Stack, host: str) -> None:
    replica = _standby(replicated)
    replica.down()  # the standby's PgBouncer and PostgreSQL, as when a replica host goes away
    try:
        answers = [answer for _ in range(3) for answer in _read_all(host)]
        assert [status for status, _ in answers] == [200] * len(answers)
        # Requests whose pooled connection pointed at the standby retry on a new connection,
        # which libpq opens on the primary: each within the pool timeout (a generous bound).
        assert max(seconds for _, seconds in answers) < POOL_TIMEOUT + 1
        assert not _serving_backend_in_recovery(host)
    finally:
        replica.up()
    assert replica.streaming()
