"""The overload benchmark's arithmetic: windows before, during and after a burst, and recovery."""

from __future__ import annotations

from recsys.bench.storm import Outcome, summarize_run, timeline


def _outcomes() -> list[Outcome]:
    out: list[Outcome] = []
    for n in range(40):  # 0-4 s: before the burst, 2 ms
        out.append((n * 0.1, 0.002, "ok"))
    for n in range(30):  # 4-7 s: the burst (2 s ramp + 1 s), slow, one fast 503 and one slow
        out.append((4 + n * 0.1, 0.5, "ok"))
    out.append((4.5, 0.2, "503"))
    out.append((5.0, 7.0, "503"))
    for n in range(50):  # 7-12 s: back to normal
        out.append((7 + n * 0.1, 0.0025, "ok"))
    return out


def test_windows_failures_and_recovery() -> None:
    figures = summarize_run(_outcomes(), start_at=0.0, burst_at=4.0, end_at=12.0, ramp_s=2.0, settle_s=3.0,
                            pool_timeout_s=5.0)
    assert figures["before"]["latency"]["p50_ms"] == 2.0
    assert figures["during"]["requests"] == 32 and figures["during"]["failed"] == 2
    assert figures["during"]["latency"]["p95_ms"] == 500.0
    assert figures["after"]["requests"] == 30 and figures["after"]["failed"] == 0
    assert figures["after_p50_over_before_p50"] == 1.25
    assert figures["failures"] == {"503": 2} and figures["slow_503"] == 1
    # The burst's seconds are 4-7 s; from 7 s on every second is normal: 1 s after the 2 s ramp.
    assert figures["recovered_s_after_ramp"] == 1.0


def test_timeline_counts_each_second() -> None:
    seconds = timeline(_outcomes(), 4.0, 12.0)
    assert len(seconds) == 8
    assert seconds[0]["requests"] == 11 and seconds[0]["failed"] == 1
    assert seconds[-1]["p50_ms"] == 2.5
