"""``function_app`` imports without touching the database, and a bad setting stops the start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recsys.local.stack import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout, check=False,
    )


def test_import_with_unreachable_database_opens_no_connection() -> None:
    unreachable = f"postgresql://nobody:x@127.0.0.1:{free_port()}/none"
    result = run_python(
        """
        import os
        def sockets():
            count = 0
            for fd in os.listdir("/proc/self/fd"):
                try:
                    count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
                except FileNotFoundError:  # the descriptor listdir itself used
                    pass
            return count
        before = sockets()
        import function_app
        from recsys.db import pool
        names = sorted(f.get_function_name() for f in function_app.app.get_functions())
        print(before, sockets(), len(pool._pools), "health_get" in names)
        """,
        {"RECSYS_DATABASE_URL": unreachable, "RECSYS_EMBEDDING_DIM": "not-a-number"},
    )
    assert result.returncode == 0, result.stderr
    before, after, pools, has_health = result.stdout.split()
    assert (after, pools, has_health) == (before, "0", "True")


@pytest.mark.parametrize(("name", "value"), [("RECSYS_EMBEDDING_DIM", "abc"), ("RECSYS_POOL_TIMEOUT", "-3")])
def test_bad_setting_stops_the_local_host_naming_it(name: str, value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "recsys", "serve", "--port", str(free_port())],
        cwd=ROOT, env={**os.environ, name: value}, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert name in result.stderr
    assert "Traceback" not in result.stderr


def test_every_http_function_needs_a_function_key_except_health_and_openapi() -> None:
    # In a fresh interpreter: get_functions() may be called only once per app object.
    result = run_python(
        """
        import json
        import function_app
        levels = {}
        for f in function_app.app.get_functions():
            trigger = f.get_trigger().get_dict_repr()
            if trigger.get("type") == "httpTrigger":
                levels[str(trigger.get("route"))] = str(trigger.get("authLevel")).split(".")[-1].lower()
        print(json.dumps(levels))
        """,
        {},
    )
    assert result.returncode == 0, result.stderr
    levels = json.loads(result.stdout)
    anonymous = {route for route in levels if route == "health" or route.startswith("openapi")}
    assert levels["health"] == "anonymous"
    for route, level in levels.items():
        assert level == ("anonymous" if route in anonymous else "function"), route


async def test_the_local_host_enforces_a_configured_function_key_on_the_app(
    stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, app_pools: None
) -> None:
    import httpx

    from recsys.config import forget_settings
    from recsys.local.cli import build_host

    monkeypatch.setenv("RECSYS_FUNCTION_KEY", "local-test-key")
    forget_settings()
    try:
        host = build_host(run_queues=False)
    finally:
        monkeypatch.delenv("RECSYS_FUNCTION_KEY")
        forget_settings()
    transport = httpx.ASGITransport(app=host)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        assert (await client.get("/api/items/nope")).status_code == 401
        assert (await client.get("/api/items/nope", headers={"x-functions-key": "wrong"})).status_code == 401
        assert (await client.get("/api/items/nope", headers={"x-functions-key": "local-test-key"})).status_code == 404
        assert (await client.get("/api/items/nope?code=local-test-key")).status_code == 404
        assert (await client.get("/api/health")).status_code == 200  # anonymous
        assert (await client.get("/api/openapi.json")).status_code == 200  # anonymous
