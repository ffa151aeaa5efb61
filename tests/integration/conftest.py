"""Fixtures shared by the integration tests of the query path."""

from __future__ import annotations

import pytest
from query_catalogue import ensure_catalogue

from recsys.datasets import Catalogue
from recsys.local.stack import Stack


@pytest.fixture(scope="module")
def catalogue(stack: Stack) -> Catalogue:
    """The clustered test catalogue in ``items``, (re)loaded once per module that asks for it."""
    return ensure_catalogue(stack)
