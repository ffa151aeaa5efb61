"""Filter index names and values, and the copy's lists (recsys.search.filter_indexes), without a database."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from recsys.search.filter_indexes import (
    KINDS,
    copy_index_name,
    copy_lists,
    field_plan_reason,
    filter_index_main,
    filter_index_name,
    filter_indexes_due,
    metadata_pair,
    refresh_reason,
)

#: The CHECK constraints of filter_indexes.index_name (sql/090_filter_indexes.sql) and copy_name
#: (sql/091_filter_index_copies.sql).
NAME = re.compile(r"^items_filter_[a-z]+_[0-9a-f]{16}$")
COPY_NAME = re.compile(r"^items_copy_[a-z]+_[0-9a-f]{16}$")


@pytest.mark.parametrize(("kind", "value"), [
    *((kind, value) for kind in ("category", "tag")
      for value in ("books", "it's {odd}, \"quoted\"; DROP TABLE items", "ü" * 256, "x")),
    ("metadata", '{"brand": "it\'s {odd}; DROP TABLE items"}'), ("metadata", '{"n": 1}'),
    ("metadata", '{"' + "ü" * 240 + '": true}'),
])
def test_a_name_is_a_safe_identifier_whatever_the_value(kind: str, value: str) -> None:
    name, copy = filter_index_name(kind, value), copy_index_name(kind, value)
    assert NAME.match(name) and len(name) < 63  # PostgreSQL truncates identifiers at 63 bytes
    assert COPY_NAME.match(copy) and len(copy) < 63
    assert name == filter_index_name(kind, value) and copy == copy_index_name(kind, value)
    assert name.removeprefix("items_filter_") == copy.removeprefix("items_copy_")


def test_names_differ_by_kind_and_value() -> None:
    names = {filter_index_name(kind, value) for kind in ("category", "tag") for value in ("a", "b", "A")}
    names |= {filter_index_name("metadata", f'{{"k": "{value}"}}') for value in ("a", "b", "A")}
    assert len(names) == len(KINDS) * 3


@pytest.mark.parametrize(("kind", "value", "says"), [
    ("colour", "red", "kind must be one of"),
    ("tag", "", "1 to 256 characters"),
    ("category", "x" * 257, "1 to 256 characters"),
    ("metadata", "books", "a metadata pair must be a JSON object of one key"),
    ("metadata", '{"a": 1, "b": 2}', "a metadata pair must be a JSON object of one key"),
    ("metadata", '["a", 1]', "a metadata pair must be a JSON object of one key"),
    ("metadata", '{"": 1}', "key must not be empty"),
    ("metadata", '{"a": null}', "must be a string, a finite number or a boolean"),
    ("metadata", '{"a": [1]}', "must be a string, a finite number or a boolean"),
    ("metadata", '{"a": NaN}', "must be a string, a finite number or a boolean"),
    ("metadata", '{"a": "' + "x" * 250 + '"}', "1 to 256 characters"),
])
def test_bad_kinds_and_values_are_refused(kind: str, value: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        filter_index_name(kind, value)
    with pytest.raises(ValueError, match=says):
        copy_index_name(kind, value)


@pytest.mark.parametrize(("members", "lists"), [
    (0, 1), (1, 1), (3, 2), (1_000, 32), (10_000, 100), (100_000, 316), (1_000_000, 1000), (2_000_000_000, 32_768),
])
def test_the_copy_has_about_the_square_root_of_its_members_in_lists(members: int, lists: int) -> None:
    # One list for a value without members (IVFFlat needs at least one); at most IVFFlat's 32,768.
    assert copy_lists(members) == lists


BUILT_AT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("built", "members", "written", "due"), [
    (400, 400, 0, None),
    (400, 440, 40, None),                                        # a tenth: not yet
    (400, 400, 41, "41 of the 400 members"),                     # rewritten in place
    (400, 441, 0, "41 of the 400 members"),                      # grown (written before the build's count)
    (400, 359, 0, "41 of the 400 members"),                      # shrunk
    (0, 1, 1, "1 of the 0 members"),                             # built empty: any member
    (0, 0, 0, None),
])
def test_a_copy_is_due_once_more_than_a_tenth_of_its_members_changed(
    built: int, members: int, written: int, due: str | None
) -> None:
    reason = refresh_reason(True, built, BUILT_AT, members, written)
    if due is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(f"{due} its copy was built for changed since 2026-12-01T12:00")
        assert reason.endswith(f"({written} written, now {members})")


@pytest.mark.parametrize(("valid", "built"), [(False, 400), (True, None), (False, None)])
def test_a_filter_index_without_a_valid_copy_is_due(valid: bool, built: int | None) -> None:
    assert refresh_reason(valid, built, BUILT_AT, 400, 0) == "no valid copy of its 400 members"
    assert filter_indexes_due([("tag", "sale", valid, built, BUILT_AT, 400, 0),
                               ("tag", "new", True, 400, BUILT_AT, 400, 0)]) == [
        ("tag", "sale", "no valid copy of its 400 members")
    ]


@pytest.mark.parametrize(("argv", "says"), [
    (["refresh", "--force"], "--force is for refresh, with --category or --tag"),
    (["create", "--tag", "sale", "--force"], "--force is for refresh, with --category or --tag"),
    (["drop"], "create and drop need --category, --tag, --metadata or one of --every-*"),
    (["create", "--tag", "x", "--min-members", "5"], "--min-members is for create --every-category, --every-tag"),
    (["drop", "--every-tag", "--min-members", "5"], "--min-members is for create --every-category, --every-tag"),
    (["create", "--every-tag", "--min-members", "0"], "--min-members must be at least 1"),
    (["refresh", "--every-tag"], "--every-category, --every-tag and --every-metadata-key are for create and drop"),
    (["list", "--every-metadata-key", "brand"], "--every-category, --every-tag and --every-metadata-key are for"),
    (["create", "--every-tag", "--tag", "x"], "not allowed with argument"),
    (["create", "--every-metadata-key", "brand", "--every-tag"], "not allowed with argument"),
])
def test_the_command_refuses_options_that_do_not_go_together(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        filter_index_main(argv)
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize(("row", "says"), [
    (("create", "tag", "", "sale", 5123, 2000), "5123 members: every tag of 2000 members or more has a filter index"),
    (("create", "metadata", "brand", '{"brand": "acme"}', 2500, 2000),
     "2500 members: every value of metadata key 'brand' of 2000 members or more has a filter index"),
    (("drop", "category", "", "books", 999, 2000), "999 members, under half the 2000 of the rule that made it"),
    (("drop", "tag", "", "sale", 0, None), "made for the rule of every tag, which is gone"),
])
def test_the_rules_of_indexed_fields_say_why_they_build_or_drop(
    row: tuple[str, str, str, str, int, int | None], says: str
) -> None:
    assert field_plan_reason(*row) == says


@pytest.mark.parametrize(("text", "recorded"), [
    ('{"brand":"acme"}', '{"brand": "acme"}'),
    ('{ "n" : 3 }', '{"n": 3}'),
    ('{"on": true}', '{"on": true}'),
    ('{"größe": "groß"}', '{"größe": "groß"}'),
    ('{"price": 1.50}', '{"price": 1.5}'),
])
def test_a_metadata_pair_is_recorded_in_one_form(text: str, recorded: str) -> None:
    assert metadata_pair(text) == recorded
