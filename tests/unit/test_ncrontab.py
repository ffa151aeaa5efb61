from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from recsys.ncrontab import CronSchedule, Interval, ScheduleError, parse_cron, parse_schedule


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def occurrences(schedule: CronSchedule | Interval, start: datetime, n: int) -> list[datetime]:
    out = []
    for _ in range(n):
        start = schedule.next_after(start)
        out.append(start)
    return out


def test_every_five_minutes() -> None:
    s = parse_cron("0 */5 * * * *")
    assert occurrences(s, at(2026, 12, 3, 10, 2, 30), 3) == [
        at(2026, 12, 3, 10, 5), at(2026, 12, 3, 10, 10), at(2026, 12, 3, 10, 15)
    ]


def test_next_is_strictly_after_an_occurrence() -> None:
    s = parse_cron("0 30 3 * * *")
    assert s.next_after(at(2026, 12, 3, 3, 30)) == at(2026, 12, 4, 3, 30)
    assert s.next_after(at(2026, 12, 3, 3, 29, 59)) == at(2026, 12, 3, 3, 30)


def test_every_second_and_sub_second_start() -> None:
    s = parse_cron("* * * * * *")
    assert s.next_after(datetime(2026, 1, 1, 0, 0, 0, 900_000, tzinfo=UTC)) == at(2026, 1, 1, 0, 0, 1)


def test_ranges_lists_and_steps() -> None:
    s = parse_cron("5,35 0-10/5 9-17 * * Mon-Fri")
    assert s.seconds == {5, 35}
    assert s.minutes == {0, 5, 10}
    assert s.hours == set(range(9, 18))
    assert s.weekdays == {1, 2, 3, 4, 5}
    # Saturday 5 December 2026 17:10:35 -> Monday 7 December 09:00:05
    assert s.next_after(at(2026, 12, 5, 17, 10, 35)) == at(2026, 12, 7, 9, 0, 5)


def test_value_with_step_runs_to_the_end_of_the_field() -> None:
    assert parse_cron("10/20 * * * * *").seconds == {10, 30, 50}


def test_names_are_case_insensitive() -> None:
    s = parse_cron("0 0 12 * JAN,jul sun")
    assert s.months == {1, 7} and s.weekdays == {0}
    assert s.next_after(at(2026, 12, 3)) == at(2027, 1, 3, 12)  # first Sunday of January 2027


def test_day_of_month_and_day_of_week_must_both_hold() -> None:
    # NCrontab: "at noon on the 13th if it is a Friday", not "every 13th and every Friday".
    s = parse_cron("0 0 12 13 * Fri")
    assert occurrences(s, at(2026, 1, 1), 2) == [at(2026, 2, 13, 12), at(2026, 3, 13, 12)]
    assert s.next_after(at(2026, 3, 14)) == at(2026, 11, 13, 12)


def test_leap_day() -> None:
    assert parse_cron("0 0 0 29 2 *").next_after(at(2026, 3, 1)) == at(2028, 2, 29)


def test_month_ends_are_skipped_where_the_day_does_not_exist() -> None:
    s = parse_cron("0 0 0 31 * *")
    assert occurrences(s, at(2026, 3, 31, 0, 0, 1), 2) == [at(2026, 5, 31), at(2026, 7, 31)]


def test_five_fields_mean_second_zero() -> None:
    s = parse_cron("30 2 * * *")
    assert s.seconds == {0} and s.next_after(at(2026, 12, 3, 5)) == at(2026, 12, 4, 2, 30)


def test_naive_times_are_utc() -> None:
    assert parse_cron("0 0 * * * *").next_after(datetime(2026, 1, 1, 0, 30)) == at(2026, 1, 1, 1)


def test_matches() -> None:
    s = parse_cron("0 30 3 * * *")
    assert s.matches(at(2026, 1, 1, 3, 30)) and not s.matches(at(2026, 1, 1, 3, 30, 1))


@pytest.mark.parametrize(
    ("expression", "fragment"),
    [
        ("* * * * *  * *", "expected 6 fields"),
        ("* * *", "expected 6 fields"),
        ("60 * * * * *", "second field: 60 is outside 0-59"),
        ("* * 24 * * *", "hour field: 24"),
        ("* * * 0 * *", "day field: 0"),
        ("* * * * 13 *", "month field: 13"),
        ("* * * * * 7", "day-of-week field: 7"),
        ("* * * * Foo *", "month field: 'Foo' is not a number or a name"),
        ("*/0 * * * * *", "step '0'"),
        ("*/x * * * * *", "step 'x'"),
        ("10-5 * * * * *", "runs backwards"),
        ("1,,2 * * * * *", "empty list entry"),
        ("0 0 0 30 Feb *", "never occurs"),
        ("-1 * * * * *", "second field"),
    ],
)
def test_invalid_expressions_name_the_field(expression: str, fragment: str) -> None:
    with pytest.raises(ScheduleError, match=fragment.replace("*", r"\*")):
        parse_cron(expression)


def test_time_span_schedules() -> None:
    s = parse_schedule("00:05:00")
    assert isinstance(s, Interval) and s.seconds == 300
    assert s.next_after(at(2026, 1, 1)) == at(2026, 1, 1) + timedelta(minutes=5)
    assert parse_schedule("1.02:00:00").seconds == 93600  # type: ignore[union-attr]
    assert isinstance(parse_schedule("0 30 3 * * *"), CronSchedule)
    with pytest.raises(ScheduleError):
        parse_schedule("00:00:00")
    with pytest.raises(ScheduleError):
        parse_schedule("00:61:00")
