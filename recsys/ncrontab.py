"""NCRONTAB schedules, as the Azure Functions timer trigger reads them.

Six fields, ``{second} {minute} {hour} {day} {month} {day-of-week}``, each ``*``, a value, a
range ``a-b``, a list ``a,b,c`` and a step ``*/n``, ``a-b/n`` or ``a/n`` (from ``a`` to the
field's end); months and days of the week also by their English three-letter names
(``Jan``, ``Mon``), day of the week 0-6 with 0 for Sunday. As in NCrontab, which the Functions
host uses, a time matches when EVERY field matches (a day-of-month and a day-of-week both given
must both hold, unlike Vixie cron's "either"). Five fields (no seconds) are accepted as NCrontab
does, meaning second 0. The host also takes a time span (``"00:05:00"``, App Service plans
only): :func:`parse_schedule` returns an :class:`Interval` for it.

Times are UTC, the Functions host's default (``WEBSITE_TIME_ZONE`` aside).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

__all__ = ["CronSchedule", "Interval", "ScheduleError", "parse_cron", "parse_schedule"]


class ScheduleError(ValueError):
    """A schedule that is not valid NCRONTAB (or time span); the message says which field."""


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()


_FIELDS = (
    _Field("second", 0, 59),
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day", 1, 31),
    _Field("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
    _Field("day-of-week", 0, 6, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)

#: Far enough to find any valid date (a 29 February on a Monday recurs within 28 years).
_SEARCH_YEARS = 30


def _value(text: str, f: _Field) -> int:
    lowered = text.lower()
    if lowered in f.names:
        return f.low + f.names.index(lowered)
    if not text.isdigit():
        raise ScheduleError(f"{f.name} field: {text!r} is not a number" + (" or a name" if f.names else ""))
    value = int(text)
    if not f.low <= value <= f.high:
        raise ScheduleError(f"{f.name} field: {value} is outside {f.low}-{f.high}")
    return value


def _parse_field(text: str, f: _Field) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise ScheduleError(f"{f.name} field: empty list entry in {text!r}")
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ScheduleError(f"{f.name} field: step {step_text!r} must be a positive number")
            step = int(step_text)
        if base == "*":
            low, high = f.low, f.high
        elif "-" in base:
            first, _, last = base.partition("-")
            low, high = _value(first, f), _value(last, f)
            if low > high:
                raise ScheduleError(f"{f.name} field: range {base!r} runs backwards")
        else:
            low = _value(base, f)
            high = f.high if slash else low
        values.update(range(low, high + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class CronSchedule:
    """A parsed NCRONTAB expression; :meth:`next_after` gives its occurrences."""

    expression: str
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]

    def matches(self, when: datetime) -> bool:
        """Whether ``when`` (UTC, to the second) is an occurrence."""
        return (
            when.second in self.seconds
            and when.minute in self.minutes
            and when.hour in self.hours
            and self._day_matches(when)
        )

    def _day_matches(self, when: datetime) -> bool:
        # Python: Monday 0 .. Sunday 6; NCRONTAB: Sunday 0 .. Saturday 6.
        return when.month in self.months and when.day in self.days and (when.weekday() + 1) % 7 in self.weekdays

    def next_after(self, after: datetime) -> datetime:
        """The first occurrence strictly after ``after`` (an aware datetime; naive means UTC).

        Raises :class:`ScheduleError` for a schedule that never occurs (``0 0 0 30 Feb *``).
        """
        if after.tzinfo is None:
            after = after.replace(tzinfo=UTC)
        t = after.astimezone(UTC).replace(microsecond=0) + timedelta(seconds=1)
        limit = t + timedelta(days=366 * _SEARCH_YEARS)
        # Walk day by day to a matching date, then within it to the first matching time; each
        # step skips everything the failing field rules out, so this takes few iterations.
        while t < limit:
            if not self._day_matches(t):
                t = (t + timedelta(days=1)).replace(hour=0, minute=0, second=0)
                continue
            found = self._first_time_in_day(t)
            if found is not None:
                return found
            t = (t + timedelta(days=1)).replace(hour=0, minute=0, second=0)
        raise ScheduleError(f"schedule {self.expression!r} never occurs")

    def _first_time_in_day(self, start: datetime) -> datetime | None:
        for hour in sorted(h for h in self.hours if h >= start.hour):
            for minute in sorted(self.minutes):
                if hour == start.hour and minute < start.minute:
                    continue
                for second in sorted(self.seconds):
                    if hour == start.hour and minute == start.minute and second < start.second:
                        continue
                    return start.replace(hour=hour, minute=minute, second=second)
        return None


@dataclass(frozen=True)
class Interval:
    """A time-span schedule (``hh:mm:ss``): every ``seconds``, counted from the previous run."""

    expression: str
    seconds: float

    def next_after(self, after: datetime) -> datetime:
        if after.tzinfo is None:
            after = after.replace(tzinfo=UTC)
        return after + timedelta(seconds=self.seconds)


def parse_cron(expression: str) -> CronSchedule:
    """Parse a six-field (or five-field, seconds 0) NCRONTAB expression."""
    fields = expression.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise ScheduleError(
            f"expected 6 fields ({{second}} {{minute}} {{hour}} {{day}} {{month}} {{day-of-week}}), got {len(fields)}"
        )
    parsed = [_parse_field(text, f) for text, f in zip(fields, _FIELDS, strict=True)]
    schedule = CronSchedule(expression.strip(), *parsed)
    schedule.next_after(datetime(2000, 1, 1, tzinfo=UTC))  # refuses a schedule that never occurs
    return schedule


_TIMESPAN = re.compile(r"^(?:(\d+)\.)?(\d{1,2}):(\d{2}):(\d{2})$")


def parse_schedule(expression: str) -> CronSchedule | Interval:
    """An NCRONTAB expression or a ``[d.]hh:mm:ss`` time span, as the timer trigger accepts."""
    text = expression.strip()
    match = _TIMESPAN.match(text)
    if match:
        days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
        if minutes > 59 or seconds > 59 or hours > 23:
            raise ScheduleError(f"time span {text!r} is not valid")
        total = days * 86400 + hours * 3600 + minutes * 60 + seconds
        if total <= 0:
            raise ScheduleError("a time span schedule must be longer than zero")
        return Interval(text, float(total))
    return parse_cron(text)
