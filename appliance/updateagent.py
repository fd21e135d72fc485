"""The daemon's part of a software update (docs/updates.md): when, and getting it ready.

Each poll answer brings the newest published bundle above this version (`update`) and the
maintenance window. The agent installs that bundle at once when UpdateGatewaySoftwareNow
raised the request counter, or at the window's minute (a version that already failed here
waits for an explicit request or a newer one). To install it:

1. hold the job runner: no job starts, the running ones finish (a restart would only cut
   them and have them started again);
2. download the bundle over the signed link and check it is the offered one (its form and
   payload hash: gatewaycore.bundle.read; the signature is the root installer's to check,
   with the key in the image, not ours);
3. leave it as the request (appliance/updatefiles.py): the root installer takes it from
   there, switches versions and restarts this daemon, or refuses it;
4. the installer's result file is watched (a stat every RESULT_CHECK seconds) and its
   outcome kept in the state, reported in every poll and shown on the console.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance import updatefiles
from appliance.gatewaystate import GatewayState
from appliance.jobrunner import JobRunner
from appliance.link import LinkError, PollAnswer, UpdateOffer
from appliance.version import __version__
from gatewaycore import atomicfile, bundle, maintenance, utctime

log = logging.getLogger(__name__)

RESULT_CHECK = 2.0       # seconds between looks at the installer's result file
RESULT_WAIT = 15 * 60.0  # how long a request may go unanswered before it counts as failed


class UpdateAgent:
    """`fetch(version)` downloads a bundle (LinkClient.fetch_update); `clock` and `sleep`
    are the wall clock and its wait (tests inject both to reach a window at once)."""

    def __init__(self, gateway: GatewayState, fetch: Callable[[str], Awaitable[bytes]],
                 jobs: JobRunner, state_dir: Path,
                 result_path: Path = updatefiles.DEFAULT_RESULT, *,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 result_wait: float = RESULT_WAIT) -> None:
        self._gateway = gateway
        self._fetch = fetch
        self._jobs = jobs
        self.request_path = state_dir / updatefiles.REQUEST
        self._result_path = result_path
        self._clock = clock
        self._sleep = sleep
        self._result_wait = result_wait
        self._offer: UpdateOffer | None = None
        self._polled = False
        self._kick = asyncio.Event()
        self._new_result = asyncio.Event()
        self._result_seen: tuple[int, int] | None = None
        self._window_done: float | None = None  # the window start last acted on
        self.phase: str | None = None  # what an install is doing, for the status view

    # -- from the link loop -----------------------------------------------------------------

    def offer(self, answer: PollAnswer) -> None:
        """Keep the poll's offer and window (the state keeps what the console shows)."""
        self._offer = answer.update if answer.state == "activated" else None
        self._polled = True
        shown = None if self._offer is None else {
            "version": self._offer.version, "publishedAt": self._offer.published_at}
        st = self._gateway.state
        if shown != st.update_offer or answer.maintenance != st.maintenance:
            self._gateway.save(update_offer=shown, maintenance=answer.maintenance)
        self._kick.set()

    def report(self) -> dict[str, str] | None:
        """The poll's `updateStatus`: the last result, told until the control plane has it
        (every poll carries it; it is small)."""
        result = self._gateway.state.update_result
        return updatefiles.as_report(result) if result else None

    # -- what the status view shows -----------------------------------------------------------

    def next_window(self, window: maintenance.Window | None = None) -> float | None:
        """Epoch seconds of the next maintenance window start (of `window`, else the one
        in the state), None without a window."""
        window = window or self._window()
        if window is None:
            return None
        after = self._clock()
        if self._window_done is not None:
            after = max(after, self._window_done + 60)
        return window.next_start(datetime.fromtimestamp(after, UTC)).timestamp()

    def _window(self) -> maintenance.Window | None:
        doc = self._gateway.state.maintenance
        try:
            return maintenance.Window.from_api(doc) if doc else None
        except maintenance.WindowError:
            return None

    def view(self) -> dict[str, Any]:
        st = self._gateway.state
        window = self._window()
        due = self.next_window(window)
        return {
            "installed": __version__,
            "available": st.update_offer,
            "maintenanceWindow": window.describe() if window else None,
            "nextWindow": utctime.format_utc(due) if due is not None else None,
            "phase": self.phase,
            "lastResult": st.update_result,
        }

    # -- the task ------------------------------------------------------------------------------

    async def run(self) -> None:
        watcher = asyncio.create_task(self._watch_results(), name="update-results")
        try:
            while True:
                self._kick.clear()
                await self._act()
                due = self.next_window()
                wait = None if due is None else max(0.0, due - self._clock())
                if await self._wait(wait):
                    continue  # kicked: a poll came (an offer, a request, a new window)
                if due is not None and self._clock() >= due:
                    self._window_done = due
                    await self._at_window()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _wait(self, seconds: float | None) -> bool:
        """True when kicked, False when `seconds` passed."""
        kicked = asyncio.ensure_future(self._kick.wait())
        if seconds is None:
            await kicked
            return True
        timer = asyncio.ensure_future(self._sleep(seconds))
        try:
            await asyncio.wait({kicked, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (kicked, timer):
                task.cancel()
        return self._kick.is_set()

    async def _act(self) -> None:
        """An UpdateGatewaySoftwareNow not acted on yet: install the offer, or note that
        nothing newer is published (known only once a poll answered)."""
        st = self._gateway.state
        if st.software_update_request <= st.update_request_handled or not self._polled:
            return
        self._gateway.save(update_request_handled=st.software_update_request)
        if self._offer is None:
            log.info("event=update_not_available request=%d version=%s",
                     st.software_update_request, __version__)
            return
        await self.install(self._offer, "requested")

    async def _at_window(self) -> None:
        offer = self._offer
        if offer is None:
            log.info("event=maintenance_window update=none version=%s", __version__)
        elif offer.version == self._gateway.state.update_failed_version:
            log.info("event=maintenance_window update=%s skipped=failed_before", offer.version)
        else:
            await self.install(offer, "maintenance window")

    async def install(self, offer: UpdateOffer, why: str) -> None:
        log.info("event=update_starting version=%s from=%s why=%s running_jobs=%d",
                 offer.version, __version__, why, self._jobs.running)
        outcome: dict[str, str] | None = None
        try:
            self.phase = "waiting for the running jobs to finish"
            await self._jobs.hold_until_idle()
            self.phase = f"downloading {offer.version}"
            data = await self._fetch(offer.version)
            await asyncio.to_thread(self._stage, data, offer)
            self.phase = f"installing {offer.version}"
            self._new_result.clear()
            os.replace(self._download_path, self.request_path)
            atomicfile.fsync_dir(self.request_path.parent)
            log.info("event=update_requested version=%s bytes=%d", offer.version, len(data))
            # The installer restarts this daemon when it switches: then this wait ends with
            # the process, and the next daemon reads the result.
            async with asyncio.timeout(self._result_wait):  # not wait_for: in 3.11 it can
                await self._new_result.wait()               # swallow a stop's cancel
        except (LinkError, bundle.BundleError, OSError) as exc:
            outcome = {"outcome": "failed", "version": offer.version, "from": __version__,
                       "message": f"not installed: {exc}", "at": utctime.format_utc()}
        except TimeoutError:
            self.request_path.unlink(missing_ok=True)
            outcome = {"outcome": "failed", "version": offer.version, "from": __version__,
                       "message": f"the installer did not answer within "
                                  f"{self._result_wait:.0f} s", "at": utctime.format_utc()}
        finally:
            self.phase = None
            task = asyncio.current_task()
            if task is None or not task.cancelling():  # a stop (the installer's restart)
                self._jobs.release()                   # keeps the hold to the end

            with contextlib.suppress(OSError):
                self._download_path.unlink(missing_ok=True)
        if outcome is not None:
            self._record(outcome)

    @property
    def _download_path(self) -> Path:
        return self.request_path.with_name("download.bundle")

    def _stage(self, data: bytes, offer: UpdateOffer) -> None:
        """Write the download and check it is the bundle offered (off the event loop)."""
        self.request_path.parent.mkdir(mode=0o700, exist_ok=True)
        atomicfile.write_atomic(self._download_path, data, mode=0o600)
        release = bundle.read(self._download_path)
        if (release.version, release.sha256) != (offer.version, offer.sha256):
            raise bundle.BundleError(f"the download is {release.version} "
                                     f"({release.sha256[:12]}), not the {offer.version} "
                                     f"({offer.sha256[:12]}) offered")

    # -- the installer's results -----------------------------------------------------------------

    async def _watch_results(self) -> None:
        while True:
            self.take_result()
            await asyncio.sleep(RESULT_CHECK)

    def take_result(self) -> None:
        """Record the installer's result file when it changed since the last look."""
        try:
            st = os.stat(self._result_path)
        except OSError:
            return
        seen = (st.st_mtime_ns, st.st_ino)
        if seen == self._result_seen:
            return
        self._result_seen = seen
        result = updatefiles.read_result(self._result_path)
        if result is not None and result != self._gateway.state.update_result:
            self._record(result)
            self._new_result.set()

    def _record(self, result: dict[str, str]) -> None:
        result = {**result, "message": result["message"][:1000]}
        failed = None if result["outcome"] == "installed" else result["version"]
        log.info("event=update_result outcome=%s version=%s from=%s running=%s message=%s",
                 result["outcome"], result["version"], result.get("from", ""), __version__,
                 result["message"])
        self._gateway.save(update_result=result, update_failed_version=failed)
