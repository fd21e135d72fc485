"""The job runner: the backup and restore jobs the control plane gives this gateway.

The link loop hands it each poll answer's `jobs` (docs/backups.md); the control plane's list
is the truth, and the runner makes what runs here follow it:

- a RUNNING job not running here is started, at most MAX_RUNNING (4) at once: the control
  plane gives no more, and the runner holds to it too (more wait, in list order);
- a job that becomes ABORTING is stopped and reported ABORTED; one listed ABORTING that does
  not run here (e.g. after a restart) is confirmed ABORTED at once;
- a job that leaves the list is stopped quietly (taken over, or ended by the control plane);
- nothing is kept on disk: after a daemon restart the first poll lists the jobs again and
  they start anew; the chunks already in the vault are not sent again, so they resume in
  effect.

A list is a snapshot and may be a poll older than a job's end, so a job that ended here
and told the control plane so is not started again while the list still names it; one that
stopped without a report (the control plane was unreachable, or said it was not ours) is
started again only by a list that came after it stopped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.backupjob import BackupJob
from appliance.hypervisors.model import BackupConnector
from appliance.joblink import (
    ABORT_MESSAGE,
    ABORTED,
    COMPLETED,
    FAILED,
    JobLink,
    JobLinkError,
    JobStopped,
    LinkedJob,
)
from appliance.link import JobOrder
from appliance.restorejob import RestoreJob

log = logging.getLogger(__name__)

MAX_RUNNING = 4
STOP_TIMEOUT = 60.0  # how long a daemon stop waits for jobs to let go of the hypervisor


@dataclass(frozen=True)
class _Ended:
    outcome: str
    reported: bool
    generation: int  # the list generation in force when the job ended


class JobRunner:
    """Runs the jobs of the latest list, at most `max_running` at once.

    `connect(hypervisor_arn)` returns a BackupConnector for the associated hypervisor (it is
    called in a worker thread and raises when there is none); `job_options` go to every job
    (the tests' progress period and in-flight bound).
    """

    def __init__(self, link: JobLink, connect: Callable[[str], BackupConnector], *,
                 max_running: int = MAX_RUNNING, **job_options: Any) -> None:
        self._link = link
        self._connect = connect
        self._max = max_running
        self._job_options = job_options
        self._orders: dict[str, JobOrder] = {}
        self._generation = 0
        self._running: dict[str, tuple[LinkedJob, asyncio.Task[str]]] = {}
        self._ended: dict[str, _Ended] = {}
        self._reports: dict[str, asyncio.Task[None]] = {}
        self._closed = False
        self._held = False  # a software update waits for the running jobs: none starts
        self.peak_running = 0  # the most jobs that ran here at once (status, tests)
        self._changed = asyncio.Event()

    # -- from the link loop ---------------------------------------------------------------

    def offer(self, orders: Sequence[JobOrder]) -> None:
        """Make what runs here follow the control plane's list (one poll answer's jobs)."""
        if self._closed:
            return
        self._generation += 1
        self._orders = {o.job_id: o for o in orders}
        for job_id, (job, _) in self._running.items():
            if job_id not in self._orders and job.stop(aborted=False):
                log.info("event=job_stopping job_id=%s reason=unlisted", job_id)
        for job_id in [j for j in self._ended if j not in self._orders]:
            del self._ended[job_id]
        self._reconcile()

    def _reconcile(self) -> None:
        for order in self._orders.values():
            running = self._running.get(order.job_id)
            if order.invalid is not None:
                if running is None:
                    self._report_once(order, order.invalid, aborted=False)
            elif order.state == "ABORTING":
                if running is not None:
                    if running[0].stop(aborted=True):
                        log.info("event=job_stopping job_id=%s reason=aborting", order.job_id)
                else:
                    self._report_once(order, ABORT_MESSAGE, aborted=True)
            elif running is None and self._may_start(order.job_id):
                if len(self._running) >= self._max or self._held:
                    continue  # waits for a free slot (view() lists it as WAITING)
                self._start(order)
        self._changed.set()

    def _may_start(self, job_id: str) -> bool:
        ended = self._ended.get(job_id)
        if ended is None:
            return job_id not in self._reports
        if ended.reported and ended.outcome in (COMPLETED, FAILED, ABORTED):
            return False  # a list older than the end: the control plane will drop it
        return self._generation > ended.generation

    def _start(self, order: JobOrder) -> None:
        kind = BackupJob if order.type == "BACKUP" else RestoreJob
        job = kind(order, self._link, self._connect, **self._job_options)
        task = asyncio.create_task(job.run(), name=f"job-{order.job_id}")
        self._running[order.job_id] = (job, task)
        self.peak_running = max(self.peak_running, len(self._running))
        self._ended.pop(order.job_id, None)
        log.info("event=job_started job_id=%s type=%s vm=%s running=%d", order.job_id,
                 order.type, order.vm_uuid or order.recovery_point_arn, len(self._running))
        task.add_done_callback(lambda t, job=job: self._on_end(job, t))

    def _on_end(self, job: LinkedJob, task: asyncio.Task[str]) -> None:
        self._running.pop(job.job_id, None)
        outcome = job.outcome or FAILED
        if task.cancelled() or task.exception() is not None:
            outcome = FAILED  # run() never raises; a cancel at shutdown lands here
        self._ended[job.job_id] = _Ended(outcome, job.reported, self._generation)
        log.info("event=job_ended job_id=%s type=%s outcome=%s reported=%s bytes=%d "
                 "message=%s", job.job_id, job.type, outcome, str(job.reported).lower(),
                 job.bytes_done, job.message)
        if not self._closed:
            self._reconcile()

    def _report_once(self, order: JobOrder, message: str, aborted: bool) -> None:
        """Tell the control plane a job it lists here ended (ABORTED, or FAILED because it
        cannot be read), once; a report that fails is tried again at a later list."""
        ended = self._ended.get(order.job_id)
        if order.job_id in self._reports or (ended is not None and ended.reported):
            return

        async def report() -> None:
            reported = True
            try:
                await self._link.failed(order.job_id, message, aborted)
            except JobStopped:
                pass
            except JobLinkError as exc:
                reported = False
                log.warning("event=job_report_failed job_id=%s reason=%s", order.job_id,
                            str(exc))
            outcome = ABORTED if aborted else FAILED
            self._ended[order.job_id] = _Ended(outcome, reported, self._generation)
            log.info("event=job_ended job_id=%s type=%s outcome=%s reported=%s bytes=0 "
                     "message=%s", order.job_id, order.type, outcome, str(reported).lower(),
                     message)

        task = asyncio.create_task(report(), name=f"job-report-{order.job_id}")
        self._reports[order.job_id] = task
        task.add_done_callback(lambda _t: self._reports.pop(order.job_id, None))

    # -- what status shows ----------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._running)

    def waiting(self) -> list[JobOrder]:
        """RUNNING jobs of the list that wait for a free slot here."""
        return [o for o in self._orders.values()
                if o.invalid is None and o.state == "RUNNING" and o.job_id not in self._running
                and self._may_start(o.job_id)]

    def summary(self) -> dict[str, int]:
        """The status's `jobs`: how many run and how many wait."""
        return {"running": len(self._running), "waiting": len(self.waiting()),
                "maxRunning": self._max}

    def view(self) -> dict[str, Any]:
        """`GET /v1/jobs` (docs/local-api.md)."""
        jobs = [job.view() for job, _ in self._running.values()]
        jobs += [{"jobId": o.job_id, "type": o.type, "state": "WAITING",
                  "vm": o.vm_name if o.type == "BACKUP" else o.restore_name,
                  "phase": "waiting for the software update" if self._held
                  else "waiting for a free slot", "bytesDone": 0, "bytesTotal": 0,
                  "percent": 0.0, "startedAt": None, "note": None}
                 for o in self.waiting()]
        return {**self.summary(), "jobs": jobs}

    def job(self, job_id: str) -> LinkedJob | None:
        entry = self._running.get(job_id)
        return entry[0] if entry is not None else None

    async def hold_until_idle(self) -> None:
        """Start no more jobs and return once none runs: a software update restarts the
        daemon, and a job it cut would only be given back and started again (`release`
        undoes the hold when the update does not happen)."""
        self._held = True
        while self._running:
            await self.changed()

    def release(self) -> None:
        self._held = False
        if not self._closed:
            self._reconcile()

    async def changed(self) -> None:
        """Wait until the runner next reconciles (a list arrived or a job ended)."""
        self._changed.clear()
        await self._changed.wait()

    async def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop every job quietly (the control plane gives them back after a restart) and
        wait, up to `timeout`, for them to let go of the hypervisor."""
        self._closed = True
        tasks = [task for _, task in self._running.values()]
        for job, _ in self._running.values():
            job.stop(aborted=False)
        for task in self._reports.values():
            task.cancel()
        tasks += list(self._reports.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            log.warning("event=job_stop_timeout task=%s", task.get_name())
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
