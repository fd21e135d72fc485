"""The maintenance window (PutMaintenanceStartTime): when it next starts, in UTC.

One rule for both sides: the control plane shows the window's next start as GetGateway's
`NextUpdateAvailabilityTime`, and the appliance installs a published update at that minute.
The stored form is the API's: `HourOfDay`, `MinuteOfHour`, and `DayOfWeek` (0 = Sunday,
weekly) or `DayOfMonth` (1-31, monthly; a month without that day uses its last day) or
neither (daily).
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any


class WindowError(ValueError):
    """A stored window that does not follow the API's ranges; the message names the field."""


def _field(doc: dict[str, Any], name: str, low: int, high: int, optional: bool = False
           ) -> int | None:
    value = doc.get(name)
    if value is None and optional:
        return None
    if type(value) is not int or not low <= value <= high:
        raise WindowError(f"{name}: must be an integer from {low} to {high}, got {value!r}")
    return value


@dataclass(frozen=True)
class Window:
    hour: int
    minute: int
    day_of_week: int | None = None   # 0 = Sunday .. 6 = Saturday
    day_of_month: int | None = None  # 1 .. 31

    @classmethod
    def from_api(cls, doc: Any) -> Window:
        if not isinstance(doc, dict):
            raise WindowError("MaintenanceStartTime: must be an object")
        hour = _field(doc, "HourOfDay", 0, 23)
        minute = _field(doc, "MinuteOfHour", 0, 59)
        week = _field(doc, "DayOfWeek", 0, 6, optional=True)
        month = _field(doc, "DayOfMonth", 1, 31, optional=True)
        if week is not None and month is not None:
            raise WindowError(
                "DayOfWeek, DayOfMonth: give one of them (weekly or monthly), not both")
        assert hour is not None and minute is not None
        return cls(hour, minute, week, month)

    def describe(self) -> str:
        """One line for a console: 'Sundays 03:30 UTC', 'day 15 of each month 03:30 UTC'."""
        at = f"{self.hour:02d}:{self.minute:02d} UTC"
        if self.day_of_week is not None:
            return f"{calendar.day_name[(self.day_of_week - 1) % 7]}s {at}"
        if self.day_of_month is not None:
            return f"day {self.day_of_month} of each month {at} (or its last day)"
        return f"daily {at}"

    def next_start(self, after: datetime) -> datetime:
        """The first start of the window at or after `after` (to the minute)."""
        now = (after.astimezone(UTC) if after.tzinfo else after.replace(tzinfo=UTC))
        now = now.replace(second=0, microsecond=0) + (
            timedelta(minutes=1) if now.second or now.microsecond else timedelta())
        day = now.replace(hour=0, minute=0)
        for _ in range(400):  # a monthly window starts within 31 days; a year bounds it
            if self._on(day):
                start = day.replace(hour=self.hour, minute=self.minute)
                if start >= now:
                    return start
            day += timedelta(days=1)
        raise AssertionError("no window start within 400 days")  # pragma: no cover

    def _on(self, day: datetime) -> bool:
        if self.day_of_week is not None:
            return (day.weekday() + 1) % 7 == self.day_of_week  # Python: Monday = 0
        if self.day_of_month is not None:
            last = calendar.monthrange(day.year, day.month)[1]
            return day.day == min(self.day_of_month, last)
        return True
