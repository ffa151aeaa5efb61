"""What the fault tests need: a host process, a small catalogue, a partitionable link, a load.

- :class:`PartitionProxy` stands for a network path between the app and PgBouncer that can
  stop delivering packets without closing anything, as a partitioned link or a dead NAT entry
  does: while it is paused, nothing written on either side arrives and no connection is
  refused or reset; new connections hang too. When it resumes, what was held is delivered,
  as TCP retransmission would.
- :func:`served_app` runs ``python -m recsys serve`` in its own process (its own pools and
  GIL, as a Functions worker), pointed at a stack.
- :func:`run_load` drives every query endpoint and the enqueue endpoint from concurrent
  clients and records each request's outcome and timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from recsys.datasets import Catalogue, clustered_catalogue
from recsys.local.stack import Stack, free_port

__all__ = [
    "ISOLATED_CATALOGUE_SIZE",
    "ISOLATED_SERVER_POOL",
    "Outcome",
    "PartitionProxy",
    "load_catalogue",
    "partition_proxy",
    "run_load",
    "served_app",
    "wait_until_healthy",
]

ROOT = Path(__file__).resolve().parents[2]
#: PgBouncer's server connections per (database, user) pool on the isolated stack (conftest).
ISOLATED_SERVER_POOL = 6
#: Items of the isolated stack's catalogue: as many as the demo catalogue of ``make run``.
ISOLATED_CATALOGUE_SIZE = 20_000


# ----------------------------------------------------------------------------- the link


class PartitionProxy:
    """Forwards 127.0.0.1:<port> to ``target``; :meth:`pause` stops delivery without closing."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        self._flowing.set()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._writers.add(client_writer)
        await self._flowing.wait()  # a partitioned link does not carry the handshake either
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        self._writers.add(upstream_writer)
        pumps = [
            asyncio.create_task(self._pump(client_reader, upstream_writer)),
            asyncio.create_task(self._pump(upstream_reader, client_writer)),
        ]
        for task in pumps:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()


@contextlib.contextmanager
def partition_proxy(
    target_host: str, target_port: int
) -> Iterator[tuple[int, PartitionProxy, asyncio.AbstractEventLoop]]:
    """A :class:`PartitionProxy` on its own event loop in a thread: (port, proxy, loop)."""
    loop = asyncio.new_event_loop()
    proxy = PartitionProxy(target_host, target_port)
    thread = threading.Thread(target=loop.run_forever, name="partition-proxy", daemon=True)
    thread.start()
    try:
        port = asyncio.run_coroutine_threadsafe(proxy.start(), loop).result(10)
        yield port, proxy, loop
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(proxy.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# ----------------------------------------------------------------------------- data and host


def load_catalogue(stack: Stack, n: int, *, seed: int = 11) -> Catalogue:
    """``n`` clustered items in ``items`` (emptied first), by binary COPY, indexed and analysed.

    The HNSW index is dropped for the load and built after it: much faster than inserting
    into the graph row by row.
    """
    catalogue = clustered_catalogue(n, stack.config.embedding_dim, clusters=20, spread=0.5, seed=seed)
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        register_vector(conn)
        index = conn.execute("SELECT pg_get_indexdef('items_embedding_cosine'::regclass)").fetchone()
        assert index is not None
        with conn.transaction():
            conn.execute("TRUNCATE items")
            conn.execute("DROP INDEX items_embedding_cosine")
            statement = "COPY items (id, embedding, category) FROM STDIN WITH (FORMAT BINARY)"
            with conn.cursor().copy(statement) as copy:
                copy.set_types(["text", "vector", "text"])
                for row in zip(catalogue.ids, catalogue.vectors, catalogue.categories, strict=True):
                    copy.write_row(row)
            conn.execute(index[0])
        conn.execute("ANALYZE items")
    return catalogue


def wait_until_healthy(process: subprocess.Popen[Any], base: str, log_path: Path, timeout: float = 60) -> None:
    """Until the host ``process`` (its output in ``log_path``) answers ``GET /api/health`` with 200."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the host exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/api/health", timeout=5).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the host did not become healthy: {log_path.read_text()[-2000:]}")
        time.sleep(0.1)


@contextlib.contextmanager
def served_app(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """``python -m recsys serve`` on a free port with ``env``; yields its base URL, stops it after."""
    port = free_port()
    # Only what is given: not the settings other tests put into this process's environment.
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("RECSYS_", "AzureWebJobs"))}
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "recsys", "serve", "--port", str(port)],
            cwd=ROOT, env={**base_env, **env}, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(process, base, log_path)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ----------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Outcome:
    """One request: its operation, start and end (``time.monotonic()``), status (0: no answer)."""

    op: str
    started: float
    ended: float
    status: int
    code: str | None = None

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def _requests(catalogue: Catalogue, dim: int, worker: int) -> Iterator[tuple[str, str, str, Any]]:
    """(operation, method, path, json body) for ever, cycling through every endpoint."""
    rng = np.random.default_rng(worker)
    ids = catalogue.ids
    for n in itertools.count():
        pick = [ids[int(i)] for i in rng.choice(len(ids), size=5, replace=False)]
        vector = rng.standard_normal(dim).round(4).tolist()
        yield "get", "GET", f"/api/items/{pick[0]}", None
        yield "lookup", "POST", "/api/items/lookup", {"ids": pick}
        yield "similar", "GET", f"/api/items/{pick[1]}/similar?k=10", None
        yield "recommend", "POST", "/api/recommendations", {"positive": pick[:2], "negative": pick[4:], "k": 10}
        yield "batch", "POST", "/api/recommendations/batch", {
            "queries": [{"positive": [pick[2]]}, {"vector": vector, "k": 5}, {"positive": pick[3:4], "k": 20}]
        }
        item = {"id": f"load-{worker}-{n}", "embedding": vector, "category": "load"}
        yield "enqueue", "POST", "/api/embeddings/batches", {"items": [item]}


async def run_load(
    base_url: str,
    catalogue: Catalogue,
    *,
    dim: int,
    concurrency: int,
    seconds: float,
    stop: asyncio.Event | None = None,
    request_timeout: float = 60.0,
) -> list[Outcome]:
    """``concurrency`` clients, each sending its next request as soon as the last one ended,
    for ``seconds`` (or until ``stop`` is set); every request's :class:`Outcome`."""
    outcomes: list[Outcome] = []
    end = time.monotonic() + seconds
    # Idle keep-alive connections are dropped by the client after 2 s, before the server's 5 s
    # (uvicorn's default): otherwise a request sent just as the server closes one is lost in
    # transit, a race of HTTP/1.1 keep-alive that would be blamed on the fault under test.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=2.0)

    async def client_loop(client: httpx.AsyncClient, worker: int) -> None:
        for op, method, path, body in _requests(catalogue, dim, worker):
            if time.monotonic() >= end or (stop is not None and stop.is_set()):
                return
            started = time.monotonic()
            try:
                response = await client.request(method, path, json=body)
                status = response.status_code
                code = response.json().get("code") if status >= 400 else None
            except httpx.HTTPError as exc:
                status, code = 0, f"{type(exc).__name__}: {exc}"  # no HTTP answer at all
            outcomes.append(Outcome(op, started, time.monotonic(), status, code))

    async with httpx.AsyncClient(base_url=base_url, timeout=request_timeout, limits=limits) as client:
        await asyncio.gather(*(client_loop(client, worker) for worker in range(concurrency)))
    return outcomes
