"""A step of the wall clock makes the shaper re-read it: the watcher, with injected clocks.

The machine's clock is never touched: the watcher and the shaper are given fake wall and
monotonic clocks, and the test steps the fake wall clock.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from appliance.clockwatch import CHECK_SECONDS, STEP_SECONDS, ClockWatch
from appliance.config import ListenAddress, Settings
from appliance.daemon import Daemon
from appliance.gatewaystate import GatewayState
from appliance.shaping import ScheduledShaper
from appliance.state import StateStore

# Monday 2026-11-23 08:00 UTC: an hour before the 09:00 boundary of `FROM_NINE`.
T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC).timestamp()
FROM_NINE = [  # 800 kbit/s on Mondays until 08:59, 8 Mbit/s from 09:00 to 09:59
    {"StartHourOfDay": 0, "StartMinuteOfHour": 0, "EndHourOfDay": 8, "EndMinuteOfHour": 59,
     "DaysOfWeek": [1], "AverageUploadRateLimitInBitsPerSec": 800_000},
    {"StartHourOfDay": 9, "StartMinuteOfHour": 0, "EndHourOfDay": 9, "EndMinuteOfHour": 59,
     "DaysOfWeek": [1], "AverageUploadRateLimitInBitsPerSec": 8_000_000},
]


class Clocks:
    """A monotonic clock and a wall clock that follows it, plus whatever step is applied."""

    def __init__(self, start: float) -> None:
        self.mono = 1000.0
        self.offset = start - self.mono

    def wall(self) -> float:
        return self.mono + self.offset

    def monotonic(self) -> float:
        return self.mono

    def call_later(self, delay: float, callback: Any) -> Any:
        """The shaper's timers are never fired here: only `resync` may change the rate."""

        class Handle:
            def cancel(self) -> None:
                pass

        return Handle()


def watch(clocks: Clocks, steps: list[float]) -> ClockWatch:
    return ClockWatch(steps.append, wall=clocks.wall, monotonic=clocks.monotonic)


def test_clocks_that_agree_are_no_step() -> None:
    clocks, steps = Clocks(T0), []
    w = watch(clocks, steps)
    for _ in range(10):
        clocks.mono += CHECK_SECONDS
        assert w.check() is None
    clocks.mono += CHECK_SECONDS
    clocks.offset += STEP_SECONDS  # exactly the threshold: NTP slewing never gets near it
    assert w.check() is None
    assert steps == []


@pytest.mark.parametrize("step", [30.0, -1800.0, 1.5, -1.5])
def test_a_step_either_way_is_reported_once(step: float) -> None:
    clocks, steps = Clocks(T0), []
    w = watch(clocks, steps)
    clocks.mono += 2.0
    clocks.offset += step
    assert w.check() == pytest.approx(step)
    clocks.mono += CHECK_SECONDS
    assert w.check() is None  # measured from the last check: the same step is not seen again
    assert steps == [pytest.approx(step)]


def test_rebase_takes_a_step_already_dealt_with_as_agreed() -> None:
    clocks, steps = Clocks(T0), []
    w = watch(clocks, steps)
    clocks.offset += 60.0
    w.rebase()  # e.g. the console's POST /v1/clock-stepped resynced the shaper already
    clocks.mono += CHECK_SECONDS
    assert w.check() is None
    assert steps == []


async def test_run_checks_every_interval_until_cancelled() -> None:
    clocks, steps = Clocks(T0), []
    w = watch(clocks, steps)
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        clocks.mono += seconds
        if len(slept) == 3:
            clocks.offset += 120.0  # the wall clock is stepped during the third wait
        if len(slept) == 6:
            raise asyncio.CancelledError
        await asyncio.sleep(0)

    with pytest.raises(asyncio.CancelledError):
        await w.run(sleep=fake_sleep)
    assert slept == [CHECK_SECONDS] * 6
    assert steps == [pytest.approx(120.0)]


def test_a_step_past_a_boundary_puts_the_new_limit_in_force(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The watcher wired as the daemon wires it: GatewayState.resync_clock on a step."""
    clocks = Clocks(T0)
    store = StateStore(tmp_path)
    store.load()
    store.update(schedule=FROM_NINE)
    shaper = ScheduledShaper(clock=clocks.wall, monotonic=clocks.monotonic,
                             call_later=clocks.call_later)
    gateway = GatewayState(store, shaper)
    shaper.start()
    w = ClockWatch(lambda _step: gateway.resync_clock("watcher"), wall=clocks.wall,
                   monotonic=clocks.monotonic)
    assert shaper.limit_bps == 800_000
    clocks.mono += CHECK_SECONDS
    assert w.check() is None
    assert shaper.limit_bps == 800_000

    clocks.mono += CHECK_SECONDS
    clocks.offset += 3600.0  # stepped forward an hour: 09:00:10, the 8 Mbit/s interval
    with caplog.at_level(logging.INFO):
        assert w.check() == pytest.approx(3600.0)
    assert shaper.limit_bps == 8_000_000
    assert shaper.status()["nextChange"] == "2026-11-23T10:00:00Z"
    assert any("event=clock_resync source=watcher" in r.getMessage() for r in caplog.records)

    clocks.mono += CHECK_SECONDS
    clocks.offset -= 3600.0  # and back
    w.check()
    assert shaper.limit_bps == 800_000
    shaper.close()


async def test_the_daemon_is_whole_once_created_and_resyncs_on_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(
        listen=(ListenAddress("127.0.0.1", 0),), state_dir=tmp_path / "state",
        control_plane_url="http://127.0.0.1:9", local_api_socket=tmp_path / "api.sock",
    )
    daemon = Daemon.create(settings)
    try:
        doc = daemon.views.status()  # no part is missing before `run`
        assert doc["keyId"] == daemon.identity.key_id and doc["activated"] is False
        daemon.shaper.start()
        with caplog.at_level(logging.INFO):
            shaping = daemon.local_api().clock_stepped()
        assert set(shaping) == {"limitBitsPerSec", "inForce", "nextChange", "achievedBitsPerSec"}
        assert any("event=clock_resync source=api" in r.getMessage() for r in caplog.records)
    finally:
        daemon.shaper.close()
        await daemon.link.close()
