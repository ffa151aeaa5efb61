"""A filter index's copy built again once its members changed: named by the maintenance run,
built by ``filter-index refresh``, and answered without while it is missing. Indexed fields: the
filter indexes a rule keeps for every value of a field that reaches its bound. Metadata filter
indexes, which answer the requests that ask for their pair."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.types.json import Jsonb

from recsys.config import Settings, load_settings
from recsys.datasets import clustered_catalogue
from recsys.db.pool import close_pools
from recsys.local.stack import Stack, StackConfig
from recsys.maintenance import housekeeping
from recsys.search.filter_indexes import (
    DRIFT,
    DRIFT_PARAMS,
    FIELD_PLAN,
    create_filter_index,
    drop_filter_index,
    filter_index_main,
    filter_indexes_due,
    list_filter_indexes,
)

pytestmark = pytest.mark.integration

#: A catalogue of 6,000 items in 20 clusters, and 1,000 more drawn alike for the members the tests
#: add and remove.
CATALOGUE = clustered_catalogue(7000, 384, clusters=20, seed=11)
BASE = 6000


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of these tests' own: the members they add and delete go through the shared index's
    graph (and may stay there as its entry point until a VACUUM), which the session's catalogue
    keeps for other tests. A recall calibration of its catalogue, so that the maintenance runs do
    not make one."""
    stack = Stack(StackConfig.ephemeral(Path(tmp_path_factory.mktemp("refresh")) / "stack"))
    stack.up()
    try:
        with psycopg.connect(stack.admin_conninfo(), autocommit=True) as conn:
            register_vector(conn)
            with conn.cursor().copy("COPY items (id, embedding, category) FROM STDIN WITH (FORMAT BINARY)") as copy:
                copy.set_types(["text", "vector", "text"])
                for i in range(BASE):
                    copy.write_row((CATALOGUE.ids[i], CATALOGUE.vectors[i], CATALOGUE.categories[i]))
            conn.execute("ANALYZE items")
            conn.execute("INSERT INTO recall_calibrations (k, sample_size, catalogue_size) VALUES (10, 100, %s)",
                         [BASE])
        yield stack
    finally:
        stack.down()


@pytest.fixture
def settings(own: Stack) -> Settings:
    return load_settings(own.app_environment())


@pytest.fixture
async def pools() -> AsyncIterator[None]:
    """The pools the maintenance runs open (on this stack) are closed when the test's loop ends."""
    yield
    await close_pools()


@pytest.fixture
def category(own: Stack) -> Iterator[str]:
    """A category of this test's own, whose items and filter index are removed after it."""
    value = f"r{uuid.uuid4().hex[:10]}"
    yield value
    with psycopg.connect(own.admin_conninfo(), autocommit=True) as conn:
        drop_filter_index(conn, "category", value)
        conn.execute("DELETE FROM items WHERE category = %s", [value])


#: The type of each column the tests' items are given a value in.
_COLUMN_TYPES = {"category": "text", "tags": "text[]", "metadata": "jsonb"}


def _copy_spare(conn: psycopg.Connection[Any], prefix: str, column: str, values: dict[int, Any], *,
                offset: int = 0) -> None:
    """Items ``prefix-i`` with ``values[i]`` in ``column``, the catalogue's spare items from ``offset`` on."""
    statement = sql.SQL("COPY items (id, embedding, {}) FROM STDIN WITH (FORMAT BINARY)").format(sql.Identifier(column))
    with conn.cursor().copy(statement) as copy:
        copy.set_types(["text", "vector", _COLUMN_TYPES[column]])
        for i, value in values.items():
            copy.write_row((f"{prefix}-{i:04d}", CATALOGUE.vectors[BASE + offset + i], value))


def _add(conn: psycopg.Connection[Any], category: str, first: int, n: int) -> None:
    """``n`` members of ``category``, the catalogue's spare items from ``first`` on."""
    _copy_spare(conn, category, "category", dict.fromkeys(range(first, first + n), category))


def _indexed(own: Stack, category: str) -> None:
    """400 members of ``category``, and its filter index."""
    with psycopg.connect(own.admin_conninfo(), autocommit=True) as admin:
        register_vector(admin)
        _add(admin, category, 0, 400)
        create_filter_index(admin, "category", category, maintenance_work_mem="64MB")


def _listed(conn: psycopg.Connection[Any], category: str) -> Any:
    return next(i for i in list_filter_indexes(conn) if i.value == category)


def _due(report: Any, category: str) -> list[str]:
    return [line for line in report.filter_indexes_due if repr(category) in line]


def _step_errors(report: Any) -> list[str]:
    """The errors of the run's step that names the filter indexes due (the others' are their tests')."""
    return [e for e in report.errors if e.startswith("filter_indexes_due")]


def _nearest(own: Stack, category: str, query: str) -> tuple[list[str], set[str]]:
    """The category's 10 nearest to ``query`` by ``recsys_nearest``, and how they were answered: by
    the exact scan (a cost ratio that makes any search dearer), from the copy where there is one."""
    with psycopg.connect(own.admin_conninfo(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, method FROM recsys_nearest((SELECT embedding FROM items WHERE id = %s), 10, 40,"
            " ARRAY[%s], NULL, NULL, NULL, ARRAY[%s], false, 1e9)", [query, category, query],
        ).fetchall()
    return [r[0] for r in rows], {r[1] for r in rows}


def _truth(own: Stack, query: str, where: str, params: list[Any]) -> list[str]:
    """The 10 items nearest to ``query`` among those that ``where`` (fixed SQL, its values in
    ``params``) selects, by numpy."""
    with psycopg.connect(own.admin_conninfo(), autocommit=True) as conn:
        register_vector(conn)
        rows = conn.execute(sql.SQL("SELECT id, embedding FROM items WHERE ({}) OR id = %s ORDER BY id").format(
            sql.SQL(where)), [*params, query]).fetchall()
    ids = [r[0] for r in rows]
    vectors = np.array([r[1].to_numpy() for r in rows], dtype=np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = vectors @ vectors[ids.index(query)]
    return [ids[i] for i in np.argsort(-scores, kind="stable") if ids[i] != query][:10]


async def test_a_copy_whose_members_changed_by_more_than_a_tenth_is_named_and_built_again(
    own: Stack, settings: Settings, pools: None, category: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with psycopg.connect(own.admin_conninfo(), autocommit=True) as admin:
        register_vector(admin)
        _add(admin, category, 0, 400)
        built = create_filter_index(admin, "category", category, maintenance_work_mem="64MB")
        assert (built.copy_members, built.copy_lists, built.copy_valid) == (400, 20, True)
        assert built.copy_built_at is not None
        # 40 members written since (a tenth): not yet due.
        _add(admin, category, 400, 40)
    report = await housekeeping(settings)
    assert _step_errors(report) == [] and _due(report, category) == []

    # One more: 41 of the 400 members the copy was built for changed.
    with psycopg.connect(own.admin_conninfo(), autocommit=True) as admin:
        register_vector(admin)
        _add(admin, category, 440, 1)
    report = await housekeeping(settings)
    assert _step_errors(report) == []
    assert _due(report, category) == [
        f"category {category!r}: 41 of the 400 members its copy was built for changed since"
        f" {built_at(own, category)} (41 written, now 441)"
    ]

    # `refresh` builds that copy again, on the 441 members (21 lists), and no other.
    assert filter_index_main(["refresh", "--url", own.admin_conninfo(), "--maintenance-work-mem", "64MB"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["value"], line["refreshed"]) for line in lines] == [(category, True)]
    assert lines[0]["reason"].startswith("41 of the 400 members")
    with psycopg.connect(own.admin_conninfo(), autocommit=True) as admin:
        refreshed = _listed(admin, category)
    assert (refreshed.copy_members, refreshed.copy_lists, refreshed.copy_valid) == (441, 21, True)
    assert refreshed.copy_built_at is not None and refreshed.copy_built_at >= built.copy_built_at
    report = await housekeeping(settings)
    assert _due(report, category) == []
    # Asked for by name, a copy not due is left as it is, unless forced.
    assert filter_index_main(["refresh", "--category", category, "--url", own.admin_conninfo()]) == 0
    assert json.loads(capsys.readouterr().out) == {"kind": "category", "value": category, "refreshed": False,
                                                   "reason": None}
    assert filter_index_main(["refresh", "--category", category, "--force", "--url", own.admin_conninfo()]) == 0
    forced = json.loads(capsys.readouterr().out)
    assert (forced["refreshed"], forced["reason"]) == (True, "asked for (--force)")
    assert forced["index"]["copy_members"] == 441
    assert filter_index_main(["refresh", "--category", f"{category}-none", "--url", own.admin_conninfo()]) == 2
    assert "there is no filter index for category" in capsys.readouterr().err
    # Members deleted count as their number moves: 45 fewer of 441.
    with psycopg.connect(own.admin_conninfo(), autocommit=True) as admin:
        admin.execute("DELETE FROM items WHERE category = %s AND id >= %s", [category, f"{category}-0396"])
    report = await housekeeping(settings)
    assert [line.split(": ", 1)[1].split(" since ")[0] for line in _due(report, category)] == [
        "45 of the 441 members its copy was built for changed"
    ]


def built_at(own: Stack, category: str) -> str:
    with psycopg.connect(own.admin_conninfo(), autocommit=True) as admin:
        row = admin.execute("SELECT copy_built_at FROM filter_indexes WHERE value = %s", [category]).fetchone()
    assert row is not None
    return str(row[0].isoformat())


def test_a_copy_built_before_its_members_were_recorded_stands_for_its_lists_squared(
    own: Stack, category: str
) -> None:
    _indexed(own, category)
    with psycopg.connect(own.admin_conninfo(), autocommit=True) as admin:
        register_vector(admin)
        # As 094 leaves a copy built before it: 20 lists stand for 400 members, built at creation.
        admin.execute("UPDATE filter_indexes SET copy_members = NULL, copy_built_at = NULL WHERE value = %s",
                      [category])
        assert [d for d in filter_indexes_due(admin.execute(DRIFT, DRIFT_PARAMS).fetchall()) if d[1] == category] == []
        _add(admin, category, 400, 41)
        due = [d for d in filter_indexes_due(admin.execute(DRIFT, DRIFT_PARAMS).fetchall()) if d[1] == category]
    assert [reason.split(" since ")[0] for _, _, reason in due] == [
        "41 of the 400 members its copy was built for changed"
    ]


def test_a_refresh_that_fails_leaves_the_filter_index_without_a_copy_answering_exactly(
    own: Stack, category: str
) -> None:
    _indexed(own, category)
    query = f"{category}-0007"
    truth = _truth(own, query, "category = %s", [category])
    assert _nearest(own, category, query) == (truth, {"exact"})
    with psycopg.connect(own.admin_conninfo(), autocommit=True) as admin:
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
    assert _nearest(own, category, query) == (truth, {"exact"})
    with psycopg.connect(own.admin_conninfo(), autocommit=True) as admin:
        due = [d for d in filter_indexes_due(admin.execute(DRIFT, DRIFT_PARAMS).fetchall()) if d[1] == category]
        assert due == [("category", category, "no valid copy of its 400 members")]
        rebuilt = create_filter_index(admin, "category", category, maintenance_work_mem="64MB")
    assert (rebuilt.copy_valid, rebuilt.copy_members) == (True, 400)
    assert _nearest(own, category, query) == (truth, {"exact"})


def _tag_items(conn: psycopg.Connection[Any], prefix: str, tags: dict[int, list[str]]) -> None:
    """Items ``prefix-i`` with ``tags[i]``, from the catalogue's spare items (``i`` under 600)."""
    _copy_spare(conn, prefix, "tags", tags, offset=400)


def _automatic(own: Stack, prefix: str) -> dict[str, bool]:
    with psycopg.connect(own.admin_conninfo(), autocommit=True) as conn:
        return {i.value: i.automatic for i in list_filter_indexes(conn) if i.value.startswith(prefix)}


async def test_an_indexed_field_keeps_a_filter_index_for_every_value_of_its_bound_or_more(
    own: Stack, settings: Settings, pools: None, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    big, middle, small = f"{prefix}-big", f"{prefix}-middle", f"{prefix}-small"
    url = ["--url", own.admin_conninfo(), "--maintenance-work-mem", "64MB"]
    try:
        with psycopg.connect(own.admin_conninfo(), autocommit=True) as admin:
            register_vector(admin)
            # 300, 150 and 40 members; an item that names its tag twice counts once.
            _tag_items(admin, prefix, {i: [big, big] if i == 0 else [big] for i in range(300)}
                       | {i: [middle] for i in range(300, 450)} | {i: [small] for i in range(450, 490)})
        assert filter_index_main(["create", "--every-tag", "--min-members", "120", *url]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert lines[0]["rule"]["kind"] == "tag" and lines[0]["rule"]["min_members"] == 120
        assert [(line["action"], line["value"], line["reason"]) for line in lines[1:]] == [
            ("create", big, "300 members: every tag of 120 members or more has a filter index"),
            ("create", middle, "150 members: every tag of 120 members or more has a filter index"),
        ]
        assert all(line["index"]["valid"] and line["index"]["copy_valid"] for line in lines[1:])
        assert _automatic(own, prefix) == {big: True, middle: True}
        assert filter_index_main(["fields", "--url", own.admin_conninfo()]) == 0
        assert [(f["kind"], f["min_members"]) for f in json.loads(capsys.readouterr().out)] == [("tag", 120)]
        report = await housekeeping(settings)
        assert _step_errors(report) == [] and [line for line in report.filter_indexes_due if prefix in line] == []

        # The small tag reaches the bound, the middle one falls to 70 (not under half of it) then 55.
        with psycopg.connect(own.admin_conninfo(), autocommit=True) as admin:
            register_vector(admin)
            _tag_items(admin, prefix, {i: [small, "other"] for i in range(490, 570)})
            admin.execute("DELETE FROM items WHERE tags && ARRAY[%s] AND id < %s", [middle, f"{prefix}-0380"])
        report = await housekeeping(settings)
        # The middle tag's copy is due as any other (80 of its 150 members went).
        assert [line.split(" since ")[0] for line in report.filter_indexes_due if prefix in line] == [
            f"tag {middle!r}: 80 of the 150 members its copy was built for changed",
            f"tag {small!r}: to create, 120 members: every tag of 120 members or more has a filter index",
        ]
        with psycopg.connect(own.admin_conninfo(), autocommit=True) as admin:
            admin.execute("DELETE FROM items WHERE tags && ARRAY[%s] AND id < %s", [middle, f"{prefix}-0395"])
        report = await housekeeping(settings)
        assert [line for line in report.filter_indexes_due if prefix in line and ": to " in line] == [
            f"tag {small!r}: to create, 120 members: every tag of 120 members or more has a filter index",
            f"tag {middle!r}: to drop, 55 members, under half the 120 of the rule that made it",
        ]
        # `refresh` applies the rule first: the middle tag's copy is not built again, its filter
        # index goes.
        assert filter_index_main(["refresh", *url]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(line.get("action", "refresh"), line["value"]) for line in lines
                if line["value"].startswith(prefix)] == [("create", small), ("drop", middle)]
        assert _automatic(own, prefix) == {big: True, small: True}
        report = await housekeeping(settings)
        assert [line for line in report.filter_indexes_due if prefix in line] == []

        # A rule over every category whose bound no category reaches builds nothing.
        assert filter_index_main(["create", "--every-category", "--min-members", "100000", *url]) == 0
        assert [json.loads(line) for line in capsys.readouterr().out.splitlines()][1:] == []
        assert filter_index_main(["drop", "--every-category", *url]) == 0
        assert json.loads(capsys.readouterr().out) == {"kind": "category", "key": "", "rule_dropped": True}

        # Created by name, a filter index is no rule's: dropping the rule drops only the others.
        assert filter_index_main(["create", "--tag", big, *url]) == 0
        assert json.loads(capsys.readouterr().out)["automatic"] is False
        assert filter_index_main(["drop", "--every-tag", *url]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert lines[0] == {"kind": "tag", "key": "", "rule_dropped": True}
        assert [(line["action"], line["value"], line["reason"], line["dropped"]) for line in lines[1:]] == [
            ("drop", small, "made for the rule of every tag, which is gone", True)
        ]
        assert _automatic(own, prefix) == {big: False}
    finally:
        with psycopg.connect(own.admin_conninfo(), autocommit=True) as admin:
            admin.execute("DELETE FROM indexed_fields")
            for value in (big, middle, small):
                drop_filter_index(admin, "tag", value)
            admin.execute("DELETE FROM items WHERE id LIKE %s", [f"{prefix}-%"])



def _scans(own: Stack, names: list[str]) -> int:
    """The scans of the indexes ``names`` that the statistics have counted."""
    with psycopg.connect(own.admin_conninfo(), autocommit=True) as admin:
        row = admin.execute("SELECT coalesce(sum(idx_scan), 0) FROM pg_stat_user_indexes"
                            " WHERE indexrelname = ANY (%s)", [names]).fetchone()
    assert row is not None
    return int(row[0])


def _scans_since(own: Stack, names: list[str], before: int, *, wait_for: int = 1) -> int:
    """The scans of the indexes ``names`` counted since ``before``, waiting up to 5 s for
    ``wait_for`` of them (after the backend that read them asked to flush its statistics)."""
    for _ in range(50):
        if _scans(own, names) - before >= wait_for:
            break
        time.sleep(0.1)
    return _scans(own, names) - before


def _metadata_nearest(own: Stack, query: str, metadata: dict[str, Any], cost_ratio: float) -> list[tuple[str, str]]:
    """``recsys_nearest``'s 10 nearest to ``query`` among the items whose metadata contains ``metadata``,
    and how each was found; statistics flushed after."""
    with psycopg.connect(own.admin_conninfo(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, method FROM recsys_nearest((SELECT embedding FROM items WHERE id = %s), 10, 40,"
            " NULL, NULL, NULL, %s, ARRAY[%s], false, %s)", [query, Jsonb(metadata), query, cost_ratio],
        ).fetchall()
        conn.execute("SELECT pg_stat_force_next_flush()")
    return [(str(r[0]), str(r[1])) for r in rows]


def test_a_metadata_key_indexed_as_a_field_and_a_pair_by_name(
    own: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = f"m{uuid.uuid4().hex[:8]}"
    acme, zenith = f"{prefix}-acme", f"{prefix}-zenith"
    url = ["--url", own.admin_conninfo(), "--maintenance-work-mem", "64MB"]
    try:
        with psycopg.connect(own.admin_conninfo(), autocommit=True) as admin:
            register_vector(admin)
            _copy_spare(admin, prefix, "metadata", {
                i: Jsonb({"brand": acme if i < 450 else zenith, "colour": "red" if i % 2 else "blue", "n": i})
                for i in range(600)
            }, offset=400)
            admin.execute("ANALYZE items")
        # Every value of the key of 200 members or more: acme's 450, not zenith's 150, nor any `n` or
        # `colour` (another key).
        assert filter_index_main(["create", "--every-metadata-key", "brand", "--min-members", "200", *url]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert (lines[0]["rule"]["kind"], lines[0]["rule"]["key"]) == ("metadata", "brand")
        pair = json.dumps({"brand": acme})
        assert [(line["action"], line["value"], line["reason"]) for line in lines[1:]] == [
            ("create", pair,
             "450 members: every value of metadata key 'brand' of 200 members or more has a filter index"),
        ]
        made = lines[1]["index"]
        assert (made["kind"], made["value"], made["automatic"], made["valid"], made["copy_valid"]) == (
            "metadata", pair, True, True, True)

        # A request that asks for the pair among others: the filter index answers, its graph or its
        # copy's sweep (a cost ratio that makes any search cheaper than the exact scan), and the
        # rest of the filter holds.
        asked = {"brand": acme, "colour": "red"}
        with psycopg.connect(own.admin_conninfo(), autocommit=True) as admin:
            passing = {r[0] for r in admin.execute("SELECT id FROM items WHERE metadata @> %s", [Jsonb(asked)])}
        recalls = []
        for query in (f"{prefix}-{i:04d}" for i in range(1, 450, 45)):
            truth = _truth(own, query, "metadata @> %s", [Jsonb(asked)])
            before = _scans(own, [made["index_name"], made["copy_name"]])
            found = _metadata_nearest(own, query, asked, 1e-6)
            assert {method for _, method in found} == {"filter_index"}
            assert _scans_since(own, [made["index_name"], made["copy_name"]], before) >= 1
            assert len(found) == 10 and {i for i, _ in found} <= passing
            recalls.append(len({i for i, _ in found} & set(truth)) / 10)
            # The exact scan (any search dearer) gives numpy's answer, from the copy or the table.
            assert [i for i, _ in _metadata_nearest(own, query, asked, 1e9)] == truth
        assert np.mean(recalls) >= 0.95, recalls

        # By name, the pair in any JSON spacing is recorded in one form; the rule names nothing more.
        assert filter_index_main(["create", "--metadata", f'{{"brand":"{zenith}"}}', *url]) == 0
        by_name = json.loads(capsys.readouterr().out)
        assert (by_name["value"], by_name["automatic"]) == (json.dumps({"brand": zenith}), False)
        with psycopg.connect(own.admin_conninfo(), autocommit=True) as admin:
            plan = [row for row in admin.execute(FIELD_PLAN).fetchall() if prefix in row[3]]
        assert plan == []
        assert filter_index_main(["create", "--metadata", '{"brand": ["a"]}', *url]) == 2
        assert "must be a string, a finite number or a boolean" in capsys.readouterr().err

        # Dropping the rule drops the filter index it made, not the one made by name.
        assert filter_index_main(["drop", "--every-metadata-key", "brand", *url]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert lines[0] == {"kind": "metadata", "key": "brand", "rule_dropped": True}
        assert [(line["action"], line["value"], line["dropped"]) for line in lines[1:]] == [("drop", pair, True)]
        assert _automatic(own, "{") == {json.dumps({"brand": zenith}): False}
    finally:
        with psycopg.connect(own.admin_conninfo(), autocommit=True) as admin:
            admin.execute("DELETE FROM indexed_fields")
            for value in (acme, zenith):
                drop_filter_index(admin, "metadata", json.dumps({"brand": value}))
            admin.execute("DELETE FROM items WHERE id LIKE %s", [f"{prefix}-%"])


def test_several_categories_each_with_a_filter_index_are_answered_by_the_union_of_their_searches(
    own: Stack,
) -> None:
    # Two categories of spare items from clusters other than the query items' (cluster 0): the
    # shared index's probe finds none of them, and each category's filter index answers its part.
    prefix = f"u{uuid.uuid4().hex[:8]}"
    first, second = f"{prefix}-a", f"{prefix}-b"
    spare = {j: first if CATALOGUE.clusters[BASE + j] < 10 else second
             for j in range(1000) if CATALOGUE.clusters[BASE + j] != 0}
    queries = [CATALOGUE.ids[i] for i in np.flatnonzero(CATALOGUE.clusters[:BASE] == 0)[:10]]
    try:
        with psycopg.connect(own.admin_conninfo(), autocommit=True) as admin:
            register_vector(admin)
            _copy_spare(admin, prefix, "category", spare)
            made = [create_filter_index(admin, "category", value, maintenance_work_mem="64MB")
                    for value in (first, second)]
        names = [name for index in made for name in (index.index_name, index.copy_name)]
        for union in (True, False):
            if not union:
                with psycopg.connect(own.admin_conninfo(), autocommit=True) as admin:
                    drop_filter_index(admin, "category", second)
                names = names[:2]
            before = _scans(own, names)
            recalls, methods = [], set()
            with psycopg.connect(own.admin_conninfo(), autocommit=True) as conn:
                for query in queries:
                    rows = conn.execute(
                        "SELECT id, method FROM recsys_nearest((SELECT embedding FROM items WHERE id = %s), 10, 100,"
                        " ARRAY[%s, %s], NULL, NULL, NULL, ARRAY[%s], false, 0.01)", [query, first, second, query],
                    ).fetchall()
                    truth = _truth(own, query, "category = ANY (%s)", [[first, second]])
                    assert len(rows) == 10
                    recalls.append(len({r[0] for r in rows} & set(truth)) / 10)
                    methods |= {r[1] for r in rows}
                conn.execute("SELECT pg_stat_force_next_flush()")
            scanned = _scans_since(own, names, before, wait_for=len(queries) if union else 0)
            assert np.mean(recalls) >= 0.95, (union, recalls, methods)
            if union:
                assert scanned >= len(queries) and "hnsw" not in methods, (scanned, methods)
            else:
                assert scanned == 0 and "filter_index" not in methods, (scanned, methods)
    finally:
        with psycopg.connect(own.admin_conninfo(), autocommit=True) as admin:
            for value in (first, second):
                drop_filter_index(admin, "category", value)
            admin.execute("DELETE FROM items WHERE id LIKE %s", [f"{prefix}-%"])
