"""The AWS Backup state: vaults, jobs and recovery points, in the control plane's SQLite file.

Why the same file as store.py (through Store.connection and Store.transaction): a backup
completing must make the recovery point COMPLETED, the job COMPLETED and the VM's
LastBackupDate (a column of store.py's `vms`) change in one transaction, and a job given to
a gateway must bump that gateway's poll version (store.py's `identities`) in the same
transaction that assigns it. One file, one writer, so each of these is all-or-nothing.

Tables:
- `backup_vaults`: one row per vault; `storage` is the key its bytes are kept under in
  vaults.py (random per vault: a vault deleted and created again starts empty, and names
  are per region while storage is not).
- `backup_jobs`: backup AND restore jobs (`job_type`), because the scheduler treats both
  alike (a slot on a gateway of a hypervisor). A backup job knows the recovery point it
  will make (`recovery_point_arn`, given out by StartBackupJob) before it exists.
- `job_runs`: every assignment of a job to a gateway, so a gateway that once held a job
  learns it was taken over (409 NotAssigned) rather than that it never existed (404), and
  the scheduler knows which gateway was given a job least recently.
- `recovery_points`: COMPLETED points (a row exists only once its manifest is durable in
  the vault) and points being deleted (DELETING: the row goes after the manifest).
  Protected resources are derived from them.

Nothing here knows HTTP, the API's shapes or the vault's files; every public method is one
transaction (or one read) and must be called on the event loop's thread, like Store's.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from controlplane.store import Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS backup_vaults (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    region TEXT NOT NULL,
    name TEXT NOT NULL,
    arn TEXT NOT NULL UNIQUE,
    storage TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    creator_request_id TEXT,
    encryption_key_arn TEXT,
    tags TEXT NOT NULL DEFAULT '{}',
    UNIQUE (region, name)
);
CREATE TABLE IF NOT EXISTS backup_jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    job_type TEXT NOT NULL,
    region TEXT NOT NULL,
    state TEXT NOT NULL,
    status_message TEXT,
    vault_name TEXT NOT NULL,
    vault_arn TEXT NOT NULL,
    storage TEXT NOT NULL,
    resource_arn TEXT NOT NULL,
    resource_name TEXT,
    hypervisor_id TEXT NOT NULL,
    vm_uuid TEXT,
    iam_role_arn TEXT,
    idempotency_token TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    bytes_transferred INTEGER NOT NULL DEFAULT 0,
    backup_size INTEGER NOT NULL DEFAULT 0,
    percent_done REAL NOT NULL DEFAULT 0,
    recovery_point_arn TEXT NOT NULL,
    point_id TEXT NOT NULL,
    delete_after_days INTEGER,
    start_by REAL,
    tags TEXT NOT NULL DEFAULT '{}',
    backup_type TEXT,
    base_point_arn TEXT,
    base_checkpoint TEXT,
    gateway_id TEXT,
    assigned_at REAL,
    orphaned_at REAL,
    restore_name TEXT,
    restore_options TEXT,
    created_resource_arn TEXT
);
CREATE TABLE IF NOT EXISTS job_runs (
    job_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    assigned_at REAL NOT NULL,
    PRIMARY KEY (job_id, gateway_id)
);
CREATE TABLE IF NOT EXISTS recovery_points (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    arn TEXT NOT NULL UNIQUE,
    point_id TEXT NOT NULL,
    region TEXT NOT NULL,
    vault_name TEXT NOT NULL,
    vault_arn TEXT NOT NULL,
    storage TEXT NOT NULL,
    status TEXT NOT NULL,
    resource_arn TEXT NOT NULL,
    resource_name TEXT,
    hypervisor_id TEXT NOT NULL,
    hypervisor_arn TEXT NOT NULL,
    hypervisor_kind TEXT NOT NULL,
    vm_uuid TEXT NOT NULL,
    job_id TEXT NOT NULL,
    iam_role_arn TEXT,
    created_at REAL NOT NULL,
    completed_at REAL NOT NULL,
    backup_size INTEGER NOT NULL,
    delete_after_days INTEGER,
    delete_at REAL,
    checkpoint TEXT,
    incremental INTEGER NOT NULL DEFAULT 0,
    restore_defaults TEXT NOT NULL DEFAULT '{}',
    last_restore REAL
);
CREATE INDEX IF NOT EXISTS backup_vaults_region ON backup_vaults (region, seq);
CREATE INDEX IF NOT EXISTS backup_jobs_state ON backup_jobs (state, seq);
CREATE INDEX IF NOT EXISTS backup_jobs_list ON backup_jobs (region, job_type, seq);
CREATE INDEX IF NOT EXISTS backup_jobs_gateway ON backup_jobs (gateway_id)
    WHERE state IN ('RUNNING', 'ABORTING');
CREATE UNIQUE INDEX IF NOT EXISTS backup_jobs_token
    ON backup_jobs (region, job_type, idempotency_token) WHERE idempotency_token IS NOT NULL;
CREATE INDEX IF NOT EXISTS job_runs_gateway ON job_runs (gateway_id, assigned_at);
CREATE INDEX IF NOT EXISTS recovery_points_vault ON recovery_points (region, vault_name, seq);
CREATE INDEX IF NOT EXISTS recovery_points_resource ON recovery_points (resource_arn, completed_at);
CREATE INDEX IF NOT EXISTS recovery_points_expiry ON recovery_points (delete_at)
    WHERE delete_at IS NOT NULL;
"""

BACKUP = "BACKUP"
RESTORE = "RESTORE"
ACTIVE = ("RUNNING", "ABORTING")          # held by a gateway
OPEN = ("CREATED", "PENDING", "RUNNING", "ABORTING")
ENDED = ("ABORTED", "COMPLETED", "FAILED", "EXPIRED")
COMPLETED = "COMPLETED"
DELETING = "DELETING"


class BackupStoreError(Exception):
    """A change the state does not allow: `reason` a machine word, `message` for humans."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Vault:
    seq: int
    region: str
    name: str
    arn: str
    storage: str
    created_at: float
    creator_request_id: str | None
    encryption_key_arn: str | None
    tags: dict[str, str]


@dataclass(frozen=True)
class Job:
    """A backup or restore job. `gateway_id` is the gateway it runs on while ACTIVE (the
    last one it ran on otherwise); `orphaned_at` is when that gateway was last heard from,
    set while the job waits for another one after losing its lease."""

    seq: int
    job_id: str
    job_type: str
    region: str
    state: str
    status_message: str | None
    vault_name: str
    vault_arn: str
    storage: str
    resource_arn: str
    resource_name: str | None
    hypervisor_id: str
    vm_uuid: str | None
    iam_role_arn: str | None
    idempotency_token: str | None
    created_at: float
    started_at: float | None
    completed_at: float | None
    bytes_transferred: int
    backup_size: int
    percent_done: float
    recovery_point_arn: str
    point_id: str
    delete_after_days: int | None
    start_by: float | None
    tags: dict[str, str]
    backup_type: str | None
    base_point_arn: str | None
    base_checkpoint: str | None
    gateway_id: str | None
    assigned_at: float | None
    orphaned_at: float | None
    restore_name: str | None
    restore_options: dict[str, str] | None
    created_resource_arn: str | None


@dataclass(frozen=True)
class Point:
    seq: int
    arn: str
    point_id: str
    region: str
    vault_name: str
    vault_arn: str
    storage: str
    status: str
    resource_arn: str
    resource_name: str | None
    hypervisor_id: str
    hypervisor_arn: str
    hypervisor_kind: str
    vm_uuid: str
    job_id: str
    iam_role_arn: str | None
    created_at: float
    completed_at: float
    backup_size: int
    delete_after_days: int | None
    delete_at: float | None
    checkpoint: str | None
    incremental: bool
    restore_defaults: dict[str, str]
    last_restore: float | None


@dataclass(frozen=True)
class NewPoint:
    """What a completed backup adds (the rest comes from its job)."""

    hypervisor_arn: str
    hypervisor_kind: str
    backup_size: int
    checkpoint: str | None
    incremental: bool
    restore_defaults: dict[str, str]


_VAULT_COLS = ("seq, region, name, arn, storage, created_at, creator_request_id,"
               " encryption_key_arn, tags")
_JOB_COLS = (
    "seq, job_id, job_type, region, state, status_message, vault_name, vault_arn, storage,"
    " resource_arn, resource_name, hypervisor_id, vm_uuid, iam_role_arn, idempotency_token,"
    " created_at, started_at, completed_at, bytes_transferred, backup_size, percent_done,"
    " recovery_point_arn, point_id, delete_after_days, start_by, tags, backup_type,"
    " base_point_arn, base_checkpoint, gateway_id, assigned_at, orphaned_at, restore_name,"
    " restore_options, created_resource_arn"
)
_POINT_COLS = (
    "seq, arn, point_id, region, vault_name, vault_arn, storage, status, resource_arn,"
    " resource_name, hypervisor_id, hypervisor_arn, hypervisor_kind, vm_uuid, job_id,"
    " iam_role_arn, created_at, completed_at, backup_size, delete_after_days, delete_at,"
    " checkpoint, incremental, restore_defaults, last_restore"
)


def _vault(row: tuple[Any, ...]) -> Vault:
    return Vault(*row[:8], tags=json.loads(row[8]))


def _job(row: tuple[Any, ...]) -> Job:
    values = list(row)
    values[25] = json.loads(values[25])
    values[33] = json.loads(values[33]) if values[33] is not None else None
    return Job(*values)


def _point(row: tuple[Any, ...]) -> Point:
    values = list(row)
    values[22] = bool(values[22])
    values[23] = json.loads(values[23])
    return Point(*values)


@dataclass(frozen=True)
class JobFilter:
    """The filters of ListBackupJobs / ListRestoreJobs (None: not filtered)."""

    resource_arn: str | None = None
    state: str | None = None
    vault_name: str | None = None
    created_before: float | None = None
    created_after: float | None = None
    complete_before: float | None = None
    complete_after: float | None = None


@dataclass(frozen=True)
class PointFilter:
    resource_arn: str | None = None
    created_before: float | None = None
    created_after: float | None = None


@dataclass(frozen=True)
class Protected:
    """A VM with at least one COMPLETED point: its newest."""

    resource_arn: str
    resource_name: str | None
    last_backup: float
    vault_arn: str
    point_arn: str


@dataclass
class Tx:
    """A write transaction that may change gateways' job lists: `bump` bumps a gateway's
    poll version in it, and its poll is woken once the transaction is durable."""

    db: sqlite3.Connection
    woken: list[str] = field(default_factory=list)

    def bump(self, gateway_id: str) -> None:
        key_id = bump_gateway(self.db, gateway_id)
        if key_id is not None:
            self.woken.append(key_id)


class BackupStore:
    """The backup tables over a Store's connection; `notify(key_id)` wakes a gateway's
    long-poll (PollHub.notify) after a transaction that changed its job list."""

    def __init__(self, store: Store, notify: Callable[[str], None] = lambda key_id: None
                 ) -> None:
        self.store = store
        self.notify = notify
        self._db = store.connection
        self._db.executescript(SCHEMA)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        """One write transaction; the polls it bumped are woken after COMMIT (a poll woken
        earlier could read the state before the change)."""
        tx = Tx(self.store.connection)
        with self.store.transaction():
            yield tx
        for key_id in dict.fromkeys(tx.woken):
            self.notify(key_id)

    # -- vaults ---------------------------------------------------------------------------

    def create_vault(self, region: str, name: str, arn: str, storage: str, now: float,
                     creator_request_id: str | None, encryption_key_arn: str | None,
                     tags: dict[str, str]) -> Vault:
        """BackupStoreError("Exists") when the region has a vault of that name."""
        with self.store.transaction() as db:
            if db.execute("SELECT 1 FROM backup_vaults WHERE region=? AND name=?",
                          (region, name)).fetchone():
                raise BackupStoreError("Exists", f"Backup vault {name} already exists")
            db.execute(
                "INSERT INTO backup_vaults (region, name, arn, storage, created_at,"
                " creator_request_id, encryption_key_arn, tags) VALUES (?,?,?,?,?,?,?,?)",
                (region, name, arn, storage, now, creator_request_id, encryption_key_arn,
                 json.dumps(tags)),
            )
            row = db.execute(f"SELECT {_VAULT_COLS} FROM backup_vaults WHERE arn=?",
                             (arn,)).fetchone()
            return _vault(row)

    def vault(self, region: str, name: str) -> Vault | None:
        row = self._db.execute(
            f"SELECT {_VAULT_COLS} FROM backup_vaults WHERE region=? AND name=?", (region, name)
        ).fetchone()
        return _vault(row) if row else None

    def list_vaults(self, region: str, after_seq: int, limit: int) -> list[Vault]:
        rows = self._db.execute(
            f"SELECT {_VAULT_COLS} FROM backup_vaults WHERE region=? AND seq>? ORDER BY seq"
            " LIMIT ?", (region, after_seq, limit),
        ).fetchall()
        return [_vault(r) for r in rows]

    def point_count(self, region: str, vault_name: str) -> int:
        """Recovery points the vault holds (those being deleted included)."""
        return int(self._db.execute(
            "SELECT COUNT(*) FROM recovery_points WHERE region=? AND vault_name=?",
            (region, vault_name),
        ).fetchone()[0])

    def delete_vault(self, region: str, name: str) -> Vault:
        """Remove an empty vault's row; BackupStoreError("NotEmpty") naming what it holds
        (points, or jobs that will write into it) otherwise, in the same transaction."""
        with self.store.transaction() as db:
            row = db.execute(f"SELECT {_VAULT_COLS} FROM backup_vaults WHERE region=? AND"
                             " name=?", (region, name)).fetchone()
            if row is None:
                raise BackupStoreError("NoVault", f"Backup vault {name} was not found")
            points = int(db.execute(
                "SELECT COUNT(*) FROM recovery_points WHERE region=? AND vault_name=?",
                (region, name)).fetchone()[0])
            if points:
                raise BackupStoreError(
                    "NotEmpty", f"Backup vault {name} holds {points} recovery point(s); "
                    "delete them first (DeleteRecoveryPoint)")
            jobs = [str(r[0]) for r in db.execute(
                "SELECT job_id FROM backup_jobs WHERE region=? AND vault_name=? AND state IN"
                " ('CREATED','PENDING','RUNNING','ABORTING') ORDER BY seq",
                (region, name))]
            if jobs:
                raise BackupStoreError(
                    "NotEmpty", f"Backup vault {name} has {len(jobs)} job(s) not ended "
                    f"({', '.join(jobs[:5])}); stop them or wait for them to end")
            db.execute("DELETE FROM backup_vaults WHERE region=? AND name=?", (region, name))
            return _vault(row)

    # -- jobs -----------------------------------------------------------------------------

    def job_by_token(self, region: str, job_type: str, token: str) -> Job | None:
        row = self._db.execute(
            f"SELECT {_JOB_COLS} FROM backup_jobs WHERE region=? AND job_type=? AND"
            " idempotency_token=?", (region, job_type, token),
        ).fetchone()
        return _job(row) if row else None

    def insert_job(self, fields: dict[str, Any]) -> Job:
        """A new job (PENDING), or the job of the same idempotency token if there is one."""
        fields = dict(fields)
        for key in ("tags", "restore_options"):
            if key in fields and fields[key] is not None:
                fields[key] = json.dumps(fields[key])
        columns = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        with self.store.transaction() as db:
            token = fields.get("idempotency_token")
            if token is not None:
                row = db.execute(
                    f"SELECT {_JOB_COLS} FROM backup_jobs WHERE region=? AND job_type=? AND"
                    " idempotency_token=?", (fields["region"], fields["job_type"], token),
                ).fetchone()
                if row:
                    return _job(row)
            db.execute(f"INSERT INTO backup_jobs ({columns}) VALUES ({marks})",
                       tuple(fields.values()))
            row = db.execute(f"SELECT {_JOB_COLS} FROM backup_jobs WHERE job_id=?",
                             (fields["job_id"],)).fetchone()
            return _job(row)

    def job(self, job_id: str) -> Job | None:
        row = self._db.execute(f"SELECT {_JOB_COLS} FROM backup_jobs WHERE job_id=?",
                               (job_id,)).fetchone()
        return _job(row) if row else None

    def list_jobs(self, region: str, job_type: str, filters: JobFilter, after_seq: int,
                  limit: int) -> list[Job]:
        where = ["region=?", "job_type=?", "seq>?"]
        args: list[Any] = [region, job_type, after_seq]
        _add_filters(where, args, (
            ("resource_arn", "=", filters.resource_arn),
            ("state", "=", filters.state),
            ("vault_name", "=", filters.vault_name),
            ("created_at", "<", filters.created_before),
            ("created_at", ">", filters.created_after),
            ("completed_at", "<", filters.complete_before),
            ("completed_at", ">", filters.complete_after),
        ))
        rows = self._db.execute(
            f"SELECT {_JOB_COLS} FROM backup_jobs WHERE {' AND '.join(where)} ORDER BY seq"
            " LIMIT ?", (*args, limit),
        ).fetchall()
        return [_job(r) for r in rows]

    def jobs_in_states(self, states: Iterable[str]) -> list[Job]:
        states = tuple(states)
        marks = ", ".join("?" for _ in states)
        rows = self._db.execute(
            f"SELECT {_JOB_COLS} FROM backup_jobs WHERE state IN ({marks}) ORDER BY seq",
            states,
        ).fetchall()
        return [_job(r) for r in rows]

    def jobs_of_gateway(self, gateway_id: str) -> list[Job]:
        """The jobs a gateway holds now (RUNNING or ABORTING), oldest first."""
        rows = self._db.execute(
            f"SELECT {_JOB_COLS} FROM backup_jobs WHERE gateway_id=? AND state IN"
            " ('RUNNING','ABORTING') ORDER BY seq", (gateway_id,),
        ).fetchall()
        return [_job(r) for r in rows]

    def ran_on(self, job_id: str, gateway_id: str) -> bool:
        """Whether the job was ever given to this gateway."""
        return self._db.execute("SELECT 1 FROM job_runs WHERE job_id=? AND gateway_id=?",
                                (job_id, gateway_id)).fetchone() is not None

    def update_job(self, job_id: str, expect_states: tuple[str, ...],
                   gateway_id: str | None = None, **changes: Any) -> Job | None:
        """Set columns of a job that is in one of `expect_states` (and, with `gateway_id`,
        held by that gateway); None when it is not (it changed meanwhile). Bumps the poll
        version of the gateway holding it when its state changes."""
        if not changes:
            return self.job(job_id)
        for key in ("tags", "restore_options"):
            if key in changes and changes[key] is not None:
                changes[key] = json.dumps(changes[key])
        sets = ", ".join(f"{c}=?" for c in changes)
        marks = ", ".join("?" for _ in expect_states)
        where = f"job_id=? AND state IN ({marks})"
        args: list[Any] = [job_id, *expect_states]
        if gateway_id is not None:
            where += " AND gateway_id=?"
            args.append(gateway_id)
        with self.transaction() as tx:
            db = tx.db
            before = db.execute(f"SELECT gateway_id, state FROM backup_jobs WHERE {where}",
                                args).fetchone()
            if before is None:
                return None
            db.execute(f"UPDATE backup_jobs SET {sets} WHERE job_id=?",
                       (*changes.values(), job_id))
            if "state" in changes and before[0] and before[1] in ACTIVE:
                tx.bump(str(before[0]))
            row = db.execute(f"SELECT {_JOB_COLS} FROM backup_jobs WHERE job_id=?",
                             (job_id,)).fetchone()
            return _job(row)

    def complete_backup(self, job_id: str, gateway_id: str, point: NewPoint, now: float
                        ) -> Job | None:
        """The point COMPLETED, the job COMPLETED and the VM's LastBackupDate, at once;
        None when the job is no longer held by this gateway."""
        with self.transaction() as tx:
            db = tx.db
            row = db.execute(
                f"SELECT {_JOB_COLS} FROM backup_jobs WHERE job_id=? AND gateway_id=? AND"
                " state IN ('RUNNING','ABORTING')", (job_id, gateway_id),
            ).fetchone()
            if row is None:
                return None
            job = _job(row)
            # AWS counts DeleteAfterDays from the point's creation (the job's start).
            delete_at = (job.created_at + job.delete_after_days * 86400.0
                         if job.delete_after_days is not None else None)
            db.execute(
                f"INSERT INTO recovery_points ({_POINT_COLS.replace('seq, ', '', 1)}) VALUES"
                " (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (job.recovery_point_arn, job.point_id, job.region, job.vault_name,
                 job.vault_arn, job.storage, COMPLETED, job.resource_arn, job.resource_name,
                 job.hypervisor_id, point.hypervisor_arn, point.hypervisor_kind,
                 job.vm_uuid or "", job.job_id, job.iam_role_arn, job.created_at, now,
                 point.backup_size, job.delete_after_days, delete_at, point.checkpoint,
                 int(point.incremental), json.dumps(point.restore_defaults), None),
            )
            db.execute(
                "UPDATE backup_jobs SET state='COMPLETED', completed_at=?, percent_done=100,"
                " backup_size=?, backup_type=?, status_message=?, orphaned_at=NULL"
                " WHERE job_id=?",
                (now, point.backup_size, "INCREMENTAL" if point.incremental else "FULL",
                 f"{'incremental' if point.incremental else 'full'} backup completed on "
                 f"gateway {gateway_id}", job_id),
            )
            refresh_last_backup(db, job.resource_arn)
            tx.bump(gateway_id)
            row = db.execute(f"SELECT {_JOB_COLS} FROM backup_jobs WHERE job_id=?",
                             (job_id,)).fetchone()
            return _job(row)

    def complete_restore(self, job_id: str, gateway_id: str, vm: dict[str, Any],
                         vm_arn: str, region: str, now: float) -> Job | None:
        """The restore COMPLETED and the new VM in its hypervisor's inventory, at once."""
        with self.transaction() as tx:
            db = tx.db
            row = db.execute(
                f"SELECT {_JOB_COLS} FROM backup_jobs WHERE job_id=? AND gateway_id=? AND"
                " state IN ('RUNNING','ABORTING')", (job_id, gateway_id),
            ).fetchone()
            if row is None:
                return None
            job = _job(row)
            db.execute(
                "INSERT INTO vms (arn, hypervisor_id, region, uuid, name, path, host_name,"
                " tags) VALUES (?, ?, ?, ?, ?, ?, ?, '[]') ON CONFLICT(arn) DO UPDATE SET"
                " name=excluded.name, path=excluded.path, host_name=excluded.host_name",
                (vm_arn, job.hypervisor_id, region, vm["uuid"], vm["name"], vm["path"],
                 vm.get("hostName")),
            )
            db.execute(
                "UPDATE backup_jobs SET state='COMPLETED', completed_at=?, percent_done=100,"
                " created_resource_arn=?, status_message=?, orphaned_at=NULL WHERE job_id=?",
                (now, vm_arn, f"restored as {vm['name']} by gateway {gateway_id}", job_id),
            )
            db.execute("UPDATE recovery_points SET last_restore=? WHERE arn=?",
                       (now, job.recovery_point_arn))
            tx.bump(gateway_id)
            row = db.execute(f"SELECT {_JOB_COLS} FROM backup_jobs WHERE job_id=?",
                             (job_id,)).fetchone()
            return _job(row)

    # -- recovery points ------------------------------------------------------------------

    def point(self, arn: str) -> Point | None:
        row = self._db.execute(f"SELECT {_POINT_COLS} FROM recovery_points WHERE arn=?",
                               (arn,)).fetchone()
        return _point(row) if row else None

    def list_points(self, region: str, vault_name: str | None, filters: PointFilter,
                    after_seq: int, limit: int) -> list[Point]:
        where = ["region=?", "seq>?"]
        args: list[Any] = [region, after_seq]
        _add_filters(where, args, (
            ("vault_name", "=", vault_name),
            ("resource_arn", "=", filters.resource_arn),
            ("created_at", "<", filters.created_before),
            ("created_at", ">", filters.created_after),
        ))
        rows = self._db.execute(
            f"SELECT {_POINT_COLS} FROM recovery_points WHERE {' AND '.join(where)}"
            " ORDER BY seq LIMIT ?", (*args, limit),
        ).fetchall()
        return [_point(r) for r in rows]

    def latest_point(self, resource_arn: str, vault_name: str, region: str) -> Point | None:
        """The newest COMPLETED point of a VM in a vault: an incremental backup's base."""
        row = self._db.execute(
            f"SELECT {_POINT_COLS} FROM recovery_points WHERE resource_arn=? AND vault_name=?"
            " AND region=? AND status='COMPLETED' ORDER BY completed_at DESC, seq DESC LIMIT 1",
            (resource_arn, vault_name, region),
        ).fetchone()
        return _point(row) if row else None

    def point_users(self, arn: str) -> list[str]:
        """Jobs not ended that read this point (a restore, an incremental on it as base)."""
        return [str(r[0]) for r in self._db.execute(
            "SELECT job_id FROM backup_jobs WHERE state IN ('CREATED','PENDING','RUNNING',"
            "'ABORTING') AND ((job_type='RESTORE' AND recovery_point_arn=?) OR"
            " base_point_arn=?) ORDER BY seq", (arn, arn))]

    def mark_deleting(self, arn: str) -> Point:
        """First step of a delete: DELETING (no longer listed as restorable). Refused
        (BackupStoreError "InUse") while a job not ended reads it."""
        with self.store.transaction() as db:
            row = db.execute(f"SELECT {_POINT_COLS} FROM recovery_points WHERE arn=?",
                             (arn,)).fetchone()
            if row is None:
                raise BackupStoreError("NoPoint", f"Recovery point {arn} was not found")
            users = [str(r[0]) for r in db.execute(
                "SELECT job_id FROM backup_jobs WHERE state IN ('CREATED','PENDING','RUNNING',"
                "'ABORTING') AND ((job_type='RESTORE' AND recovery_point_arn=?) OR"
                " base_point_arn=?) ORDER BY seq", (arn, arn))]
            if users:
                raise BackupStoreError(
                    "InUse", f"Recovery point {arn} is read by job(s) not ended: "
                    f"{', '.join(users[:5])}")
            db.execute("UPDATE recovery_points SET status='DELETING' WHERE arn=?", (arn,))
            point = _point(row)
            refresh_last_backup(db, point.resource_arn)
            return point

    def drop_point(self, arn: str) -> None:
        """Last step of a delete, after its manifest is gone from the vault."""
        with self.store.transaction() as db:
            db.execute("DELETE FROM recovery_points WHERE arn=? AND status='DELETING'", (arn,))

    def deleting_points(self) -> list[Point]:
        rows = self._db.execute(
            f"SELECT {_POINT_COLS} FROM recovery_points WHERE status='DELETING' ORDER BY seq"
        ).fetchall()
        return [_point(r) for r in rows]

    def expired_points(self, now: float) -> list[Point]:
        rows = self._db.execute(
            f"SELECT {_POINT_COLS} FROM recovery_points WHERE delete_at IS NOT NULL AND"
            " delete_at<=? AND status='COMPLETED' ORDER BY delete_at", (now,),
        ).fetchall()
        return [_point(r) for r in rows]

    # -- protected resources --------------------------------------------------------------

    def protected(self, region: str, after_arn: str, limit: int) -> list[Protected]:
        rows = self._db.execute(
            "SELECT resource_arn FROM recovery_points WHERE region=? AND status='COMPLETED'"
            " AND resource_arn>? GROUP BY resource_arn ORDER BY resource_arn LIMIT ?",
            (region, after_arn, limit),
        ).fetchall()
        out = []
        for (arn,) in rows:
            found = self.protected_resource(region, str(arn))
            if found is not None:
                out.append(found)
        return out

    def protected_resource(self, region: str, resource_arn: str) -> Protected | None:
        row = self._db.execute(
            "SELECT resource_arn, resource_name, completed_at, vault_arn, arn FROM"
            " recovery_points WHERE region=? AND resource_arn=? AND status='COMPLETED'"
            " ORDER BY completed_at DESC, seq DESC LIMIT 1", (region, resource_arn),
        ).fetchone()
        return Protected(*row) if row else None

    def latest_restore(self, resource_arn: str) -> Job | None:
        row = self._db.execute(
            f"SELECT {_JOB_COLS} FROM backup_jobs WHERE job_type='RESTORE' AND resource_arn=?"
            " ORDER BY seq DESC LIMIT 1", (resource_arn,),
        ).fetchone()
        return _job(row) if row else None

    # -- rebuilt from a vault's storage (controlplane/vaultrebuild.py) --------------------

    def adopt_account(self, account: str) -> str:
        """The database's account id, set to `account` when it has none yet: a rebuilt
        control plane keeps the ARNs its vaults were created under."""
        with self.store.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key='account_id'").fetchone()
            if row:
                return str(row[0])
            db.execute("INSERT INTO meta (key, value) VALUES ('account_id', ?)", (account,))
            return account

    def insert_rebuilt_vault(self, row: dict[str, Any]) -> bool:
        """A vault's row from its vault.json (vaultindex.vault_row): True when inserted,
        False when that vault (its ARN and storage) is here already; BackupStoreError
        "Exists" when its region and name, ARN or storage belong to another row."""
        with self.store.transaction() as db:
            same = db.execute("SELECT storage FROM backup_vaults WHERE arn=? OR storage=? OR"
                              " (region=? AND name=?)",
                              (row["arn"], row["storage"], row["region"], row["name"])
                              ).fetchall()
            if any(str(r[0]) == row["storage"] for r in same) and len(same) == 1:
                return False
            if same:
                raise BackupStoreError(
                    "Exists", f"backup vault {row['name']} in {row['region']}: the database "
                    f"has another vault of that name or ARN (storage "
                    f"{', '.join(sorted(str(r[0]) for r in same))})")
            db.execute(
                "INSERT INTO backup_vaults (region, name, arn, storage, created_at,"
                " creator_request_id, encryption_key_arn, tags) VALUES (?,?,?,?,?,?,?,?)",
                (row["region"], row["name"], row["arn"], row["storage"], row["created_at"],
                 row["creator_request_id"], row["encryption_key_arn"],
                 json.dumps(row["tags"])))
            return True

    def insert_rebuilt_point(self, row: dict[str, Any]) -> bool:
        """A COMPLETED point's row from its record (vaultindex.point_row): True when
        inserted, False when a point of that ARN is here already. The VM's LastBackupDate
        follows, when the VM is in the inventory."""
        with self.store.transaction() as db:
            if db.execute("SELECT 1 FROM recovery_points WHERE arn=?",
                          (row["arn"],)).fetchone():
                return False
            values = dict(row, status=COMPLETED, incremental=int(row["incremental"]),
                          restore_defaults=json.dumps(row["restore_defaults"]),
                          last_restore=None)
            columns = _POINT_COLS.replace("seq, ", "", 1)
            names = [c.strip() for c in columns.split(",")]
            db.execute(f"INSERT INTO recovery_points ({columns}) VALUES "
                       f"({', '.join('?' for _ in names)})", [values[n] for n in names])
            refresh_last_backup(db, row["resource_arn"])
            return True


def bump_gateway(db: sqlite3.Connection, gateway_id: str) -> str | None:
    """The gateway's job list changed: its poll version + 1; returns its key id to wake."""
    row = db.execute("SELECT key_id FROM gateways WHERE gateway_id=?", (gateway_id,)).fetchone()
    if row is None:
        return None
    db.execute("UPDATE identities SET version=version+1 WHERE key_id=?", (row[0],))
    return str(row[0])


def refresh_last_backup(db: sqlite3.Connection, resource_arn: str) -> None:
    """The VM's LastBackupDate (store.py's vms.last_backup) follows its newest COMPLETED
    point: set when one completes, recomputed when one is deleted."""
    db.execute(
        "UPDATE vms SET last_backup=(SELECT MAX(completed_at) FROM recovery_points WHERE"
        " resource_arn=vms.arn AND status='COMPLETED') WHERE arn=?", (resource_arn,),
    )


def _add_filters(where: list[str], args: list[Any],
                 conditions: Iterable[tuple[str, str, Any]]) -> None:
    """Append `column op ?` for each condition whose value is given (None: no filter).
    Columns and operators are this module's constants, never a caller's text."""
    for column, op, value in conditions:
        if value is not None:
            where.append(f"{column}{op}?")
            args.append(value)
