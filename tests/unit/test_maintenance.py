"""The maintenance window's next start (gatewaycore/maintenance.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gatewaycore.maintenance import Window, WindowError


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_weekly_uses_the_apis_sunday_zero() -> None:
    # 2026-11-27 is a Friday; DayOfWeek 0 is Sunday -> 2026-11-29
    window = Window.from_api({"HourOfDay": 3, "MinuteOfHour": 30, "DayOfWeek": 0})
    assert window.next_start(at("2026-11-27T10:00:00")) == at("2026-11-29T03:30:00")
    assert window.describe() == "Sundays 03:30 UTC"
    friday = Window.from_api({"HourOfDay": 3, "MinuteOfHour": 30, "DayOfWeek": 5})
    assert friday.next_start(at("2026-11-27T03:29:59")) == at("2026-11-27T03:30:00")
    assert friday.next_start(at("2026-11-27T03:30:00")) == at("2026-11-27T03:30:00")
    assert friday.next_start(at("2026-11-27T03:30:01")) == at("2026-12-04T03:30:00")


def test_monthly_day_31_falls_on_the_last_day_of_short_months() -> None:
    window = Window.from_api({"HourOfDay": 0, "MinuteOfHour": 0, "DayOfMonth": 31})
    assert window.next_start(at("2027-02-01T00:00:00")) == at("2027-02-28T00:00:00")
    assert window.next_start(at("2027-03-01T00:00:00")) == at("2027-03-31T00:00:00")


def test_daily_without_a_day() -> None:
    window = Window.from_api({"HourOfDay": 23, "MinuteOfHour": 59})
    assert window.next_start(at("2026-12-31T23:59:30")) == at("2027-01-01T23:59:00")


@pytest.mark.parametrize(("doc", "field"), [
    ({"HourOfDay": 24, "MinuteOfHour": 0}, "HourOfDay"),
    ({"HourOfDay": 1, "MinuteOfHour": 60}, "MinuteOfHour"),
    ({"HourOfDay": 1, "MinuteOfHour": 0, "DayOfWeek": 7}, "DayOfWeek"),
    ({"HourOfDay": 1, "MinuteOfHour": 0, "DayOfWeek": 1, "DayOfMonth": 1}, "DayOfMonth"),
    ({"HourOfDay": True, "MinuteOfHour": 0}, "HourOfDay"),
])
def test_bad_windows_name_the_field(doc: dict[str, object], field: str) -> None:
    with pytest.raises(WindowError, match=field):
        Window.from_api(doc)
