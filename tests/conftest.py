"""Test fixtures. Integration tests share one real local stack per test session.

The stack runs on free ports in a temporary folder, so a test run never disturbs a
``make run`` stack on the same machine. If it cannot start, the run fails loudly.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
from stack_support import stack_folder

from recsys.config import Settings, load_settings, settings_environment
from recsys.local.stack import Stack, StackConfig


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    with stack_folder("stack") as root:
        stack = Stack(StackConfig.ephemeral(root))
        try:
            stack.up()
            yield stack
        finally:
            stack.down()


@pytest.fixture(scope="session")
def stack_env(stack: Stack) -> Iterator[dict[str, str]]:
    """The process environment points the app at the test stack for the whole session."""
    env = {**stack.app_environment(), "RECSYS_POOL_TIMEOUT": "3", "RECSYS_CONNECT_TIMEOUT": "2"}
    with settings_environment(env):
        yield env


@pytest.fixture
def settings(stack_env: dict[str, str]) -> Settings:
    return load_settings(os.environ)


@pytest.fixture
async def app_pools(stack_env: dict[str, str]) -> AsyncIterator[None]:
    """Pools opened by the code under test are closed when the test's event loop ends."""
    from recsys.db.pool import close_pools

    yield
    await close_pools()


@pytest.fixture(scope="session")
def local_host(stack_env: dict[str, str]) -> Iterator[str]:
    """``function_app.app`` served by the local host (HTTP and queue triggers); yields the base URL."""
    from recsys.local.cli import build_host
    from recsys.local.host import serve_in_thread
    from recsys.local.stack import free_port

    with serve_in_thread(build_host(), free_port()) as url:
        yield url
