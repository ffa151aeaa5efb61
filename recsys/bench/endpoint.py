"""Benchmark 5: ``GET /api/items/{id}/similar`` through the local host vs the same SQL run raw.

The host serves the function app in a process of its own (as a Functions worker is), with the
app's pool settings; the raw variant runs the very SQL the service sends (same statement, same
parameters, same client-side binding) over a pool with the same settings. The HTTP client is a
minimal keep-alive HTTP/1.1 client, so that the figure is the cost of the host, the handler and
the JSON, not of a client library. A third variant calls the app's handler in this process with
a hand-built request (no HTTP), which splits the overhead between the HTTP server and the
handler. Concurrency 1, 8 and 32; variants interleaved in rounds.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from typing import Any

import azure.functions as func
import psycopg

from recsys.bench.harness import (
    BenchOptions,
    Deadline,
    app_environment,
    bench_stack,
    load_catalogue,
    local_host,
    server_versions,
)
from recsys.bench.plots import line_plot
from recsys.bench.results import BenchResult, Headline
from recsys.bench.stats import ratio, summarize
from recsys.config import load_settings
from recsys.datasets import clustered_catalogue
from recsys.db.pool import close_pools, get_pool
from recsys.local import tools
from recsys.local.host import discover
from recsys.local.stack import free_port
from recsys.search import queries
from recsys.search.params import SimilarQuery
from recsys.search.service import similar_params

__all__ = ["HttpClient", "run"]

TITLE = "/similar through the host vs raw SQL"
K = 10
EF_SEARCH = 100
CONCURRENCY = (1, 8, 32)
ROUNDS = 2


class HttpClient:
    """One keep-alive HTTP/1.1 connection: GET a path, return the status and the body."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        reused = self._writer is not None
        try:
            return await self._get(path)
        except (asyncio.IncompleteReadError, ConnectionError):
            # uvicorn closes a keep-alive connection idle for 5 s: open a new one, once.
            await self.close()
            if not reused:
                raise
            return await self._get(path)

    async def _get(self, path: str) -> tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        self._writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode())
        head = await self._reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return status, await self._reader.readexactly(length)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _similar_handler() -> Any:
    """The app's ``similar_get`` handler, to call in this process without HTTP."""
    root = str(tools.project_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    import function_app

    http, _ = discover(function_app.app)
    return next(f.handler for f in http if f.name == "similar_get")


async def _closed_loop(concurrency: int, count: int, seconds: float, one: Any) -> tuple[list[float], float]:
    """``concurrency`` workers issue ``count`` requests in all (or stop at ``seconds``)."""
    latencies: list[float] = []
    deadline = Deadline(seconds)
    remaining = [count]

    async def worker(slot: int) -> None:
        while remaining[0] > 0 and deadline:
            remaining[0] -= 1
            started = time.perf_counter()
            await one(slot)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker(slot) for slot in range(concurrency)))
    return latencies, time.perf_counter() - started


async def _run(env: dict[str, str], port: int, ids: list[str], count: int, seconds: float) -> dict[str, Any]:
    settings = load_settings(env)
    # The app's own pool (recsys.db.pool), configured from the same settings as the host's.
    pool = await get_pool("query", settings)
    await pool.wait(timeout=30)
    rng = random.Random(5)
    clients = [HttpClient("127.0.0.1", port) for _ in range(max(CONCURRENCY))]
    statement = queries.TIMEOUT_PREFIX + queries.SEARCH

    async def raw(slot: int) -> None:
        params = {"statement_timeout": str(settings.statement_timeout_ms),
                  **similar_params(rng.choice(ids), SimilarQuery(k=K, ef_search=EF_SEARCH), EF_SEARCH)}
        async with pool.connection() as conn, psycopg.AsyncClientCursor(conn) as cur:
            await cur.execute(statement, params)
            cur.nextset()
            rows = await cur.fetchall()
        assert len(rows) == K

    handler = _similar_handler()

    async def direct(slot: int) -> None:
        request = func.HttpRequest("GET", "http://127.0.0.1/api/items/x/similar", body=b"",
                                   params={"k": str(K), "ef_search": str(EF_SEARCH)},
                                   route_params={"id": rng.choice(ids)})
        response = await handler(request)
        assert response.status_code == 200, response.get_body()[:200]

    async def http(slot: int) -> None:
        status, body = await clients[slot].get(f"/api/items/{rng.choice(ids)}/similar?k={K}&ef_search={EF_SEARCH}")
        assert status == 200, body[:200]

    figures: dict[str, Any] = {}
    try:
        for variant in (raw, direct, http):  # warm-up: connections, caches
            await _closed_loop(max(CONCURRENCY), 200, 30, variant)
        samples: dict[str, tuple[list[float], float]] = {}
        for _ in range(ROUNDS):
            for concurrency in CONCURRENCY:
                for name, variant in (("raw_sql", raw), ("handler", direct), ("http", http)):
                    latencies, elapsed = await _closed_loop(concurrency, count // ROUNDS, seconds / ROUNDS, variant)
                    done, spent = samples.get(f"{name}/{concurrency}", ([], 0.0))
                    samples[f"{name}/{concurrency}"] = (done + latencies, spent + elapsed)
        for key, (latencies, elapsed) in samples.items():
            figures[key] = {**summarize(latencies), "requests_per_s": round(len(latencies) / elapsed, 1)}
    finally:
        for client in clients:
            await client.close()
        await close_pools()
    return figures


def run(options: BenchOptions) -> BenchResult:
    items = options.size(10_000, 1_000)
    dim = options.size(384, 64)
    count = options.size(3_000, 100)
    seconds = options.size(40, 10)
    catalogue = clustered_catalogue(items, dim, seed=5)
    with bench_stack(options, "endpoint", embedding_dim=dim) as stack:
        load_catalogue(stack, catalogue)
        servers = server_versions(stack)
        port = free_port()
        env = {**stack.app_environment(), "RECSYS_POOL_MIN_SIZE": "1", "RECSYS_POOL_MAX_SIZE": "4"}
        # The handler variant runs in this process, on the app's settings.
        with local_host(env, port), app_environment(env):
            figures = asyncio.run(_run(env, port, catalogue.ids, count, seconds))
    for concurrency in CONCURRENCY:
        figures[f"http_vs_raw_p50/{concurrency}"] = round(
            ratio(figures[f"http/{concurrency}"]["p50_ms"], figures[f"raw_sql/{concurrency}"]["p50_ms"]), 2)
        figures[f"handler_vs_raw_p50/{concurrency}"] = round(
            ratio(figures[f"handler/{concurrency}"]["p50_ms"], figures[f"raw_sql/{concurrency}"]["p50_ms"]), 2)
    plot = "endpoint.png"
    line_plot(
        options.out_dir / plot,
        {f"{name} p50": (list(CONCURRENCY), [figures[f"{key}/{c}"]["p50_ms"] for c in CONCURRENCY])
         for key, name in (("http", "/similar"), ("handler", "handler, no HTTP"), ("raw_sql", "raw SQL"))},
        title="/similar through the local host vs raw SQL", xlabel="concurrent clients", ylabel="p50 (ms)", logx=True,
    )
    at_one = figures["http_vs_raw_p50/1"]
    headlines = [
        Headline(f"/similar p50 ÷ raw SQL p50 at concurrency 1 ({figures['http/1']['p50_ms']} ms vs "
                 f"{figures['raw_sql/1']['p50_ms']} ms)", at_one, "×", "≤ 1.3×", at_one <= 1.3),
    ]
    headlines.append(Headline(
        f"the handler called without HTTP ÷ raw SQL, p50 at concurrency 1 ({figures['handler/1']['p50_ms']} ms)",
        figures["handler_vs_raw_p50/1"], "×"))
    for concurrency in CONCURRENCY[1:]:
        http_rate = figures[f"http/{concurrency}"]["requests_per_s"]
        raw_rate = figures[f"raw_sql/{concurrency}"]["requests_per_s"]
        headlines.append(Headline(
            f"/similar ÷ raw SQL at concurrency {concurrency}: p50 (req/s {http_rate} vs {raw_rate})",
            figures[f"http_vs_raw_p50/{concurrency}"], "×"))
    return BenchResult(
        name="endpoint",
        title=TITLE,
        inputs={
            "catalogue_items": items, "dim": dim, "k": K, "ef_search": EF_SEARCH, "concurrency": list(CONCURRENCY),
            "requests_per_level": count, "rounds": ROUNDS, "pool": {"min_size": 1, "max_size": 4},
            "host": "python -m recsys serve (uvicorn, one process)", "client": "keep-alive HTTP/1.1, one per worker",
        },
        figures=figures,
        headlines=headlines,
        plots=[plot],
        servers=servers,
    )
