"""Validation of query strings and bodies: typed values out, or InvalidArgument naming the field."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from recsys.errors import InvalidArgument
from recsys.search.params import (
    check_text,
    parse_batch,
    parse_bool,
    parse_id,
    parse_int,
    parse_lookup,
    parse_recommendation,
    parse_similar,
)

DIM = 4


def field_of(call: Any, *args: Any) -> str | None:
    with pytest.raises(InvalidArgument) as caught:
        call(*args)
    return caught.value.field


def test_ids_are_strings_of_1_to_128_characters_or_integers() -> None:
    assert parse_id("sku-1") == "sku-1"
    assert parse_id(42) == "42"
    assert parse_id(-7) == "-7"
    assert parse_id(4401.0) == "4401"  # an integer, as JSON (and JSON Schema) sees it
    assert parse_id("x" * 128) == "x" * 128
    for bad in ("", "x" * 129, True, 1.5, None, ["a"], {"id": 1}, "a\x00b"):
        assert field_of(parse_id, bad, "ids") == "ids"


def test_integers_from_query_strings_and_json() -> None:
    assert parse_int("10", "k", 1, 1000, text=True) == 10
    assert parse_int(" +7 ", "k", 1, 1000, text=True) == 7
    assert parse_int(10, "k", 1, 1000) == 10
    assert parse_int(10.0, "k", 1, 1000) == 10
    for bad in ("ten", "1e3", "+-5", "", "١٠", "99999999999999999999999"):
        assert field_of(lambda v: parse_int(v, "k", 1, 1000, text=True), bad) == "k"
    for bad in ("10", True, 2.5, None, float("inf")):
        assert field_of(lambda v: parse_int(v, "k", 1, 1000), bad) == "k"
    assert field_of(lambda v: parse_int(v, "k", 1, 1000), 0) == "k"


def test_booleans() -> None:
    assert parse_bool(True, "include_vector") is True
    assert parse_bool("TRUE", "include_vector", text=True) is True
    assert parse_bool("0", "include_vector", text=True) is False
    assert field_of(lambda v: parse_bool(v, "include_vector"), "true") == "include_vector"
    assert field_of(lambda v: parse_bool(v, "include_vector", text=True), "maybe") == "include_vector"


def test_similar_query_string() -> None:
    query = parse_similar({"k": "5", "ef_search": "64", "category": "books", "exclude": "a,b", "code": "key"})
    assert (query.k, query.ef_search, query.categories, query.exclude) == (5, 64, ("books",), ("a", "b"))
    assert parse_similar({}).k == 10 and parse_similar({}).ef_search is None
    assert parse_similar({"recall_target": "0.95"}).recall_target == 0.95
    assert field_of(parse_similar, {"recall_target": "0.95", "ef_search": "10"}) == "recall_target"
    assert field_of(parse_similar, {"exclude": "a,,b"}) == "exclude"


def test_similar_filters_and_controls_from_the_query_string() -> None:
    pairs = [("category", "books"), ("category", "music"), ("tags_any", "a,b"), ("tags_all", "c"),
             ("metadata", '{"color": "red", "size": 4, "new": true}'), ("offset", "20"), ("score_threshold", "-0.5"),
             ("exact", "true"), ("with_vector", "1"), ("diversity", "0.25"), ("candidates", "80")]
    query = parse_similar(dict(pairs), pairs)
    assert query.categories == ("books", "music")
    assert (query.tags_any, query.tags_all) == (("a", "b"), ("c",))
    assert query.metadata == {"color": "red", "size": 4, "new": True}
    assert (query.offset, query.score_threshold, query.exact, query.with_vector) == (20, -0.5, True, True)
    assert (query.diversity, query.pool, query.ranked) == (0.25, 80, 30)
    assert parse_similar({"k": "10"}).pool == 50 and parse_similar({"k": "100", "offset": "900"}).pool == 1000
    assert parse_similar({"k": "10", "candidates": "5"}).pool == 10  # raised to k + offset, as ef_search is


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"category": ""}, "category"),
        ({"tags_any": ""}, "tags_any"),
        ({"tags_all": "a,,b"}, "tags_all"),
        ({"metadata": "{"}, "metadata"),
        ({"metadata": "[1]"}, "metadata"),
        ({"metadata": '{"k": NaN}'}, "metadata"),
        ({"offset": "x"}, "offset"),
        ({"k": "10", "offset": "995"}, "offset"),
        ({"score_threshold": "2"}, "score_threshold"),
        ({"score_threshold": "nan"}, "score_threshold"),
        ({"exact": "perhaps"}, "exact"),
        ({"exact": "true", "ef_search": "5"}, "ef_search"),
        ({"with_vector": "2"}, "with_vector"),
        ({"diversity": "inf"}, "diversity"),
        ({"candidates": "1e3"}, "candidates"),
    ],
)
def test_invalid_similar_query_strings(params: dict[str, str], field: str) -> None:
    assert field_of(parse_similar, params) == field


def test_recommendation_body() -> None:
    query = parse_recommendation(
        {"positive": ["a", 2, "a"], "negative": ["n"], "vector": [1, 0, 0, 0.5], "k": 3, "exclude": [9]}, DIM
    )
    assert query.positive == ("a", "2") and query.negative == ("n",) and query.exclude == ("9",)
    assert query.vector is not None and query.vector.dtype == np.float32
    assert parse_recommendation({"vector": [0, 0, 1, 0]}, DIM).positive == ()
    full = parse_recommendation(
        {"positive": ["a"], "category": "books", "tags_any": ["x"], "tags_all": ["y", "z"], "metadata": {"n": 1.5},
         "strategy": "best_score", "offset": 5, "diversity": 0, "exact": False, "with_vector": False}, DIM
    )
    assert (full.categories, full.tags_any, full.tags_all) == (("books",), ("x",), ("y", "z"))
    assert full.metadata == {"n": 1.5}
    assert (full.strategy, full.offset, full.ranked) == ("best_score", 5, 15)
    assert parse_recommendation({"positive": ["a"], "category": ["a", "b"]}, DIM).categories == ("a", "b")
    assert parse_recommendation({"positive": ["a"]}, DIM).strategy == "average_vector"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "body"),
        ({}, "positive"),
        ({"positive": ["a"], "unknown": 1}, "unknown"),
        ({"vector": [1, 2, 3]}, "vector"),
        ({"vector": [1, 2, 3, float("nan")]}, "vector"),
        ({"vector": [1, 2, 3, float("inf")]}, "vector"),
        ({"vector": [1, 2, 3, 1e39]}, "vector"),
        ({"vector": [1, 2, 3, False]}, "vector"),
        ({"vector": [0, 0, 0, 0]}, "vector"),
        ({"positive": ["a"], "category": ""}, "category"),
        ({"positive": ["a"], "negative": "b"}, "negative"),
        ({"positive": ["a"], "recall_target": 0.3}, "recall_target"),
        ({"positive": ["a"], "category": []}, "category"),
        ({"positive": ["a"], "category": ["ok", 3]}, "category"),
        ({"positive": ["a"], "category": ["x"] * 101}, "category"),
        ({"positive": ["a"], "tags_any": "red"}, "tags_any"),
        ({"positive": ["a"], "tags_any": []}, "tags_any"),
        ({"positive": ["a"], "tags_all": ["a\x00b"]}, "tags_all"),
        ({"positive": ["a"], "tags_all": ["t" * 257]}, "tags_all"),
        ({"positive": ["a"], "metadata": ["k"]}, "metadata"),
        ({"positive": ["a"], "metadata": {"k": None}}, "metadata"),
        ({"positive": ["a"], "metadata": {"k": [1]}}, "metadata"),
        ({"positive": ["a"], "metadata": {"k": {"n": 1}}}, "metadata"),
        ({"positive": ["a"], "metadata": {"": 1}}, "metadata"),
        ({"positive": ["a"], "offset": -1}, "offset"),
        ({"positive": ["a"], "offset": 1001}, "offset"),
        ({"positive": ["a"], "offset": 991}, "offset"),
        ({"positive": ["a"], "offset": 1.5}, "offset"),
        ({"positive": ["a"], "score_threshold": 1.01}, "score_threshold"),
        ({"positive": ["a"], "score_threshold": "0.5"}, "score_threshold"),
        ({"positive": ["a"], "exact": "yes"}, "exact"),
        ({"positive": ["a"], "exact": True, "ef_search": 10}, "ef_search"),
        ({"positive": ["a"], "exact": True, "recall_target": 0.9}, "recall_target"),
        ({"positive": ["a"], "with_vector": 1}, "with_vector"),
        ({"positive": ["a"], "diversity": -0.1}, "diversity"),
        ({"positive": ["a"], "diversity": 1.5}, "diversity"),
        ({"positive": ["a"], "candidates": 0}, "candidates"),
        ({"positive": ["a"], "candidates": 1001}, "candidates"),
        ({"positive": ["a"], "strategy": "best"}, "strategy"),
        ({"positive": ["a"], "strategy": ["best_score"]}, "strategy"),
    ],
)
def test_invalid_recommendation_bodies(body: Any, field: str) -> None:
    assert field_of(parse_recommendation, body, DIM) == field


def test_lookup_and_batch_envelopes() -> None:
    assert parse_lookup({"ids": [1, "b"], "include_vector": True}) == (("1", "b"), True)
    assert field_of(parse_lookup, {"ids": ["a"] * 1001}) == "ids"
    assert len(parse_batch({"queries": [{}] * 32})) == 32
    assert field_of(parse_batch, {"queries": [{}] * 33}) == "queries"
    assert field_of(parse_batch, {"queries": []}) == "queries"


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "nul\x00", "\x00"])
def test_text_postgresql_cannot_store_is_a_400_naming_the_field(text: str) -> None:
    # Strings reach here from JSON bodies and from the host's own decoding of paths and
    # query strings (which may be lenient): both kinds are refused before the driver sees them.
    with pytest.raises(InvalidArgument) as caught:
        parse_id(text, "id")
    assert caught.value.field == "id"
    with pytest.raises(InvalidArgument) as caught:
        parse_similar({"category": text})
    assert caught.value.field == "category"
    with pytest.raises(InvalidArgument) as caught:
        parse_similar({"exclude": f"ok,{text}"})
    assert caught.value.field == "exclude"
    with pytest.raises(InvalidArgument) as caught:
        parse_recommendation({"positive": ["a"], "category": text}, 4)
    assert caught.value.field == "category"
    with pytest.raises(InvalidArgument) as caught:
        parse_lookup({"ids": ["a", text]})
    assert caught.value.field == "ids"


def test_non_ascii_text_that_is_unicode_is_kept() -> None:
    assert check_text("été 📚", "category") == "été 📚"
    assert parse_id("\ufffd") == "\ufffd"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"k": "1e999"}, "k"),
        ({"k": "9" * 40}, "k"),
        ({"k": "١٢"}, "k"),  # Unicode digits are not an integer of the API
        ({"ef_search": "-0"}, "ef_search"),
        ({"recall_target": "1e999"}, "recall_target"),
        ({"recall_target": "nan"}, "recall_target"),
        ({"recall_target": "0.9", "ef_search": "10"}, "recall_target"),
    ],
)
def test_hostile_query_string_numbers(params: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_similar(params)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"positive": ["a"], "k": float("inf")}, "k"),
        ({"positive": ["a"], "k": 10**400}, "k"),
        ({"positive": ["a"], "ef_search": 1e300}, "ef_search"),
        ({"positive": ["a"], "recall_target": float("inf")}, "recall_target"),
        ({"vector": [1e39, 1.0, 1.0, 1.0]}, "vector"),
        ({"vector": [-3.4e38, 0.0, 0.0, 0.0]}, "vector"),  # float32, but cosine would overflow to NaN
        ({"vector": [1.1e17, 1.0, 1.0, 1.0]}, "vector"),
        ({"vector": [float("inf"), 1.0, 1.0, 1.0]}, "vector"),
        ({"positive": [10**200]}, "positive"),
    ],
)
def test_hostile_json_numbers(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_recommendation(body, 4)
    assert caught.value.field == field
