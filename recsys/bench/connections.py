"""Benchmark 1: a pooled connection vs a new connection per request.

A new PostgreSQL connection costs a process fork and a SCRAM exchange (thousands of PBKDF2
rounds on both sides); a function that connects per request pays it every time. Measured
straight to PostgreSQL and through PgBouncer (which keeps its server connections, so a new
client connection there costs only the SCRAM exchange with PgBouncer), one client, requests one
after another, variants interleaved in rounds so that background load hits all alike.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from recsys.bench.harness import BenchOptions, Deadline, bench_stack, load_catalogue, server_versions
from recsys.bench.results import BenchResult, Headline
from recsys.bench.stats import rate, ratio, summarize
from recsys.config import Settings
from recsys.datasets import clustered_catalogue
from recsys.db.pool import connection_kwargs

__all__ = ["run"]

TITLE = "pooled vs connect-per-request"
LOOKUP = "SELECT id, category, metadata FROM items WHERE id = %s"
ROUNDS = 3

Request = Callable[[str], Awaitable[None]]


def _kwargs() -> dict[str, Any]:
    return connection_kwargs(Settings())


def connect_per_request(url: str) -> Request:
    async def request(item_id: str) -> None:
        conn = await psycopg.AsyncConnection.connect(url, **_kwargs())
        try:
            await (await conn.execute(LOOKUP, [item_id])).fetchall()
        finally:
            await conn.close()

    return request


def pooled(pool: AsyncConnectionPool) -> Request:
    async def request(item_id: str) -> None:
        async with pool.connection() as conn:
            await (await conn.execute(LOOKUP, [item_id])).fetchall()

    return request


async def _measure(request: Request, ids: list[str], count: int, seconds: float) -> tuple[list[float], float]:
    latencies: list[float] = []
    deadline = Deadline(seconds)
    started = time.perf_counter()
    while len(latencies) < count and deadline:
        t0 = time.perf_counter()
        await request(random.choice(ids))
        latencies.append(time.perf_counter() - t0)
    return latencies, time.perf_counter() - started


async def _run(urls: dict[str, str], ids: list[str], new_count: int, pooled_count: int, seconds: float
               ) -> dict[str, Any]:
    pools = {
        name: AsyncConnectionPool(
            url, kwargs=_kwargs(), min_size=1, max_size=1, check=AsyncConnectionPool.check_connection, open=False
        )
        for name, url in urls.items()
    }
    samples: dict[str, tuple[list[float], float]] = {}
    for name, url in urls.items():
        conn = await psycopg.AsyncConnection.connect(url, **_kwargs())
        uses_tls = conn.pgconn.ssl_in_use
        await conn.close()
        assert uses_tls == ("sslmode=verify-full" in url), f"{name}: TLS in use is {uses_tls}"
    try:
        for pool in pools.values():
            await pool.open(wait=True, timeout=30)
        variants: dict[str, tuple[Request, int]] = {}
        for name, url in urls.items():
            variants[f"{name}/new_connection"] = (connect_per_request(url), new_count)
            variants[f"{name}/pooled"] = (pooled(pools[name]), pooled_count)
        for variant, (request, _) in variants.items():
            await _measure(request, ids, 5, 5)  # warm caches and the pool
            samples[variant] = ([], 0.0)
        for _ in range(ROUNDS):
            for variant, (request, count) in variants.items():
                latencies, elapsed = await _measure(request, ids, count // ROUNDS, seconds / ROUNDS)
                done, spent = samples[variant]
                samples[variant] = (done + latencies, spent + elapsed)
    finally:
        for pool in pools.values():
            await pool.close()
    return {
        variant: {**summarize(latencies), "requests_per_s": round(rate(len(latencies), elapsed), 1)}
        for variant, (latencies, elapsed) in samples.items()
    }


def run(options: BenchOptions) -> BenchResult:
    items = options.size(2_000, 200)
    new_count = options.size(600, 30)
    pooled_count = options.size(6_000, 150)
    seconds = options.size(60, 10)
    catalogue = clustered_catalogue(items, 32, seed=1)
    # TLS terminates at PgBouncer (this PostgreSQL build has no OpenSSL); "allow" lets the
    # plain and the TLS clients share one PgBouncer, so that they are measured side by side.
    with bench_stack(options, "connections", embedding_dim=32, tls=True,
                     bouncer_settings={"client_tls_sslmode": "allow"}) as stack:
        load_catalogue(stack, catalogue, index=False)
        servers = server_versions(stack)
        tls = f"?sslmode=verify-full&sslrootcert={stack.tls_files.ca_cert}"
        plain = "?sslmode=disable"
        urls = {"direct": stack.direct_url() + plain, "pgbouncer": stack.bouncer_url() + plain,
                "pgbouncer_tls": stack.bouncer_url() + tls}
        figures = asyncio.run(_run(urls, catalogue.ids, new_count, pooled_count, seconds))

    headlines = []
    for name, label in (("direct", "straight to PostgreSQL"), ("pgbouncer", "through PgBouncer"),
                        ("pgbouncer_tls", "through PgBouncer with TLS (verify-full)")):
        pooled_rate = figures[f"{name}/pooled"]["requests_per_s"]
        new_rate = figures[f"{name}/new_connection"]["requests_per_s"]
        speedup = ratio(pooled_rate, new_rate)
        figures[f"{name}/pooled_vs_new_requests_per_s"] = round(speedup, 2)
        goal = name == "direct"
        headlines += [
            Headline(f"pooled ÷ new connection per request, req/s, {label}", round(speedup, 1), "×",
                     "≥ 20×" if goal else None, speedup >= 20 if goal else None),
            Headline(f"p50 pooled, {label}", figures[f"{name}/pooled"]["p50_ms"], "ms"),
            Headline(f"p50 new connection per request, {label}", figures[f"{name}/new_connection"]["p50_ms"], "ms"),
        ]
    return BenchResult(
        name="connections",
        title=TITLE,
        inputs={
            "catalogue_items": items, "request": LOOKUP, "clients": 1, "rounds": ROUNDS,
            "new_connection_requests": new_count, "pooled_requests": pooled_count, "time_cap_s": seconds,
            "auth": "SCRAM-SHA-256 password", "tls": "TLS 1.3 at PgBouncer, sslmode=verify-full, local CA",
            "pool": "psycopg_pool AsyncConnectionPool, max_size 1, checked on checkout",
        },
        figures=figures,
        headlines=headlines,
        servers=servers,
    )
