"""Benchmark 6: many function instances, each with its own small pool, against few server connections.

Azure Functions scales out to many instances, and every worker process keeps its own pool. With
PostgreSQL at ``max_connections = 22``, instances connecting directly run out of connections as
soon as there are more of them than server slots; through PgBouncer in transaction mode they
share a fixed set of server connections. Each run offers the same total load (requests/s, spread
evenly over the instances) for a fixed time; instances live in a few OS processes, many asyncio
instances each, started over a short ramp as a scale-out would.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from typing import Any

import psycopg

from recsys.bench.harness import BenchOptions, bench_stack, load_catalogue, server_versions
from recsys.bench.plots import line_plot
from recsys.bench.results import BenchResult, Headline
from recsys.bench.stats import summarize
from recsys.config import Settings
from recsys.datasets import clustered_catalogue
from recsys.db.pool import close_pools, get_pool
from recsys.search.params import SimilarQuery
from recsys.search.service import similar_items

__all__ = ["run"]

TITLE = "many instances, few server connections"
QUERY = SimilarQuery(k=10, ef_search=40)
MAX_CONNECTIONS = 22
#: Server connections PgBouncer may open: below max_connections minus the superuser reserve (3).
BOUNCER_POOL = 16
#: Requests in flight per instance beyond which new ones are refused (bounds the load loop).
MAX_IN_FLIGHT = 16
#: Seconds over which the instances start (scale-out), each at a random moment.
RAMP_S = 2.0
#: The slower scale-out of the extra run at the top instance count.
GRADUAL_RAMP_S = 10.0
#: Seconds after the ramp from which latencies also count as steady state.
SETTLE_S = 3.0


@dataclass(frozen=True)
class Workload:
    url: str
    ids: list[str]
    instances: int
    rate_per_instance: float
    duration_s: float
    ramp_s: float
    pool_max_size: int
    pool_timeout_s: float
    start_at: float
    seed: int


async def _instance(work: Workload, number: int, rng: random.Random, out: dict[str, Any]) -> None:
    """One function instance: the app's pool of its own; requests arrive at a steady rate, each a task."""
    await asyncio.sleep(max(0.0, work.start_at - time.time()) + rng.uniform(0, work.ramp_s))
    settings = replace(Settings(), database_url=work.url, pool_min_size=1, pool_max_size=work.pool_max_size,
                       pool_timeout=work.pool_timeout_s, connect_timeout=5)
    # Instances share an event loop here, so each names its pool (recsys.db.pool keys them by name).
    pool = await get_pool(f"instance-{number}", settings)
    end = work.start_at + work.ramp_s + work.duration_s
    # After the scale-out storm (every instance connecting at once) has settled.
    steady_from = work.start_at + work.ramp_s + SETTLE_S
    interval = 1.0 / work.rate_per_instance
    next_at = time.time() + rng.uniform(0, interval)
    tasks: set[asyncio.Task[None]] = set()

    async def request(item_id: str) -> None:
        issued = time.time()
        started = time.perf_counter()
        try:
            await similar_items(pool, item_id, QUERY, timeout_ms=int(work.pool_timeout_s * 1000))
        except Exception as exc:
            out["errors"][type(exc).__name__] += 1
            return
        elapsed = time.perf_counter() - started
        out["latencies"].append(elapsed)
        if issued >= steady_from:
            out["steady"].append(elapsed)

    try:
        while next_at < end:
            await asyncio.sleep(max(0.0, next_at - time.time()))
            next_at += interval
            out["offered"] += 1
            if len(tasks) >= MAX_IN_FLIGHT:
                out["errors"]["Shed"] += 1
                continue
            task = asyncio.create_task(request(rng.choice(work.ids)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=work.pool_timeout_s + 30)
        for task in tasks:
            task.cancel()
            out["errors"]["Unfinished"] += 1
    finally:
        await pool.close(timeout=5)


async def _instances(work: Workload) -> dict[str, Any]:
    out: dict[str, Any] = {"latencies": [], "steady": [], "errors": Counter(), "offered": 0}
    rng = random.Random(work.seed)
    try:
        await asyncio.gather(*(
            _instance(work, number, random.Random(rng.random()), out) for number in range(work.instances)
        ))
    finally:
        await close_pools()
    return out


def run_instances(work: Workload) -> dict[str, Any]:
    """Entry point of a worker process: run ``work.instances`` instances on one event loop."""
    # A refused connection is the expected outcome here, not news for the log.
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    logging.getLogger("recsys").setLevel(logging.ERROR)
    out = asyncio.run(_instances(work))
    return {"latencies": out["latencies"], "steady": out["steady"], "errors": dict(out["errors"]),
            "offered": out["offered"]}


class ServerSampler:
    """Samples the server connections of the app role (pg_stat_activity) and PgBouncer's pools."""

    def __init__(self, admin_conninfo: str, bouncer_admin_url: str | None, period_s: float = 0.25) -> None:
        self.admin_conninfo = admin_conninfo
        self.bouncer_admin_url = bouncer_admin_url
        self.period_s = period_s
        self.backends: list[int] = []
        self.waiting_clients: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> ServerSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with psycopg.connect(self.admin_conninfo, autocommit=True) as pg:
            bouncer = None
            if self.bouncer_admin_url:
                bouncer = psycopg.connect(self.bouncer_admin_url, autocommit=True, prepare_threshold=None,
                                          cursor_factory=psycopg.ClientCursor)
            try:
                while not self._stop.wait(self.period_s):
                    row = pg.execute(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE backend_type = 'client backend' AND usename = 'recsys'"
                    ).fetchone()
                    self.backends.append(int(row[0]) if row else 0)
                    if bouncer is not None:
                        cur = bouncer.execute("SHOW POOLS")
                        names = [d.name for d in cur.description or []]
                        waiting = sum(dict(zip(names, r, strict=True))["cl_waiting"] for r in cur.fetchall())
                        self.waiting_clients.append(int(waiting))
            finally:
                if bouncer is not None:
                    bouncer.close()


def _one_run(stack: Any, route: str, instances: int, total_rate: float, duration: float, processes: int,
             ids: list[str], pool_max_size: int, pool_timeout: float, ramp: float) -> dict[str, Any]:
    url = stack.bouncer_url() if route == "pgbouncer" else stack.direct_url()
    start_at = time.time() + 3.0  # time for the worker processes to start
    shares = [instances // processes + (1 if p < instances % processes else 0) for p in range(processes)]
    works = [
        Workload(url=url, ids=ids, instances=share, rate_per_instance=total_rate / instances, duration_s=duration,
                 ramp_s=ramp, pool_max_size=pool_max_size, pool_timeout_s=pool_timeout, start_at=start_at,
                 seed=1000 * instances + p)
        for p, share in enumerate(shares) if share
    ]
    with (
        ServerSampler(stack.admin_conninfo(), stack.bouncer_admin_url() if route == "pgbouncer" else None) as sampler,
        ProcessPoolExecutor(max_workers=len(works), mp_context=get_context("spawn")) as executor,
    ):
        outs = list(executor.map(run_instances, works, timeout=duration + ramp + pool_timeout + 120))
    latencies = [x for out in outs for x in out["latencies"]]
    steady = [x for out in outs for x in out["steady"]]
    errors: Counter[str] = Counter()
    for out in outs:
        errors.update(out["errors"])
    offered = sum(out["offered"] for out in outs)
    return {
        "offered": offered,
        "succeeded": len(latencies),
        "failed": sum(errors.values()),
        "failed_share": round(sum(errors.values()) / offered, 4) if offered else None,
        "errors": dict(errors),
        "latency": summarize(latencies),
        "latency_steady": summarize(steady),
        # Instances start over the ramp and all stop at its end plus the duration.
        "requests_per_s": round(len(latencies) / (duration + ramp / 2), 1),
        "server_connections_max": max(sampler.backends, default=0),
        "server_connections_mean": round(sum(sampler.backends) / len(sampler.backends), 1) if sampler.backends else 0,
        "bouncer_waiting_clients_max": max(sampler.waiting_clients, default=None),
    }


def run(options: BenchOptions) -> BenchResult:
    counts = [30, 100, 500]
    total_rate = float(options.size(200, 60))
    duration = float(options.size(20, 4))
    processes = 2
    pool_max_size = 2
    pool_timeout = 5.0
    catalogue = clustered_catalogue(options.size(5_000, 1_000), 64, seed=6)
    runs: dict[str, Any] = {}
    with bench_stack(
        options, "overload", embedding_dim=64,
        pg_settings={"max_connections": str(MAX_CONNECTIONS)},
        bouncer_settings={"default_pool_size": str(BOUNCER_POOL), "max_db_connections": str(BOUNCER_POOL),
                          "max_client_conn": "3000", "query_wait_timeout": "20"},
    ) as stack:
        load_catalogue(stack, catalogue)
        servers = server_versions(stack)
        for instances in counts:
            for route in ("direct", "pgbouncer"):
                logging.getLogger("recsys").info("overload: %d instances, %s", instances, route)
                runs[f"{route}/{instances}"] = _one_run(stack, route, instances, total_rate, duration, processes,
                                                         catalogue.ids, pool_max_size, pool_timeout, RAMP_S)
        # The same top count scaled out gradually, as Azure adds instances over seconds, not at once.
        runs[f"pgbouncer/{counts[-1]}/gradual"] = _one_run(stack, "pgbouncer", counts[-1], total_rate, duration,
                                                           processes, catalogue.ids, pool_max_size, pool_timeout,
                                                           GRADUAL_RAMP_S)
    plot = "overload.png"
    line_plot(
        options.out_dir / plot,
        {route: (counts, [100 * (runs[f"{route}/{n}"]["failed_share"] or 0) for n in counts])
         for route in ("direct", "pgbouncer")},
        title=f"failed requests at {total_rate:.0f} req/s offered, max_connections = {MAX_CONNECTIONS}",
        xlabel="function instances (each with its own pool)", ylabel="failed requests (%)", logx=True,
    )
    top = runs[f"pgbouncer/{counts[-1]}"]
    gradual = runs[f"pgbouncer/{counts[-1]}/gradual"]
    direct_top = runs[f"direct/{counts[-1]}"]
    return BenchResult(
        name="overload",
        title=TITLE,
        inputs={
            "max_connections": MAX_CONNECTIONS, "pgbouncer_pool": BOUNCER_POOL, "instances": counts,
            "offered_requests_per_s": total_rate, "duration_s": duration, "ramp_s": RAMP_S,
            "gradual_ramp_s": GRADUAL_RAMP_S, "processes": processes,
            "pool_per_instance": {"min_size": 1, "max_size": pool_max_size, "timeout_s": pool_timeout},
            "request": "recsys.search.service.similar_items(k=10, ef_search=40) over the app's pool",
            "catalogue_items": len(catalogue.ids), "dim": 64,
            "steady_state_from_s_after_ramp": SETTLE_S,
        },
        figures=runs,
        headlines=[
            Headline(f"failed requests through PgBouncer at {counts[-1]} instances (of {top['offered']})",
                     top["failed"], "", "0", top["failed"] == 0),
            Headline(f"server connections in use through PgBouncer at {counts[-1]} instances (max)",
                     top["server_connections_max"], "", "≤ 20", top["server_connections_max"] <= 20),
            Headline(f"failed requests direct at {counts[-1]} instances (of {direct_top['offered']})",
                     direct_top["failed"], ""),
            Headline(f"p50 through PgBouncer at {counts[-1]} instances (p95 {top['latency'].get('p95_ms')} ms; "
                     f"after the scale-out: p50 {top['latency_steady'].get('p50_ms')} ms, "
                     f"p95 {top['latency_steady'].get('p95_ms')} ms)", top["latency"].get("p50_ms"), "ms"),
            Headline(f"failed requests through PgBouncer at {counts[-1]} instances started over {GRADUAL_RAMP_S:g} s "
                     f"instead of {RAMP_S:g} s (of {gradual['offered']}; p50 {gradual['latency'].get('p50_ms')} ms, "
                     f"p95 {gradual['latency'].get('p95_ms')} ms; {gradual['server_connections_max']} server "
                     "connections)", gradual["failed"], ""),
            *[Headline(f"failed requests direct at {n} instances (of {runs[f'direct/{n}']['offered']})",
                       runs[f"direct/{n}"]["failed"], "") for n in counts[:-1]],
        ],
        plots=[plot],
        servers=servers,
    )
