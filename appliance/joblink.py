"""The job link: the gateway's client of the control plane's job endpoints (docs/backups.md).

Signed like every `/gateway/...` request (appliance/link.py's helpers). Why it differs from
the poll client:

- A job runs for hours and the control plane may be restarted under it, so every call is
  retried with capped, jittered backoff on connection errors and 5xx for a bounded time
  (`retry_for`, 10 minutes by default); a 4xx is an answer and is never retried.
- 409 `NotAssigned`/`JobEnded` and 404 `UnknownJob` mean the job is no longer this
  gateway's to run: `JobStopped`, on which the job ends quietly (no `failed` report).
- A chunk's body goes through the daemon's one shaper piece by piece (`acquire` right before
  each piece is handed to the socket, as appliance/upload.py does), so backups keep to the
  bandwidth schedule together with every other upload, and the shaper's FIFO order shares
  the limit fairly between the jobs. It is sent with `Expect: 100-continue` (a refusal
  costs no body bytes) and a `Content-Length`, signed `UNSIGNED-PAYLOAD` (the chunk id
  names the content; the control plane checks it).

It also holds what every job shares (`LinkedJob`): its status for the local API, its
progress report every 2 s (the job's lease, and the `abort` answer of StopBackupJob), its
stop, and its final report (`complete`, or `failed`: ABORTED when stopped, FAILED with a
clear message otherwise; nothing when the job is no longer ours). The backup and restore
jobs (backupjob.py, restorejob.py) are subclasses; the runner (jobrunner.py) starts and
stops them.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import aiohttp
from multidict import CIMultiDict

from appliance.identity import Identity
from appliance.link import Backoff, JobOrder, new_session, signed_headers
from appliance.shaping import ScheduledShaper
from gatewaycore import utctime

log = logging.getLogger(__name__)

RETRY_FOR = 600.0        # the control plane may be restarted mid-job: keep trying this long
BACKOFF_CAP = 10.0
CALL_TIMEOUT = 60.0      # a JSON call
COMPLETE_TIMEOUT = 300.0  # complete: the control plane makes every chunk durable first
FETCH_TIMEOUT = 120.0    # GET of one chunk (not shaped: downloads are not limited)
CONNECT_TIMEOUT = 10.0
STOP_CODES = ("NotAssigned", "JobEnded", "UnknownJob")
T = TypeVar("T")


class JobLinkError(Exception):
    """A job call that failed: `code` is the control plane's error code or a local one."""

    code = "JobLinkError"


class JobStopped(JobLinkError):
    """The job is no longer this gateway's to run (taken over, ended, unknown): stop quietly.

    `retried`: the call had been attempted before (its first attempt may have been done by
    the control plane, whose answer was lost)."""

    def __init__(self, code: str, message: str, retried: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.retried = retried


class JobRefused(JobLinkError):
    """Any other 4xx answer; `doc` is its JSON body (e.g. `missing` of MissingChunks)."""

    def __init__(self, status: int, code: str, message: str, doc: dict[str, Any]) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.doc = doc


class LinkDown(JobLinkError):
    """The control plane could not be reached (or answered 5xx) for `retry_for` seconds."""

    code = "ControlPlaneUnreachable"


class _Attempt(Exception):
    """One attempt failed in a way worth retrying (connection error, timeout, 5xx)."""


async def _shaped(body: bytes, shaper: ScheduledShaper,
                  sent: Callable[[int], None] | None = None) -> AsyncIterator[memoryview]:
    """`body` in pieces of the shaper's size, each acquired right before it is sent (and
    counted by `sent` as it is handed to the socket)."""
    view = memoryview(body)
    while view:
        piece = view[: shaper.piece_size]  # re-read per piece: it follows the rate in force
        view = view[len(piece):]
        await shaper.acquire(len(piece))
        if sent is not None:
            sent(len(piece))
        yield piece


class JobLink:
    """The job endpoints of one control plane, for every job of the gateway (one session)."""

    def __init__(self, base_url: str, identity: Identity, shaper: ScheduledShaper, *,
                 retry_for: float = RETRY_FOR, backoff_cap: float = BACKOFF_CAP) -> None:
        self.base_url = base_url.rstrip("/")
        self._identity = identity
        self._shaper = shaper
        self._retry_for = retry_for
        self._backoff_cap = backoff_cap
        self._session: aiohttp.ClientSession | None = None
        self.bytes_sent = 0  # chunk body bytes the control plane accepted (all jobs)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No total timeout by default: a shaped chunk at 51,200 bit/s takes 11 minutes.
            self._session = new_session(aiohttp.ClientTimeout(
                total=None, sock_connect=CONNECT_TIMEOUT))
        return self._session

    # -- the retry loop ---------------------------------------------------------------------

    async def _call(self, method: str, path: str, *,
                    payload: dict[str, Any] | bytes | None = None,
                    chunk: tuple[str, bytes] | None = None,
                    sent: Callable[[int], None] | None = None,
                    timeout: float | None = CALL_TIMEOUT,
                    ok: tuple[int, ...] = (200,)) -> tuple[int, Any, CIMultiDict[str], bytes]:
        """One logical call, attempted until it gets an answer or `retry_for` passes.

        Returns (status, JSON doc or None, headers, raw body) for a status in `ok`; raises
        JobStopped, JobRefused (4xx) or LinkDown. Each attempt is signed afresh (new nonce).
        """
        deadline = time.monotonic() + self._retry_for
        backoff = Backoff(base=0.5, cap=self._backoff_cap)
        attempt = 0
        while True:
            attempt += 1
            try:
                status, doc, headers, raw = await self._attempt(method, path, payload, chunk,
                                                               timeout, sent)
            except _Attempt as exc:
                delay = backoff.next_delay()
                if time.monotonic() + delay > deadline:
                    log.warning("event=job_link_down path=%s attempts=%d reason=%s", path,
                                attempt, str(exc))
                    raise LinkDown(f"control plane {self.base_url} unreachable for "
                                   f"{self._retry_for:.0f}s: {exc}") from None
                log.warning("event=job_link_retry path=%s attempt=%d delay=%.1f reason=%s",
                            path, attempt, delay, str(exc))
                await asyncio.sleep(delay)
                continue
            if status in ok:
                if attempt > 1:
                    log.info("event=job_link_restored path=%s attempts=%d", path, attempt)
                return status, doc, headers, raw
            body = doc if isinstance(doc, dict) else {}
            code = str(body.get("error") or f"HTTP{status}")
            message = str(body.get("message") or f"HTTP {status}")[:500]
            if code in STOP_CODES and status in (404, 409):
                raise JobStopped(code, message, retried=attempt > 1)
            raise JobRefused(status, code, message, body)

    async def _attempt(self, method: str, path: str, payload: dict[str, Any] | bytes | None,
                       chunk: tuple[str, bytes] | None, timeout: float | None,
                       sent: Callable[[int], None] | None = None,
                       ) -> tuple[int, Any, CIMultiDict[str], bytes]:
        data: Any
        if chunk is not None:
            encoding, body = chunk
            headers = signed_headers(self._identity, method, path, None,
                                     "application/octet-stream")
            headers["X-Gateway-Chunk-Encoding"] = encoding
            headers["Content-Length"] = str(len(body))
            data = _shaped(body, self._shaper, sent)
        elif payload is not None:  # a JSON object, or one already serialized
            data = (payload if isinstance(payload, bytes)
                    else json.dumps(payload, separators=(",", ":")).encode())
            headers = signed_headers(self._identity, method, path, data)
        else:
            data = None
            headers = signed_headers(self._identity, method, path, b"")
        # sock_read starts once the body is sent (aiohttp), so a slow shaped chunk is not cut
        # by it, while an answer that never comes is
        limit = aiohttp.ClientTimeout(total=timeout, sock_connect=CONNECT_TIMEOUT,
                                      sock_read=COMPLETE_TIMEOUT)
        try:
            async with self._get_session().request(
                method, self.base_url + path, data=data, headers=headers, timeout=limit,
                expect100=chunk is not None,
            ) as resp:
                raw = await resp.read()
                status = resp.status
                got = CIMultiDict(resp.headers)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError):
                reason = f"no answer within {timeout:.0f}s"
            raise _Attempt(reason) from None
        if status >= 500:
            raise _Attempt(f"HTTP {status}{_said(raw, got)}")
        doc: Any = None
        if got.get("Content-Type", "").startswith("application/json"):
            try:
                doc = json.loads(raw)
            except ValueError:
                raise _Attempt(f"HTTP {status} with a malformed JSON body") from None
        return status, doc, got, raw

    # -- backup -------------------------------------------------------------------------

    async def started(self, job_id: str, incremental: bool, note: str, size: int) -> None:
        await self._call("POST", f"/gateway/jobs/{job_id}/started", payload={
            "incremental": incremental, "note": note, "backupSizeInBytes": size})

    async def missing(self, job_id: str, chunk_ids: list[str]) -> list[str]:
        """Of `chunk_ids` (at most 1,024), those the vault does not hold."""
        _, doc, _, _ = await self._call("POST", f"/gateway/jobs/{job_id}/missing",
                                        payload={"chunks": chunk_ids})
        missing = doc.get("missing") if isinstance(doc, dict) else None
        asked = set(chunk_ids)
        if not isinstance(missing, list) or not all(m in asked for m in missing):
            raise JobLinkError("the control plane's /missing answer names chunks that were "
                               "not asked about")
        return list(missing)

    async def put_chunk(self, job_id: str, chunk_id: str, encoding: str, body: bytes,
                        sent: Callable[[int], None] | None = None) -> bool:
        """Send one encoded chunk through the shaper; True when the vault stored it now.
        `sent(n)` is called as each piece of the body goes out (a job's BytesTransferred
        moves with the wire, not by whole chunks)."""
        status, _, _, _ = await self._call(
            "PUT", f"/gateway/jobs/{job_id}/chunks/{chunk_id}", chunk=(encoding, body),
            sent=sent, timeout=None, ok=(200, 201))
        self.bytes_sent += len(body)
        return status == 201

    async def progress(self, job_id: str, done: int, size: int, percent: float,
                       message: str) -> bool:
        """Report progress (also the job's lease); True when the job must stop (abort)."""
        _, doc, _, _ = await self._call("POST", f"/gateway/jobs/{job_id}/progress", payload={
            "bytesTransferred": done, "backupSizeInBytes": size,
            "percentDone": round(min(100.0, max(0.0, percent)), 2), "message": message})
        return isinstance(doc, dict) and doc.get("abort") is True

    async def complete_backup(self, job_id: str, incremental: bool, checkpoint: str | None,
                              manifest: bytes, bytes_transferred: int) -> str:
        """The recovery point's ARN; JobRefused MissingChunks (doc `missing`) when the vault
        lacks chunks the manifest names.

        `manifest` is the manifest's JSON, serialized by the caller (it counts its bytes in
        `bytes_transferred`, the job's final BytesTransferred, and a large one is
        serialized off the event loop): spliced into the body, not parsed again."""
        head = json.dumps({"incremental": incremental, "checkpoint": checkpoint,
                           "bytesTransferred": bytes_transferred}, separators=(",", ":"))
        body = head[:-1].encode() + b',"manifest":' + manifest + b"}"
        _, doc, _, _ = await self._call(
            "POST", f"/gateway/jobs/{job_id}/complete", timeout=COMPLETE_TIMEOUT,
            payload=body)
        arn = doc.get("recoveryPointArn") if isinstance(doc, dict) else None
        return arn if isinstance(arn, str) else ""

    async def failed(self, job_id: str, message: str, aborted: bool) -> None:
        await self._call("POST", f"/gateway/jobs/{job_id}/failed",
                         payload={"message": message[:1000], "aborted": aborted})

    # -- restore ------------------------------------------------------------------------

    async def manifest(self, job_id: str) -> Any:
        _, doc, _, _ = await self._call("GET", f"/gateway/jobs/{job_id}/manifest",
                                        timeout=COMPLETE_TIMEOUT)
        return doc

    async def get_chunk(self, job_id: str, chunk_id: str) -> tuple[str, bytes]:
        """(encoding, encoded bytes) of one chunk the job's manifest names."""
        _, _, headers, raw = await self._call(
            "GET", f"/gateway/jobs/{job_id}/chunks/{chunk_id}", timeout=FETCH_TIMEOUT)
        return headers.get("X-Gateway-Chunk-Encoding", "identity"), raw

    async def complete_restore(self, job_id: str, vm: dict[str, Any]) -> None:
        await self._call("POST", f"/gateway/jobs/{job_id}/complete", payload={"vm": vm},
                         timeout=COMPLETE_TIMEOUT)


# -- what every job shares: its status, its progress reports, its stop, its final report ---

PROGRESS_PERIOD = 2.0   # docs/backups.md: at most every 2 s per job; also the job's lease
COMPLETED, FAILED, ABORTED, STOPPED = "COMPLETED", "FAILED", "ABORTED", "STOPPED"
ABORT_MESSAGE = "stopped by StopBackupJob"


class JobFailure(Exception):
    """A failure of the job itself, its message written for the person reading the job."""


class JobAborted(Exception):
    """The control plane's progress answer said `abort` (StopBackupJob was called)."""


def describe(exc: BaseException) -> str:
    """The one line a failed job reports for `exc`."""
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None)
    if isinstance(exc, JobFailure | LinkDown):
        return str(exc)
    if isinstance(exc, JobRefused):
        return f"the control plane refused a job call: {exc.code}: {exc.message}"
    if code and message:  # a HypervisorError
        return f"{code}: {message}"
    return f"{type(exc).__name__}: {exc}"


async def first_failure(main: Awaitable[T], *helpers: Awaitable[Any]) -> T:
    """`main`'s result, with `helpers` running beside it until it ends; the first exception
    of any of them cancels the others and is raised as itself (not an ExceptionGroup, so a
    job's handlers see JobAborted or a read error directly). Cancelling this cancels all."""
    task = asyncio.ensure_future(main)
    others = [asyncio.ensure_future(h) for h in helpers]
    try:
        pending = {task, *others}
        while True:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            if task.done():
                return task.result()
    finally:
        for t in (task, *others):
            t.cancel()
        await asyncio.gather(task, *others, return_exceptions=True)


async def run_together(*aws: Awaitable[Any]) -> None:
    """Run `aws` until all end; the first failure cancels the others and is raised as
    itself (asyncio.gather would leave them running; a TaskGroup would wrap it)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class LinkedJob:
    """One job run for the control plane: what status shows of it, its periodic progress
    report (the lease, and the abort answer), its stop, and its final report.

    `run` never raises (except when cancelled from outside, which it treats as a quiet
    stop): it returns the outcome. Subclasses do the work in `_work` (blocking calls through
    `in_thread`, on the job's own threads, so four jobs never wait on each other's reads) and
    say in `_end_on_hypervisor` how to let go of what they began, which runs on EVERY path,
    after the job's threads have drained (a read still running must not see its session end).
    """

    type = "JOB"
    threads = 2

    def __init__(self, order: JobOrder, link: JobLink,
                 connect: Callable[[str], Any], *,
                 progress_period: float = PROGRESS_PERIOD) -> None:
        self.order = order
        self.link = link
        self._connect = connect
        self._progress_period = progress_period
        self.connector: Any = None
        self.phase = "starting"
        self.bytes_done = 0
        self.bytes_total = 0
        self.note = ""
        self.started_at = utctime.format_utc()
        self.outcome: str | None = None
        self.message = ""
        self._stop: str | None = None       # "abort" (StopBackupJob) or "quiet"
        self._task: asyncio.Task[Any] | None = None
        self._cancellable = False
        self._done = False                  # the control plane accepted `complete`
        self._completing = False            # `complete` is on its way: its answer decides
        self.reported = False               # the control plane knows how the job ended
        self._pool = ThreadPoolExecutor(self.threads,
                                        thread_name_prefix=f"job-{order.job_id[:12]}")

    # -- for the runner -------------------------------------------------------------------

    @property
    def job_id(self) -> str:
        return self.order.job_id

    @property
    def stopping(self) -> bool:
        return self._stop is not None

    @property
    def ending(self) -> bool:
        """Done with its work (completed, or letting go): a stop changes nothing now."""
        return self._done or self.outcome is not None

    def stop(self, aborted: bool) -> bool:
        """Stop the job: `aborted` (ABORTING: report ABORTED) or quietly (no longer ours).
        False when there was nothing to stop (already stopping so, or ending)."""
        if self._stop == "abort" or self.ending or (self._stop == "quiet" and not aborted):
            return False
        self._stop = "abort" if aborted else "quiet"
        if self._cancellable and self._task is not None and not self._completing:
            self._task.cancel()
        return True

    async def completing(self, call: Awaitable[T]) -> T:
        """Await the job's `complete` call uncancelled. A poll can drop the job from its list
        (COMPLETED there) before this call's answer arrives: cancelling it then would throw
        away a finished job (a libvirt checkpoint, say); its answer decides instead (the
        job done, or a 409 if it is not ours any more)."""
        self._completing = True
        try:
            return await call
        finally:
            self._completing = False

    def percent(self) -> float:
        if self.bytes_total <= 0:
            return 100.0 if self._done else 0.0
        return min(100.0, 100.0 * self.bytes_done / self.bytes_total)

    def view(self) -> dict[str, Any]:
        """The job as `GET /v1/jobs` shows it."""
        order = self.order
        return {
            "jobId": order.job_id, "type": self.type,
            "state": "STOPPING" if self.stopping else "RUNNING",
            "vm": order.vm_name if self.type == "BACKUP" else order.restore_name,
            "phase": self.phase, "bytesDone": self.bytes_done, "bytesTotal": self.bytes_total,
            "percent": round(self.percent(), 1), "startedAt": self.started_at,
            "note": self.note or None,
        }

    async def run(self) -> str:
        """Do the job, let go of what it began, report how it ended; the outcome."""
        self._task = asyncio.current_task()
        failure: str | None = None
        self._cancellable = True
        try:
            if self._stop is None:
                await self._work()
        except asyncio.CancelledError:
            if self._stop is None:  # cancelled from outside (the daemon stopping)
                self._stop = "quiet"
            assert self._task is not None
            self._task.uncancel()
        except JobStopped as exc:
            self._stop = "quiet"
            self.message = f"{exc.code}: {exc}"
        except JobAborted:
            self._stop = "abort"
        except (JobFailure, JobLinkError) as exc:
            failure = describe(exc)
        except Exception as exc:
            if getattr(exc, "code", None) and getattr(exc, "message", None):
                failure = describe(exc)  # a HypervisorError: the user can act on it
            else:
                log.exception("event=job_error job_id=%s", self.job_id)
                failure = f"internal error in the gateway: {describe(exc)}"
        finally:
            self._cancellable = False
        ok = self._done
        self.phase = "cleaning up"
        await self._release(ok)
        if ok:
            self.outcome = COMPLETED
        elif self._stop == "abort":
            self.outcome = ABORTED
            self.message = ABORT_MESSAGE
            await self._report_failed(ABORT_MESSAGE, aborted=True)
        elif self._stop == "quiet" and failure is None:
            self.outcome = STOPPED
        else:
            self.outcome = FAILED
            self.message = failure or "stopped"
            await self._report_failed(self.message, aborted=False)
        self.phase = self.outcome.lower()
        return self.outcome

    # -- for the subclasses -------------------------------------------------------------

    async def _work(self) -> None:
        raise NotImplementedError

    def _end_on_hypervisor(self, ok: bool) -> None:
        """Let go of what the job began on the hypervisor (in a worker thread)."""

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on one of the job's threads."""
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args))

    def open_connector(self) -> Any:
        """The connector for the job's hypervisor (in a worker thread); kept on the job so a
        stop that arrives meanwhile still closes it."""
        self.connector = self._connect(self.order.hypervisor_arn)
        return self.connector

    async def with_progress(self, main: Awaitable[T]) -> T:
        """`main`, reporting progress every period meanwhile (JobAborted on `abort`)."""
        return await first_failure(main, self._report_progress())

    async def _report_progress(self) -> None:
        while True:
            await asyncio.sleep(self._progress_period)
            done, total = self.transferred(), self.bytes_total
            if await self.link.progress(self.job_id, done, total, self.percent(),
                                        self.progress_message()):
                log.info("event=job_abort_requested job_id=%s", self.job_id)
                raise JobAborted()

    def progress_message(self) -> str:
        return self.phase

    def transferred(self) -> int:
        """The progress report's `bytesTransferred`: here the bytes done (a restore's bytes
        written); a backup reports the bytes it sent to the vault (AWS's meaning)."""
        return self.bytes_done

    def mark_done(self) -> None:
        """The control plane accepted `complete`: from here on the job cannot be stopped."""
        self._done = True
        self._cancellable = False
        self.reported = True

    async def _release(self, ok: bool) -> None:
        """Drain the job's threads, then end what it began and close its connector; logs
        and swallows every error (this runs on the failure paths too)."""
        await asyncio.to_thread(self._pool.shutdown, True, cancel_futures=True)
        try:
            await asyncio.to_thread(self._end_on_hypervisor, ok)
        except Exception as exc:
            log.error("event=job_cleanup_failed job_id=%s reason=%s", self.job_id,
                      describe(exc))
        if self.connector is not None:
            try:
                await asyncio.to_thread(self.connector.close)
            except Exception as exc:
                log.warning("event=job_connector_close_failed job_id=%s reason=%s",
                            self.job_id, describe(exc))

    async def _report_failed(self, message: str, aborted: bool) -> None:
        try:
            await self.link.failed(self.job_id, message, aborted)
            self.reported = True
        except JobStopped:
            self.reported = True  # already ended, or no longer ours: nothing to report to
        except JobLinkError as exc:
            log.warning("event=job_report_failed job_id=%s reason=%s", self.job_id, str(exc))


def _said(raw: bytes, headers: CIMultiDict[str]) -> str:
    """': <message>' of a JSON error answer (a 5xx names its cause, e.g. the vault's storage
    backend), bounded and printable, so a job that fails after its retries says why."""
    if not headers.get("Content-Type", "").startswith("application/json"):
        return ""
    try:
        doc = json.loads(raw)
    except ValueError:
        return ""
    message = doc.get("message") if isinstance(doc, dict) else None
    if not isinstance(message, str) or not message:
        return ""
    return ": " + "".join(c if c.isprintable() else "?" for c in message[:300])
