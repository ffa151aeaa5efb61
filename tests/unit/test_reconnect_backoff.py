"""The pool's reconnection schedule: exponential bounds, full jitter, a cap, and a time to give up."""

from __future__ import annotations

import random

from recsys.db.pool import RECONNECT_BASE_DELAY, RECONNECT_MAX_DELAY, ReconnectBackoff


def test_delays_are_drawn_below_a_doubling_capped_bound() -> None:
    rng = random.Random(3)
    firsts, laters = [], []
    for _ in range(300):
        attempt = ReconnectBackoff(timeout=1000.0, rng=rng)
        for n in range(8):
            attempt.update_delay(now=float(n))
            bound = min(RECONNECT_MAX_DELAY, RECONNECT_BASE_DELAY * 2**n)
            assert 0.0 <= attempt.delay <= bound
        firsts.append(ReconnectBackoff(timeout=1000.0, rng=rng))
        firsts[-1].update_delay(now=0.0)
        laters.append(attempt.delay)
    first_delays = [a.delay for a in firsts]
    # Spread over the whole interval, not bunched around one value as psycopg_pool's 1 s ± 10 %.
    assert min(first_delays) < 0.1 * RECONNECT_BASE_DELAY and max(first_delays) > 0.9 * RECONNECT_BASE_DELAY
    assert max(laters) > 0.9 * RECONNECT_MAX_DELAY


def test_gives_up_after_its_timeout_and_never_waits_past_it() -> None:
    attempt = ReconnectBackoff(timeout=3.0, rng=random.Random(1))
    attempt.update_delay(now=100.0)
    assert not attempt.time_to_give_up(100.0)
    for now in (101.0, 102.0, 102.9):
        attempt.update_delay(now=now)
        assert now + attempt.delay <= 103.0
    assert attempt.time_to_give_up(103.0)
