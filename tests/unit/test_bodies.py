"""Request bodies: what ``parse_json_body`` accepts, and the field each rejection names."""

from __future__ import annotations

import json
import time

import pytest

from recsys.errors import InvalidArgument
from recsys.http.bodies import MAX_DEPTH, json_depth, parse_json_body


def rejected(body: bytes) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        parse_json_body(body)
    return caught.value


def test_plain_documents_parse() -> None:
    assert parse_json_body(b'{"ids": ["a", 1], "k": 10}') == {"ids": ["a", 1], "k": 10}
    assert parse_json_body('{"category": "été 📚"}'.encode()) == {"category": "été 📚"}


@pytest.mark.parametrize(
    ("body", "depth"),
    [
        (b"1", 0),
        (b"[]", 1),
        (b'{"a": [[1], {"b": []}]}', 4),
        (b'{"a": "[[[[[[{{{{"}', 1),  # brackets inside strings do not count
        (b'["\\"[[[", [[]]]', 3),  # nor after an escaped quote
        (b'["\\\\", [[]]]', 3),  # an escaped backslash ends before the quote
    ],
)
def test_depth_counts_structure_only(body: bytes, depth: int) -> None:
    assert json_depth(body) == depth


def test_nesting_deeper_than_the_limit_is_a_400_on_body() -> None:
    assert parse_json_body(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) is not None
    for depth in (MAX_DEPTH + 1, 5_000, 500_000):  # 500k levels: about 1 MB, under the size limit
        error = rejected(b"[" * depth + b"]" * depth)
        assert error.field == "body" and f"nested {depth} levels" in error.message
    assert rejected(b'{"ids": ' + b"[" * 3000 + b"]" * 3000 + b"}").field == "body"
    # Unbalanced (not JSON at all) is still a 400, never a RecursionError.
    assert rejected(b"[" * 100_000).field == "body"


def test_depth_check_is_cheap_on_a_large_body() -> None:
    items = [{"id": f"i{i}", "embedding": [0.5] * 384, "metadata": {"a": [1, {"b": "[{"}]}} for i in range(2000)]
    body = json.dumps({"items": items}).encode()
    started = time.perf_counter()
    assert json_depth(body) == 6
    # Generous: a few milliseconds per MB here; a Python loop over the bytes would take ~100x.
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize(
    "body",
    [b"\xff", b'{"ids": ["\xff"]}', b'{"ids": ["\xed\xa0\x80"]}', b'{"a": "\xc3"}', '{"a": 1}'.encode("utf-16")],
)
def test_text_that_is_not_utf8_is_a_400_on_body(body: bytes) -> None:
    error = rejected(body)
    assert error.field == "body" and "UTF-8" in error.message


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"ids": ["\\ud800"]}', "ids[0]"),
        (b'{"positive": ["a"], "category": "x\\udfff"}', "category"),
        (b'{"items": [{"id": "a", "metadata": {"k": ["ok", "\\udbff\\u0041"]}}]}', "items[0].metadata.k[1]"),
        (b'{"\\ud800": 1}', "\\ud800"),  # the key itself, written as an escape
        (b'{"ids": ["a\\u0000b"]}', "ids[0]"),
        (b'{"metadata": {"\\u0000": 1}}', "metadata.\\x00"),
        (b'"\\ud800"', "body"),
    ],
)
def test_lone_surrogates_and_nul_escapes_name_their_string(body: bytes, field: str) -> None:
    error = rejected(body)
    assert error.field == field


def test_valid_escapes_are_left_alone() -> None:
    assert parse_json_body(b'{"c": "\\ud83d\\udcda"}') == {"c": "📚"}  # a pair: one character
    assert parse_json_body(b'{"c": "\\\\ud800"}') == {"c": "\\ud800"}  # an escaped backslash, then text
    assert parse_json_body(b'{"c": "\\\\u0000"}') == {"c": "\\u0000"}
    assert parse_json_body(b'{"c": "\\u00e9\\u0041"}') == {"c": "éA"}


def test_duplicate_keys_are_a_400_naming_the_key() -> None:
    assert rejected(b'{"k": 1, "k": 2}').field == "k"
    assert rejected(b'{"a": {"x": 1, "y": 2, "x": 3}}').field == "x"
    assert parse_json_body(b'[{"k": 1}, {"k": 2}]') == [{"k": 1}, {"k": 2}]


@pytest.mark.parametrize("body", [b"", b"  \n", b"{", b'{"a": NaN}', b"[Infinity]", b"-Infinity", b"{'a': 1}"])
def test_empty_truncated_and_non_json_bodies_are_a_400_on_body(body: bytes) -> None:
    assert rejected(body).field == "body"


def test_huge_numbers_parse_for_the_field_validators_to_bound() -> None:
    assert parse_json_body(b'{"k": 1e999}') == {"k": float("inf")}
    assert parse_json_body(b'{"k": ' + b"9" * 4000 + b"}")["k"] == int("9" * 4000)
    # Past Python's limit on integer digits (4300) the parser refuses: a 400, not a 500.
    assert rejected(b'{"k": ' + b"9" * 5000 + b"}").field == "body"
