from __future__ import annotations

import json
import random
from datetime import UTC, datetime

from recsys.ingest.retry import BASE_DELAY, Delivery, backoff_delay


def test_backoff_doubles_with_equal_jitter_up_to_the_cap() -> None:
    rng = random.Random(1)
    for attempt in range(1, 12):
        ceiling = min(300.0, BASE_DELAY * 2 ** (attempt - 1))
        delays = [backoff_delay(attempt, 300.0, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 4  # spread out, not in lockstep
    assert backoff_delay(10_000, 300.0, rng) <= 300.0


def test_a_first_delivery_is_its_own_origin() -> None:
    inserted = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
    d = Delivery.of(b'{"batch_id": "b", "items": []}', "m-1", inserted)
    assert (d.message_id, d.inserted_at, d.attempt, d.first_failure) == ("m-1", inserted, 0, None)
    assert d.copy(retry={"attempt": 1})["origin"] == {"message_id": "m-1", "inserted_us": 1796292000000000}


def test_a_retry_copy_keeps_the_first_deliverys_id_and_insertion_time() -> None:
    body = json.dumps({
        "batch_id": "b", "items": [],
        "origin": {"message_id": "m-1", "inserted_us": 1796292000000000},
        "retry": {"attempt": 3, "first_failure": 1796292001.5, "error": "x"},
    }).encode()
    d = Delivery.of(body, "m-9", datetime(2026, 12, 3, 11, 0, tzinfo=UTC))
    assert d.message_id == "m-1"
    assert d.inserted_at == datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
    assert (d.attempt, d.first_failure) == (3, 1796292001.5)


def test_a_body_that_is_not_a_json_object_has_no_document() -> None:
    d = Delivery.of(b"[1, 2", "m", None)
    assert d.document is None and d.attempt == 0
    bad_origin = Delivery.of(b'{"origin": {"message_id": 5, "inserted_us": "x"}, "retry": {"attempt": -1}}', "m", None)
    assert (bad_origin.message_id, bad_origin.inserted_at, bad_origin.attempt) == ("m", None, 0)
