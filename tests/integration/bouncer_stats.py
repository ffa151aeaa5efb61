"""PgBouncer's own counters, read from its admin console, for tests that count round trips."""

from __future__ import annotations

import asyncio
import time

import psycopg

from recsys.local.stack import Stack

__all__ = ["close_server_connections", "pool_rows", "settled_query_count"]


def _console(stack: Stack, user: str = "recsys") -> psycopg.Connection[tuple[object, ...]]:
    """PgBouncer's admin console, as ``user`` (``recsys`` may read it, ``postgres`` also command it)."""
    return psycopg.connect(stack.bouncer_admin_url(user=user), autocommit=True, prepare_threshold=None,
                           cursor_factory=psycopg.ClientCursor)


def _rows(console: psycopg.Connection[tuple[object, ...]], command: str) -> list[dict[str, object]]:
    cur = console.execute(command)
    names = [d.name for d in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _show(stack: Stack, command: str) -> list[dict[str, object]]:
    with _console(stack) as console:
        return _rows(console, command)


def close_server_connections(stack: Stack, timeout: float = 5.0) -> None:
    """PgBouncer's server connections to the app database closed (its ``RECONNECT``), once their
    backends have ended.

    A backend kept idle behind PgBouncer reports its statistics (the index scans it made, ...) up
    to 10 s after its last statement, when it is idle within a second of its last report; a
    backend that ends reports them at once. A count read after this call holds what the
    connections through PgBouncer did in the transactions they have ended.
    """
    with _console(stack, "postgres") as console:
        # A server connection in a transaction (active) is closed only once it is released.
        pids = [int(str(r["remote_pid"])) for r in _rows(console, "SHOW SERVERS")
                if r["database"] == stack.config.database and r["state"] != "active"]
        console.execute("RECONNECT")
    deadline = time.monotonic() + timeout
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY (%s)", [pids]).fetchone() != (0,):
            if time.monotonic() > deadline:
                raise TimeoutError(f"PgBouncer's server connections {pids} did not end in {timeout} s")
            time.sleep(0.05)


def _query_count(stack: Stack) -> int:
    rows = _show(stack, "SHOW STATS")
    return sum(int(str(r["total_query_count"])) for r in rows if r["database"] == stack.config.database)


async def settled_query_count(stack: Stack, timeout: float = 20.0) -> int:
    """Queries PgBouncer has passed to the app database so far, once its totals stop moving.

    PgBouncer refreshes SHOW STATS every ``stats_period`` (1 s on the local stack), so a figure
    counts only when two readings 1.2 s apart agree.
    """
    deadline = time.monotonic() + timeout
    last = await asyncio.to_thread(_query_count, stack)
    while True:
        await asyncio.sleep(1.2)
        now = await asyncio.to_thread(_query_count, stack)
        if now == last:
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"PgBouncer's query count kept moving for {timeout:g} s")
        last = now


def pool_rows(stack: Stack, user: str) -> list[dict[str, object]]:
    """``SHOW POOLS`` rows of ``user`` on the app database."""
    return [r for r in _show(stack, "SHOW POOLS") if r["database"] == stack.config.database and r["user"] == user]
