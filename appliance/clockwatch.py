"""The clock-step watcher: notices a step of the wall clock and says so.

The schedule is in UTC wall time, but the shaper's timers run on the monotonic clock, so a
step of the wall clock (NTP, the console's sync, a VM resumed or migrated) must make it
re-read the wall clock. The console tells the daemon when it steps the clock itself
(`POST /v1/clock-stepped`); this watcher is the fallback for every other step. Both clocks
are read every CHECK_SECONDS: if their progress differs by more than STEP_SECONDS, the wall
clock was stepped (NTP slewing moves it at most 0.5 ms per second, far below that).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

CHECK_SECONDS = 5.0
STEP_SECONDS = 1.0


class ClockWatch:
    """Calls `on_step(seconds)` when the wall clock moved `seconds` more than the monotonic.

    `wall` and `monotonic` are injected so a unit test steps a fake clock instead of the
    machine's.
    """

    def __init__(
        self,
        on_step: Callable[[float], None],
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        interval: float = CHECK_SECONDS,
        threshold: float = STEP_SECONDS,
    ) -> None:
        self._on_step = on_step
        self._wall = wall
        self._mono = monotonic
        self.interval = interval
        self.threshold = threshold
        self._base_wall = wall()
        self._base_mono = monotonic()

    def rebase(self) -> None:
        """Take the clocks as they are now as agreed (after a step was already dealt with)."""
        self._base_wall = self._wall()
        self._base_mono = self._mono()

    def check(self) -> float | None:
        """Compare the clocks' progress since the last check; the step (seconds) if any."""
        wall, mono = self._wall(), self._mono()
        step = (wall - self._base_wall) - (mono - self._base_mono)
        self._base_wall, self._base_mono = wall, mono
        if abs(step) <= self.threshold:
            return None
        log.info("event=clock_step seconds=%.3f", step)
        self._on_step(step)
        return step

    async def run(self, sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        """Check every `interval` seconds, until cancelled."""
        self.rebase()
        while True:
            await sleep(self.interval)
            self.check()
