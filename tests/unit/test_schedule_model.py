"""The schedule model: API validation edges, the rate in force, the next change, the preview."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from gatewaycore.schedule import (
    MAX_RATE_BPS,
    MIN_RATE_BPS,
    Interval,
    Schedule,
    ScheduleError,
)

ALL_DAYS = [0, 1, 2, 3, 4, 5, 6]
# 2026-11-22 is a Sunday; 2026-11-28 the Saturday of the same week.
SUNDAY = datetime(2026, 11, 22, tzinfo=UTC)


def iv(sh, sm, eh, em, days, rate=None):
    item = {
        "StartHourOfDay": sh,
        "StartMinuteOfHour": sm,
        "EndHourOfDay": eh,
        "EndMinuteOfHour": em,
        "DaysOfWeek": days,
    }
    if rate is not None:
        item["AverageUploadRateLimitInBitsPerSec"] = rate
    return item


def refused(items) -> ScheduleError:
    with pytest.raises(ScheduleError) as info:
        Schedule.from_api(items)
    return info.value


# --- validation -----------------------------------------------------------------------------


def test_round_trip_keeps_order_and_leaves_unset_rate_out():
    items = [iv(18, 0, 23, 59, [1, 2], 51_200), iv(0, 0, 8, 59, [1], None)]
    sched = Schedule.from_api(items)
    assert sched.to_api() == items
    assert "AverageUploadRateLimitInBitsPerSec" not in sched.to_api()[1]
    assert sched.intervals[0] == Interval(frozenset({1, 2}), 18, 0, 23, 59, 51_200)


def test_empty_schedule_is_valid_and_means_no_limit():
    assert Schedule.from_api([]) == Schedule.empty()
    assert Schedule.empty().to_api() == []
    assert Schedule.empty().rate_at(SUNDAY) is None
    assert Schedule.empty().next_change(SUNDAY) is None


def test_end_minute_is_inclusive_so_touching_minutes_overlap():
    err = refused([iv(10, 0, 10, 30, [1]), iv(10, 30, 11, 0, [1])])
    assert err.index == 1
    assert "BandwidthRateLimitIntervals[1]" in str(err)
    assert "BandwidthRateLimitIntervals[0]" in str(err)
    assert "Mon" in str(err) and "10:31" in str(err)


def test_back_to_back_at_59_then_00_is_accepted():
    sched = Schedule.from_api([iv(9, 0, 9, 59, [3], 100_000_000), iv(10, 0, 10, 59, [3])])
    assert len(sched.intervals) == 2


def test_single_minute_interval_is_accepted():
    sched = Schedule.from_api([iv(12, 0, 12, 0, [2], MIN_RATE_BPS)])
    assert sched.rate_at(SUNDAY + timedelta(days=2, hours=12, seconds=59)) == MIN_RATE_BPS
    assert sched.rate_at(SUNDAY + timedelta(days=2, hours=12, minutes=1)) is None


@pytest.mark.parametrize("day", ALL_DAYS)
def test_overlap_is_refused_on_each_day_separately(day):
    other = [(day + 1) % 7]
    # The same hours on different days do not overlap ...
    Schedule.from_api([iv(8, 0, 12, 0, [day]), iv(8, 0, 12, 0, other)])
    # ... but do when the shared day is this one.
    err = refused([iv(8, 0, 12, 0, [day]), iv(11, 0, 13, 0, [*other, day])])
    assert err.index == 1
    assert ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")[day] in str(err)


def test_twenty_intervals_accepted_twenty_one_refused():
    twenty = [iv(h, 0, h, 59, [1]) for h in range(20)]
    assert len(Schedule.from_api(twenty).intervals) == 20
    err = refused([*twenty, iv(21, 0, 21, 59, [1])])
    assert "at most 20" in str(err) and "21" in str(err)


@pytest.mark.parametrize("rate", [MIN_RATE_BPS - 1, 0, -1, MAX_RATE_BPS + 1])
def test_rate_out_of_range_is_refused_with_the_range(rate):
    err = refused([iv(0, 0, 1, 0, [0], rate)])
    assert err.field == "AverageUploadRateLimitInBitsPerSec"
    assert "51,200" in str(err) and "8,000,000,000,000" in str(err)
    assert "[0]" in str(err)


@pytest.mark.parametrize("rate", [MIN_RATE_BPS, MAX_RATE_BPS])
def test_rate_bounds_are_accepted(rate):
    assert Schedule.from_api([iv(0, 0, 1, 0, [0], rate)]).intervals[0].rate_bps == rate


def test_interval_may_not_cross_midnight():
    err = refused([iv(22, 0, 2, 0, [5])])
    assert "before it starts" in str(err) and "as two" in str(err)
    # given as two, it is fine and continuous across the day boundary
    sched = Schedule.from_api([iv(22, 0, 23, 59, [5], 1_000_000), iv(0, 0, 1, 59, [6], 1_000_000)])
    friday_night = SUNDAY + timedelta(days=5, hours=22)
    assert sched.next_change(friday_night) == SUNDAY + timedelta(days=6, hours=2)


@pytest.mark.parametrize(
    ("days", "fragment"),
    [
        ([1, 1], "more than once"),
        ([], "1 to 7"),
        ([0, 1, 2, 3, 4, 5, 6, 0], "1 to 7"),
        ([7], "0 (Sunday) to 6 (Saturday)"),
        ([-1], "0 (Sunday) to 6 (Saturday)"),
        (["1"], "0 (Sunday) to 6 (Saturday)"),
        ([True], "0 (Sunday) to 6 (Saturday)"),
        ("0,1", "list"),
        (3, "list"),
    ],
)
def test_days_of_week_rules(days, fragment):
    err = refused([iv(0, 0, 1, 0, [2]), iv(3, 0, 4, 0, days)])
    assert err.index == 1 and err.field == "DaysOfWeek"
    assert fragment in str(err)
    assert "BandwidthRateLimitIntervals[1].DaysOfWeek" in str(err)


@pytest.mark.parametrize(
    ("field", "value", "accepted"),
    [
        ("StartHourOfDay", 24, "0 to 23"),
        ("EndHourOfDay", -1, "0 to 23"),
        ("StartMinuteOfHour", 60, "0 to 59"),
        ("EndMinuteOfHour", 99, "0 to 59"),
        ("StartHourOfDay", "9", "0 to 23"),
        ("StartHourOfDay", 9.0, "0 to 23"),
        ("EndMinuteOfHour", True, "0 to 59"),
        ("AverageUploadRateLimitInBitsPerSec", "100000000", "51,200"),
        ("AverageUploadRateLimitInBitsPerSec", True, "51,200"),
        ("AverageUploadRateLimitInBitsPerSec", 1e8, "51,200"),
    ],
)
def test_wrong_values_and_types_name_field_and_range(field, value, accepted):
    item = iv(0, 0, 0, 59, [4], 1_000_000)
    item[field] = value
    err = refused([item])
    assert err.field == field
    assert f"BandwidthRateLimitIntervals[0].{field}" in str(err)
    assert accepted in str(err)


@pytest.mark.parametrize(
    "field",
    ["StartHourOfDay", "StartMinuteOfHour", "EndHourOfDay", "EndMinuteOfHour", "DaysOfWeek"],
)
def test_missing_required_member(field):
    item = iv(0, 0, 0, 59, [4])
    del item[field]
    err = refused([item])
    assert err.field == field and "missing" in str(err)


def test_unknown_member_and_non_objects_and_non_list():
    item = iv(0, 0, 0, 59, [4])
    item["Days"] = [1]
    assert refused([item]).field == "Days"
    assert refused(["x"]).index == 0
    assert "must be a list" in str(refused({"a": 1}))
    assert "must be a list" in str(refused(None))


def test_error_is_a_value_error():
    assert issubclass(ScheduleError, ValueError)


# --- the rate in force and the next change --------------------------------------------------


def test_saturday_2359_to_sunday_0000_across_the_week():
    sched = Schedule.from_api(
        [iv(23, 59, 23, 59, [6], 1_000_000), iv(0, 0, 0, 0, [0], 2_000_000)]
    )
    sat_2359 = SUNDAY + timedelta(days=6, hours=23, minutes=59)
    assert sat_2359.strftime("%a %H:%M") == "Sat 23:59"
    assert sched.rate_at(sat_2359) == 1_000_000
    assert sched.rate_at(sat_2359 + timedelta(seconds=59.999)) == 1_000_000
    next_sunday = sat_2359 + timedelta(minutes=1)
    assert sched.rate_at(next_sunday) == 2_000_000
    assert sched.next_change(sat_2359 + timedelta(seconds=30)) == next_sunday
    # at Sunday 00:00 itself the change is past; the next is 00:01
    assert sched.next_change(next_sunday) == next_sunday + timedelta(minutes=1)
    # after Sunday 00:01 the next change wraps to the coming Saturday 23:59
    assert sched.next_change(next_sunday + timedelta(minutes=5)) == sat_2359 + timedelta(days=7)
    assert sched.interval_at(next_sunday).rate_bps == 2_000_000
    assert sched.interval_at(next_sunday + timedelta(minutes=1)) is None


def test_day_boundary_and_adjacent_intervals_with_the_same_rate_are_no_change():
    sched = Schedule.from_api(
        [iv(9, 0, 17, 59, [1, 2], 100_000_000), iv(18, 0, 23, 59, [1], 100_000_000)]
    )
    monday_noon = SUNDAY + timedelta(days=1, hours=12)
    # 17:59 -> 18:00 same rate; Monday 23:59 -> Tuesday 00:00 drops to no limit
    assert sched.next_change(monday_noon) == SUNDAY + timedelta(days=2)
    assert sched.rate_at(SUNDAY + timedelta(days=1, hours=23, minutes=59, seconds=59)) == (
        100_000_000
    )
    assert sched.rate_at(SUNDAY + timedelta(days=2)) is None
    assert sched.next_change(SUNDAY + timedelta(days=2)) == SUNDAY + timedelta(days=2, hours=9)
    assert sched.next_change(SUNDAY + timedelta(days=2, hours=18)) == SUNDAY + timedelta(
        days=8, hours=9
    )


def test_other_time_zones_are_converted_and_naive_is_utc():
    sched = Schedule.from_api([iv(9, 0, 9, 59, [1], 1_000_000)])
    monday_9_utc = SUNDAY + timedelta(days=1, hours=9)
    cet = timezone(timedelta(hours=1))
    assert sched.rate_at(monday_9_utc.astimezone(cet)) == 1_000_000
    assert sched.rate_at(monday_9_utc.replace(tzinfo=None)) == 1_000_000
    assert sched.next_change(monday_9_utc.astimezone(cet)) == monday_9_utc + timedelta(hours=1)


def test_whole_week_at_one_rate_never_changes():
    sched = Schedule.from_api([iv(0, 0, 23, 59, ALL_DAYS, 1_000_000)])
    assert sched.rate_at(SUNDAY + timedelta(days=3, hours=5)) == 1_000_000
    assert sched.next_change(SUNDAY) is None


# --- preview --------------------------------------------------------------------------------


def test_preview_is_readable_and_fits_80_columns():
    sched = Schedule.from_api(
        [
            iv(9, 0, 17, 59, [1, 2, 3, 4, 5], 100_000_000),
            iv(0, 0, 23, 59, [0, 6], 51_200),
        ]
    )
    lines = sched.preview()
    assert "Mon-Fri     09:00-17:59  100.0 Mbit/s" in lines
    assert "Mon-Fri     00:00-08:59  no limit" in lines
    assert "Sun,Sat     00:00-23:59  51.2 kbit/s" in lines
    assert all(len(line) <= 80 for line in lines)
    assert Schedule.empty().preview() == ["Every day   00:00-23:59  no limit"]


def test_preview_of_twenty_intervals_fits_80_columns():
    days = [[d] for d in range(7)]
    items = [iv(h, 0, h, 30, days[h % 7], 8_000_000_000_000) for h in range(20)]
    lines = Schedule.from_api(items).preview()
    assert all(len(line) <= 80 for line in lines)
    assert any("8.0 Tbit/s" in line for line in lines)
