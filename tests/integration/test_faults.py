"""The fault matrix: each fault produced for real against a stack of this module's own, each
with the outcome the README promises, as a client of the local host sees it over HTTP.

The app runs as ``python -m recsys serve`` in its own process and reaches PgBouncer through
a :class:`PartitionProxy` (which forwards everything until a test partitions it). Timings are
measured from the fault (the kill, the restart, the partition), never as wall-clock totals.
Bounds are generous on purpose: this machine is small and shared, and the point is "503
within a bounded time, never a hang, never a 500", not a latency figure.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from faults_support import (
    ISOLATED_SERVER_POOL,
    Outcome,
    PartitionProxy,
    partition_proxy,
    run_load,
    served_app,
)

from recsys.datasets import Catalogue
from recsys.local.stack import Stack

# The isolated stack and its catalogue start with the first test: slow on a loaded machine.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

POOL_TIMEOUT = 2.0
STATEMENT_TIMEOUT_MS = 2000
#: A read whose connection stops answering gives up after its statement timeout plus this
#: (``recsys.search.service.ANSWER_GRACE``).
ANSWER_GRACE = 1.0
POOL_MAX = 4
#: PgBouncer's server connections per (database, user) pool on this module's stack.
SERVER_POOL = ISOLATED_SERVER_POOL
CONCURRENCY = 16
#: Slack for a slow, shared machine on top of every documented bound.
MARGIN = 2.0
#: Longest any request may take while the database is unreachable: the pool timeout, or a
#: statement already sent on a connection that stops answering (statement timeout + grace).
UNAVAILABLE_BOUND = max(POOL_TIMEOUT, STATEMENT_TIMEOUT_MS / 1000 + ANSWER_GRACE) + MARGIN
#: The service answers every request again this long after the failed component is back.
RECOVERY_BOUND = 5.0
OK = {200, 202}


@pytest.fixture(scope="module")
def fault_stack(isolated_stack: Stack) -> Stack:
    """The session's isolated stack: the faults below would disturb every other test."""
    return isolated_stack


@pytest.fixture(scope="module")
def fault_catalogue(isolated_catalogue: Catalogue) -> Catalogue:
    return isolated_catalogue


@pytest.fixture(scope="module")
def link(fault_stack: Stack) -> Iterator[tuple[int, PartitionProxy, asyncio.AbstractEventLoop]]:
    with partition_proxy(fault_stack.config.host, fault_stack.config.bouncer_port) as proxied:
        yield proxied


@pytest.fixture(scope="module")
def app(
    fault_stack: Stack, fault_catalogue: Catalogue, link: tuple[int, PartitionProxy, asyncio.AbstractEventLoop],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """The function app in its own process, through the proxy; yields its base URL."""
    port = link[0]
    env = fault_stack.app_environment()
    bouncer = f"{fault_stack.config.host}:{fault_stack.config.bouncer_port}"
    for name in ("RECSYS_DATABASE_URL", "RECSYS_LOADER_DATABASE_URL"):
        env[name] = env[name].replace(bouncer, f"127.0.0.1:{port}")
    env.update({
        "RECSYS_POOL_MIN_SIZE": "1",
        "RECSYS_POOL_MAX_SIZE": str(POOL_MAX),
        "RECSYS_POOL_TIMEOUT": str(POOL_TIMEOUT),
        "RECSYS_CONNECT_TIMEOUT": "2",
        "RECSYS_STATEMENT_TIMEOUT_MS": str(STATEMENT_TIMEOUT_MS),
    })
    with served_app(env, tmp_path_factory.mktemp("faults-host") / "host.log") as base:
        yield base


def load(app: str, catalogue: Catalogue, stack: Stack, seconds: float, **kwargs: Any) -> list[Outcome]:
    return asyncio.run(run_load(app, catalogue, dim=stack.config.embedding_dim, concurrency=CONCURRENCY,
                                seconds=seconds, **kwargs))


async def load_with_fault(
    app: str, catalogue: Catalogue, stack: Stack, *, before: float, fault: Any, after: float
) -> tuple[list[Outcome], dict[str, float]]:
    """Load for ``before`` seconds, run ``fault()`` in a thread (it returns named instants),
    keep the load going ``after`` seconds past the fault's last instant."""
    stop = asyncio.Event()
    load_task = asyncio.create_task(
        run_load(app, catalogue, dim=stack.config.embedding_dim, concurrency=CONCURRENCY, seconds=600, stop=stop)
    )
    await asyncio.sleep(before)
    instants: dict[str, float] = await asyncio.to_thread(fault)
    await asyncio.sleep(max(0.0, max(instants.values()) + after - time.monotonic()))
    stop.set()
    return await load_task, instants


def health(app: str) -> dict[str, Any]:
    response = httpx.get(f"{app}/api/health", timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def pgbouncer_pool(stack: Stack, user: str) -> dict[str, Any]:
    with psycopg.connect(stack.bouncer_admin_url(), autocommit=True) as conn:
        cursor = conn.execute("SHOW POOLS")
        names = [c.name for c in cursor.description or ()]
        for row in cursor.fetchall():
            pool = dict(zip(names, row, strict=True))
            if pool["database"] == stack.config.database and pool["user"] == user:
                return pool
    return {}


def statuses(outcomes: list[Outcome]) -> Counter[int]:
    return Counter(o.status for o in outcomes)


def assert_recovered(outcomes: list[Outcome], since: float, label: str) -> dict[str, float]:
    """Every request started ``RECOVERY_BOUND`` s after ``since`` succeeded; the figures."""
    late = [o for o in outcomes if o.started >= since + RECOVERY_BOUND]
    assert late, f"{label}: no request was sent after the recovery bound"
    failed_late = [o for o in late if o.status not in OK]
    assert not failed_late, f"{label}: failures {RECOVERY_BOUND} s after the restart: {failed_late[:5]}"
    first_ok = min((o.ended for o in outcomes if o.started >= since and o.status in OK), default=float("nan"))
    last_bad = max((o.ended for o in outcomes if o.status not in OK), default=since)
    return {"first_success_after_s": round(first_ok - since, 2), "last_failure_after_s": round(last_bad - since, 2)}


def wait_until_serving(app: str, catalogue: Catalogue, bound: float = 30.0) -> None:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        with httpx.Client(base_url=app, timeout=10) as client:
            ok = [client.get(f"/api/items/{catalogue.ids[i]}/similar").status_code for i in range(3)]
        if ok == [200, 200, 200]:
            return
        time.sleep(0.2)
    raise AssertionError("the service did not come back")


# ----------------------------------------------------------------------------- 1. sustained load


def test_sustained_mixed_load_has_no_errors_and_stable_pools(app: str, fault_stack: Stack,
                                                             fault_catalogue: Catalogue) -> None:
    before = health(app)["pool"]["query"]
    samples: list[dict[str, Any]] = []

    async def sample_while_loading() -> list[Outcome]:
        task = asyncio.create_task(run_load(app, fault_catalogue, dim=fault_stack.config.embedding_dim,
                                            concurrency=CONCURRENCY, seconds=30))
        while not task.done():
            await asyncio.sleep(5)
            samples.append(await asyncio.to_thread(pgbouncer_pool, fault_stack, "recsys_query"))
        return await task

    outcomes = asyncio.run(sample_while_loading())
    after = health(app)["pool"]["query"]

    by_status = statuses(outcomes)
    assert set(by_status) <= OK, (by_status, [o for o in outcomes if o.status not in OK][:5])
    assert {o.op for o in outcomes} == {"get", "lookup", "similar", "recommend", "batch", "enqueue"}
    assert len(outcomes) >= 100, len(outcomes)  # a sanity bound: 300 to 3000 here, by the machine's load
    # The app's pool: never above its bound, no request gave up, no connection lost or replaced.
    assert after["pool_size"] <= after["pool_max"] == POOL_MAX
    for counter in ("requests_errors", "connections_lost", "connections_errors", "returns_bad"):
        assert after.get(counter, 0) == before.get(counter, 0), (counter, before, after)
    assert after.get("connections_num", 0) - before.get("connections_num", 0) <= POOL_MAX
    # PgBouncer: the app's clients never needed more server connections than its pool allows.
    for pool in samples:
        servers = sum(pool[k] for k in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"))
        assert servers <= SERVER_POOL, pool
    seconds = max(o.ended for o in outcomes) - min(o.started for o in outcomes)
    print(f"\nsustained load: {len(outcomes)} requests in {seconds:.1f} s ({len(outcomes) / seconds:.0f}/s), "
          f"p99 {sorted(o.seconds for o in outcomes)[int(len(outcomes) * 0.99)] * 1000:.0f} ms, "
          f"pool {before} -> {after}")


# ----------------------------------------------------------------------------- 6. idle server connections killed


def test_idle_server_connections_killed_are_invisible_to_clients(app: str, fault_stack: Stack,
                                                                 fault_catalogue: Catalogue) -> None:
    load(app, fault_catalogue, fault_stack, 2)
    time.sleep(1.5)  # every server connection idle in PgBouncer's pool
    with psycopg.connect(fault_stack.admin_conninfo(), autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE usename IN ('recsys_query', 'recsys_loader') AND state = 'idle'"
        ).fetchone()
    assert killed is not None and killed[0] >= 1
    outcomes = load(app, fault_catalogue, fault_stack, 3)
    assert set(statuses(outcomes)) <= OK, statuses(outcomes)
    print(f"\nidle server connections killed: {killed[0]}; then {len(outcomes)} requests, {statuses(outcomes)}")


# ----------------------------------------------------------------------------- 2. server pool saturated


def test_saturated_server_pool_answers_503_in_time_and_recovers(app: str, fault_stack: Stack,
                                                               fault_catalogue: Catalogue) -> None:
    sleep_s = 6.0

    async def saturate() -> tuple[list[Outcome], float, float]:
        url = fault_stack.bouncer_url(user="recsys_query")
        sleepers = [await psycopg.AsyncConnection.connect(url, autocommit=True, prepare_threshold=None)
                    for _ in range(SERVER_POOL)]
        try:
            tasks = [asyncio.create_task(c.execute("SELECT pg_sleep(%s)", [sleep_s])) for c in sleepers]
            # Saturated once PgBouncer has handed every server connection to a sleeper.
            for _ in range(100):
                await asyncio.sleep(0.05)
                pool = await asyncio.to_thread(pgbouncer_pool, fault_stack, "recsys_query")
                if pool.get("sv_active") == SERVER_POOL:
                    break
            saturated = time.monotonic()
            outcomes = await run_load(app, fault_catalogue, dim=fault_stack.config.embedding_dim,
                                      concurrency=8, seconds=sleep_s - 2.5)
            await asyncio.gather(*tasks)
            released = time.monotonic()
        finally:
            for c in sleepers:
                await c.close()
        return outcomes, saturated, released

    outcomes, saturated, released = asyncio.run(saturate())
    queries = [o for o in outcomes if o.op != "enqueue"]
    assert min(o.started for o in queries) >= saturated
    assert queries and all(o.status == 503 and o.code == "busy" for o in queries), statuses(queries)
    slowest = max(o.seconds for o in queries)
    assert slowest <= UNAVAILABLE_BOUND, slowest
    started = time.monotonic()
    wait_until_serving(app, fault_catalogue, bound=RECOVERY_BOUND + MARGIN)
    print(f"\nsaturated server pool: {len(queries)} query requests, all 503, slowest {slowest:.2f} s; "
          f"served again {time.monotonic() - released:.2f} s after the slow statements ended "
          f"(waited {time.monotonic() - started:.2f} s)")


# ----------------------------------------------------------------------------- 5. a link that drops packets


def test_a_partitioned_link_answers_503_in_time_never_hangs(
    app: str, fault_stack: Stack, fault_catalogue: Catalogue,
    link: tuple[int, PartitionProxy, asyncio.AbstractEventLoop],
) -> None:
    _, proxy, proxy_loop = link

    def partition() -> dict[str, float]:
        proxy_loop.call_soon_threadsafe(proxy.pause)
        return {"partitioned": time.monotonic()}

    try:
        outcomes, instants = asyncio.run(load_with_fault(
            app, fault_catalogue, fault_stack, before=1.0, fault=partition, after=UNAVAILABLE_BOUND + 2
        ))
    finally:
        proxy_loop.call_soon_threadsafe(proxy.resume)
    resumed = time.monotonic()
    cut = instants["partitioned"]
    affected = [o for o in outcomes if o.ended > cut]
    assert affected and all(o.status in OK | {503} for o in affected), statuses(affected)
    assert not [o for o in outcomes if o.status == 0], "a request got no answer"
    # Every request that was in flight at the cut, or started during it, ended in time.
    slowest = max(o.ended - max(o.started, cut) for o in affected)
    assert slowest <= UNAVAILABLE_BOUND, slowest
    started_late = [o for o in affected if o.started >= cut + 0.5]
    assert started_late and all(o.status == 503 for o in started_late), statuses(started_late)
    wait_until_serving(app, fault_catalogue, bound=RECOVERY_BOUND + MARGIN)
    print(f"\npartitioned link: {len(affected)} requests after the cut {statuses(affected)}, "
          f"slowest {slowest:.2f} s from the cut; served again {time.monotonic() - resumed:.2f} s after it healed")


# ----------------------------------------------------------------------------- 4. PgBouncer SIGKILL


def test_pgbouncer_killed_under_load_is_back_within_5_s_of_its_restart(app: str, fault_stack: Stack,
                                                                      fault_catalogue: Catalogue) -> None:
    def kill_and_restart() -> dict[str, float]:
        pid = int(fault_stack.bouncer_pidfile.read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        while Path(f"/proc/{pid}").exists():
            time.sleep(0.01)
        time.sleep(1.0)
        fault_stack.start_pgbouncer()
        return {"killed": killed, "restarted": time.monotonic()}

    outcomes, instants = asyncio.run(load_with_fault(
        app, fault_catalogue, fault_stack, before=1.0, fault=kill_and_restart, after=RECOVERY_BOUND + 1
    ))
    assert not [o for o in outcomes if o.status == 0], "a request got no answer"
    assert set(statuses(outcomes)) <= OK | {503}, statuses(outcomes)
    down = [o for o in outcomes if o.ended > instants["killed"] and o.started < instants["restarted"]]
    assert max(o.ended - max(o.started, instants["killed"]) for o in down) <= UNAVAILABLE_BOUND
    figures = assert_recovered(outcomes, instants["restarted"], "pgbouncer restart")
    print(f"\npgbouncer SIGKILL: {statuses(outcomes)}, outage {instants['restarted'] - instants['killed']:.2f} s, "
          f"after the restart {figures}")


# ----------------------------------------------------------------------------- 3. PostgreSQL crash


def test_postgres_immediate_stop_with_requests_in_flight(app: str, fault_stack: Stack,
                                                         fault_catalogue: Catalogue) -> None:
    def crash_and_restart() -> dict[str, float]:
        crashed = time.monotonic()
        fault_stack.stop_postgres(mode="immediate")
        time.sleep(1.0)
        fault_stack.start_postgres()
        return {"crashed": crashed, "restarted": time.monotonic()}

    outcomes, instants = asyncio.run(load_with_fault(
        app, fault_catalogue, fault_stack, before=1.0, fault=crash_and_restart, after=RECOVERY_BOUND + 1
    ))
    in_flight = [o for o in outcomes if o.started < instants["crashed"] < o.ended]
    assert in_flight, "no request was in flight at the crash"
    # Each request fails at most once, as one 503 the client may retry (or it was retried inside).
    assert not [o for o in outcomes if o.status == 0], "a request got no answer"
    assert set(statuses(outcomes)) <= OK | {503}, statuses(outcomes)
    assert max(o.ended - max(o.started, instants["crashed"]) for o in outcomes if o.ended > instants["crashed"]) \
        <= (instants["restarted"] - instants["crashed"]) + UNAVAILABLE_BOUND
    figures = assert_recovered(outcomes, instants["restarted"], "postgres restart")
    print(f"\npostgres stop -m immediate: in flight {statuses(in_flight)}, all {statuses(outcomes)}, "
          f"outage {instants['restarted'] - instants['crashed']:.2f} s, after the restart {figures}")


# ----------------------------------------------------------------------------- 7. ingest during an outage


def test_ingest_endpoints_answer_503_in_time_while_the_database_is_down(app: str, fault_stack: Stack,
                                                                       fault_catalogue: Catalogue) -> None:
    vector = [0.5] * fault_stack.config.embedding_dim

    async def ingest_requests() -> list[tuple[int, str | None, str | None, float]]:
        async def one(client: httpx.AsyncClient, method: str, path: str, body: Any) -> tuple[Any, ...]:
            started = time.monotonic()
            response = await client.request(method, path, json=body)
            code = response.json().get("code")
            return response.status_code, code, response.headers.get("retry-after"), time.monotonic() - started

        async with httpx.AsyncClient(base_url=app, timeout=60) as client:
            return await asyncio.gather(*(
                request
                for n in range(2)
                for request in (
                    one(client, "POST", "/api/embeddings/batches",
                        {"items": [{"id": f"outage-{n}", "embedding": vector}]}),
                    one(client, "GET", f"/api/embeddings/batches/b-unknown-{n}", None),
                )
            ))

    fault_stack.stop_postgres()
    down = time.monotonic()
    try:
        answers = asyncio.run(ingest_requests())
    finally:
        fault_stack.start_postgres()
    restarted = time.monotonic()
    assert all((status, code) == (503, "busy") and (retry or "").isdigit() for status, code, retry, _ in answers), \
        answers
    slowest = max(seconds for *_, seconds in answers)
    assert slowest <= UNAVAILABLE_BOUND, answers
    deadline = restarted + RECOVERY_BOUND + MARGIN
    while True:
        response = httpx.post(f"{app}/api/embeddings/batches", json={"items": [{"id": "after", "embedding": vector}]},
                              timeout=30)
        if response.status_code == 202 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert response.status_code == 202, response.text
    print(f"\ningest during an outage ({restarted - down:.1f} s): {len(answers)} requests, all 503, "
          f"slowest {slowest:.2f} s; enqueueing again {time.monotonic() - restarted:.2f} s after the restart")
