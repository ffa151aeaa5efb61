"""What every benchmark needs: options, an ephemeral stack, a catalogue loaded fast, versions."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from pgvector.psycopg import register_vector

from recsys.config import DEFAULT_HNSW_EF_CONSTRUCTION, DEFAULT_HNSW_M
from recsys.datasets import Catalogue
from recsys.local import tools
from recsys.local.stack import Stack, StackConfig

__all__ = [
    "HNSW_BUILD",
    "SERVER_SIZED_FOR_CATALOGUE",
    "BenchOptions",
    "Deadline",
    "app_environment",
    "bench_stack",
    "build_hnsw_index",
    "drop_hnsw_index",
    "load_catalogue",
    "local_host",
    "server_versions",
]

log = logging.getLogger("recsys")

HNSW_INDEX = "items_embedding_cosine"
#: The HNSW parameters of the benchmarks' builds: the service's defaults.
HNSW_BUILD = {"m": DEFAULT_HNSW_M, "ef_construction": DEFAULT_HNSW_EF_CONSTRUCTION}

#: PostgreSQL memory for the benchmarks whose catalogue is large (200,000 items and more): the
#: table and its graph stay in shared buffers, as on a server sized for its catalogue, instead of
#: being read back from the page cache through the stack's default 256 MB.
SERVER_SIZED_FOR_CATALOGUE: Mapping[str, str] = {"shared_buffers": "'4GB'", "effective_cache_size": "'16GB'"}


@dataclass(frozen=True)
class BenchOptions:
    """``quick`` shrinks every size so that a benchmark only proves it runs."""

    quick: bool = False
    #: Where results and plots go.
    out_dir: Path = Path("bench/results")
    #: Where the ephemeral stacks live (default: the system's temporary folder).
    work_dir: Path | None = None

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full


class Deadline:
    """A time bound for a load loop: ``while deadline:`` stops when the time is up."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def __bool__(self) -> bool:
        return time.monotonic() < self.end

    @property
    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())


@contextlib.contextmanager
def bench_stack(
    options: BenchOptions,
    name: str,
    *,
    embedding_dim: int = 384,
    pg_settings: Mapping[str, str] | None = None,
    bouncer_settings: Mapping[str, str] | None = None,
    **config: Any,
) -> Iterator[Stack]:
    """A fresh local stack on free ports in a temporary folder, stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=f"recsys-bench-{name}-", dir=options.work_dir))
    pg = {"max_wal_size": "'4GB'", "checkpoint_timeout": "'30min'", **(pg_settings or {})}
    stack = Stack(StackConfig.ephemeral(
        root, embedding_dim=embedding_dim, pg_settings=pg, bouncer_settings=dict(bouncer_settings or {}), **config
    ))
    try:
        stack.up()
        grant_app_role(stack)
        yield stack
    finally:
        stack.down()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def local_host(env: Mapping[str, str], port: int) -> Iterator[str]:
    """``python -m recsys serve`` in a process of its own (as a Functions worker is) with ``env``.

    Yields its base URL once ``/api/health`` answers; stops it afterwards.
    """
    log_file = tempfile.NamedTemporaryFile(prefix="recsys-bench-host-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "recsys", "serve", "--port", str(port)],
        cwd=tools.project_root(), env={**os.environ, **env},
        stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )

    def failed(why: str) -> RuntimeError:
        tail = Path(log_file.name).read_text(encoding="utf-8", errors="replace")[-4000:]
        return RuntimeError(f"{why}; its log ({log_file.name}) ends with:\n{tail}")

    try:
        deadline = Deadline(120)
        while True:
            if process.poll() is not None:
                raise failed(f"the local host exited with {process.returncode}")
            if not deadline:
                raise failed("the local host did not answer /api/health within 120 s")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log_file.close()
        Path(log_file.name).unlink(missing_ok=True)


def app_environment(env: Mapping[str, str]) -> contextlib.AbstractContextManager[None]:
    """``env`` in ``os.environ`` (and the settings cache cleared) for the duration of the block."""
    from recsys.config import settings_environment

    return settings_environment(env)


def grant_app_role(stack: Stack) -> None:
    """Let the app role ``recsys`` read and write every table: benchmarks measure speed, not privileges."""
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO recsys")
        conn.execute("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO recsys")


def server_versions(stack: Stack) -> dict[str, str]:
    """PostgreSQL, pgvector and PgBouncer versions of ``stack``."""
    versions: dict[str, str] = {}
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        versions["postgresql"] = str(row[0]) if row else "?"
        row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        versions["pgvector"] = str(row[0]) if row else "?"
    binary = tools.pgbouncer_bin()
    if binary is not None:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False).stdout
        versions["pgbouncer"] = out.splitlines()[0].removeprefix("PgBouncer ").strip() if out else "?"
    return versions


def drop_hnsw_index(stack: Stack) -> None:
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        conn.execute(f"DROP INDEX IF EXISTS {HNSW_INDEX}")


def build_hnsw_index(
    stack: Stack, *, m: int = DEFAULT_HNSW_M, ef_construction: int = DEFAULT_HNSW_EF_CONSTRUCTION
) -> float:
    """(Re)build the HNSW cosine index after a bulk load; returns the seconds it took.

    Built as the schema owner with two parallel workers and ample ``maintenance_work_mem``: the
    fast way to index a catalogue loaded in bulk (the graph fits in memory while it is built).
    """
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        conn.execute(f"DROP INDEX IF EXISTS {HNSW_INDEX}")
        row = conn.execute(
            "SELECT format_type(atttypid, NULL) FROM pg_attribute"
            " WHERE attrelid = 'items'::regclass AND attname = 'embedding'"
        ).fetchone()
        opclass = "halfvec_cosine_ops" if row and row[0] == "halfvec" else "vector_cosine_ops"
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute("SET max_parallel_maintenance_workers = 2")
        started = time.perf_counter()
        conn.execute(
            f"CREATE INDEX {HNSW_INDEX} ON items USING hnsw (embedding {opclass})"
            f" WITH (m = {int(m)}, ef_construction = {int(ef_construction)})"
        )
        conn.execute("ANALYZE items")
        return time.perf_counter() - started


def load_catalogue(stack: Stack, catalogue: Catalogue, *, index: bool = True) -> dict[str, float]:
    """Load ``catalogue`` into ``items`` by binary COPY with the HNSW index dropped, then rebuild it.

    Returns the seconds spent copying and indexing.
    """
    drop_hnsw_index(stack)
    started = time.perf_counter()
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        register_vector(conn)
        with (
            conn.transaction(),
            conn.cursor() as cur,
            cur.copy("COPY items (id, embedding, category) FROM STDIN WITH (FORMAT BINARY)") as copy,
        ):
            copy.set_types(["text", "vector", "text"])
            for item_id, vector, category in zip(catalogue.ids, catalogue.vectors, catalogue.categories, strict=True):
                copy.write_row((item_id, vector, category))
        # As a catalogue in service would be: hint bits set and the visibility map built, so
        # the first reads of a benchmark do not pay for the load.
        conn.execute("VACUUM (ANALYZE) items")
    copied = time.perf_counter() - started
    indexed = build_hnsw_index(stack) if index else 0.0
    log.info("loaded %d items in %.1f s, indexed in %.1f s", len(catalogue.ids), copied, indexed)
    return {"copy_s": round(copied, 3), "index_s": round(indexed, 3)}
