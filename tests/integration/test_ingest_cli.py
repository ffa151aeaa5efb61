"""``python -m recsys load | enqueue | demo`` against the test stack (and its local host)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest
from ingest_support import count_items, id_prefix, raw_items

from recsys.datasets import clustered_catalogue
from recsys.local.stack import Stack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def recsys_command(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recsys", *args],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=timeout, check=False,
    )


@pytest.fixture
def prefix(stack: Stack, stack_env: dict[str, str]) -> Iterator[str]:
    with id_prefix(stack, "c") as token:
        yield token



def test_load_copies_a_jsonl_of_items_and_can_run_again(stack: Stack, prefix: str, tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    items = raw_items(120, prefix, b64=False)
    path.write_text("".join(json.dumps(i) + "\n" for i in items))

    for _ in range(2):  # a re-run upserts the same rows
        result = recsys_command("load", str(path), "--chunk-size", "50", "--no-progress")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout.splitlines()[-1]) == {"rows": 120, "chunks": 3, "index_rebuilt": False}
    assert count_items(stack, prefix) == 120


def test_load_a_npy_with_its_ids_rebuilding_the_hnsw_index(stack: Stack, prefix: str, tmp_path: Path) -> None:
    catalogue = clustered_catalogue(300, 384, seed=5, id_prefix=prefix)
    np.save(tmp_path / "vectors.npy", catalogue.vectors)
    meta = [{"id": i, "category": c} for i, c in zip(catalogue.ids, catalogue.categories, strict=True)]
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        (before,) = conn.execute("SELECT pg_get_indexdef('items_embedding_cosine'::regclass)").fetchone() or ("",)

    result = recsys_command(
        "load", str(tmp_path / "vectors.npy"), "--items", str(tmp_path / "ids.jsonl"), "--build-index",
        "--workers", "1", "--maintenance-work-mem", "64MB", "--url", stack.direct_url(user="postgres"),
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"rows": 300, "chunks": 1, "index_rebuilt": True}
    assert count_items(stack, prefix) == 300
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        (after,) = conn.execute("SELECT pg_get_indexdef('items_embedding_cosine'::regclass)").fetchone() or ("",)
        row = conn.execute("SELECT category FROM items WHERE id = %s", [catalogue.ids[7]]).fetchone()
    assert after == before and "hnsw" in after
    assert row == (catalogue.categories[7],)


def test_load_refuses_a_bad_line_naming_it(prefix: str, tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    items = raw_items(3, prefix, b64=False)
    items[2]["embedding"] = [1.0]
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    result = recsys_command("load", str(path), "--no-progress")
    assert result.returncode == 2
    assert "items.jsonl:3.embedding must have 384 dimensions" in result.stderr
    assert "Traceback" not in result.stderr


def test_enqueue_sends_a_batch_that_the_host_loads(stack: Stack, local_host: str, prefix: str, tmp_path: Path) -> None:
    path = tmp_path / "batch.json"
    path.write_text(json.dumps({"batch_id": f"{prefix}cli", "items": raw_items(30, prefix)}))
    result = recsys_command("enqueue", str(path), "--wait", "120")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "batch_id": f"{prefix}cli", "items": 30, "deletes": 0, "messages": 1, "status": "loaded", "rows": 30,
    }
    assert count_items(stack, prefix) == 30


def test_demo_loads_a_clustered_catalogue_through_the_queue(stack: Stack, local_host: str, prefix: str) -> None:
    result = recsys_command("demo", "--items", "600", "--batches", "2", "--prefix", prefix, "--timeout", "120")
    assert result.returncode == 0, result.stderr
    statuses = json.loads(result.stdout.splitlines()[-1])
    assert [(s["status"], s["rows"]) for s in statuses] == [("loaded", 300), ("loaded", 300)]
    assert count_items(stack, prefix) == 600
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        categories = conn.execute("SELECT count(DISTINCT category) FROM items WHERE starts_with(id, %s)",
                                  [prefix]).fetchone()
    assert categories == (10,)
    again = recsys_command("demo", "--items", "600", "--batches", "2", "--prefix", prefix, "--timeout", "120")
    assert again.returncode == 0 and "already loaded" in again.stderr
