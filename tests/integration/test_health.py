"""``GET /api/health`` through the local host, PgBouncer and PostgreSQL, and while PostgreSQL is down."""

from __future__ import annotations

import time

import httpx
import psycopg
import pytest

from recsys.local.stack import Stack

pytestmark = pytest.mark.integration


def bouncer_counters(stack: Stack) -> tuple[int, int]:
    """Transactions and queries PgBouncer has passed on to the recsys database so far."""
    with psycopg.connect(stack.bouncer_admin_url(), autocommit=True, prepare_threshold=None) as admin:
        cursor = admin.execute("SHOW STATS")
        names = [c.name for c in cursor.description or []]
        for row in cursor:
            stats = dict(zip(names, row, strict=True))
            if stats["database"] == "recsys":
                return int(stats["total_xact_count"]), int(stats["total_query_count"])
    return 0, 0


def test_health_is_ok_and_goes_through_pgbouncer(stack: Stack, local_host: str) -> None:
    before = bouncer_counters(stack)
    response = httpx.get(f"{local_host}/api/health", timeout=30)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["database"] == "ok"
    assert body["pool"]["query"]["pool_max"] >= 1
    after = bouncer_counters(stack)
    # PgBouncer's counters are updated at its stats period; poll until they move.
    for _ in range(40):
        if after[0] > before[0]:
            break
        time.sleep(0.1)
        after = bouncer_counters(stack)
    assert after[0] > before[0] and after[1] > before[1]


def test_health_is_503_while_postgres_is_down_and_recovers_without_restart(stack: Stack, local_host: str) -> None:
    assert httpx.get(f"{local_host}/api/health", timeout=30).status_code == 200
    stack.stop_postgres()
    try:
        response = httpx.get(f"{local_host}/api/health", timeout=60)
        assert response.status_code == 503
        assert response.headers["retry-after"].isdigit()
        body = response.json()
        assert body["code"] == "busy" and body["database"] == "unreachable"
        assert "Traceback" not in response.text
    finally:
        stack.start_postgres()
    # PgBouncer keeps refusing for its server_login_retry (1 s) after its last failed server login,
    # and the app answers that quickly with 503: poll as a client honouring Retry-After would.
    statuses = []
    for _ in range(20):
        statuses.append(httpx.get(f"{local_host}/api/health", timeout=60).status_code)
        if statuses[-1] == 200:
            break
        time.sleep(0.5)
    assert statuses[-1] == 200, statuses
