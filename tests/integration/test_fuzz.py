"""Schemathesis over every operation of the served OpenAPI document, against the real app.

The app runs as ``python -m recsys serve`` (its own process, a function key required) on the
isolated stack with a demo-sized catalogue, so that the document's examples find items. The
fuzzer sends valid and invalid data (examples, coverage and fuzzing phases, fixed seed,
bounded examples) and fails the test on any 5xx, any answer the document does not describe
(status, headers, body), any schema-valid request rejected or invalid one accepted, a key not
enforced, or a wrong method answered otherwise than 405 with ``Allow``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults_support import served_app

from recsys.datasets import Catalogue
from recsys.local.stack import Stack

# The isolated stack and its catalogue start with the first test: slow on a loaded machine.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

SEED = 20261203
#: Examples per operation and phase: enough to reach every branch of the document
#: (the coverage phase adds its own cases at every boundary), within the test-time budget.
MAX_EXAMPLES = 10
KEY = "fuzz-key"
HOOKS = Path(__file__).with_name("fuzz_hooks.py")

CONFIG = f"""
hooks = "{HOOKS}"
seed = {SEED}

[generation]
max-examples = {MAX_EXAMPLES}

[phases.stateful]
enabled = false

# A deletion is enqueued (202) and applies when the loader runs: the item is still there
# right after, which this check takes for a use after free.
[checks.use_after_free]
enabled = false
"""


@pytest.fixture(scope="module")
def fuzzed_app(isolated_stack: Stack, isolated_catalogue: Catalogue,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {**isolated_stack.app_environment(), "RECSYS_FUNCTION_KEY": KEY, "RECSYS_POOL_TIMEOUT": "5"}
    with served_app(env, tmp_path_factory.mktemp("fuzz-host") / "host.log") as base:
        yield base


def test_schemathesis_finds_nothing_over_every_operation(fuzzed_app: str, tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [
        str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(config),
        "run", f"{fuzzed_app}/api/openapi.json", "--url", fuzzed_app,
        "--header", f"x-functions-key: {KEY}",
        "--phases", "examples,coverage,fuzzing",
        "--workers", "1",
        # How fast the generator itself is depends on the machine's load, not on the app.
        "--suppress-health-check", "too_slow",
        "--request-timeout", "30",
        "--generation-database", "none",
        "--no-color",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-3000:]
    # Every operation of the document was selected and exercised.
    selected = re.search(r"Selected: (\d+)/(\d+)", result.stdout)
    tested = re.search(r"Tested: (\d+)", result.stdout)
    assert selected and tested and selected[1] == selected[2] == tested[1], result.stdout[-3000:]
