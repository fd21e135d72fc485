"""The upload shaper: one token bucket for every upload of the gateway, following the schedule.

Why this shape (the figures it was tuned against are in the README, "Measured here"):

- Reservation model (as Go's x/time/rate): a caller takes its bytes from the bucket at once,
  the count may go negative, and the caller waits until its reservation matures. Waiters are
  therefore served strictly in arrival order, so no upload stream can starve another.
- The bucket is kept as one instant, `tat` (GCRA's "theoretical arrival time"): the moment
  at which the bytes reserved so far will all have been earned. Bytes are earned along a
  rate curve that is flat, or has ONE planned step: the next boundary of the schedule.
- The bucket starts EMPTY with a small burst (BURST_SECONDS of the rate), and again at every
  change of the limit: a full bucket or a one-second burst makes the first second overshoot
  by 10-100 %, and a burst saved at 1 Gbit/s is 2 % of the next second at 100 Mbit/s.
- Pieces are sized from the rate (PIECE_SECONDS of it), so 51,200 bit/s is shaped as finely
  as 10 Gbit/s: one fixed-size piece would be a large share of a slow second.
- A schedule boundary is taken at its exact instant, not when a timer happens to fire:
  PLAN_AHEAD seconds before it, the step is written into the rate curve (on the monotonic
  clock), so reservations made before the boundary earn the part of their bytes that falls
  after it at the new rate, and a late timer or a busy event loop cannot stretch the old
  rate past the boundary. A second timer at the boundary only tidies up (piece size, status,
  the next boundary); any acquire after the instant does the same first.
- Before a drop, pieces shrink to the new rate's size for the last old-rate piece, so no
  reservation carries more than one new-rate piece across the boundary (one 256 KiB piece
  at 100 Mbit/s is 40 s of 51,200 bit/s), and the piece released at the boundary, which
  reaches the receiver after it, is a small one.
- The boundary timer waits at most MAX_TIMER_SECONDS before it re-reads the wall clock, to
  survive clock steps; its last leg is armed for PLAN_AHEAD before the boundary exactly, so
  a normal boundary is met by the exact timer, never by the re-arm.
- With no limit and no planned limit, `acquire` only counts bytes: no bucket, no timer, no
  await that suspends.

Time is injected: `clock` (wall time, Unix seconds, UTC: which interval is in force),
`monotonic` (the bucket's time: a stepped wall clock must neither stall nor burst uploads) and
`call_later` (asyncio's signature, on the monotonic clock), so the unit tests drive the bucket
and the boundary timer with a fake clock and no real sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from gatewaycore.schedule import Schedule, format_rate, iso_utc

log = logging.getLogger(__name__)

BURST_SECONDS = 0.02
PIECE_SECONDS = 0.01
MIN_PIECE = 64
MAX_PIECE = 256 * 1024
UNLIMITED_PIECE = 256 * 1024
METER_SECONDS = 5.0
METER_BIN = 0.1
# Longest wait on the boundary timer before it re-reads the wall clock: a step of the system
# clock (NTP, VM time sync on resume) then delays a switch by at most this much.
MAX_TIMER_SECONDS = 60.0
# How long before a boundary its rate step is planned into the bucket: far more than a
# timer's lateness on a loaded host, far less than any interval of the schedule (1 minute).
PLAN_AHEAD = 0.5


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


CallLater = Callable[[float, Callable[[], None]], TimerHandle]


class ShaperClosed(RuntimeError):
    """The shaper was closed while an upload waited for its turn."""


class _Waiter:
    __slots__ = ("fut", "nbytes", "wake")

    def __init__(self, fut: asyncio.Future[None], nbytes: int, wake: float):
        self.fut = fut
        self.nbytes = nbytes
        self.wake = wake


class _Plan:
    """The next boundary: from monotonic instant `at`, `limit_bps` (None: no limit)."""

    __slots__ = ("at", "limit_bps", "rate", "wall")

    def __init__(self, at: float, limit_bps: int | None, wall: float):
        self.at = at
        self.limit_bps = limit_bps
        self.rate = None if limit_bps is None else limit_bps / 8
        self.wall = wall


def _piece_for(rate: float | None) -> int:
    if rate is None:
        return UNLIMITED_PIECE
    return max(MIN_PIECE, min(MAX_PIECE, int(rate * PIECE_SECONDS)))


class RateMeter:
    """Bytes through the shaper over the last METER_SECONDS, in METER_BIN bins."""

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._started = clock()
        self._bins: deque[list[float]] = deque()

    def add(self, nbytes: int, now: float | None = None) -> None:
        b = int((self._clock() if now is None else now) / METER_BIN)
        bins = self._bins
        if bins and bins[-1][0] == b:
            bins[-1][1] += nbytes
        else:
            bins.append([b, nbytes])
            if len(bins) > METER_SECONDS / METER_BIN + 2:
                bins.popleft()

    def bits_per_sec(self) -> float:
        now = self._clock()
        oldest = int(now / METER_BIN) - int(METER_SECONDS / METER_BIN)
        total = sum(n for b, n in self._bins if b > oldest)
        span = min(METER_SECONDS, max(now - self._started, METER_BIN))
        return total * 8 / span


class ScheduledShaper:
    """The gateway's shared upload limiter.

    Use: `shaper.start()` inside the event loop, `await shaper.acquire(n)` before sending n
    bytes (n of about `piece_size`), `shaper.set_schedule(s)` when the control plane sends a
    new schedule, `shaper.close()` on shutdown.
    """

    def __init__(
        self,
        schedule: Schedule | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        call_later: CallLater | None = None,
        burst_seconds: float = BURST_SECONDS,
    ):
        self._clock = clock
        self._mono = monotonic
        self._call_later = call_later
        self._burst_seconds = burst_seconds
        self._schedule = schedule or Schedule.empty()
        self._limit_bps: int | None = None
        self._rate: float | None = None  # bytes per second; None = no limit
        self._burst = 0.0
        self._piece = UNLIMITED_PIECE
        self._plan: _Plan | None = None
        self._free = True  # no limit now and none planned: the fast path
        self._tat = monotonic()
        self._waiters: deque[_Waiter] = deque()
        self._wake_handle: TimerHandle | None = None
        self._wake_at: float | None = None
        self._boundary_handle: TimerHandle | None = None
        self._started = False
        self._closed = False
        self.meter = RateMeter(monotonic)
        self._reshape(self._mono(), self._schedule.rate_at(self._utc(clock())), None)

    # --- public --------------------------------------------------------------------------

    @property
    def piece_size(self) -> int:
        """Bytes an upload should acquire at a time at the current rate.

        Read it right before `acquire` (no await in between): within the last old-rate piece
        before a drop it is already the new rate's piece, so no reservation carries more than
        one new-rate piece past the boundary, and the piece released AT the boundary (sent
        after it) is a small one.
        """
        plan = self._plan
        if plan is None:
            return self._piece
        now = self._mono()
        if now >= plan.at:
            self._commit(now)
            return self._piece
        new = _piece_for(plan.rate)
        if self._rate is None or new >= self._piece:
            return self._piece
        start = max(self._tat, now - self._burst / self._rate)
        before = (plan.at - start) * self._rate
        return self._piece if before >= self._piece else new

    @property
    def limit_bps(self) -> int | None:
        return self._limit_bps

    @property
    def schedule(self) -> Schedule:
        return self._schedule

    @property
    def tokens(self) -> float:
        """Bytes in the bucket now; negative: owed by reservations still waiting."""
        now = self._mono()
        if self._rate is None and self._plan is None:
            return 0.0
        if self._tat > now:
            return -self._earned(now, self._tat)
        if self._rate is None:
            return 0.0
        return min(self._burst, (now - self._tat) * self._rate)

    def start(self) -> None:
        """Arm the boundary timer (call from inside the event loop)."""
        if self._call_later is None:
            self._call_later = asyncio.get_running_loop().call_later
        self._started = True
        self._closed = False
        self._on_boundary()

    def close(self) -> None:
        """Stop the timers; uploads still waiting get ShaperClosed."""
        self._closed = True
        self._started = False
        for handle in (self._boundary_handle, self._wake_handle):
            if handle is not None:
                handle.cancel()
        self._boundary_handle = self._wake_handle = None
        self._wake_at = None
        while self._waiters:
            w = self._waiters.popleft()
            if not w.fut.done():
                w.fut.set_exception(ShaperClosed("upload shaper closed"))

    def set_schedule(self, schedule: Schedule) -> None:
        """Replace the schedule; the rate in force now applies at once."""
        self._schedule = schedule
        log.info("event=shaper_schedule intervals=%d", len(schedule.intervals))
        if self._started:
            self._on_boundary()
        else:
            self._reshape(self._mono(), schedule.rate_at(self._utc(self._clock())), None)

    def resync(self) -> None:
        """Re-read the wall clock now (after the system time was stepped)."""
        if self._started:
            self._on_boundary()

    async def acquire(self, nbytes: int) -> None:
        """Wait until `nbytes` may be sent. Cancelling the wait gives the bytes back."""
        if self._free:  # fast path: no limit
            self.meter.add(nbytes)
            return
        if self._closed:
            raise ShaperClosed("upload shaper closed")
        now = self._mono()
        plan = self._plan
        if plan is not None and now >= plan.at:
            self._commit(now)
        rate = self._rate
        if rate is None:  # no limit until the planned one (or the plan just lifted it)
            self.meter.add(nbytes, now)
            return
        start = max(self._tat, now - self._burst / rate)
        wake = self._tat = self._advance(start, nbytes)
        if wake <= now and not self._waiters:
            self.meter.add(nbytes, now)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(fut, nbytes, wake)
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            self._arm_wake(now)
        try:
            await fut
        except asyncio.CancelledError:
            self._give_back(waiter)
            raise

    def status(self) -> dict[str, Any]:
        """The shape of GET /v1/shaping (docs/local-api.md)."""
        if self._plan is not None and self._mono() >= self._plan.at:
            self._commit(self._mono())
        now = self._utc(self._clock())
        interval = self._schedule.interval_at(now)
        nxt = self._schedule.next_change(now)
        return {
            "limitBitsPerSec": self._limit_bps,
            "inForce": interval.to_api() if interval is not None else None,
            "nextChange": iso_utc(nxt) if nxt is not None else None,
            "achievedBitsPerSec": round(self.meter.bits_per_sec(), 1),
        }

    # --- the rate curve: the current rate, then at most one planned step -------------------

    @staticmethod
    def _utc(ts: float) -> datetime:
        return datetime.fromtimestamp(ts, UTC)

    def _earned(self, a: float, b: float) -> float:
        """Bytes the curve earns from instant a to b (a <= b); no limit earns no debt."""
        plan, r0 = self._plan, self._rate
        if plan is None or b <= plan.at:
            return 0.0 if r0 is None else (b - a) * r0
        r1 = plan.rate
        after = 0.0 if r1 is None else (b - max(a, plan.at)) * r1
        if a >= plan.at:
            return after
        return after + (0.0 if r0 is None else (plan.at - a) * r0)

    def _advance(self, t: float, n: float) -> float:
        """The instant at which `n` more bytes are earned after `t`."""
        plan, r0 = self._plan, self._rate
        if plan is not None and t < plan.at:
            if r0 is not None:
                before = (plan.at - t) * r0
                if n <= before:
                    return t + n / r0
                n -= before
            r1 = plan.rate
            return plan.at if r1 is None else plan.at + n / r1
        rate = r0 if plan is None else plan.rate
        return t if rate is None else t + n / rate

    def _retreat(self, t: float, n: float) -> float:
        """The instant from which `n` bytes are earned up to `t` (inverse of _advance)."""
        plan, r0 = self._plan, self._rate
        if plan is not None and t > plan.at and plan.rate is not None:
            after = (t - plan.at) * plan.rate
            if n <= after:
                return t - n / plan.rate
            n -= after
            t = plan.at
        return t if r0 is None else t - n / r0

    def _reshape(self, now: float, limit_bps: int | None, plan: _Plan | None) -> None:
        """Put a new curve in place from `now`: the current limit and the planned step.

        What is still owed (by each waiter, and in all) is kept in BYTES and re-timed on the
        new curve, so a change applies from `now` (or from the plan's instant) on, not after
        the queue made at the old rate has drained.
        """
        if self._plan is not None and now >= self._plan.at:
            self._commit(now)
        old = self._plan
        if limit_bps == self._limit_bps and (
            (plan is None and old is None)
            or (plan is not None and old is not None and plan.limit_bps == old.limit_bps
                and abs(plan.at - old.at) < 1e-3)
        ):
            return
        old_rate, old_burst = self._rate, self._burst
        owed = [self._earned(now, w.wake) if w.wake > now else 0.0 for w in self._waiters]
        owed_all = self._earned(now, self._tat) if self._tat > now else 0.0
        tokens = (
            0.0 if old_rate is None or self._tat > now
            else min(old_burst, (now - self._tat) * old_rate)
        )
        changed = limit_bps != self._limit_bps
        self._apply(limit_bps)
        self._plan = plan
        self._free = self._rate is None and plan is None
        if self._rate is None:
            self._release_all(now)
            self._tat = plan.at if plan is not None else now  # a planned limit starts empty
        elif old_rate is None:
            self._tat = now  # start empty: a full bucket overshoots the first second
        elif owed_all > 0:
            self._tat = self._advance(now, owed_all)
            for w, debt in zip(self._waiters, owed, strict=True):
                if debt > 0:
                    w.wake = self._advance(now, debt)
            self._arm_wake(now)
        else:  # a new limit starts empty: a burst saved at the old rate is not carried over
            self._tat = now if changed else now - min(tokens, self._burst) / self._rate
        if changed:
            log.info("event=shaper_limit limit=%s", format_rate(limit_bps).replace(" ", ""))
        if plan is not None:
            log.info(
                "event=shaper_planned limit=%s in_ms=%.1f",
                format_rate(plan.limit_bps).replace(" ", ""), (plan.at - now) * 1000,
            )

    def _apply(self, limit_bps: int | None) -> None:
        self._limit_bps = limit_bps
        self._rate = None if limit_bps is None else limit_bps / 8
        self._piece = _piece_for(self._rate)
        if self._rate is not None:
            self._burst = max(self._rate * self._burst_seconds, float(self._piece))

    def _commit(self, now: float) -> None:
        """The planned instant has passed: its rate becomes the current one.

        The curve is unchanged from the plan's instant on, so nothing is re-timed; `now`
        only says how late this bookkeeping ran (the bytes never depended on it).
        """
        plan = self._plan
        assert plan is not None
        self._apply(plan.limit_bps)
        self._plan = None
        # Tokens saved before the boundary (uploads slower than the old limit) are not
        # carried into the new interval: the new limit starts empty at its instant.
        self._tat = max(self._tat, plan.at)
        self._free = self._rate is None
        if self._rate is None:
            self._release_all(now)
        log.info(
            "event=shaper_limit limit=%s planned=1 late_ms=%.2f",
            format_rate(plan.limit_bps).replace(" ", ""), (now - plan.at) * 1000,
        )

    # --- waiting ---------------------------------------------------------------------------

    def _arm_wake(self, now: float) -> None:
        """One timer, for the head of the queue: later waiters mature later (FIFO)."""
        if not self._waiters:
            return
        head = self._waiters[0].wake
        if self._wake_handle is not None:
            if self._wake_at == head:
                return
            self._wake_handle.cancel()
        self._wake_at = head
        self._wake_handle = self._timer()(max(0.0, head - now), self._on_wake)

    def _on_wake(self) -> None:
        self._wake_handle = None
        self._wake_at = None
        now = self._mono()
        if self._plan is not None and now >= self._plan.at:
            self._commit(now)
        while self._waiters and self._waiters[0].wake <= now:
            w = self._waiters.popleft()
            if not w.fut.done():
                w.fut.set_result(None)
                self.meter.add(w.nbytes, now)
        self._arm_wake(now)

    def _release_all(self, now: float) -> None:
        if self._wake_handle is not None:
            self._wake_handle.cancel()
        self._wake_handle = None
        self._wake_at = None
        while self._waiters:
            w = self._waiters.popleft()
            if not w.fut.done():
                w.fut.set_result(None)
                self.meter.add(w.nbytes, now)

    def _give_back(self, waiter: _Waiter) -> None:
        """A cancelled upload returns its bytes; those queued behind it move up."""
        now = self._mono()
        try:
            position = self._waiters.index(waiter)
        except ValueError:
            position = -1  # already released when the cancel arrived: bytes never sent
        else:
            del self._waiters[position]
        if position < 0:
            self.meter.add(-waiter.nbytes, now)
        if self._rate is None:
            return  # no limit now: nothing is owed
        n = waiter.nbytes
        self._tat = self._retreat(self._tat, n)
        if position < 0:
            return
        for i in range(position, len(self._waiters)):
            self._waiters[i].wake = self._retreat(self._waiters[i].wake, n)
        if self._waiters:
            self._arm_wake(now)
        elif self._wake_handle is not None:
            self._wake_handle.cancel()
            self._wake_handle = None
            self._wake_at = None

    def _timer(self) -> CallLater:
        if self._call_later is None:
            self._call_later = asyncio.get_running_loop().call_later
        return self._call_later

    # --- the schedule's boundaries -------------------------------------------------------

    def _on_boundary(self, not_before: float | None = None) -> None:
        """Apply the rate in force now; plan the next boundary or arm the timer toward it.

        `not_before`: the wall time of a boundary just taken, so a wall clock read a hair
        before it (clocks drift apart by microseconds) does not take the old rate back.
        """
        if self._boundary_handle is not None:
            self._boundary_handle.cancel()
            self._boundary_handle = None
        if self._closed:
            return
        wall = self._clock()
        if not_before is not None:
            wall = max(wall, not_before)
        now = self._mono()
        nxt = self._schedule.next_change(self._utc(wall))
        delay = None if nxt is None else max(0.0, nxt.timestamp() - wall)
        plan = None
        if nxt is not None and delay is not None and delay < PLAN_AHEAD + 0.01:
            plan = _Plan(now + delay, self._schedule.rate_at(nxt), nxt.timestamp())
        self._reshape(now, self._schedule.rate_at(self._utc(wall)), plan)
        if delay is None:
            return
        kept = self._plan  # `plan`, or an equal one already in place
        if kept is not None:
            self._boundary_handle = self._timer()(
                max(0.0, kept.at - now), lambda: self._on_planned(kept)
            )
        else:
            wait = min(MAX_TIMER_SECONDS, delay - PLAN_AHEAD)
            self._boundary_handle = self._timer()(wait, self._on_boundary)

    def _on_planned(self, plan: _Plan) -> None:
        """The timer at the boundary: take the plan if no acquire did, aim at the next one."""
        self._boundary_handle = None
        if self._plan is plan:
            self._commit(self._mono())
        self._on_boundary(not_before=plan.wall)
