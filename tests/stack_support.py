"""Where test stacks live."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["stack_folder"]


@contextlib.contextmanager
def stack_folder(name: str) -> Iterator[Path]:
    """A private folder for a test stack, removed afterwards.

    Not under pytest's ``tmp_path_factory``: every pytest session that starts on the machine
    resets ``/tmp/pytest-of-<user>`` to mode 0700, which would cut the unprivileged service
    user that runs PostgreSQL and PgBouncer off a stack another session is still using.
    """
    root = Path(tempfile.mkdtemp(prefix=f"recsys-{name}-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
