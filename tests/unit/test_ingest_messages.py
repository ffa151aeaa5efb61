"""Batch documents and queue messages: validation names the field; encoding round-trips."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest

from recsys.errors import InvalidArgument
from recsys.ingest.messages import (
    INLINE_MAX_BYTES,
    MAX_PART_ENTRIES,
    MAX_VERSION,
    QUEUE_MESSAGE_MAX_BYTES,
    BlobRef,
    Delete,
    encode_document,
    encode_embedding,
    latest_items,
    message_key,
    parse_batch_document,
    parse_items,
    parse_message,
    parse_part,
    parse_version,
)
from recsys.ingest.producer import next_version, plan_messages, stamp_versions

DIM = 4


def item(**overrides: Any) -> dict[str, Any]:
    return {"id": "a", "embedding": [0.1, 0.2, 0.3, 0.4], **overrides}


def error_of(raw: Any, **kwargs: Any) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        parse_items(raw, DIM, **kwargs)
    return caught.value


def test_a_valid_item_is_parsed_with_defaults() -> None:
    (parsed,) = parse_items([item()], DIM)
    assert parsed.id == "a" and parsed.category is None and parsed.tags == [] and parsed.metadata == {}
    assert parsed.embedding.dtype == np.float32
    np.testing.assert_array_equal(parsed.embedding, np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32))


def test_an_integer_id_is_taken_as_its_decimal_string() -> None:
    (parsed,) = parse_items([item(id=12345)], DIM)
    assert parsed.id == "12345"


def test_embedding_b64_is_little_endian_float32() -> None:
    vector = np.array([1.5, -2.0, 0.25, 8.0], dtype="<f4")
    (parsed,) = parse_items([{"id": "b", "embedding_b64": base64.b64encode(vector.tobytes()).decode()}], DIM)
    np.testing.assert_array_equal(parsed.embedding, vector)
    assert encode_embedding(parsed.embedding) == base64.b64encode(vector.tobytes()).decode()


@pytest.mark.parametrize(
    ("bad", "field", "words"),
    [
        (item(id=""), "items[1].id", "1 to 128"),
        (item(id="x" * 129), "items[1].id", "1 to 128"),
        (item(id=True), "items[1].id", "string or an integer"),
        (item(id="a\x00b"), "items[1].id", "NUL"),
        (item(embedding=[1.0, 2.0]), "items[1].embedding", "4 dimensions, got 2"),
        (item(embedding=[1.0, 2.0, 3.0, float("nan")]), "items[1].embedding", "finite"),
        (item(embedding=[1.0, 2.0, 3.0, float("inf")]), "items[1].embedding", "finite"),
        (item(embedding=[1.0, 2.0, 3.0, 1e300]), "items[1].embedding", "finite"),
        (item(embedding=[1.0, 2.0, 3.0, "4"]), "items[1].embedding", "only numbers"),
        (item(embedding=[1.0, 2.0, 3.0, True]), "items[1].embedding", "only numbers"),
        (item(embedding=[0, 0, 0, 0]), "items[1].embedding", "all zeros"),
        (item(embedding=None), "items[1].embedding", "required"),
        ({"id": "b", "embedding_b64": "not base64!"}, "items[1].embedding_b64", "base64"),
        ({"id": "b", "embedding_b64": base64.b64encode(b"\0" * 12).decode()}, "items[1].embedding_b64", "16 bytes"),
        (
            {"id": "b", "embedding_b64": base64.b64encode(np.full(4, np.nan, "<f4").tobytes()).decode()},
            "items[1].embedding_b64", "finite",
        ),
        (item(embedding_b64="AAAA"), "items[1].embedding", "not both"),
        (item(category=3), "items[1].category", "string"),
        (item(tags="t"), "items[1].tags", "list of strings"),
        (item(tags=["ok", 3]), "items[1].tags[1]", "string"),
        (item(metadata=[1]), "items[1].metadata", "object"),
        (item(metadata={"x": float("nan")}), "items[1].metadata", "finite"),
        (item(metadata={"x": "\x00"}), "items[1].metadata", "NUL"),
        ("not an object", "items[1]", "object"),
    ],
)
def test_a_bad_item_is_refused_naming_its_field(bad: Any, field: str, words: str) -> None:
    error = error_of([item(id="first"), bad])
    assert error.field == field
    assert words in error.message


def test_a_repeated_id_is_accepted_and_the_latest_entry_of_each_id_wins() -> None:
    parsed = parse_items([item(id="a", tags=["first"]), item(id="b"), item(id="a", tags=["second"])], DIM)
    assert [i.id for i in parsed] == ["a", "b", "a"]
    items, _ = stamp_versions(parsed, [], 42)
    latest, dropped = latest_items(items)
    assert [(i.id, i.tags) for i in latest] == [("a", ["second"]), ("b", [])] and dropped == 1
    # The highest version wins whatever the order; equal versions, the last of them.
    raw = [item(id="c", version=9, tags=["9"]), item(id="c", version=12, tags=["12"]),
           item(id="c", version=3, tags=["3"]), item(id="c", version=12, tags=["12 again"])]
    latest, dropped = latest_items(parse_items(raw, DIM))
    assert [(i.id, i.version, i.tags) for i in latest] == [("c", 12, ["12 again"])] and dropped == 3


def test_items_must_be_a_non_empty_list_within_the_limit() -> None:
    assert error_of([]).field == "items"
    assert error_of({"id": "a"}).field == "items"
    assert error_of([item(id=str(i)) for i in range(3)], max_items=2).field == "items"


def test_a_batch_document_needs_items_and_a_valid_batch_id() -> None:
    assert parse_batch_document({"items": [item()]}, DIM)[0] is None
    assert parse_batch_document({"batch_id": 7, "items": [item()]}, DIM)[0] == "7"
    for doc, field in [([], "body"), ({"batch_id": "x"}, "items"), ({"batch_id": "", "items": [item()]}, "batch_id")]:
        with pytest.raises(InvalidArgument) as caught:
            parse_batch_document(doc, DIM)
        assert caught.value.field == field


def test_a_message_has_items_or_a_blob() -> None:
    inline = parse_message(json.dumps({"batch_id": "b-1", "items": [item()]}))
    assert (inline.batch_id, inline.part, inline.blob) == ("b-1", 0, None)
    pointer = parse_message(json.dumps({"batch_id": "b-1", "part": 2, "blob": "box/dir/name.json"}))
    assert (pointer.part, pointer.blob) == (2, BlobRef("box", "dir/name.json"))
    for doc, field in [
        ("{not json", "body"),
        ([], "body"),
        ({"items": []}, "batch_id"),
        ({"batch_id": "b", "part": -1, "items": []}, "part"),
        ({"batch_id": "b"}, "items"),
        ({"batch_id": "b", "items": [], "blob": "c/n"}, "items"),
        ({"batch_id": "b", "blob": "no-slash"}, "blob"),
    ]:
        with pytest.raises(InvalidArgument) as caught:
            parse_message(doc if isinstance(doc, str) else json.dumps(doc))
        assert caught.value.field == field, doc


def test_the_key_of_a_broken_message_is_kept_when_it_can_be() -> None:
    assert message_key({"batch_id": "b", "part": 1, "items": "nonsense"}) == ("b", 1)
    assert message_key({"batch_id": "", "items": []}) is None
    assert message_key(["b"]) is None


def test_encoded_documents_round_trip() -> None:
    items = parse_items([item(id=str(i), category="c", tags=["t"], metadata={"n": i}) for i in range(3)], DIM)
    message = parse_message(encode_document("b-9", 1, items=items))
    assert (message.batch_id, message.part) == ("b-9", 1)
    again = parse_items(message.items, DIM)
    assert [(i.id, i.category, i.tags, i.metadata) for i in again] == [(i.id, i.category, i.tags, i.metadata)
                                                                          for i in items]
    for a, b in zip(again, items, strict=True):
        np.testing.assert_array_equal(a.embedding, b.embedding)


def test_the_inline_limit_leaves_room_for_base64() -> None:
    assert len(base64.b64encode(b"x" * INLINE_MAX_BYTES)) <= QUEUE_MESSAGE_MAX_BYTES


def test_a_large_batch_becomes_a_few_blob_messages_not_many_small_ones() -> None:
    rng = np.random.default_rng(1)
    raw = [{"id": f"i{i}", "embedding": rng.standard_normal(384).tolist()} for i in range(2500)]
    items = parse_items(raw, 384)
    small, small_blobs = plan_messages("b", items[:5], container="box")
    assert len(small) == 1 and small_blobs == []
    payloads, blobs = plan_messages("b", items, container="box", part_items=1000)
    assert len(payloads) == 3 and len(blobs) == 3
    assert all(len(base64.b64encode(p)) <= QUEUE_MESSAGE_MAX_BYTES for p in payloads)
    assert [json.loads(p)["part"] for p in payloads] == [0, 1, 2]
    assert [len(json.loads(data)["items"]) for _, data in blobs] == [1000, 1000, 500]


# ----------------------------------------------------------------------------- versions and deletes


def part_error(doc: Any, **kwargs: Any) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        parse_part(doc, DIM, **kwargs)
    return caught.value


def test_versions_are_integers_from_1_to_2_to_the_53_minus_1() -> None:
    assert parse_version(None, "v") is None
    assert parse_version(1, "v") == 1 and parse_version(MAX_VERSION, "v") == MAX_VERSION
    assert parse_version(1e12, "v") == 10**12  # an integer written as a float
    for bad in (0, -1, MAX_VERSION + 1, 1.5, "3", True, [], float("nan")):
        with pytest.raises(InvalidArgument) as caught:
            parse_version(bad, "items[0].version")
        assert caught.value.field == "items[0].version"


def test_a_part_holds_items_and_deletions_with_their_versions() -> None:
    part = parse_part({"items": [item(version=7)], "delete": ["b", 12, {"id": "c", "version": 9}]}, DIM)
    assert [(i.id, i.version) for i in part.items] == [("a", 7)]
    assert part.deletes == [Delete("b"), Delete("12"), Delete("c", 9)]
    assert len(part) == 4
    assert parse_part({"delete": ["x"]}, DIM).items == []


def test_an_id_may_be_deleted_twice_in_a_batch_and_upserted_twice() -> None:
    part = parse_part({"delete": ["a", {"id": "a", "version": 3}, "a"]}, DIM)
    assert part.deletes == [Delete("a"), Delete("a", 3), Delete("a")] and len(part) == 3
    assert len(parse_part({"items": [item(), item(version=2)], "delete": ["b", "b"]}, DIM)) == 4


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({}, "items"),
        ({"items": [], "delete": []}, "items"),
        ({"delete": {"id": "a"}}, "delete"),
        ({"items": "a"}, "items"),
        ({"delete": [None]}, "delete[0]"),
        ({"delete": [{"id": "a", "version": 0}]}, "delete[0].version"),
        ({"delete": [{"id": "a", "extra": 1}]}, "delete[0]"),
        ({"items": [item()], "delete": ["b", "a", "a"]}, "delete"),
        ({"items": [item()], "delete": ["a"]}, "delete"),
        ({"items": [item(version="new")]}, "items[0].version"),
    ],
)
def test_bad_parts_name_the_field(doc: Any, field: str) -> None:
    assert part_error(doc).field == field


def test_a_part_over_the_entry_limit_is_refused_before_its_entries_are_parsed() -> None:
    doc = {"items": [{"not": "checked"}] * 3, "delete": ["a"] * (MAX_PART_ENTRIES - 2)}
    error = part_error(doc)
    expected = f"items and delete must hold at most {MAX_PART_ENTRIES} entries in all, got {MAX_PART_ENTRIES + 1}"
    assert error.message == expected
    assert error.field == "delete"


def test_messages_carry_deletions_and_their_source() -> None:
    items = parse_items([item(version=3)], DIM)
    message = parse_message(encode_document("b", 0, items=items, deletes=[Delete("x", 4)], source="enqueue:t"))
    assert (message.source, message.deletes) == ("enqueue:t", [{"id": "x", "version": 4}])
    assert parse_part({"items": message.items, "delete": message.deletes}, DIM).deletes == [Delete("x", 4)]
    assert parse_message(json.dumps({"batch_id": "b", "delete": ["y"]})).deletes == ["y"]
    with pytest.raises(InvalidArgument) as caught:
        parse_message(json.dumps({"batch_id": "b", "delete": ["y"], "blob": "c/n"}))
    assert caught.value.field == "items"


def test_a_message_may_count_writes_its_producer_found_stale() -> None:
    assert parse_message(json.dumps({"batch_id": "b", "delete": ["y"]})).stale == 0
    assert parse_message(encode_document("b", 0, deletes=[Delete("y", 1)], stale=3)).stale == 3
    assert parse_message(encode_document("b", 0, blob=BlobRef("c", "n"), stale=2)).stale == 2
    for bad in (-1, 1.5, "2", True, 50_001):
        with pytest.raises(InvalidArgument) as caught:
            parse_message(json.dumps({"batch_id": "b", "delete": ["y"], "stale": bad}))
        assert caught.value.field == "stale"


def test_the_stale_count_travels_on_the_first_part_only() -> None:
    items = parse_items([item(id=f"i{i}", version=1) for i in range(5)], DIM)
    payloads, blobs = plan_messages("b", items, container="box", part_items=2, stale=4)
    assert blobs == [] and [json.loads(p).get("stale", 0) for p in payloads] == [4, 0, 0]
    payloads, _ = plan_messages("b", items, container="box", part_items=2)
    assert all("stale" not in json.loads(p) for p in payloads)


def test_the_producer_stamps_missing_versions_with_one_increasing_clock() -> None:
    first, second = next_version(), next_version()
    assert second > first > 1_700_000_000 * 10**6
    items, deletes = stamp_versions(parse_items([item(), item(id="b", version=5)], DIM), [Delete("c")], 42)
    assert [i.version for i in items] == [42, 5] and deletes == [Delete("c", 42)]


def test_parts_are_cut_by_bytes_as_well_as_by_entries() -> None:
    rng = np.random.default_rng(2)
    items = parse_items([{"id": f"i{i}", "embedding": rng.standard_normal(384).tolist()} for i in range(300)], 384)
    payloads, blobs = plan_messages("b", items, container="box", deletes=[Delete("z", 1)], part_bytes=200_000)
    assert len(payloads) > 1 and max(len(data) for _, data in blobs) <= 200_000
    stored = {str(ref): json.loads(data) for ref, data in blobs}
    documents = [stored.get(json.loads(p).get("blob"), json.loads(p)) for p in payloads]
    assert [d["part"] for d in documents] == list(range(len(payloads)))
    assert sum(len(d["items"]) for d in documents) == 300
    assert documents[-1]["delete"] == [{"id": "z", "version": 1}]
    assert len({d["source"] for d in documents}) == 1

def test_components_past_1e17_are_refused_since_cosine_would_overflow() -> None:
    from recsys.ingest.messages import parse_embedding

    assert parse_embedding([1e17, 0.0, 0.0, 1.0], 4, "embedding") is not None
    with pytest.raises(InvalidArgument) as caught:
        parse_embedding([-3.4e38, 0.0, 0.0, 0.0], 4, "items[0].embedding")
    assert caught.value.field == "items[0].embedding"


def test_a_halfvec_catalogue_refuses_components_past_65504_before_anything_is_sent() -> None:
    # pgvector refuses to cast such a component to halfvec: in the loader the database refused the
    # whole part after the batch had been accepted. The producer refuses it first, naming the field.
    import asyncio

    from recsys.config import Settings
    from recsys.ingest.producer import enqueue_document
    from recsys.search.params import HALFVEC_MAX, max_component

    assert max_component("halfvec") == HALFVEC_MAX == 65504.0 and max_component("vector") == 1e17
    past = [70_000.0, 0.0, 0.0, 1.0]
    assert parse_batch_document({"items": [item(embedding=past)]}, DIM)[1].items[0].embedding[0] == 70_000.0
    for field, value in (("embedding", past),
                         ("embedding_b64", encode_embedding(np.asarray(past, dtype=np.float32)))):
        with pytest.raises(InvalidArgument) as caught:
            parse_batch_document({"items": [{"id": "a", field: value}]}, DIM, limit=HALFVEC_MAX)
        assert caught.value.field == f"items[0].{field}" and "65504" in str(caught.value)
    within = parse_part({"items": [item(embedding=[65504.0, 0.0, 0.0, -65504.0])]}, DIM, limit=HALFVEC_MAX)
    assert within.items[0].embedding[0] == 65504.0
    settings = Settings(embedding_dim=DIM, vector_type="halfvec", storage_connection="UseDevelopmentStorage=true")
    with pytest.raises(InvalidArgument) as caught:
        asyncio.run(enqueue_document({"items": [item(embedding=past)]}, settings=settings))
    assert caught.value.field == "items[0].embedding"


def test_the_served_document_of_a_halfvec_catalogue_bounds_stored_components_by_65504() -> None:
    from recsys.http.openapi import openapi_document

    doc = json.loads(openapi_document(8, "halfvec"))
    stored = doc["components"]["schemas"]["IngestItem"]["properties"]
    assert stored["embedding"]["items"]["maximum"] == 65504 and stored["embedding"]["items"]["minimum"] == -65504
    assert "±65504" in stored["embedding"]["description"] and "±65504" in stored["embedding_b64"]["description"]
    # A query's vector is scaled to unit length before it takes the column's type.
    asked = doc["components"]["schemas"]["RecommendationRequest"]["properties"]["vector"]["items"]
    assert asked["maximum"] == 1e17
    plain = json.loads(openapi_document(8))["components"]["schemas"]["IngestItem"]["properties"]
    assert plain["embedding"]["items"]["maximum"] == 1e17


def test_the_loader_refuses_a_message_past_a_halfvec_catalogues_bound_as_bad_input() -> None:
    # A message another producer wrote: the loader's validation refuses it naming the field, where
    # the database would have refused the whole part's rows at the cast.
    import asyncio

    from recsys.config import Settings
    from recsys.ingest.loader import _part_of

    message = parse_message(json.dumps({"batch_id": "b-1", "items": [item(embedding=[70_000.0, 0.0, 0.0, 1.0])]}))
    halfvec = Settings(embedding_dim=DIM, vector_type="halfvec")
    with pytest.raises(InvalidArgument) as caught:
        asyncio.run(_part_of(message, halfvec, None))  # type: ignore[arg-type]
    assert caught.value.field == "items[0].embedding"
    part = asyncio.run(_part_of(message, Settings(embedding_dim=DIM), None))  # type: ignore[arg-type]
    assert part is not None and part.items[0].embedding[0] == 70_000.0
