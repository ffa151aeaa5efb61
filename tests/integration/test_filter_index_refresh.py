"""A filter index's copy built again once its members changed: named by the maintenance run,
built by ``filter-index refresh``, and answered without while it is missing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from ingest_support import id_prefix
from pgvector.psycopg import register_vector

from recsys.config import Settings
from recsys.local.stack import Stack
from recsys.maintenance import housekeeping
from recsys.search.filter_indexes import (
    DRIFT,
    DRIFT_PARAMS,
    create_filter_index,
    drop_filter_index,
    filter_index_main,
    filter_indexes_due,
    list_filter_indexes,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def category(stack: Stack, stack_env: dict[str, str]) -> Iterator[str]:
    """A category of this test's own, whose items and filter index are removed after it, and the
    recall calibrations the maintenance runs made meanwhile (the catalogue's state for other tests)."""
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        (before,) = conn.execute("SELECT coalesce(max(id), 0) FROM recall_calibrations").fetchone() or (0,)
    with id_prefix(stack, "r") as token:
        yield f"{token}cat"
        with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
            drop_filter_index(conn, "category", f"{token}cat")
            conn.execute("DELETE FROM recall_calibrations WHERE id > %s", [before])


def _add(conn: psycopg.Connection[Any], category: str, first: int, n: int, dim: int) -> None:
    rng = np.random.default_rng(first)
    with conn.cursor().copy("COPY items (id, embedding, category) FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types(["text", "vector", "text"])
        for i in range(first, first + n):
            copy.write_row((f"{category}-{i:04d}", rng.standard_normal(dim).astype(np.float32), category))


def _indexed(stack: Stack, settings: Settings, category: str) -> None:
    """400 members of ``category``, and its filter index."""
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as admin:
        register_vector(admin)
        _add(admin, category, 0, 400, settings.embedding_dim)
        create_filter_index(admin, "category", category, maintenance_work_mem="64MB")


def _listed(conn: psycopg.Connection[Any], category: str) -> Any:
    return next(i for i in list_filter_indexes(conn) if i.value == category)


def _due(report: Any, category: str) -> list[str]:
    return [line for line in report.filter_indexes_due if repr(category) in line]


def _step_errors(report: Any) -> list[str]:
    """The errors of the run's step that names the filter indexes due (the others' are their tests')."""
    return [e for e in report.errors if e.startswith("filter_indexes_due")]


def _nearest(stack: Stack, category: str, query: str) -> tuple[list[str], set[str]]:
    """The category's 10 nearest to ``query`` by ``recsys_nearest``, and how they were answered: by
    the exact scan (a cost ratio that makes any search dearer), from the copy where there is one."""
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, method FROM recsys_nearest((SELECT embedding FROM items WHERE id = %s), 10, 40,"
            " ARRAY[%s], NULL, NULL, NULL, ARRAY[%s], false, 1e9)", [query, category, query],
        ).fetchall()
    return [r[0] for r in rows], {r[1] for r in rows}


def _truth(stack: Stack, category: str, query: str) -> list[str]:
    """The category's 10 nearest to ``query``, by numpy."""
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
        register_vector(conn)
        rows = conn.execute("SELECT id, embedding FROM items WHERE category = %s ORDER BY id", [category]).fetchall()
    ids = [r[0] for r in rows]
    vectors = np.array([r[1].to_numpy() for r in rows], dtype=np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = vectors @ vectors[ids.index(query)]
    return [ids[i] for i in np.argsort(-scores) if ids[i] != query][:10]


async def test_a_copy_whose_members_changed_by_more_than_a_tenth_is_named_and_built_again(
    stack: Stack, settings: Settings, app_pools: None, category: str, capsys: pytest.CaptureFixture[str]
) -> None:
    dim = settings.embedding_dim
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as admin:
        register_vector(admin)
        _add(admin, category, 0, 400, dim)
        built = create_filter_index(admin, "category", category, maintenance_work_mem="64MB")
        assert (built.copy_members, built.copy_lists, built.copy_valid) == (400, 20, True)
        assert built.copy_built_at is not None
        # 40 members written since (a tenth): not yet due.
        _add(admin, category, 400, 40, dim)
    report = await housekeeping(settings)
    assert _step_errors(report) == [] and _due(report, category) == []

    # One more: 41 of the 400 members the copy was built for changed.
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as admin:
        register_vector(admin)
        _add(admin, category, 440, 1, dim)
    report = await housekeeping(settings)
    assert _step_errors(report) == []
    assert _due(report, category) == [
        f"category {category!r}: 41 of the 400 members its copy was built for changed since"
        f" {built_at(stack, category)} (41 written, now 441)"
    ]

    # `refresh` builds that copy again, on the 441 members (21 lists), and no other.
    assert filter_index_main(["refresh", "--url", stack.admin_conninfo(), "--maintenance-work-mem", "64MB"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["value"], line["refreshed"]) for line in lines] == [(category, True)]
    assert lines[0]["reason"].startswith("41 of the 400 members")
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as admin:
        refreshed = _listed(admin, category)
    assert (refreshed.copy_members, refreshed.copy_lists, refreshed.copy_valid) == (441, 21, True)
    assert refreshed.copy_built_at is not None and refreshed.copy_built_at >= built.copy_built_at
    report = await housekeeping(settings)
    assert _due(report, category) == []
    # Asked for by name, a copy not due is left as it is, unless forced.
    assert filter_index_main(["refresh", "--category", category, "--url", stack.admin_conninfo()]) == 0
    assert json.loads(capsys.readouterr().out) == {"kind": "category", "value": category, "refreshed": False,
                                                   "reason": None}
    assert filter_index_main(["refresh", "--category", category, "--force", "--url", stack.admin_conninfo()]) == 0
    forced = json.loads(capsys.readouterr().out)
    assert (forced["refreshed"], forced["reason"]) == (True, "asked for (--force)")
    assert forced["index"]["copy_members"] == 441
    assert filter_index_main(["refresh", "--category", f"{category}-none", "--url", stack.admin_conninfo()]) == 2
    assert "there is no filter index for category" in capsys.readouterr().err
    # Members deleted count as their number moves: 45 fewer of 441.
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as admin:
        admin.execute("DELETE FROM items WHERE category = %s AND id >= %s", [category, f"{category}-0396"])
    report = await housekeeping(settings)
    assert [line.split(": ", 1)[1].split(" since ")[0] for line in _due(report, category)] == [
        "45 of the 441 members its copy was built for changed"
    ]


def built_at(stack: Stack, category: str) -> str:
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as admin:
        row = admin.execute("SELECT copy_built_at FROM filter_indexes WHERE value = %s", [category]).fetchone()
    assert row is not None
    return str(row[0].isoformat())


def test_a_copy_built_before_its_members_were_recorded_stands_for_its_lists_squared(
    stack: Stack, settings: Settings, category: str
) -> None:
    _indexed(stack, settings, category)
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as admin:
        register_vector(admin)
        # As 094 leaves a copy built before it: 20 lists stand for 400 members, built at creation.
        admin.execute("UPDATE filter_indexes SET copy_members = NULL, copy_built_at = NULL WHERE value = %s",
                      [category])
        assert [d for d in filter_indexes_due(admin.execute(DRIFT, DRIFT_PARAMS).fetchall()) if d[1] == category] == []
        _add(admin, category, 400, 41, settings.embedding_dim)
        due = [d for d in filter_indexes_due(admin.execute(DRIFT, DRIFT_PARAMS).fetchall()) if d[1] == category]
    assert [reason.split(" since ")[0] for _, _, reason in due] == [
        "41 of the 400 members its copy was built for changed"
    ]


def test_a_refresh_that_fails_leaves_the_filter_index_without_a_copy_answering_exactly(
    stack: Stack, settings: Settings, category: str
) -> None:
    _indexed(stack, settings, category)
    query = f"{category}-0007"
    truth = _truth(stack, category, query)
    assert _nearest(stack, category, query) == (truth, {"exact"})
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as admin:
        copy = _listed(admin, category).copy_name
        # 64 kB for the build: pgvector refuses it (the lists' k-means needs 8 MB), after the old
        # copy went.
        with pytest.raises(psycopg.errors.ProgramLimitExceeded):
            create_filter_index(admin, "category", category, maintenance_work_mem="64kB", rebuild_copy=True)
        left = _listed(admin, category)
        (exists,) = admin.execute("SELECT to_regclass(%s) IS NOT NULL", [f"public.{copy}"]).fetchone() or (None,)
    assert (left.copy_name, left.copy_valid, left.sweep_width, left.copy_members, exists) == (None, False, None, None,
                                                                                              False)
    # Answered from the table meanwhile, the same; it is due; `create` builds the copy.
    assert _nearest(stack, category, query) == (truth, {"exact"})
    with psycopg.connect(stack.admin_conninfo(), autocommit=True) as admin:
        due = [d for d in filter_indexes_due(admin.execute(DRIFT, DRIFT_PARAMS).fetchall()) if d[1] == category]
        assert due == [("category", category, "no valid copy of its 400 members")]
        rebuilt = create_filter_index(admin, "category", category, maintenance_work_mem="64MB")
    assert (rebuilt.copy_valid, rebuilt.copy_members) == (True, 400)
    assert _nearest(stack, category, query) == (truth, {"exact"})
