"""The shaper's token bucket and boundary timer, driven by a fake clock: no real sleeps.

The fake clock owns the timers the shaper arms (call_later); `run_until` fires them in time
order, letting the asyncio tasks run between two timers, so released bytes can be checked
against the x/time/rate bounds at exact instants.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from datetime import UTC, datetime

import pytest

from appliance.shaping import (
    MAX_PIECE,
    MAX_TIMER_SECONDS,
    MIN_PIECE,
    PLAN_AHEAD,
    ScheduledShaper,
    ShaperClosed,
)
from gatewaycore.schedule import Schedule

ALL_DAYS = [0, 1, 2, 3, 4, 5, 6]
# Monday 2026-11-23 08:59:50 UTC: ten seconds before a 09:00 boundary.
T0 = datetime(2026, 11, 23, 8, 59, 50, tzinfo=UTC).timestamp()


class FakeHandle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeTime:
    """`boundary_late`: every timer but the bucket's wake-up fires this much late (a busy
    event loop), to show the rate changes at the boundary instant, not when a timer runs."""

    def __init__(self, start: float, boundary_late: float = 0.0) -> None:
        self.now = start  # monotonic time; the wall clock is now + wall_offset
        self.wall_offset = 0.0
        self.boundary_late = boundary_late
        self.fired: list[float] = []  # when the boundary timers ran
        self._heap: list = []
        self._seq = itertools.count()

    def clock(self) -> float:
        return self.now + self.wall_offset

    def monotonic(self) -> float:
        return self.now

    def call_later(self, delay, callback):
        handle = FakeHandle()
        when = self.now + max(0.0, delay)
        if getattr(callback, "__name__", "") != "_on_wake":
            when += self.boundary_late
        heapq.heappush(self._heap, (when, next(self._seq), callback, handle))
        return handle

    def pending(self) -> list[float]:
        return sorted(when for when, _, _, h in self._heap if not h.cancelled)

    async def settle(self) -> None:
        for _ in range(8):
            await asyncio.sleep(0)

    async def run_until(self, until: float) -> None:
        while True:
            await self.settle()
            while self._heap and self._heap[0][3].cancelled:
                heapq.heappop(self._heap)
            if not self._heap or self._heap[0][0] > until:
                break
            when, _, callback, _ = heapq.heappop(self._heap)
            self.now = max(self.now, when)
            if getattr(callback, "__name__", "") != "_on_wake":
                self.fired.append(self.now)
            callback()
        self.now = max(self.now, until)
        await self.settle()


def whole_week(rate: int | None) -> Schedule:
    item = {
        "StartHourOfDay": 0,
        "StartMinuteOfHour": 0,
        "EndHourOfDay": 23,
        "EndMinuteOfHour": 59,
        "DaysOfWeek": ALL_DAYS,
    }
    if rate is not None:
        item["AverageUploadRateLimitInBitsPerSec"] = rate
    return Schedule.from_api([item])


def from_nine(before: int | None, after: int | None) -> Schedule:
    """`before` until Monday 08:59:59, `after` from 09:00 to 09:59 (then `before` again)."""
    items = []
    for sh, eh, rate in ((0, 8, before), (9, 9, after), (10, 23, before)):
        item = {
            "StartHourOfDay": sh,
            "StartMinuteOfHour": 0,
            "EndHourOfDay": eh,
            "EndMinuteOfHour": 59,
            "DaysOfWeek": [1],
        }
        if rate is not None:
            item["AverageUploadRateLimitInBitsPerSec"] = rate
        items.append(item)
    return Schedule.from_api(items)


def make(schedule: Schedule, ft: FakeTime) -> ScheduledShaper:
    shaper = ScheduledShaper(
        schedule, clock=ft.clock, monotonic=ft.monotonic, call_later=ft.call_later
    )
    shaper.start()
    return shaper


# More pieces than any burst holds (10 Gbit/s: a 25 MB burst is ~95 pieces of 256 KiB).
MAX_PIECES_AT_ONE_INSTANT = 10_000


async def pump(shaper: ScheduledShaper, log: list, tag) -> None:
    """Acquire piece after piece for ever, logging (fake time, tag, bytes).

    An `await` that never suspends never yields to the event loop, so a bucket that stops
    waiting would make this loop spin for ever, out of reach of the per-test timeout too:
    SIGALRM's failure lands in whichever pump is running, asyncio stores it as that task's
    exception, and the next pump spins on (seen: still spinning 60 s after a 5 s timeout).
    Hence the guard: the fake clock only moves between two timers, so thousands of pieces
    at one instant mean the bucket does not shape: the pump then stops, and the test's byte
    bounds fail on the bytes it logged.
    """
    same_instant, last = 0, None
    while True:
        n = shaper.piece_size
        await shaper.acquire(n)
        now = shaper._mono()
        same_instant = same_instant + 1 if now == last else 0
        last = now
        log.append((now, tag, n))
        if same_instant > MAX_PIECES_AT_ONE_INSTANT:
            # Return rather than raise: an exception left in a task the failing test never
            # gathers is logged from the task's __del__, at whatever moment the GC runs.
            return


@pytest.mark.parametrize("rate_bps", [51_200, 100_000_000, 10_000_000_000])
async def test_released_bytes_stay_within_the_rate_bounds(rate_bps):
    ft = FakeTime(T0 - 3600)
    shaper = make(whole_week(rate_bps), ft)
    start = ft.now
    log: list = []
    tasks = [asyncio.create_task(pump(shaper, log, i)) for i in range(4)]
    rate = rate_bps / 8
    burst = shaper._burst
    piece = shaper.piece_size
    duration = 20.0
    released = seen = 0
    for step in range(1, 401):
        t = duration * step / 400
        await ft.run_until(start + t)
        for _, _, n in log[seen:]:  # the log is in time order: count what is new
            released += n
        seen = len(log)
        assert released <= burst + rate * t + piece
    released = sum(n for _, _, n in log)
    assert released >= 0.999 * rate * duration
    # every stream got its share (FIFO: round robin)
    per_stream = [sum(n for _, tag, n in log if tag == i) for i in range(4)]
    assert max(per_stream) - min(per_stream) <= piece
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    shaper.close()


def test_piece_size_follows_the_rate():
    ft = FakeTime(T0)
    slow = ScheduledShaper(whole_week(51_200), clock=ft.clock, monotonic=ft.monotonic)
    fast = ScheduledShaper(whole_week(1_000_000_000), clock=ft.clock, monotonic=ft.monotonic)
    assert slow.piece_size == MIN_PIECE == 64  # 10 ms of 6,400 bytes/s
    assert fast.piece_size == MAX_PIECE  # 10 ms would be 1.25 MB: capped
    assert slow.piece_size < fast.piece_size


async def test_waiters_are_served_in_arrival_order_not_smallest_first():
    ft = FakeTime(T0 - 3600)
    shaper = make(whole_week(800_000), ft)  # 100,000 bytes/s
    done: list[str] = []

    async def take(tag: str, n: int) -> None:
        await shaper.acquire(n)
        done.append(tag)

    tasks = []
    for tag, n in (("big", 50_000), ("small", 10), ("mid", 1_000), ("tiny", 1)):
        tasks.append(asyncio.create_task(take(tag, n)))
        await ft.settle()
    assert done == []
    await ft.run_until(ft.now + 0.49)
    assert done == []  # "small" did not overtake "big"
    await ft.run_until(ft.now + 0.03)
    assert done == ["big", "small", "mid", "tiny"]
    await asyncio.gather(*tasks)


async def test_a_cancelled_upload_gives_its_tokens_back():
    ft = FakeTime(T0 - 3600)
    shaper = make(whole_week(800_000), ft)  # 100,000 bytes/s
    done: list[tuple[str, float]] = []
    start = ft.now

    async def take(tag: str, n: int) -> None:
        await shaper.acquire(n)
        done.append((tag, ft.now - start))

    big = asyncio.create_task(take("big", 100_000))  # would hold the line for 1 s
    await ft.settle()
    after = asyncio.create_task(take("after", 10_000))  # behind it: 1.1 s
    await ft.settle()
    await ft.run_until(start + 0.05)
    big.cancel()
    await ft.settle()
    assert big.cancelled()
    # "after" moves up to where it would have been without "big": 0.1 s
    await ft.run_until(start + 0.2)
    assert done == [("after", pytest.approx(0.1))]
    # and the bucket holds no debt of the cancelled upload: the next piece is immediate
    await ft.run_until(start + 5)
    await shaper.acquire(100)
    assert shaper.tokens >= 0
    await after


async def test_cancelling_the_last_waiter_restores_the_bucket():
    ft = FakeTime(T0 - 3600)
    shaper = make(whole_week(800_000), ft)
    task = asyncio.create_task(shaper.acquire(30_000))
    await ft.settle()
    assert shaper.tokens == pytest.approx(-30_000)
    task.cancel()
    await ft.settle()
    assert shaper.tokens == pytest.approx(0)
    assert ft.pending() == []  # no wake timer left behind


async def test_rate_changes_at_the_boundary_by_the_timer():
    ft = FakeTime(T0)  # 08:59:50, boundary at 09:00:00
    shaper = make(from_nine(51_200, 1_000_000), ft)
    boundary = T0 + 10
    assert shaper.limit_bps == 51_200
    assert ft.pending() == [boundary - PLAN_AHEAD]  # armed for the boundary, not a ticker
    assert shaper.status()["nextChange"] == "2026-11-23T09:00:00Z"
    # a reservation made at the old rate: 64,000 bytes = 10 s at 6,400 bytes/s
    await ft.run_until(boundary - 1)
    pending = asyncio.create_task(shaper.acquire(64_000))
    await ft.settle()
    await ft.run_until(boundary - 1e-6)
    assert shaper.limit_bps == 51_200
    await ft.run_until(boundary)
    assert shaper.limit_bps == 1_000_000
    status = shaper.status()
    assert status["limitBitsPerSec"] == 1_000_000
    assert status["inForce"]["AverageUploadRateLimitInBitsPerSec"] == 1_000_000
    assert status["inForce"]["StartHourOfDay"] == 9
    assert status["nextChange"] == "2026-11-23T10:00:00Z"
    # re-timed at the new rate: the debt left at the boundary (64,000 less the 128-byte
    # burst gathered before, less 1 s at 6,400 B/s) = 57,472 B at 125,000 B/s = 0.459776 s
    await ft.run_until(boundary + 0.4597)
    assert not pending.done()
    await ft.run_until(boundary + 0.4598)
    assert pending.done()
    assert shaper.piece_size == 1250
    # the next boundary (10:00) goes back to the old rate
    await ft.run_until(boundary + 3600)
    assert shaper.limit_bps == 51_200
    shaper.close()


async def test_switch_to_no_limit_releases_waiters_and_back_starts_empty():
    ft = FakeTime(T0)
    shaper = make(from_nine(51_200, None), ft)
    boundary = T0 + 10
    waiting = asyncio.create_task(shaper.acquire(640_000))  # 100 s at the old rate
    await ft.settle()
    await ft.run_until(boundary)
    assert shaper.limit_bps is None
    assert waiting.done()
    # fast path: acquire completes without suspending
    coro = shaper.acquire(10**9)
    with pytest.raises(StopIteration):
        coro.send(None)
    await ft.run_until(boundary + 3600)
    assert shaper.limit_bps == 51_200
    assert shaper.tokens == 0  # starts empty, no burst from the unlimited hour
    shaper.close()


async def test_set_schedule_applies_now_and_rearms_the_timer():
    ft = FakeTime(T0)
    shaper = make(whole_week(None), ft)
    assert shaper.limit_bps is None and ft.pending() == []
    shaper.set_schedule(from_nine(2_000_000, 4_000_000))
    assert shaper.limit_bps == 2_000_000
    assert ft.pending() == [T0 + 10 - PLAN_AHEAD]
    shaper.set_schedule(whole_week(None))
    assert shaper.limit_bps is None
    assert ft.pending() == []


async def test_close_fails_waiters():
    ft = FakeTime(T0)
    shaper = make(whole_week(51_200), ft)
    task = asyncio.create_task(shaper.acquire(10_000))
    await ft.settle()
    shaper.close()
    with pytest.raises(ShaperClosed):
        await task


async def test_achieved_rate_is_measured_over_the_last_seconds():
    ft = FakeTime(T0 - 3600)
    shaper = make(whole_week(8_000_000), ft)  # 1,000,000 bytes/s
    log: list = []
    task = asyncio.create_task(pump(shaper, log, 0))
    await ft.run_until(ft.now + 10)
    achieved = shaper.status()["achievedBitsPerSec"]
    assert 7_800_000 <= achieved <= 8_200_000
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await ft.run_until(ft.now + 10)
    assert shaper.status()["achievedBitsPerSec"] == 0


async def test_wall_clock_steps_neither_stall_nor_burst_the_bucket():
    ft = FakeTime(T0 - 3600)
    shaper = make(from_nine(800_000, 8_000_000), ft)  # 100,000 B/s until 09:00
    log: list = []
    task = asyncio.create_task(pump(shaper, log, 0))
    await ft.run_until(ft.now + 1)
    ft.wall_offset = -1800  # the system clock is stepped back half an hour
    start = ft.now
    await ft.run_until(start + 2)
    sent = sum(n for when, _, n in log if when > start)
    assert 0.99 * 200_000 <= sent <= 200_000 + shaper._burst + shaper.piece_size
    # stepped forward past 09:00: after resync() the 09:00 rate is in force
    ft.wall_offset = 3600 + 10
    shaper.resync()
    assert shaper.limit_bps == 8_000_000
    assert shaper.status()["nextChange"] == "2026-11-23T10:00:00Z"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    shaper.close()


# --- a rate change at a boundary --------------------------------------------------------


@pytest.mark.parametrize("late", [0.0, 0.02], ids=["timer-on-time", "timer-20ms-late"])
@pytest.mark.parametrize(
    ("before", "after"),
    [
        (1_000_000_000, 100_000_000),
        (100_000_000, 1_000_000_000),
        (100_000_000, 51_200),
        (51_200, 100_000_000),
    ],
)
async def test_bytes_after_a_boundary_follow_the_new_rate_from_its_instant(before, after, late):
    """x/time/rate's bounds on each side of the boundary, with the boundary as time zero.

    20 ms of a late timer at the old rate would exceed the bound after a drop by far more
    than a burst and a piece (1 Gbit/s -> 100 Mbit/s: 2.25 MB against 0.375 MB).
    """
    ft = FakeTime(T0 + 8, boundary_late=late)  # 2 s before the 09:00 boundary
    shaper = make(from_nine(before, after), ft)
    boundary = T0 + 10
    start = ft.now
    r0, r1 = before / 8, after / 8
    burst0, piece0 = shaper._burst, shaper.piece_size
    log: list = []
    tasks = [asyncio.create_task(pump(shaper, log, i)) for i in range(4)]
    await ft.run_until(boundary)
    pre = sum(n for when, _, n in log if when <= boundary)
    assert pre <= burst0 + r0 * (boundary - start) + piece0
    seen = len(log)
    after_bytes = 0
    duration = 10.0  # one 10 ms piece still maturing is then 0.1 % of the ideal
    steps = [k / 100 for k in range(1, 101)] + [1 + k / 4 for k in range(1, 37)]
    for t in steps:
        await ft.run_until(boundary + t)
        for _, _, n in log[seen:]:
            after_bytes += n
        seen = len(log)
        assert shaper.limit_bps == after or t < late
        burst1, piece1 = max(r1 * 0.02, shaper.piece_size), shaper.piece_size
        assert after_bytes <= burst1 + r1 * t + piece1, f"{t=}"
        assert after_bytes >= r1 * t - piece1, f"{t=}"
    ideal = r0 * (boundary - start) + r1 * duration
    assert pre + after_bytes >= 0.999 * ideal
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    shaper.close()


async def test_a_reservation_across_the_boundary_pays_each_part_at_its_rate():
    ft = FakeTime(T0)  # 08:59:50
    shaper = make(from_nine(51_200, 1_000_000), ft)  # 6,400 B/s, then 125,000 B/s
    boundary = T0 + 10
    await ft.run_until(boundary - 0.2)  # inside the plan window: the step is known
    pending = asyncio.create_task(shaper.acquire(64_000))
    await ft.settle()
    # idle since the start: a full 128-byte burst (20 ms) + 0.2 s at 6,400 B/s = 1,408 B
    # before 09:00, the other 62,592 B at 125,000 B/s: 0.500736 s after it
    await ft.run_until(boundary + 0.5007)
    assert not pending.done()
    await ft.run_until(boundary + 0.5008)
    assert pending.done()
    shaper.close()


async def test_tokens_saved_before_a_boundary_are_not_carried_past_it():
    ft = FakeTime(T0 + 9)  # 1 s before 09:00; 1 Gbit/s, then 100 Mbit/s
    shaper = make(from_nine(1_000_000_000, 100_000_000), ft)
    boundary = T0 + 10
    await ft.run_until(boundary + 0.001)  # idle: a full 20 ms burst (2.5 MB) at 1 Gbit/s
    n = shaper.piece_size
    assert n == 125_000
    task = asyncio.create_task(shaper.acquire(n))
    await ft.settle()
    # the new limit started empty at 09:00: 1 ms of 12.5 MB/s is 12,500 B, not 125,000
    assert not task.done()
    await ft.run_until(boundary + n / 12_500_000 - 1e-6)
    assert not task.done()
    await ft.run_until(boundary + n / 12_500_000 + 1e-6)
    assert task.done()
    shaper.close()


async def test_pieces_shrink_before_a_drop_so_one_new_piece_at_most_crosses_it():
    ft = FakeTime(T0 + 9)  # 1 s before 09:00
    shaper = make(from_nine(100_000_000, 51_200), ft)
    boundary = T0 + 10
    assert shaper.piece_size == 125_000  # 10 ms of 100 Mbit/s
    log: list = []
    task = asyncio.create_task(pump(shaper, log, 0))
    await ft.run_until(boundary + 1)
    # the pieces released by the boundary ended by it; the first one after it is small
    crossing = [n for when, _, n in log if when > boundary]
    assert crossing and crossing[0] <= MIN_PIECE
    assert shaper.piece_size == MIN_PIECE
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    shaper.close()


async def test_a_distant_boundary_is_met_by_the_exact_timer_not_the_rearm():
    ft = FakeTime(T0 - 3 * 3600)  # 05:59:50, the boundary three hours on
    ft.wall_offset = 1234.5678  # the monotonic clock has another origin than the wall clock
    ft.now -= ft.wall_offset
    shaper = make(from_nine(51_200, 1_000_000), ft)
    boundary = T0 + 10 - ft.wall_offset  # on the monotonic clock
    await ft.run_until(boundary - 1e-6)
    assert shaper.limit_bps == 51_200
    gaps = [b - a for a, b in itertools.pairwise(ft.fired)]
    assert gaps and max(gaps) <= MAX_TIMER_SECONDS  # re-reads the wall clock every minute
    assert ft.fired[-1] == pytest.approx(boundary - PLAN_AHEAD, abs=1e-5)  # plans ahead
    assert ft.pending() == [pytest.approx(boundary, abs=1e-5)]  # one timer, at the boundary
    await ft.run_until(boundary)
    assert shaper.limit_bps == 1_000_000
    assert ft.fired[-1] == pytest.approx(boundary, abs=1e-5)
    shaper.close()


async def test_a_wall_clock_step_during_the_wait_is_caught_by_the_rearm():
    ft = FakeTime(T0 - 3600)  # 07:59:50, the boundary an hour on
    shaper = make(from_nine(51_200, 1_000_000), ft)
    await ft.run_until(ft.now + 600)
    ft.wall_offset = -30.0  # stepped back 30 s, nobody calls resync()
    boundary = T0 + 10 + 30  # when the wall clock now reads 09:00, on the monotonic clock
    await ft.run_until(boundary - 1e-6)
    assert shaper.limit_bps == 51_200
    await ft.run_until(boundary)
    assert shaper.limit_bps == 1_000_000
    # stepped forward past 10:00 without resync(): the next re-arm (<= 60 s) catches it
    ft.wall_offset = 3600.0
    await ft.run_until(ft.now + MAX_TIMER_SECONDS)
    assert shaper.limit_bps == 51_200
    shaper.close()


async def test_a_new_schedule_inside_the_plan_window_replaces_the_plan():
    ft = FakeTime(T0 + 9.8)  # 200 ms before 09:00: the step to 1 Mbit/s is planned
    shaper = make(from_nine(51_200, 1_000_000), ft)
    # 6,400 B: 1,280 B before 09:00 at 6,400 B/s, 5,120 B after it at 125,000 B/s
    waiting = asyncio.create_task(shaper.acquire(6_400))
    await ft.settle()
    # the boundary timer, and the waiter's
    assert ft.pending() == [T0 + 10, pytest.approx(T0 + 10 + 0.04096, abs=1e-5)]
    shaper.set_schedule(whole_week(51_200))  # no boundary any more
    # the waiter only (no boundary timer), re-timed: all 6,400 B at the old rate
    assert ft.pending() == [pytest.approx(ft.now + 1.0, abs=1e-5)]
    await ft.run_until(T0 + 10.5)
    assert shaper.limit_bps == 51_200 and not waiting.done()
    await ft.run_until(T0 + 10.81)
    assert waiting.done()
    # a schedule lifting the limit at 10:00: a reservation across it is free from 10:00 on
    shaper.set_schedule(from_nine(None, 800_000))  # 100,000 B/s from 09:00 to 09:59
    ten = T0 + 10 + 3600
    await ft.run_until(ten - 0.1)
    assert shaper.limit_bps == 800_000
    waiting = asyncio.create_task(shaper.acquire(50_000))  # 0.5 s at 100,000 B/s
    await ft.settle()
    await ft.run_until(ten - 1e-3)
    assert not waiting.done()
    await ft.run_until(ten)
    assert waiting.done() and shaper.limit_bps is None
    shaper.close()
