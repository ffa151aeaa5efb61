"""Simulated Functions instances for the overload benchmark: worker processes and their figures.

Instances live in a few OS processes, many asyncio instances each, every one with the app's
own pool (``recsys.db.pool``) and running the app's query (``similar_items``). A front end in each
process spreads a fixed request rate over the instances that are up, as the Functions front end
spreads HTTP requests: an instance that starts during a scale-out gets requests at once, and its
first request opens its pool. The burst instances start at random moments within the ramp.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from recsys.bench.stats import summarize
from recsys.config import Settings
from recsys.db.pool import close_pools, get_pool
from recsys.search.params import SimilarQuery
from recsys.search.service import similar_items

__all__ = ["Outcome", "Workload", "run_instances", "summarize_run", "timeline"]

QUERY = SimilarQuery(k=10, ef_search=40)
#: Requests in flight per instance (the host's per-instance concurrency) before the front end
#: tries another instance; a request no instance can take is counted as shed.
MAX_IN_FLIGHT = 16


@dataclass(frozen=True)
class Workload:
    url: str
    ids: list[str]
    #: Instances up from the start (warm before the burst), and instances of the burst.
    warm: int
    burst: int
    #: Requests per second this process sends to its instances.
    rate: float
    #: Epoch seconds: the warm instances start; the burst starts; everything stops.
    start_at: float
    burst_at: float
    end_at: float
    ramp_s: float
    pool_min_size: int
    pool_max_size: int
    pool_timeout_s: float
    seed: int


#: One request: when it was issued (epoch s), how long it took (s), and how it ended:
#: "ok", the HTTP status the app answers for its error ("503", "504", "500"), or "shed".
Outcome = tuple[float, float, str]


def _status(exc: BaseException) -> str:
    """The status the HTTP layer answers for ``exc`` (``recsys.http.responses``)."""
    if isinstance(exc, PoolTimeout):
        return "503"
    if isinstance(exc, pg_errors.QueryCanceled):
        return "504"
    if isinstance(exc, psycopg.OperationalError):
        return "503"
    return "500"


@dataclass
class _Instance:
    pool: AsyncConnectionPool
    in_flight: int = 0


@dataclass
class _Front:
    live: list[_Instance] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)


async def _simulate(work: Workload) -> dict[str, Any]:
    rng = random.Random(work.seed)
    settings = replace(Settings(), database_url=work.url, pool_min_size=work.pool_min_size,
                       pool_max_size=work.pool_max_size, pool_timeout=work.pool_timeout_s)
    front = _Front()
    starting: set[asyncio.Task[None]] = set()

    async def start(number: int, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.time()))
        # Instances share an event loop here, so each names its pool (pools are kept by name).
        front.live.append(_Instance(await get_pool(f"instance-{number}", settings)))

    moments = [work.start_at] * work.warm + [work.burst_at + rng.uniform(0, work.ramp_s) for _ in range(work.burst)]
    for number, at in enumerate(moments):
        task = asyncio.create_task(start(number, at))
        starting.add(task)
        task.add_done_callback(starting.discard)

    async def request(instance: _Instance, item_id: str) -> None:
        issued = time.time()
        started = time.perf_counter()
        instance.in_flight += 1
        try:
            await similar_items(instance.pool, item_id, QUERY, timeout_ms=int(work.pool_timeout_s * 1000))
            kind = "ok"
        except Exception as exc:
            kind = _status(exc)
            name = type(exc).__name__
            front.errors[name] = front.errors.get(name, 0) + 1
        finally:
            instance.in_flight -= 1
        front.outcomes.append((issued, time.perf_counter() - started, kind))

    cpu: dict[str, float] = {}

    async def measure_cpu() -> None:
        # This process's CPU time over the burst (the ramp and one second more): the simulated
        # instances' own work, which on Azure each instance would do on its own CPU.
        await asyncio.sleep(max(0.0, work.burst_at - time.time()))
        cpu["start"], cpu["wall_start"] = time.process_time(), time.time()
        await asyncio.sleep(max(0.0, work.burst_at + work.ramp_s + 1.0 - time.time()))
        cpu["used"] = time.process_time() - cpu["start"]
        cpu["wall"] = time.time() - cpu["wall_start"]

    meter = asyncio.create_task(measure_cpu())
    tasks: set[asyncio.Task[None]] = set()
    interval = 1.0 / work.rate
    next_at = work.start_at + rng.uniform(0, interval)
    while next_at < work.end_at:
        await asyncio.sleep(max(0.0, next_at - time.time()))
        next_at += interval
        if not front.live:
            continue
        chosen = None
        for _ in range(4):
            candidate = rng.choice(front.live)
            if candidate.in_flight < MAX_IN_FLIGHT:
                chosen = candidate
                break
        if chosen is None:
            front.outcomes.append((time.time(), 0.0, "shed"))
            continue
        task = asyncio.create_task(request(chosen, rng.choice(work.ids)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=2 * work.pool_timeout_s + 30)
    for task in [*tasks, *starting, meter]:
        task.cancel()
    logins = sum(i.pool.get_stats().get("connections_num", 0) for i in front.live)
    login_errors = sum(i.pool.get_stats().get("connections_errors", 0) for i in front.live)
    await close_pools()
    return {"outcomes": front.outcomes, "errors": front.errors, "logins": logins, "login_errors": login_errors,
            "unfinished": len(tasks), "burst_cpu_s": round(cpu.get("used", 0.0), 3),
            "burst_wall_s": round(cpu.get("wall", 0.0), 3)}


def run_instances(work: Workload) -> dict[str, Any]:
    """Entry point of a worker process: run its share of the instances on one event loop."""
    # Refused and timed-out connections are outcomes counted here, not news for the log.
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    logging.getLogger("recsys").setLevel(logging.ERROR)
    return asyncio.run(_simulate(work))


def _window(outcomes: list[Outcome], start: float, end: float) -> dict[str, Any]:
    inside = [o for o in outcomes if start <= o[0] < end]
    failures: dict[str, int] = {}
    for _, _, kind in inside:
        if kind != "ok":
            failures[kind] = failures.get(kind, 0) + 1
    return {
        "requests": len(inside),
        "failed": sum(failures.values()),
        "failures": failures,
        "latency": summarize([o[1] for o in inside if o[2] == "ok"]),
    }


def timeline(outcomes: list[Outcome], start: float, end: float) -> list[dict[str, Any]]:
    """Per second from ``start``: requests issued, failed, and p50/p95 of those that succeeded."""
    seconds = []
    for n in range(int(end - start + 0.999)):
        window = _window(outcomes, start + n, start + n + 1)
        seconds.append({"s": n, "requests": window["requests"], "failed": window["failed"],
                        "p50_ms": window["latency"].get("p50_ms"), "p95_ms": window["latency"].get("p95_ms")})
    return seconds


def summarize_run(outcomes: list[Outcome], *, start_at: float, burst_at: float, end_at: float, ramp_s: float,
                  settle_s: float, pool_timeout_s: float) -> dict[str, Any]:
    """Figures of one run: before the burst, during it (the ramp and one second more), after it
    (from ``settle_s`` after the ramp), failures by kind, and when latency was back to normal."""
    ramp_end = burst_at + ramp_s
    before = _window(outcomes, start_at, burst_at) if burst_at > start_at else None
    during = _window(outcomes, burst_at, ramp_end + 1.0)
    after = _window(outcomes, ramp_end + settle_s, end_at)
    failures: dict[str, int] = {}
    for _, _, kind in outcomes:
        if kind != "ok":
            failures[kind] = failures.get(kind, 0) + 1
    slow_503 = sum(1 for _, elapsed, kind in outcomes if kind == "503" and elapsed > pool_timeout_s + 0.5)
    seconds = timeline(outcomes, burst_at, end_at)
    recovered_after_s = None
    reference = before["latency"].get("p50_ms") if before else None
    if reference:
        # The first second after the ramp from which every second has no failure and a p50
        # within 1.5x the p50 before the burst.
        first_after_ramp = int(ramp_s + 0.999)
        for n in range(first_after_ramp, len(seconds)):
            rest = seconds[n:]
            if all(s["failed"] == 0 and s["p50_ms"] is not None and s["p50_ms"] <= 1.5 * reference for s in rest):
                recovered_after_s = n - ramp_s
                break
    return {
        "requests": len(outcomes),
        "failed": sum(failures.values()),
        "failures": failures,
        "slow_503": slow_503,
        "before": before,
        "during": during,
        "after": after,
        "after_p50_over_before_p50": (
            round(after["latency"]["p50_ms"] / reference, 3) if reference and after["latency"].get("p50_ms") else None
        ),
        "recovered_s_after_ramp": recovered_after_s,
        "timeline": seconds,
    }
