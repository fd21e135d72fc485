"""The bandwidth rate-limit schedule: the interval model, its validation, the rate at an instant.

One implementation shared by the control plane (which validates PutBandwidthRateLimitSchedule)
and the appliance (which shapes uploads by it), so both sides agree on every edge: an interval
covers its start minute through the END of its end minute, all times are UTC, and no two
intervals may cover the same minute of the week.

The week is modelled as 10,080 minutes (0 = Sunday 00:00). Validation and lookups work on
that grid, which makes "inclusive end minute" and "overlap on any day" exact integer checks
instead of datetime arithmetic.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

from gatewaycore import utctime

MAX_INTERVALS = 20
MIN_RATE_BPS = 51_200
MAX_RATE_BPS = 8_000_000_000_000
MINUTES_PER_DAY = 24 * 60
MINUTES_PER_WEEK = 7 * MINUTES_PER_DAY
DAY_NAMES = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")

F_RATE = "AverageUploadRateLimitInBitsPerSec"
F_START_HOUR = "StartHourOfDay"
F_START_MINUTE = "StartMinuteOfHour"
F_END_HOUR = "EndHourOfDay"
F_END_MINUTE = "EndMinuteOfHour"
F_DAYS = "DaysOfWeek"
LIST_NAME = "BandwidthRateLimitIntervals"
REQUIRED_FIELDS = (F_START_HOUR, F_START_MINUTE, F_END_HOUR, F_END_MINUTE, F_DAYS)
KNOWN_FIELDS = (F_RATE, *REQUIRED_FIELDS)


class ScheduleError(ValueError):
    """A schedule the API must refuse. The message names the interval, the field and the range.

    `index` is the 0-based position of the offending interval (None for the list as a whole),
    `field` the API member name (None when the problem is between intervals).
    """

    def __init__(self, message: str, index: int | None = None, field: str | None = None):
        super().__init__(message)
        self.index = index
        self.field = field


def _where(index: int, name: str | None = None) -> str:
    return f"{LIST_NAME}[{index}]" + (f".{name}" if name else "")


def _hhmm(minute_of_day: int) -> str:
    return f"{minute_of_day // 60:02d}:{minute_of_day % 60:02d}"


def format_rate(rate_bps: int | None) -> str:
    """A rate for people: decimal SI units, as network links are sold ("100.0 Mbit/s")."""
    if rate_bps is None:
        return "no limit"
    units = (("Tbit/s", 10**12), ("Gbit/s", 10**9), ("Mbit/s", 10**6), ("kbit/s", 10**3))
    for unit, scale in units:
        if rate_bps >= scale:
            return f"{rate_bps / scale:.1f} {unit}"
    return f"{rate_bps} bit/s"


@dataclass(frozen=True)
class Interval:
    """One BandwidthRateLimitInterval. `days`: 0 = Sunday .. 6 = Saturday; end minute inclusive."""

    days: frozenset[int]
    start_hour: int
    start_minute: int
    end_hour: int
    end_minute: int
    rate_bps: int | None = None

    @property
    def start_of_day(self) -> int:
        """First minute covered, counted from 00:00."""
        return self.start_hour * 60 + self.start_minute

    @property
    def end_of_day(self) -> int:
        """Last minute covered (inclusive), counted from 00:00."""
        return self.end_hour * 60 + self.end_minute

    def to_api(self) -> dict[str, Any]:
        """The API shape; the rate member is left out when unset, as the service does."""
        out: dict[str, Any] = {}
        if self.rate_bps is not None:
            out[F_RATE] = self.rate_bps
        out.update(
            {
                F_START_HOUR: self.start_hour,
                F_START_MINUTE: self.start_minute,
                F_END_HOUR: self.end_hour,
                F_END_MINUTE: self.end_minute,
                F_DAYS: sorted(self.days),
            }
        )
        return out

    def describe(self) -> str:
        days = ",".join(DAY_NAMES[d] for d in sorted(self.days))
        return (
            f"{days} {_hhmm(self.start_of_day)}-{_hhmm(self.end_of_day)} "
            f"{format_rate(self.rate_bps)}"
        )


def _int_field(item: Mapping[str, Any], index: int, name: str, low: int, high: int) -> int:
    value = item[name]
    # bool is an int subclass in Python; JSON true must not pass as 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScheduleError(
            f"{_where(index, name)}: must be an integer from {low:,} to {high:,}, "
            f"got {value!r}",
            index,
            name,
        )
    if not low <= value <= high:
        raise ScheduleError(
            f"{_where(index, name)}: must be from {low:,} to {high:,}, got {value:,}",
            index,
            name,
        )
    return value


def _days_field(item: Mapping[str, Any], index: int) -> frozenset[int]:
    value = item[F_DAYS]
    where = _where(index, F_DAYS)
    if not isinstance(value, list | tuple):
        raise ScheduleError(
            f"{where}: must be a list of 1 to 7 integers from 0 (Sunday) to 6 (Saturday), "
            f"got {value!r}",
            index,
            F_DAYS,
        )
    if not 1 <= len(value) <= 7:
        raise ScheduleError(
            f"{where}: must hold 1 to 7 days (0 = Sunday .. 6 = Saturday), got {len(value)}",
            index,
            F_DAYS,
        )
    for day in value:
        if isinstance(day, bool) or not isinstance(day, int) or not 0 <= day <= 6:
            raise ScheduleError(
                f"{where}: each day must be an integer from 0 (Sunday) to 6 (Saturday), "
                f"got {day!r}",
                index,
                F_DAYS,
            )
    if len(set(value)) != len(value):
        dup = next(d for d in value if value.count(d) > 1)
        raise ScheduleError(
            f"{where}: day {dup} ({DAY_NAMES[dup]}) is listed more than once", index, F_DAYS
        )
    return frozenset(value)


def _interval_from_api(item: Any, index: int) -> Interval:
    if not isinstance(item, Mapping):
        raise ScheduleError(
            f"{_where(index)}: must be an object with members {', '.join(KNOWN_FIELDS)}",
            index,
        )
    unknown = sorted(str(k) for k in item if k not in KNOWN_FIELDS)
    if unknown:
        raise ScheduleError(
            f"{_where(index, unknown[0])}: unknown member; accepted: {', '.join(KNOWN_FIELDS)}",
            index,
            unknown[0],
        )
    for name in REQUIRED_FIELDS:
        if name not in item or item[name] is None:
            raise ScheduleError(f"{_where(index, name)}: missing (required)", index, name)
    rate = None
    if item.get(F_RATE) is not None:
        rate = _int_field(item, index, F_RATE, MIN_RATE_BPS, MAX_RATE_BPS)
    interval = Interval(
        days=_days_field(item, index),
        start_hour=_int_field(item, index, F_START_HOUR, 0, 23),
        start_minute=_int_field(item, index, F_START_MINUTE, 0, 59),
        end_hour=_int_field(item, index, F_END_HOUR, 0, 23),
        end_minute=_int_field(item, index, F_END_MINUTE, 0, 59),
        rate_bps=rate,
    )
    if interval.end_of_day < interval.start_of_day:
        raise ScheduleError(
            f"{_where(index)}: ends at {_hhmm(interval.end_of_day)}, before it starts at "
            f"{_hhmm(interval.start_of_day)}; an interval crossing midnight is given as two "
            f"(..-23:59 and 00:00-.. on the next day)",
            index,
            F_END_HOUR,
        )
    return interval


def minute_of_week(t: datetime) -> int:
    """Minutes since Sunday 00:00 UTC; naive datetimes are taken as UTC."""
    u = _as_utc(t)
    day = (u.weekday() + 1) % 7  # Python: Monday = 0; the API: Sunday = 0
    return day * MINUTES_PER_DAY + u.hour * 60 + u.minute


def _as_utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def iso_utc(t: datetime) -> str:
    """The ISO form used across the project's APIs (gatewaycore.utctime): `2026-11-26T09:30:00Z`."""
    return utctime.format_utc(_as_utc(t))


@dataclass(frozen=True)
class Schedule:
    """A whole week's schedule, as the last Put gave it (interval order kept)."""

    intervals: tuple[Interval, ...] = field(default_factory=tuple)

    @classmethod
    def empty(cls) -> Schedule:
        return cls(())

    @classmethod
    def from_api(cls, items: Any) -> Schedule:
        """Validate `BandwidthRateLimitIntervals` as the API receives it; ScheduleError if bad."""
        if not isinstance(items, list | tuple):
            raise ScheduleError(
                f"{LIST_NAME}: must be a list of 0 to {MAX_INTERVALS} intervals, got {items!r}"
            )
        if len(items) > MAX_INTERVALS:
            raise ScheduleError(
                f"{LIST_NAME}: at most {MAX_INTERVALS} intervals are accepted, got {len(items)}"
            )
        intervals = tuple(_interval_from_api(item, i) for i, item in enumerate(items))
        schedule = cls(intervals)
        schedule._check_overlaps()
        return schedule

    def to_api(self) -> list[dict[str, Any]]:
        return [iv.to_api() for iv in self.intervals]

    def _check_overlaps(self) -> None:
        for day in range(7):
            spans = sorted(
                (iv.start_of_day, iv.end_of_day, i)
                for i, iv in enumerate(self.intervals)
                if day in iv.days
            )
            for (_, prev_end, prev_i), (start, _, i) in itertools.pairwise(spans):
                if start <= prev_end:
                    first, second = sorted((prev_i, i))
                    raise ScheduleError(
                        f"{_where(second)}: overlaps {_where(first)} on {DAY_NAMES[day]} "
                        f"at {_hhmm(start)}; the end minute is included, so an interval "
                        f"ending at {_hhmm(prev_end)} is followed by one starting at "
                        f"{_hhmm((prev_end + 1) % MINUTES_PER_DAY)}",
                        second,
                    )

    # --- lookups on the minute-of-week grid -------------------------------------------

    @cached_property
    def _owner(self) -> tuple[int, ...]:
        """For each minute of the week, the index of the interval covering it, or -1."""
        owner = [-1] * MINUTES_PER_WEEK
        for i, iv in enumerate(self.intervals):
            for day in iv.days:
                base = day * MINUTES_PER_DAY
                for m in range(base + iv.start_of_day, base + iv.end_of_day + 1):
                    owner[m] = i
        return tuple(owner)

    @cached_property
    def _changes(self) -> tuple[int, ...]:
        """Minutes of the week at which the rate in force differs from the minute before."""
        rates = [self._rate_of(o) for o in self._owner]
        return tuple(m for m in range(MINUTES_PER_WEEK) if rates[m] != rates[m - 1])

    def _rate_of(self, owner: int) -> int | None:
        return None if owner < 0 else self.intervals[owner].rate_bps

    def interval_at(self, t: datetime) -> Interval | None:
        owner = self._owner[minute_of_week(t)]
        return None if owner < 0 else self.intervals[owner]

    def rate_at(self, t: datetime) -> int | None:
        """The limit in bits/s in force at `t`; None means no limit."""
        return self._rate_of(self._owner[minute_of_week(t)])

    def next_change(self, t: datetime) -> datetime | None:
        """The first UTC instant after `t` at which the rate in force changes; None if never."""
        changes = self._changes
        if not changes:
            return None
        u = _as_utc(t)
        week_start = u.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(
            days=(u.weekday() + 1) % 7
        )
        now_m = minute_of_week(u)
        # Changes happen on minute starts; one at `now_m` itself is already past (or now).
        k = bisect.bisect_right(changes, now_m)
        if k < len(changes):
            return week_start + timedelta(minutes=changes[k])
        return week_start + timedelta(minutes=MINUTES_PER_WEEK + changes[0])

    def preview(self) -> list[str]:
        """A readable week: the rate in force per stretch, days with the same plan grouped."""
        plans: dict[tuple[tuple[int, int, int | None], ...], list[int]] = {}
        for day in range(7):
            base = day * MINUTES_PER_DAY
            segments: list[tuple[int, int, int | None]] = []
            for m in range(MINUTES_PER_DAY):
                rate = self._rate_of(self._owner[base + m])
                if segments and segments[-1][2] == rate:
                    segments[-1] = (segments[-1][0], m, rate)
                else:
                    segments.append((m, m, rate))
            plans.setdefault(tuple(segments), []).append(day)
        lines = []
        for segments, days in plans.items():
            label = _day_label(days)
            for start, end, rate in segments:
                lines.append(f"{label:<11} {_hhmm(start)}-{_hhmm(end)}  {format_rate(rate)}")
        return lines


def _day_label(days: Sequence[int]) -> str:
    """'Mon-Fri', 'Sun,Sat', 'Every day': consecutive runs shortened."""
    if len(days) == 7:
        return "Every day"
    runs: list[list[int]] = []
    for d in days:
        if runs and runs[-1][-1] == d - 1:
            runs[-1].append(d)
        else:
            runs.append([d])
    parts = [
        DAY_NAMES[r[0]] if len(r) == 1 else f"{DAY_NAMES[r[0]]}-{DAY_NAMES[r[-1]]}" for r in runs
    ]
    return ",".join(parts)
