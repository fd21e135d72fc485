"""The update agent's timing (appliance/updateagent.py): a published update is installed at
its maintenance window's minute, not before, on an injected clock (a real wait would be
up to a week); a version that failed here is not tried again in a window."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from appliance import updateagent, updatefiles
from appliance.gatewaystate import GatewayState
from appliance.jobrunner import JobRunner
from appliance.link import JobOrder, PollAnswer, UpdateOffer
from appliance.shaping import ScheduledShaper
from appliance.state import StateStore
from gatewaycore import bundle

KEY, _ = bundle.new_key()
FRIDAY_0100 = datetime(2026, 11, 27, 1, 0, tzinfo=UTC).timestamp()
FRIDAY_0330 = datetime(2026, 11, 27, 3, 30, tzinfo=UTC).timestamp()
WINDOW = {"HourOfDay": 3, "MinuteOfHour": 30, "DayOfWeek": 5}  # Fridays (0 = Sunday)
CODE = [("appliance/version.py", b'__version__ = "0.1.0"\n')]


class FakeTime:
    """The wall clock and its sleep: a sleep moves the clock at once, `budget` times; after
    that it never returns (the agent would otherwise race through the following weeks)."""

    def __init__(self, now: float, budget: int = 3) -> None:
        self.now = now
        self.budget = budget
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.budget <= 0:
            await asyncio.Event().wait()
        self.budget -= 1
        self.now += seconds
        await asyncio.sleep(0)


def agent_for(tmp_path: Path, time: FakeTime, fetched: list[float]) -> tuple[
        updateagent.UpdateAgent, GatewayState, bytes]:
    store = StateStore(tmp_path)
    store.load()
    gateway = GatewayState(store, ScheduledShaper())
    data = bundle.build(CODE, "0.2.0", KEY, "t")
    got = asyncio.Event()

    async def fetch(version: str) -> bytes:
        fetched.append(time.clock())
        got.set()
        return data

    jobs = JobRunner(None, None)  # type: ignore[arg-type]  # no job is ever listed here
    agent = updateagent.UpdateAgent(gateway, fetch, jobs, tmp_path,
                                    tmp_path / "result.json", clock=time.clock,
                                    sleep=time.sleep, result_wait=5)
    return agent, gateway, data


def answer(data: bytes, **extra: Any) -> PollAnswer:
    """A poll answer offering the bundle `data`, with the Friday window."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        payload = tar.extractfile(bundle.PAYLOAD)
        assert payload is not None
        body = payload.read()
    offer = UpdateOffer("0.2.0", hashlib.sha256(body).hexdigest(), len(body), "t")
    return PollAnswer(1, "activated", "arn", "gw", "us-east-1", [], 0, update=offer,
                      maintenance=WINDOW, **extra)


@pytest.mark.timeout(20)
async def test_installed_at_the_window_minute(tmp_path: Path) -> None:
    time, fetched = FakeTime(FRIDAY_0100), []
    agent, gateway, data = agent_for(tmp_path, time, fetched)
    task = asyncio.create_task(agent.run())
    agent.offer(answer(data))
    request = tmp_path / updatefiles.REQUEST
    for _ in range(200):
        if request.exists():
            break
        await asyncio.sleep(0.01)
    assert fetched == [FRIDAY_0330], "fetched at the window's start, and only then"
    assert request.read_bytes() == data
    assert gateway.state.update_offer == {"version": "0.2.0", "publishedAt": "t"}
    # the installer's answer ends the wait; it is kept and reported in every poll
    updatefiles.write_result(tmp_path / "result.json", "installed", "0.2.0", "0.1.0", "ok")
    agent.take_result()
    assert agent.report() is not None and agent.report()["outcome"] == "installed"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.mark.timeout(20)
async def test_a_version_that_failed_here_waits_for_a_request(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    time, fetched = FakeTime(FRIDAY_0100, budget=1), []
    agent, gateway, data = agent_for(tmp_path, time, fetched)
    gateway.save(update_failed_version="0.2.0")
    caplog.set_level(logging.INFO)
    task = asyncio.create_task(agent.run())
    agent.offer(answer(data))
    for _ in range(200):
        if "skipped=failed_before" in caplog.text:
            break
        await asyncio.sleep(0.01)
    assert "event=maintenance_window update=0.2.0 skipped=failed_before" in caplog.text
    assert fetched == []
    # UpdateGatewaySoftwareNow (the request counter) tries it again at once
    gateway.save(software_update_request=1)
    agent.offer(answer(data))
    for _ in range(200):
        if fetched:
            break
        await asyncio.sleep(0.01)
    assert fetched == [time.clock()]
    assert gateway.state.update_request_handled == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.mark.timeout(20)
async def test_the_runner_holds_new_jobs_and_waits_for_running_ones() -> None:
    """While an update waits, no job starts and the hold ends only when the running job
    has ended; released, the waiting job starts (nothing listed is lost)."""
    runner = JobRunner(None, None)  # type: ignore[arg-type]
    started: list[str] = []
    runner._start = lambda order: started.append(order.job_id)  # type: ignore[method-assign]
    running_job = asyncio.Event()

    async def job() -> str:
        await running_job.wait()
        return "COMPLETED"

    class Job:  # what the runner reads of a running job
        job_id, type, outcome, reported, bytes_done, message = "j0", "BACKUP", "COMPLETED", \
            True, 0, ""

        def stop(self, aborted: bool) -> bool:
            raise AssertionError("a listed running job is never stopped by the hold")

        def view(self) -> dict[str, Any]:
            return {"jobId": self.job_id, "phase": "reading disks"}

    task = asyncio.create_task(job())
    runner._running["j0"] = (Job(), task)  # type: ignore[assignment]
    task.add_done_callback(lambda t: runner._on_end(Job(), t))  # type: ignore[arg-type]
    hold = asyncio.create_task(runner.hold_until_idle())
    await asyncio.sleep(0.05)
    runner.offer([JobOrder(j, "BACKUP", "RUNNING", "arn", vm_uuid=j, vm_name=j)
                  for j in ("j0", "j1")])
    await asyncio.sleep(0.05)
    assert not hold.done() and started == []
    assert runner.view()["jobs"][-1]["phase"] == "waiting for the software update"
    running_job.set()
    await asyncio.wait_for(hold, 5)
    assert started == []  # still held: the update goes on
    runner.release()
    assert started == ["j1"]
