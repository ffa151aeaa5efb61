"""Fixtures shared by the integration tests of the query path."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults_support import ISOLATED_CATALOGUE_SIZE, ISOLATED_SERVER_POOL, load_catalogue
from query_catalogue import ensure_catalogue

from recsys.datasets import Catalogue
from recsys.local.stack import Stack, StackConfig


@pytest.fixture(scope="module")
def catalogue(stack: Stack) -> Catalogue:
    """The clustered test catalogue in ``items``, (re)loaded once per module that asks for it."""
    return ensure_catalogue(stack)


@pytest.fixture(scope="session")
def isolated_stack() -> Iterator[Stack]:
    """A second stack for the tests that break things (faults) or write anything (the fuzzer).

    Not under pytest's temporary folder: a pytest run starting meanwhile resets that folder's
    mode to 0700, and the service user could no longer reach the stack to restart it.
    """
    root = Path(tempfile.mkdtemp(prefix="recsys-isolated-"))
    config = StackConfig.ephemeral(root, bouncer_settings={"default_pool_size": str(ISOLATED_SERVER_POOL)})
    stack = Stack(config)
    try:
        stack.up()
        yield stack
    finally:
        stack.down()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def isolated_catalogue(isolated_stack: Stack) -> Catalogue:
    """A demo-sized clustered catalogue in the isolated stack (ids ``item-000000`` ...)."""
    return load_catalogue(isolated_stack, ISOLATED_CATALOGUE_SIZE)
