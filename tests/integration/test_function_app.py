"""``function_app`` imports without touching the database, and a bad setting stops the start."""

from __future__ import annotations

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
