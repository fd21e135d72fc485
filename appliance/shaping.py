"""The upload shaper: one token bucket for every upload of the gateway, following the schedule.

Why this shape (see /work/shared/reference/shaping-notes.md for what was measured):

- Reservation model (as Go's x/time/rate): a caller takes its bytes from the bucket at once,
  the count may go negative, and the caller waits until its reservation matures. Waiters are
  therefore served strictly in arrival order, so no upload stream can starve another.
- The bucket is in bytes and starts EMPTY with a small burst (BURST_SECONDS of the rate):
  a full bucket or a one-second burst makes the first second overshoot by 10-100 %.
- Pieces are sized from the rate (PIECE_SECONDS of it), so 51,200 bit/s is shaped as finely
  as 10 Gbit/s: one fixed-size piece would be a large share of a slow second.
- The rate follows the schedule by a timer armed for the next UTC boundary (not a ticker),
  and pending reservations are re-timed at the new rate, so the new limit holds from the
  boundary on instead of after the queue made at the old rate drains.
- With no limit, `acquire` only counts bytes: no bucket, no timer, no await that suspends.

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

from appliance.schedule import Schedule, format_rate, iso_utc

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
        self._tokens = 0.0
        self._last = monotonic()
        self._waiters: deque[_Waiter] = deque()
        self._wake_handle: TimerHandle | None = None
        self._wake_at: float | None = None
        self._boundary_handle: TimerHandle | None = None
        self._started = False
        self._closed = False
        self.meter = RateMeter(monotonic)
        self._set_limit(self._schedule.rate_at(self._utc(clock())), self._last)

    # --- public --------------------------------------------------------------------------

    @property
    def piece_size(self) -> int:
        """Bytes an upload should acquire at a time at the current rate."""
        return self._piece

    @property
    def limit_bps(self) -> int | None:
        return self._limit_bps

    @property
    def schedule(self) -> Schedule:
        return self._schedule

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
            self._set_limit(schedule.rate_at(self._utc(self._clock())), self._mono())

    def resync(self) -> None:
        """Re-read the wall clock now (after the system time was stepped)."""
        if self._started:
            self._on_boundary()

    async def acquire(self, nbytes: int) -> None:
        """Wait until `nbytes` may be sent. Cancelling the wait gives the bytes back."""
        if self._rate is None:  # fast path: no limit
            self.meter.add(nbytes)
            return
        if self._closed:
            raise ShaperClosed("upload shaper closed")
        now = self._mono()
        self._refill(now)
        self._tokens -= nbytes
        if self._tokens >= 0 and not self._waiters:
            self.meter.add(nbytes, now)
            return
        wake = now + max(0.0, -self._tokens) / self._rate
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
        now = self._utc(self._clock())
        interval = self._schedule.interval_at(now)
        nxt = self._schedule.next_change(now)
        return {
            "limitBitsPerSec": self._limit_bps,
            "inForce": interval.to_api() if interval is not None else None,
            "nextChange": iso_utc(nxt) if nxt is not None else None,
            "achievedBitsPerSec": round(self.meter.bits_per_sec(), 1),
        }

    # --- the bucket ----------------------------------------------------------------------

    @staticmethod
    def _utc(ts: float) -> datetime:
        return datetime.fromtimestamp(ts, UTC)

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._last)
        self._last = max(self._last, now)
        if self._rate is not None:
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)

    def _set_limit(self, limit_bps: int | None, now: float) -> None:
        """Change the rate at `now`; pending reservations keep their place, re-timed."""
        if limit_bps == self._limit_bps:
            return
        self._refill(now)
        old = self._rate
        self._limit_bps = limit_bps
        if limit_bps is None:
            self._rate = None
            self._tokens = 0.0
            self._piece = UNLIMITED_PIECE
            self._release_all()
        else:
            new = limit_bps / 8
            self._rate = new
            self._piece = max(MIN_PIECE, min(MAX_PIECE, int(new * PIECE_SECONDS)))
            self._burst = max(new * self._burst_seconds, float(self._piece))
            if old is None:
                self._tokens = 0.0  # start empty: a full bucket overshoots the first second
            else:
                self._tokens = min(self._tokens, self._burst)
                for w in self._waiters:
                    w.wake = now + max(0.0, w.wake - now) * old / new
                if self._waiters:
                    self._arm_wake(now)
        log.info("event=shaper_limit limit=%s", format_rate(limit_bps).replace(" ", ""))

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
        while self._waiters and self._waiters[0].wake <= now:
            w = self._waiters.popleft()
            if not w.fut.done():
                w.fut.set_result(None)
                self.meter.add(w.nbytes, now)
        self._arm_wake(now)

    def _release_all(self) -> None:
        if self._wake_handle is not None:
            self._wake_handle.cancel()
        self._wake_handle = None
        self._wake_at = None
        while self._waiters:
            w = self._waiters.popleft()
            if not w.fut.done():
                w.fut.set_result(None)
                self.meter.add(w.nbytes)

    def _give_back(self, waiter: _Waiter) -> None:
        """A cancelled upload returns its bytes; those queued behind it move up."""
        now = self._mono()
        try:
            position = self._waiters.index(waiter)
        except ValueError:
            position = -1  # already released when the cancel arrived: bytes never sent
        else:
            del self._waiters[position]
        if self._rate is None:
            return
        self._refill(now)
        self._tokens = min(self._burst, self._tokens + waiter.nbytes)
        if position < 0:
            self.meter.add(-waiter.nbytes, now)
            return
        shift = waiter.nbytes / self._rate
        for i in range(position, len(self._waiters)):
            self._waiters[i].wake -= shift
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

    def _on_boundary(self) -> None:
        """Apply the rate in force now and arm the timer for the next UTC boundary."""
        if self._boundary_handle is not None:
            self._boundary_handle.cancel()
            self._boundary_handle = None
        if self._closed:
            return
        wall = self._clock()
        self._set_limit(self._schedule.rate_at(self._utc(wall)), self._mono())
        nxt = self._schedule.next_change(self._utc(wall))
        if nxt is None:
            return
        delay = min(MAX_TIMER_SECONDS, max(0.0, nxt.timestamp() - wall))
        self._boundary_handle = self._timer()(delay, self._on_boundary)
