"""Which gateway runs which job, leases, and the lifecycle of recovery points
(docs/backups.md, "Scheduling").

A job may run on a gateway associated with its hypervisor that was heard from within
`seen_window` and holds fewer than `slots` jobs; the least busy one is chosen (ties: the
one given a job least recently), so jobs spread. Jobs are considered in the order they were
created, and a VM has one backup job running at a time (a later one waits: it is then
incremental on the earlier one's point). A job that cannot start keeps a StatusMessage
saying why.

Leases: a RUNNING job's gateway must be heard from (a poll or a job request, both recorded
as the identity's LastSeenTime) every `lease` seconds; otherwise the job goes back to
PENDING for any gateway of the hypervisor, and fails `takeover` seconds after its gateway
was last heard from if none took it. A deleted or disassociated gateway's jobs go back at
once. An ABORTING job whose gateway is gone is ABORTED: nothing is left to stop.

The pass (`run`) is one synchronous transaction on the event loop's thread, run on every
event that can change its outcome (a job created or ended, a gateway polled, associated or
deleted) and by a periodic tick for what only time changes (leases, start windows,
DeleteAfterDays). Being synchronous, the API call that starts a job answers with the job
already RUNNING when a gateway was free, and tests need no sleeps: they move the injected
clock and call `run` or `tick`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections import defaultdict
from dataclasses import dataclass

from controlplane.backupstore import BACKUP, BackupStore, Point, Tx
from controlplane.clock import Clock
from controlplane.vaults import Vaults
from gatewaycore.utctime import format_utc

log = logging.getLogger("controlplane.jobs")

SLOTS_PER_GATEWAY = 4
SEEN_WINDOW_SECONDS = 60.0
LEASE_SECONDS = 60.0
TAKEOVER_SECONDS = 15 * 60.0
TICK_SECONDS = 5.0


@dataclass(frozen=True)
class JobTimings:
    """The scheduler's limits and durations; tests shorten them."""

    slots: int = SLOTS_PER_GATEWAY        # jobs one gateway runs at once
    seen_window: float = SEEN_WINDOW_SECONDS  # a gateway this recently heard from may take jobs
    lease: float = LEASE_SECONDS          # a RUNNING job's gateway must be heard from so often
    takeover: float = TAKEOVER_SECONDS    # how long a job waits for a gateway after a lease
    tick: float = TICK_SECONDS            # how often time-driven changes are looked for


@dataclass
class _Gateway:
    gateway_id: str
    arn: str
    seq: int
    last_seen: float | None


class JobScheduler:
    """Assigns PENDING jobs, expires leases and recovery points; `kick` asks for a pass
    soon (from any thread), `run` makes one now (on the loop's thread)."""

    def __init__(self, backups: BackupStore, vaults: Vaults, clock: Clock,
                 timings: JobTimings | None = None) -> None:
        self.backups = backups
        self.vaults = vaults
        self.clock = clock
        self.timings = timings = timings or JobTimings()
        self.slots = timings.slots
        self.seen_window = timings.seen_window
        self.lease = timings.lease
        self.takeover = timings.takeover
        # storage -> job id -> chunks that job PUT: kept by reclaim while the job may still
        # commit them (lost at a restart; a complete then reports MissingChunks, and the
        # gateway sends them again).
        self._puts: dict[str, dict[str, set[str]]] = defaultdict(dict)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    # -- the pass -------------------------------------------------------------------------

    def run(self) -> None:
        """Leases, waits that ran out, then assignments: one transaction."""
        now = self.clock.now()
        with self.backups.transaction() as tx:
            self._expire_leases(tx, now)
            self._expire_waits(tx, now)
            self._assign(tx, now)

    def polled(self, gateway_id: str | None) -> None:
        """A gateway polled (its LastSeenTime is now): it may take PENDING jobs."""
        if gateway_id and self.backups.store.connection.execute(
            "SELECT 1 FROM backup_jobs WHERE state='PENDING' LIMIT 1"
        ).fetchone():
            self.run()

    def _gateways(self, db: sqlite3.Connection, hypervisor_id: str) -> list[_Gateway]:
        return [
            _Gateway(str(r[0]), str(r[1]), int(r[2]), r[3]) for r in db.execute(
                "SELECT g.gateway_id, g.arn, g.seq, i.last_seen FROM gateways g JOIN identities"
                " i ON i.key_id=g.key_id WHERE g.hypervisor_id=? AND g.deleted_at IS NULL AND"
                " i.deleted=0 ORDER BY g.seq", (hypervisor_id,),
            )
        ]

    def _hypervisor_arn(self, db: sqlite3.Connection, hypervisor_id: str) -> str:
        row = db.execute("SELECT arn FROM hypervisors WHERE hypervisor_id=?",
                         (hypervisor_id,)).fetchone()
        return str(row[0]) if row else hypervisor_id

    def _expire_leases(self, tx: Tx, now: float) -> None:
        db = tx.db
        rows = db.execute(
            "SELECT j.job_id, j.state, j.gateway_id, j.assigned_at, j.hypervisor_id,"
            " g.arn, g.deleted_at, g.hypervisor_id, i.last_seen, i.deleted FROM backup_jobs j"
            " LEFT JOIN gateways g ON g.gateway_id=j.gateway_id LEFT JOIN identities i ON"
            " i.key_id=g.key_id WHERE j.state IN ('RUNNING','ABORTING')"
        ).fetchall()
        for (job_id, state, gateway_id, assigned_at, hypervisor_id, arn, deleted_at,
             gw_hypervisor, last_seen, identity_deleted) in rows:
            heard = max(last_seen or 0.0, assigned_at or 0.0)
            name = arn or gateway_id
            if arn is None or deleted_at is not None or identity_deleted:
                reason, since = f"gateway {name} was deleted at {format_utc(now)}", now
            elif gw_hypervisor != hypervisor_id:
                reason = f"gateway {name} was disassociated from the hypervisor"
                since = now
            elif heard < now - self.lease:
                reason, since = f"gateway {name} stopped reporting at {format_utc(heard)}", heard
            else:
                continue
            hypervisor = self._hypervisor_arn(db, hypervisor_id)
            if state == "ABORTING":
                db.execute(
                    "UPDATE backup_jobs SET state='ABORTED', completed_at=?, status_message=?"
                    " WHERE job_id=?", (now, f"stopped: {reason}", job_id))
                self.forget(job_id)
                log.info("event=job_aborted job=%s reason=lease", job_id)
            else:
                until = format_utc(since + self.takeover)
                db.execute(
                    "UPDATE backup_jobs SET state='PENDING', orphaned_at=?, status_message=?"
                    " WHERE job_id=?",
                    (since, f"{reason}; waiting for it or another gateway of {hypervisor}, "
                            f"until {until}", job_id))
                log.info("event=job_lease_lost job=%s gateway=%s until=%s", job_id, name, until)
            tx.bump(str(gateway_id))

    def _expire_waits(self, tx: Tx, now: float) -> None:
        """PENDING jobs whose gateway was lost `takeover` ago: FAILED; never-started ones
        past their StartWindowMinutes: EXPIRED."""
        db = tx.db
        rows = db.execute(
            "SELECT j.job_id, j.orphaned_at, j.start_by, j.hypervisor_id, g.arn,"
            " j.status_message FROM backup_jobs j LEFT JOIN gateways g ON"
            " g.gateway_id=j.gateway_id WHERE j.state='PENDING' AND ((j.orphaned_at IS NOT"
            " NULL AND j.orphaned_at<=?) OR (j.start_by IS NOT NULL AND j.start_by<=? AND"
            " j.started_at IS NULL))",
            (now - self.takeover, now),
        ).fetchall()
        for job_id, orphaned_at, start_by, hypervisor_id, arn, message in rows:
            hypervisor = self._hypervisor_arn(db, hypervisor_id)
            if orphaned_at is not None and orphaned_at <= now - self.takeover:
                state = "FAILED"
                text = (f"gateway {arn} stopped reporting at {format_utc(orphaned_at)}; no "
                        f"gateway of {hypervisor} took the job over by "
                        f"{format_utc(orphaned_at + self.takeover)}")
            else:
                state = "EXPIRED"
                text = (f"not started by {format_utc(start_by)} (StartWindowMinutes): "
                        f"{message or 'no gateway was free'}")
            db.execute("UPDATE backup_jobs SET state=?, completed_at=?, status_message=?"
                       " WHERE job_id=?", (state, now, text, job_id))
            self.forget(job_id)
            log.info("event=job_%s job=%s", state.lower(), job_id)

    def _assign(self, tx: Tx, now: float) -> None:
        db = tx.db
        pending = db.execute(
            "SELECT job_id, job_type, hypervisor_id, resource_arn, status_message, vault_name,"
            " region, orphaned_at FROM backup_jobs WHERE state='PENDING' ORDER BY seq"
        ).fetchall()
        if not pending:
            return
        load: dict[str, int] = defaultdict(int)
        busy_vms: dict[str, str] = {}
        for gateway_id, job_id, job_type, resource_arn in db.execute(
            "SELECT gateway_id, job_id, job_type, resource_arn FROM backup_jobs WHERE state IN"
            " ('RUNNING','ABORTING') ORDER BY seq"
        ):
            load[gateway_id] += 1
            if job_type == BACKUP:
                busy_vms.setdefault(resource_arn, job_id)
        given: dict[str, tuple[float, int]] = {
            str(r[0]): (float(r[1]), 0) for r in db.execute(
                "SELECT gateway_id, MAX(assigned_at) FROM job_runs GROUP BY gateway_id")
        }
        gateways: dict[str, list[_Gateway]] = {}
        order = 0
        for (job_id, job_type, hypervisor_id, resource_arn, message, vault_name, region,
             orphaned_at) in pending:
            say = self._say if orphaned_at is None else self._keep_lease_message
            if hypervisor_id not in gateways:
                gateways[hypervisor_id] = self._gateways(db, hypervisor_id)
            if job_type == BACKUP and resource_arn in busy_vms:
                say(db, job_id, message,
                          f"waiting for backup job {busy_vms[resource_arn]} of the same VM")
                continue
            if job_type == BACKUP:
                busy_vms[resource_arn] = job_id  # later jobs of this VM wait behind this one
            hypervisor = self._hypervisor_arn(db, hypervisor_id)
            candidates = gateways[hypervisor_id]
            fresh = [g for g in candidates
                     if g.last_seen is not None and g.last_seen >= now - self.seen_window]
            free = [g for g in fresh if load[g.gateway_id] < self.slots]
            if not candidates:
                say(db, job_id, message, f"no gateway is associated with hypervisor "
                                               f"{hypervisor}")
                continue
            if not fresh:
                say(db, job_id, message,
                          f"no gateway associated with hypervisor {hypervisor} has been seen "
                          f"in {self.seen_window:g} s")
                continue
            if not free:
                running = sum(load[g.gateway_id] for g in fresh)
                say(db, job_id, message,
                          f"waiting for a free slot: {len(fresh)} gateway(s) on hypervisor "
                          f"{hypervisor} run {running} of {self.slots * len(fresh)} jobs")
                continue
            pick = min(free, key=lambda g: (load[g.gateway_id],
                                            given.get(g.gateway_id, (float("-inf"), 0)), g.seq))
            base_arn = base_checkpoint = None
            if job_type == BACKUP:
                base = self.backups.latest_point(resource_arn, vault_name, region)
                if base is not None and base.checkpoint:
                    base_arn, base_checkpoint = base.arn, base.checkpoint
            db.execute(
                "UPDATE backup_jobs SET state='RUNNING', gateway_id=?, assigned_at=?,"
                " started_at=COALESCE(started_at, ?), orphaned_at=NULL, status_message=?,"
                " base_point_arn=?, base_checkpoint=? WHERE job_id=?",
                (pick.gateway_id, now, now, f"running on gateway {pick.arn}", base_arn,
                 base_checkpoint, job_id),
            )
            db.execute("INSERT OR REPLACE INTO job_runs (job_id, gateway_id, assigned_at)"
                       " VALUES (?, ?, ?)", (job_id, pick.gateway_id, now))
            load[pick.gateway_id] += 1
            order += 1
            given[pick.gateway_id] = (now, order)
            tx.bump(pick.gateway_id)
            log.info("event=job_assigned job=%s type=%s gateway=%s base=%s", job_id, job_type,
                     pick.arn, base_arn)

    @staticmethod
    def _say(db: sqlite3.Connection, job_id: str, current: str | None, message: str) -> None:
        """A PENDING job's StatusMessage, written only when it changes."""
        if current != message:
            db.execute("UPDATE backup_jobs SET status_message=? WHERE job_id=?",
                       (message, job_id))

    @staticmethod
    def _keep_lease_message(db: sqlite3.Connection, job_id: str, current: str | None,
                            message: str) -> None:
        """A job waiting after a lost lease keeps saying so (whose gateway, until when)."""

    # -- chunks kept from reclaim ---------------------------------------------------------

    def note_put(self, storage: str, job_id: str, chunk_id: str) -> None:
        """Before a job's chunk is put: reclaim keeps it until the job ends."""
        self._puts[storage].setdefault(job_id, set()).add(chunk_id)

    def forget(self, job_id: str) -> None:
        """A job ended: its uncommitted chunks are no longer kept."""
        for jobs in self._puts.values():
            jobs.pop(job_id, None)

    def _keep(self, storage: str) -> set[str]:
        out: set[str] = set()
        for chunks in self._puts.get(storage, {}).values():
            out |= chunks
        return out

    # -- recovery point lifecycle ---------------------------------------------------------

    async def delete_point(self, point: Point) -> tuple[int, int]:
        """DeleteRecoveryPoint and DeleteAfterDays: DELETING (refused while a job reads it),
        the manifest removed, the row removed, then the chunks no point references
        reclaimed. Each step is durable before the next, so a crash leaves a DELETING row
        that `resume_deletes` finishes."""
        self.backups.mark_deleting(point.arn)
        return await self._finish_delete(point)

    async def _finish_delete(self, point: Point) -> tuple[int, int]:
        await asyncio.to_thread(self.vaults.delete_point, point.storage, point.point_id)
        self.backups.drop_point(point.arn)
        deleted, freed = await asyncio.to_thread(self.vaults.reclaim, point.storage,
                                                 self._keep(point.storage))
        log.info("event=recovery_point_deleted arn=%s chunks_reclaimed=%d bytes_freed=%d",
                 point.arn, deleted, freed)
        return deleted, freed

    async def resume_deletes(self) -> None:
        """At start-up: finish the deletes a crash interrupted."""
        for point in self.backups.deleting_points():
            await self._finish_delete(point)

    async def expire_points(self) -> int:
        """Delete the points past their DeleteAfterDays (those a job reads wait for it)."""
        done = 0
        for point in self.backups.expired_points(self.clock.now()):
            users = self.backups.point_users(point.arn)
            if users:
                log.info("event=recovery_point_expiry_deferred arn=%s jobs=%s", point.arn,
                         ",".join(users))
                continue
            await self.delete_point(point)
            done += 1
        return done

    # -- the periodic task ----------------------------------------------------------------

    async def tick(self) -> None:
        """What only time changes: leases, waits, start windows, DeleteAfterDays."""
        self.run()
        await self.expire_points()

    def kick(self) -> None:
        """Something changed (an association, a gateway deleted): a pass on the loop as soon
        as it is free, after the change's own request. Safe from any thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._run_safely)

    def _run_safely(self) -> None:
        try:
            self.run()
        except Exception:  # one bad pass must not end scheduling for good
            log.exception("event=scheduler_failed")

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._serve())

    async def stop(self) -> None:
        self._loop = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _serve(self) -> None:
        """The periodic tick: time alone ends leases and recovery points."""
        while True:
            await asyncio.sleep(self.timings.tick)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event=scheduler_failed")
