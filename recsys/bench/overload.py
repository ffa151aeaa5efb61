"""Benchmark 6: the scale-out storm. Many function instances, each with its own pool, few server connections.

Azure Functions scales out in bursts, and every new instance opens its pool at once. PostgreSQL
runs with ``max_connections = 22``; PgBouncer (transaction mode) may open 16 server connections.

1. **Connection cost, before and after.** Connections opened the old way (PgBouncer checks a
   plain-text password with PBKDF2 at every login; pgvector's types fetched from the catalogue
   and the connection checked before its first use) and the app's way (SCRAM secrets in
   PgBouncer's auth file, types from the process's cache, no check): statements PgBouncer
   passes on per connection (SHOW STATS), PgBouncer CPU time per connection (/proc/PID/stat).
2. **Storms.** A fixed request rate on a few warm instances, then hundreds of instances start
   within 2 s and share it: failures, p50/p95/p99 before, during and after the burst, server
   connections, PgBouncer's waiting clients and CPU. The 500-instance storm runs several
   times (a metastable failure shows up in some runs only), then 1,000 instances, which is
   more than the 16 server connections can serve at once: there the goal is a fast 503.
3. **Direct vs PgBouncer** at 30 and 100 instances: the share of failed requests when every
   instance connects straight to PostgreSQL, next to PgBouncer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import psycopg
from pgvector.psycopg import register_vector_async
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from recsys.bench.harness import BenchOptions, bench_stack, load_catalogue, server_versions
from recsys.bench.plots import line_plot
from recsys.bench.results import BenchResult, Headline
from recsys.bench.stats import percentile
from recsys.bench.storm import Workload, run_instances, summarize_run
from recsys.config import Settings
from recsys.datasets import clustered_catalogue
from recsys.db.pool import configure_connection, connection_kwargs
from recsys.local.stack import LOCAL_PASSWORD, Stack

__all__ = ["run"]

log = logging.getLogger("recsys")

TITLE = "the scale-out storm: many instances, few server connections"
MAX_CONNECTIONS = 22
#: Server connections PgBouncer may open: below max_connections minus the superuser reserve (3).
BOUNCER_POOL = 16
#: Seconds over which the burst's instances start.
RAMP_S = 2.0
#: Warm instances serve the load alone for WARMUP_S (not measured), then BEFORE_S (measured).
WARM_INSTANCES = 20
WARMUP_S = 2.0
BEFORE_S = 4.0
#: Seconds after the ramp during which the load goes on; the steady state after the burst is
#: measured from SETTLE_S after the ramp.
AFTER_S = 8.0
SETTLE_S = 3.0
#: Goals of the issue this benchmark checks.
DURING_P95_GOAL_MS = 1000.0
AFTER_OVER_BEFORE_GOAL = 1.5
PROCESSES = 2
#: Pool sizes (min_size, max_size) tried once each in a 500-instance storm, next to the default.
SIZINGS = ((0, 2), (1, 2), (0, 4), (1, 4))


#: SCRAM iterations of the login the simulated instances use in the storms. On Azure every
#: instance computes its login's PBKDF2 (4096 iterations, about 8 ms here) on its own CPU; here
#: hundreds of instances share two cores with PgBouncer and PostgreSQL, so 500 logins in 2 s
#: would be 4 s of CPU in the simulator alone. Neither PgBouncer (SCRAM secrets) nor PostgreSQL
#: (the client's keys, passed through) runs PBKDF2 for a login, so the iteration count changes
#: the simulator's cost only. One storm runs with the full 4096 to show that cost.
SIMULATED_SCRAM_ITERATIONS = 64
FULL_SCRAM_ITERATIONS = 4096


@dataclass(frozen=True)
class StormSpec:
    label: str
    route: str
    instances: int
    warm: int
    pool_min_size: int
    pool_max_size: int
    scram_iterations: int = SIMULATED_SCRAM_ITERATIONS


def set_login_iterations(stack: Stack, iterations: int) -> None:
    """Give the app role its password hashed with ``iterations``, and PgBouncer the new secret."""
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("SET scram_iterations = {}").format(sql.Literal(iterations)))
        conn.execute(sql.SQL("ALTER ROLE recsys PASSWORD {}").format(sql.Literal(LOCAL_PASSWORD)))
    stack.reload_pgbouncer()
    time.sleep(0.5)


# ----------------------------------------------------------------- PgBouncer's figures


def bouncer_cpu_s(stack: Stack) -> float:
    """User + system CPU seconds PgBouncer has used so far (/proc/PID/stat, fields 14 and 15)."""
    pid = int(stack.bouncer_pidfile.read_text().split()[0])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _bouncer_show(stack: Stack, command: str) -> list[dict[str, Any]]:
    with psycopg.connect(stack.bouncer_admin_url(), autocommit=True, prepare_threshold=None,
                         cursor_factory=psycopg.ClientCursor) as admin:
        cur = admin.execute(command)
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def bouncer_queries(stack: Stack) -> int:
    """Queries PgBouncer has passed to the app database, once its totals (refreshed every
    ``stats_period``, 1 s) stop moving."""
    def read() -> int:
        rows = _bouncer_show(stack, "SHOW STATS")
        return sum(int(r["total_query_count"]) for r in rows if r["database"] == stack.config.database)

    last = read()
    for _ in range(20):
        time.sleep(1.2)
        now = read()
        if now == last:
            return now
        last = now
    return last


class ServerSampler:
    """Samples server connections (pg_stat_activity), PgBouncer's waiting clients and its CPU."""

    def __init__(self, stack: Stack, bouncer: bool, period_s: float = 0.25) -> None:
        self.stack = stack
        self.bouncer = bouncer
        self.period_s = period_s
        self.backends: list[int] = []
        self.waiting_clients: list[int] = []
        #: (epoch s, PgBouncer CPU s so far)
        self.cpu: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> ServerSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with psycopg.connect(self.stack.admin_conninfo(), autocommit=True) as pg:
            admin = None
            if self.bouncer:
                admin = psycopg.connect(self.stack.bouncer_admin_url(), autocommit=True, prepare_threshold=None,
                                        cursor_factory=psycopg.ClientCursor)
            try:
                while True:
                    self.cpu.append((time.time(), bouncer_cpu_s(self.stack)))
                    row = pg.execute(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE backend_type = 'client backend' AND usename = 'recsys'"
                    ).fetchone()
                    self.backends.append(int(row[0]) if row else 0)
                    if admin is not None:
                        cur = admin.execute("SHOW POOLS")
                        names = [d.name for d in cur.description or []]
                        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
                        self.waiting_clients.append(sum(int(r["cl_waiting"]) for r in rows))
                    if self._stop.wait(self.period_s):
                        break
            finally:
                if admin is not None:
                    admin.close()

    def cpu_between(self, start: float, end: float) -> float:
        inside = [cpu for at, cpu in self.cpu if start <= at <= end]
        return round(inside[-1] - inside[0], 3) if len(inside) >= 2 else 0.0


# ----------------------------------------------------------------- 1. connection cost


async def _open_connections(
    url: str, settings: Settings, count: int, legacy: bool, concurrency: int = 10
) -> list[float]:
    """Open and close ``count`` connections, ``concurrency`` at a time; each one's seconds."""
    kwargs = connection_kwargs(settings)
    times: list[float] = []
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            started = time.perf_counter()
            conn = await psycopg.AsyncConnection.connect(url, **kwargs)
            try:
                if legacy:
                    # What a new pooled connection cost before: pgvector's own registration (four
                    # catalogue lookups, each BEGIN / SELECT / COMMIT) and a check before first use.
                    await register_vector_async(conn)
                    await AsyncConnectionPool.check_connection(conn)
                else:
                    await configure_connection(conn)
            finally:
                await conn.close()
            times.append(time.perf_counter() - started)

    await asyncio.gather(*(one() for _ in range(count)))
    return times


def connection_cost(stack: Stack, count: int) -> dict[str, Any]:
    settings = replace(Settings(), connect_timeout=30)
    url = stack.bouncer_url()
    variants = {
        "before": (True, True),  # password in the auth file; types fetched, connection checked
        "scram_secrets_only": (False, True),
        "after": (False, False),  # the app's way
    }
    figures: dict[str, Any] = {}
    # Warm the process's type cache, as the first connection of a worker does.
    asyncio.run(_open_connections(url, settings, 1, legacy=False))
    for name, (plain, legacy) in variants.items():
        stack.config = replace(stack.config, bouncer_plain_passwords=plain)
        stack.reload_pgbouncer()
        time.sleep(0.5)
        queries, cpu = bouncer_queries(stack), bouncer_cpu_s(stack)
        started = time.perf_counter()
        times = asyncio.run(_open_connections(url, settings, count, legacy=legacy))
        wall = time.perf_counter() - started
        cpu_used = bouncer_cpu_s(stack) - cpu
        queries_used = bouncer_queries(stack) - queries
        figures[name] = {
            "connections": count,
            "plain_password_in_auth_file": plain,
            "types_fetched_and_checked_per_connection": legacy,
            "statements_per_connection": round(queries_used / count, 2),
            "bouncer_cpu_ms_per_connection": round(1000 * cpu_used / count, 3),
            "connect_p50_ms": round(1000 * percentile(times, 50), 3),
            "connections_per_s": round(count / wall, 1),
        }
        log.info("connection cost %s: %s", name, figures[name])
    stack.config = replace(stack.config, bouncer_plain_passwords=False)
    stack.reload_pgbouncer()
    return figures


# ----------------------------------------------------------------- 2./3. storms


def _storm(stack: Stack, spec: StormSpec, total_rate: float, ids: list[str], pool_timeout: float) -> dict[str, Any]:
    url = stack.bouncer_url() if spec.route == "pgbouncer" else stack.direct_url()
    start_at = time.time() + 3.0  # time for the worker processes to start
    measured_from = start_at + (WARMUP_S if spec.warm else 0.0)
    burst_at = measured_from + (BEFORE_S if spec.warm else 0.0)
    end_at = burst_at + RAMP_S + AFTER_S

    def share(total: int, p: int) -> int:
        return total // PROCESSES + (1 if p < total % PROCESSES else 0)

    works = [
        Workload(url=url, ids=ids, warm=share(spec.warm, p), burst=share(spec.instances, p),
                 rate=total_rate / PROCESSES, start_at=start_at, burst_at=burst_at, end_at=end_at, ramp_s=RAMP_S,
                 pool_min_size=spec.pool_min_size, pool_max_size=spec.pool_max_size, pool_timeout_s=pool_timeout,
                 seed=1000 * spec.instances + 10 * p + len(spec.label))
        for p in range(PROCESSES)
    ]
    load_before = os.getloadavg()[0]
    with (
        ServerSampler(stack, bouncer=spec.route == "pgbouncer") as sampler,
        ProcessPoolExecutor(max_workers=PROCESSES, mp_context=get_context("spawn")) as executor,
    ):
        outs = list(executor.map(run_instances, works, timeout=end_at - time.time() + 2 * pool_timeout + 120))
    outcomes = [o for out in outs for o in out["outcomes"]]
    errors: dict[str, int] = {}
    for out in outs:
        for name, n in out["errors"].items():
            errors[name] = errors.get(name, 0) + n
    figures = summarize_run(outcomes, start_at=measured_from, burst_at=burst_at, end_at=end_at, ramp_s=RAMP_S,
                            settle_s=SETTLE_S, pool_timeout_s=pool_timeout)
    logins = sum(out["logins"] for out in outs)
    cpu_burst = sampler.cpu_between(burst_at, burst_at + RAMP_S + 1.0)
    figures.update({
        "instances": spec.instances,
        "warm_instances": spec.warm,
        "client_scram_iterations": spec.scram_iterations,
        "route": spec.route,
        "pool": {"min_size": spec.pool_min_size, "max_size": spec.pool_max_size, "timeout_s": pool_timeout},
        "errors": errors,
        "logins": logins,
        "login_errors": sum(out["login_errors"] for out in outs),
        "unfinished": sum(out["unfinished"] for out in outs),
        "server_connections_max": max(sampler.backends, default=0),
        "bouncer_waiting_clients_max": max(sampler.waiting_clients, default=None),
        "bouncer_cpu_s": sampler.cpu_between(start_at, end_at + 5),
        "bouncer_cpu_s_during_burst": cpu_burst,
        "bouncer_cpu_share_during_burst": round(cpu_burst / (RAMP_S + 1.0), 3),
        # The simulator's processes: CPU seconds over the burst window (2 cores = 2 s per second).
        "simulator_cpu_s_during_burst": round(sum(out["burst_cpu_s"] for out in outs), 3),
        "simulator_wall_s_during_burst": max(out["burst_wall_s"] for out in outs),
        "machine_load_average_1min_before": round(load_before, 2),
    })
    log.info("storm %s: %d requests, %d failed, during p95 %s ms, after/before p50 %s", spec.label,
             figures["requests"], figures["failed"], figures["during"]["latency"].get("p95_ms"),
             figures["after_p50_over_before_p50"])
    return figures


def run(options: BenchOptions) -> BenchResult:
    repeats = options.size(5, 1)
    burst = options.size(500, 60)
    big = options.size(1000, 120)
    total_rate = float(options.size(200, 60))
    pool_timeout = Settings().pool_timeout
    defaults = Settings()
    catalogue = clustered_catalogue(options.size(5_000, 1_000), 64, seed=6)
    specs = [
        *[StormSpec(f"pgbouncer/{burst}/run{n + 1}", "pgbouncer", burst, WARM_INSTANCES,
                    defaults.pool_min_size, defaults.pool_max_size) for n in range(repeats)],
        StormSpec(f"pgbouncer/{big}", "pgbouncer", big, WARM_INSTANCES, defaults.pool_min_size, defaults.pool_max_size),
        *[StormSpec(f"{route}/{n}", route, n, 0, defaults.pool_min_size, defaults.pool_max_size)
          for n in ((10, 30) if options.quick else (30, 100)) for route in ("direct", "pgbouncer")],
        *[StormSpec(f"sizing/{burst}/min{lo}-max{hi}", "pgbouncer", burst, WARM_INSTANCES, lo, hi)
          for lo, hi in SIZINGS if (lo, hi) != (defaults.pool_min_size, defaults.pool_max_size)],
        StormSpec(f"pgbouncer/{burst}/full-scram-in-simulator", "pgbouncer", burst, WARM_INSTANCES,
                  defaults.pool_min_size, defaults.pool_max_size, FULL_SCRAM_ITERATIONS),
    ]
    runs: dict[str, Any] = {}
    with bench_stack(
        options, "overload", embedding_dim=64,
        pg_settings={"max_connections": str(MAX_CONNECTIONS)},
        bouncer_settings={"default_pool_size": str(BOUNCER_POOL), "max_db_connections": str(BOUNCER_POOL),
                          "max_client_conn": "5000", "query_wait_timeout": "20"},
    ) as stack:
        load_catalogue(stack, catalogue)
        servers = server_versions(stack)
        cost = connection_cost(stack, options.size(300, 50))
        iterations = FULL_SCRAM_ITERATIONS
        for spec in specs:
            log.info("overload: %s", spec.label)
            if spec.scram_iterations != iterations:
                iterations = spec.scram_iterations
                set_login_iterations(stack, iterations)
            runs[spec.label] = _storm(stack, spec, total_rate, catalogue.ids, pool_timeout)
    return _result(options, runs, cost, servers, burst=burst, big=big, repeats=repeats, total_rate=total_rate,
                   pool_timeout=pool_timeout, defaults=defaults, catalogue_items=len(catalogue.ids))


def _result(options: BenchOptions, runs: dict[str, Any], cost: dict[str, Any], servers: dict[str, str], *,
            burst: int, big: int, repeats: int, total_rate: float, pool_timeout: float, defaults: Settings,
            catalogue_items: int) -> BenchResult:
    storms = [runs[f"pgbouncer/{burst}/run{n + 1}"] for n in range(repeats)]
    top = runs[f"pgbouncer/{big}"]
    before, after = cost["before"], cost["after"]
    plot = "overload.png"
    line_plot(
        options.out_dir / plot,
        {f"run {n + 1}": ([s["s"] for s in run["timeline"]], [s["p95_ms"] or 0 for s in run["timeline"]])
         for n, run in enumerate(storms)} | {
            f"{big} instances": ([s["s"] for s in top["timeline"]], [s["p95_ms"] or 0 for s in top["timeline"]])},
        title=f"p95 per second from the start of the burst ({burst} instances in {RAMP_S:g} s)",
        xlabel="seconds since the burst started", ylabel="p95 (ms)",
    )
    worst_during = max((s["during"]["latency"].get("p95_ms") or 0) for s in storms)
    worst_ratio = max((s["after_p50_over_before_p50"] or 0) for s in storms)
    failed = [s["failed"] for s in storms]
    top_other = top["failed"] - top["failures"].get("503", 0) + top["slow_503"]
    headlines = [
        Headline(f"statements per new connection, before ÷ after ({before['statements_per_connection']} vs "
                 f"{after['statements_per_connection']})", before["statements_per_connection"], "",
                 "after: 0", after["statements_per_connection"] == 0),
        Headline(f"PgBouncer CPU per new connection, before (password in the auth file) ÷ after (SCRAM "
                 f"secrets): {before['bouncer_cpu_ms_per_connection']} ms vs "
                 f"{after['bouncer_cpu_ms_per_connection']} ms",
                 round(before["bouncer_cpu_ms_per_connection"] / max(after["bouncer_cpu_ms_per_connection"], 0.001), 1),
                 "×"),
        Headline(f"failed requests in each of {repeats} storms of {burst} instances in {RAMP_S:g} s through PgBouncer "
                 f"(of {', '.join(str(s['requests']) for s in storms)})", max(failed), "", "0 in every run",
                 all(f == 0 for f in failed)),
        Headline(f"p95 during the burst, worst of the {repeats} runs "
                 f"({', '.join(str(s['during']['latency'].get('p95_ms')) for s in storms)} ms)", worst_during, "ms",
                 f"≤ {DURING_P95_GOAL_MS:g} ms", worst_during <= DURING_P95_GOAL_MS),
        Headline(f"p50 after the burst ÷ p50 before it, worst of the {repeats} runs (from {SETTLE_S:g} s after the "
                 f"ramp; before: {', '.join(str(s['before']['latency'].get('p50_ms')) for s in storms)} ms)",
                 worst_ratio, "×", f"≤ {AFTER_OVER_BEFORE_GOAL:g}×", 0 < worst_ratio <= AFTER_OVER_BEFORE_GOAL),
        Headline(f"server connections at most, PgBouncer's waiting clients at most, over the {repeats} runs "
                 f"(waiting: {max((s['bouncer_waiting_clients_max'] or 0) for s in storms)})",
                 max(s["server_connections_max"] for s in storms), "", f"≤ {BOUNCER_POOL}",
                 max(s["server_connections_max"] for s in storms) <= BOUNCER_POOL),
        Headline(f"PgBouncer CPU during the burst, worst share of one core ({burst} instances; the simulated "
                 f"instances' processes used {', '.join(str(s['simulator_cpu_s_during_burst']) for s in storms)} "
                 f"CPU s in those {RAMP_S + 1:g} s; machine load average before each run "
                 f"{', '.join(str(s['machine_load_average_1min_before']) for s in storms)} on 2 cores)",
                 round(100 * max(s["bouncer_cpu_share_during_burst"] for s in storms), 1), "%"),
        Headline(f"{big} instances: failures other than a fast 503 (503 answered: {top['failures'].get('503', 0)} "
                 f"of {top['requests']}; p95 during {top['during']['latency'].get('p95_ms')} ms)", top_other, "",
                 "0", top_other == 0),
        Headline(f"{big} instances: failures after the burst (from {SETTLE_S:g} s after the ramp; p50 after ÷ before "
                 f"{top['after_p50_over_before_p50']}×)", top["after"]["failed"], "", "0 (recovers by itself)",
                 top["after"]["failed"] == 0),
    ]
    for n in sorted({spec.split("/")[1] for spec in runs if spec.startswith("direct/")}, key=int):
        direct, bounced = runs[f"direct/{n}"], runs[f"pgbouncer/{n}"]
        headlines.append(Headline(
            f"failed share at {n} instances, direct vs through PgBouncer ({direct['failed']} of {direct['requests']} "
            f"vs {bounced['failed']} of {bounced['requests']})",
            round(100 * direct["failed"] / max(direct["requests"], 1), 1), "%",
        ))
    sizing = {(defaults.pool_min_size, defaults.pool_max_size): storms[0]} | {
        (lo, hi): runs[f"sizing/{burst}/min{lo}-max{hi}"] for lo, hi in SIZINGS
        if f"sizing/{burst}/min{lo}-max{hi}" in runs}
    for (lo, hi), figures in sorted(sizing.items()):
        default = " (default)" if (lo, hi) == (defaults.pool_min_size, defaults.pool_max_size) else ""
        headlines.append(Headline(
            f"pool min_size {lo}, max_size {hi}{default}: logins in a {burst}-instance storm (failed "
            f"{figures['failed']}, p95 during {figures['during']['latency'].get('p95_ms')} ms, p50 after ÷ before "
            f"{figures['after_p50_over_before_p50']}×, server connections {figures['server_connections_max']})",
            figures["logins"], "",
        ))
    full = runs.get(f"pgbouncer/{burst}/full-scram-in-simulator")
    if full is not None:
        headlines.append(Headline(
            f"the same {burst}-instance storm with every simulated login at {FULL_SCRAM_ITERATIONS} SCRAM iterations "
            f"on the simulator's 2 cores: failed (p95 during {full['during']['latency'].get('p95_ms')} ms, p50 after "
            f"÷ before {full['after_p50_over_before_p50']}×, requests issued {full['requests']})", full["failed"], "",
        ))
    return BenchResult(
        name="overload",
        title=TITLE,
        inputs={
            "max_connections": MAX_CONNECTIONS, "pgbouncer_pool": BOUNCER_POOL, "pgbouncer_max_client_conn": 5000,
            "burst_instances": burst, "repeats": repeats, "big_burst_instances": big, "warm_instances": WARM_INSTANCES,
            "offered_requests_per_s": total_rate, "ramp_s": RAMP_S, "warmup_s": WARMUP_S, "before_s": BEFORE_S,
            "after_s": AFTER_S, "settle_s": SETTLE_S, "processes": PROCESSES,
            "pool_per_instance": {"min_size": defaults.pool_min_size, "max_size": defaults.pool_max_size,
                                  "timeout_s": pool_timeout, "connect_timeout_s": defaults.connect_timeout},
            "request": "recsys.search.service.similar_items(k=10, ef_search=40) over the instance's app pool",
            "simulated_login_scram_iterations": SIMULATED_SCRAM_ITERATIONS,
            "catalogue_items": catalogue_items, "dim": 64,
        },
        figures={"connection_cost": cost, "runs": runs},
        headlines=headlines,
        plots=[plot],
        notes=[
            "instances share 2 cores with PgBouncer and PostgreSQL; the storms' simulated logins use "
            f"{SIMULATED_SCRAM_ITERATIONS} SCRAM iterations so that the clients' PBKDF2 (8 ms per login at "
            f"{FULL_SCRAM_ITERATIONS}, on each instance's own CPU on Azure) does not starve the simulator; "
            "PgBouncer and PostgreSQL run no PBKDF2 for a login either way; one storm runs at the full count",
            "the connection cost is measured with the full 4096 iterations",
            "during = requests issued from the start of the burst to 1 s after the ramp; after = from "
            f"{SETTLE_S:g} s after the ramp to the end",
        ],
        servers=servers,
    )
