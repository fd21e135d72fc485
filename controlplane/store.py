"""The control plane's state: one SQLite file, WAL journal with full sync (the purge and the
batched heartbeats excepted: `purge` and `heartbeat` say why; the link's nonces are not
here but in controlplane/noncelog.py).

Why SQLite: every change (a key issued, a gateway created) must survive a
`kill -9` and a restart, and some changes must be all-or-nothing under concurrency (two
CreateGateway calls with one key: exactly one wins). A transaction gives both. The store
knows nothing of HTTP or JSON shapes: protocol.py and operations.py translate.

What strangers can create expires: an identity and its keys are written by the
unauthenticated `POST /gateway/activation-key`, so `purge` deletes unused keys once they
expire and never-activated identities `PENDING_RETENTION` after their last key expired.
Every purge query filters on an indexed time column (`PURGE_QUERIES`, checked by a test with
EXPLAIN QUERY PLAN): housekeeping never scans a table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.walsync import WalSync

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS identities (
    key_id TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    registered_at REAL NOT NULL,
    last_seen REAL,
    software_version TEXT,
    version INTEGER NOT NULL DEFAULT 0,
    gateway_id TEXT,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS activation_keys (
    key TEXT PRIMARY KEY,
    key_id TEXT NOT NULL REFERENCES identities(key_id),
    region TEXT NOT NULL,
    endpoint_type TEXT NOT NULL,
    ip_version TEXT,
    vpc_endpoint TEXT,
    issued_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL,
    gateway_id TEXT
);
CREATE TABLE IF NOT EXISTS gateways (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    gateway_id TEXT NOT NULL UNIQUE,
    arn TEXT NOT NULL UNIQUE,
    key_id TEXT NOT NULL REFERENCES identities(key_id),
    region TEXT NOT NULL,
    name TEXT NOT NULL,
    gateway_type TEXT NOT NULL,
    endpoint_type TEXT NOT NULL,
    ip_version TEXT,
    vpc_endpoint TEXT,
    created_at REAL NOT NULL,
    deleted_at REAL,
    schedule TEXT NOT NULL DEFAULT '[]',
    software_update_request INTEGER NOT NULL DEFAULT 0,
    maintenance TEXT
);
CREATE TABLE IF NOT EXISTS tags (
    arn TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (arn, key)
);
CREATE TABLE IF NOT EXISTS hypervisors (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    hypervisor_id TEXT NOT NULL UNIQUE,
    arn TEXT NOT NULL UNIQUE,
    region TEXT NOT NULL,
    name TEXT NOT NULL,
    host TEXT NOT NULL,
    username TEXT,
    password BLOB,
    kms_key_arn TEXT,
    log_group_arn TEXT,
    state TEXT NOT NULL DEFAULT 'PENDING',
    sync_request INTEGER NOT NULL DEFAULT 0,
    sync_status TEXT,
    sync_message TEXT,
    last_sync REAL,
    mappings TEXT NOT NULL DEFAULT '[]',
    iam_role_arn TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS vms (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    arn TEXT NOT NULL UNIQUE,
    hypervisor_id TEXT NOT NULL REFERENCES hypervisors(hypervisor_id),
    region TEXT NOT NULL,
    uuid TEXT NOT NULL,
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    host_name TEXT,
    tags TEXT NOT NULL DEFAULT '[]',
    last_backup REAL,
    UNIQUE (hypervisor_id, uuid)
);
CREATE TABLE IF NOT EXISTS uploads (
    gateway_id TEXT NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    stored_at REAL NOT NULL,
    PRIMARY KEY (gateway_id, name)
);
"""

# Columns added after the first release: (table, column, type); added to older files on open.
_ADDED_COLUMNS = (
    # When a never-activated identity may be deleted (last key expiry + PENDING_RETENTION).
    ("identities", "pending_until", "REAL"),
    # The .incoming part file of an upload being committed; NULL once the rename is done.
    ("uploads", "part", "TEXT"),
    # The hypervisor a gateway is associated with (hypervisors.hypervisor_id), or NULL.
    ("gateways", "hypervisor_id", "TEXT"),
    # The newest X25519 sealing key a gateway's poll carried (raw 32 bytes), or NULL.
    ("identities", "seal_key", "BLOB"),
    # The newest sync request an inventory was recorded for: an older one arriving late (a
    # slow gateway of two) must not overwrite a newer list.
    ("hypervisors", "reported_request", "INTEGER NOT NULL DEFAULT 0"),
)

# Created after the columns above exist. The purge filters on the time columns; the key_id
# indexes let a deleted identity's foreign-key checks find children without a table scan.
INDEXES = """
CREATE INDEX IF NOT EXISTS activation_keys_unused_expiry ON activation_keys (expires_at)
    WHERE used_at IS NULL;
CREATE INDEX IF NOT EXISTS activation_keys_key_id ON activation_keys (key_id);
CREATE INDEX IF NOT EXISTS gateways_key_id ON gateways (key_id);
CREATE INDEX IF NOT EXISTS gateways_hypervisor_id ON gateways (hypervisor_id)
    WHERE hypervisor_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS hypervisors_region ON hypervisors (region, seq);
CREATE INDEX IF NOT EXISTS vms_region ON vms (region, seq);
CREATE INDEX IF NOT EXISTS identities_pending_until ON identities (pending_until)
    WHERE gateway_id IS NULL AND deleted = 0;
"""

# Housekeeping, in this order (keys before the identities they reference). Each is a range
# scan of one index: tests/controlplane/test_link_hostile.py checks the query plans.
PURGE_QUERIES = {
    "keys": "DELETE FROM activation_keys WHERE used_at IS NULL AND expires_at <= ?",
    "identities": (
        "DELETE FROM identities WHERE gateway_id IS NULL AND deleted = 0 AND pending_until <= ?"
        " AND NOT EXISTS (SELECT 1 FROM activation_keys k WHERE k.key_id = identities.key_id)"
    ),
}

# How long an identity that never activated is kept after its last key expired. A day: the
# operator who asked for a key and did not finish CreateGateway still sees the appliance as
# registered (its polls answered "pending") until the next working day, and the appliance
# registers again by itself when a new key is asked for, so nothing is lost by the delete.
# Bounded, so the rows a stranger can make are at most (registration rate) x 24.5 h.
PENDING_RETENTION = 24 * 3600.0
# Unused keys one identity may hold at once: a new key beyond it retires the oldest, so a
# gateway asked for keys in a loop keeps a constant number of rows.
MAX_OPEN_KEYS = 10

DB_FILE = "controlplane.sqlite3"


class StoreError(Exception):
    """A request the state does not allow; `reason` is a short machine word, message for humans."""

    def __init__(self, reason: str, message: str, gateway_arn: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.gateway_arn = gateway_arn


@dataclass(frozen=True)
class UploadRecord:
    """An object stored for a gateway; `part` is set while its commit is under way."""

    gateway_id: str
    name: str
    size: int
    sha256: str
    stored_at: float
    part: str | None = None


class UploadExists(StoreError):
    """An upload under a name the gateway already holds, without replace."""

    def __init__(self, existing: UploadRecord) -> None:
        super().__init__(
            "AlreadyExists",
            f"'{existing.name}' is already stored ({existing.size} bytes, sha256 "
            f"{existing.sha256}); upload with replace to overwrite it",
        )
        self.existing = existing


@dataclass(frozen=True)
class Identity:
    key_id: str
    public_key: bytes
    last_seen: float | None
    software_version: str | None
    version: int
    gateway_id: str | None
    deleted: bool
    seal_key: bytes | None = None


@dataclass(frozen=True)
class ActivationKey:
    key: str
    key_id: str
    region: str
    endpoint_type: str
    ip_version: str | None
    vpc_endpoint: str | None
    issued_at: float
    expires_at: float
    used_at: float | None


@dataclass(frozen=True)
class Gateway:
    seq: int
    gateway_id: str
    arn: str
    key_id: str
    region: str
    name: str
    gateway_type: str
    endpoint_type: str
    ip_version: str | None
    vpc_endpoint: str | None
    created_at: float
    deleted_at: float | None
    schedule: list[dict[str, Any]]
    software_update_request: int
    maintenance: dict[str, int] | None
    last_seen: float | None
    software_version: str | None
    hypervisor_id: str | None = None


@dataclass(frozen=True)
class Hypervisor:
    """An imported hypervisor; `password` is the encrypted blob (controlplane.atrest)."""

    seq: int
    hypervisor_id: str
    arn: str
    region: str
    name: str
    host: str
    username: str | None
    password: bytes | None = field(repr=False)
    kms_key_arn: str | None
    log_group_arn: str | None
    state: str
    sync_request: int
    sync_status: str | None
    sync_message: str | None
    last_sync: float | None
    mappings: list[dict[str, str]]
    iam_role_arn: str | None
    created_at: float


@dataclass(frozen=True)
class VirtualMachine:
    """A VM as its hypervisor's last inventory reported it; `tags` are the VMware tags
    (`VmwareCategory`, `VmwareTagName`, optional `VmwareTagDescription`)."""

    seq: int
    arn: str
    hypervisor_id: str
    region: str
    uuid: str
    name: str
    path: str
    host_name: str | None
    tags: list[dict[str, str]]
    last_backup: float | None


@dataclass(frozen=True)
class ReportedVm:
    """One VM of an inventory, as the gateway reported it (already validated)."""

    uuid: str
    name: str
    path: str
    host_name: str | None
    tags: list[dict[str, str]]


@dataclass(frozen=True)
class SyncOutcome:
    """What an inventory did: VMs kept (listed now), added and removed; `stale` when it was
    for an older sync request than one already recorded (and so changed nothing)."""

    kept: int
    added: int
    removed: int
    stale: bool = False


def partition_of(region: str) -> str:
    """The ARN partition a region belongs to."""
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def vm_arn(hypervisor: Hypervisor, uuid: str) -> str:
    """The ARN of a VM: stable across syncs, derived from its hypervisor and its uuid, so a
    VM keeps its ARN (and its tags) while it is reported and the same VM seen through two
    gateways has one ARN."""
    digest = hashlib.sha256(f"{hypervisor.hypervisor_id}\0{uuid}".encode()).hexdigest()
    prefix = hypervisor.arn.rsplit(":", 1)[0]
    return f"{prefix}:vm/vm-{digest[:17]}"


def state_of(ok: bool, error_code: str | None) -> str:
    """A hypervisor's State after a gateway's report: reachable and usable (ONLINE), not
    reachable (OFFLINE), or reachable but refusing us (ERROR)."""
    if ok:
        return "ONLINE"
    return "OFFLINE" if error_code == "HostUnreachable" else "ERROR"


_GATEWAY_SELECT = """
SELECT g.seq, g.gateway_id, g.arn, g.key_id, g.region, g.name, g.gateway_type, g.endpoint_type,
       g.ip_version, g.vpc_endpoint, g.created_at, g.deleted_at, g.schedule,
       g.software_update_request, g.maintenance, i.last_seen, i.software_version,
       g.hypervisor_id
FROM gateways g JOIN identities i ON i.key_id = g.key_id
"""


def _gateway(row: sqlite3.Row) -> Gateway:
    return Gateway(
        seq=row[0],
        gateway_id=row[1],
        arn=row[2],
        key_id=row[3],
        region=row[4],
        name=row[5],
        gateway_type=row[6],
        endpoint_type=row[7],
        ip_version=row[8],
        vpc_endpoint=row[9],
        created_at=row[10],
        deleted_at=row[11],
        schedule=json.loads(row[12]),
        software_update_request=row[13],
        maintenance=json.loads(row[14]) if row[14] else None,
        last_seen=row[15],
        software_version=row[16],
        hypervisor_id=row[17],
    )


class Store:
    """All reads and writes of the state; each public method is one transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        _private_files(path)
        # Autocommit mode: transactions are opened explicitly with BEGIN IMMEDIATE, so a
        # read-then-write (use a key once) cannot interleave with another writer.
        self._db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # 64 MiB of page cache instead of 2: a fleet's rows (10,000 identities, gateways,
        # their jobs) stay in memory, and a read never waits for the disk.
        self._db.execute("PRAGMA cache_size=-65536")
        # Heartbeats waiting to be written: key id -> (last seen, software version or None).
        self._heartbeats: dict[str, tuple[float, str | None]] = {}
        self._heartbeat_lock = threading.Lock()
        self._unsynced_depth = 0  # inside `_unsynced`: commits are synchronous=NORMAL
        # Durable commits made inside a request skip their fsync; the request awaits
        # `wal.wait` before it answers (controlplane/walsync.py).
        self.wal = WalSync(path)
        self._checkpoint_db: sqlite3.Connection | None = None  # see start_checkpoints
        self._checkpoint_lock = threading.Lock()
        self._db.executescript(SCHEMA)
        self._migrate()
        self._db.executescript(INDEXES)

    def _migrate(self) -> None:
        """Add the columns a file written by an older version lacks, and drop its nonces
        table (the nonces are kept in controlplane/noncelog.py now), in one transaction."""
        with self._tx() as db:
            db.execute("DROP TABLE IF EXISTS nonces")
            for table, column, kind in _ADDED_COLUMNS:
                have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if column in have:
                    continue
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                if column == "pending_until":  # identities registered before expiry existed
                    db.execute(
                        "UPDATE identities SET pending_until = ? + COALESCE((SELECT"
                        " MAX(expires_at) FROM activation_keys k WHERE k.key_id ="
                        " identities.key_id), registered_at) WHERE gateway_id IS NULL",
                        (PENDING_RETENTION,),
                    )

    def close(self) -> None:
        self.flush_heartbeats()
        self.wal.close()
        self.stop_checkpoints()
        self._db.close()

    # -- WAL checkpoints off the event loop ---------------------------------------------
    #
    # SQLite copies the WAL into the database file (two fsyncs) in whichever commit finds the
    # WAL over 1,000 pages: with a fleet's heartbeats that is every few seconds, on the event
    # loop. While `checkpoint` is being called (the link's housekeeping task, in a thread,
    # through a connection of its own), the automatic checkpoint is off.

    def start_checkpoints(self) -> None:
        if self._checkpoint_db is None:
            self._checkpoint_db = sqlite3.connect(self.path, isolation_level=None,
                                                  check_same_thread=False, timeout=10.0)
            self._db.execute("PRAGMA wal_autocheckpoint=0")

    def checkpoint(self) -> tuple[int, int]:
        """A PASSIVE checkpoint (never waits for the writer): (WAL pages, pages copied)."""
        with self._checkpoint_lock:
            if self._checkpoint_db is None:
                return 0, 0
            row = self._checkpoint_db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return int(row[1]), int(row[2])

    def stop_checkpoints(self) -> None:
        with self._checkpoint_lock:  # a checkpoint still running in its thread ends first
            if self._checkpoint_db is not None:
                self._db.execute("PRAGMA wal_autocheckpoint=1000")
                self._checkpoint_db.close()
                self._checkpoint_db = None

    # A companion store keeps other tables in this file (controlplane/backupstore.py): it
    # reads through this connection and writes through these transactions, so its writes
    # and ours are serialized alike and one transaction may span both (a job and the VM's
    # LastBackupDate).

    @property
    def connection(self) -> sqlite3.Connection:
        return self._db

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an exception), durable on return."""
        return self._tx()

    @contextlib.contextmanager
    def _tx(self, keys: list[str] | None = None) -> Iterator[sqlite3.Connection]:
        # `keys`: a caller whose transaction changes only gateways' own rows (the gateway
        # and its identity) appends their key ids before the commit, so that a read of
        # another gateway need not wait for this commit's fsync (walsync.keyed_reads).
        # Buffered heartbeats are written first, so a transaction (the job scheduler's,
        # reading last_seen through `connection`) sees every poll so far: inside an unsynced
        # transaction they ride along, before a synced one they get their own unsynced
        # commit (a transaction that writes nothing else then needs no fsync).
        if self._heartbeats and not self._unsynced_depth:
            self.flush_heartbeats()
        # A durable write inside a request: committed without fsync, made durable by the
        # request's WalSync.wait before its answer leaves (the same guarantee as FULL).
        deferred = not self._unsynced_depth and self.wal.deferred()
        with self._unsynced() if deferred else contextlib.nullcontext():
            self._db.execute("BEGIN IMMEDIATE")
            changes = self._db.total_changes
            try:
                if self._unsynced_depth and not deferred:
                    self._write_heartbeats(self._db)
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            if deferred and self._db.total_changes != changes:
                self.wal.note_commit(keys or ())

    # -- meta ---------------------------------------------------------------------------

    def account_id(self) -> str:
        """The 12-digit account id, generated on first use and kept forever."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key='account_id'").fetchone()
            if row:
                return str(row[0])
            account = str(secrets.randbelow(9 * 10**11) + 10**11)
            db.execute("INSERT INTO meta (key, value) VALUES ('account_id', ?)", (account,))
            return account

    # -- identities and activation keys -------------------------------------------------

    def identity(self, key_id: str) -> Identity | None:
        row = self._db.execute(
            "SELECT key_id, public_key, last_seen, software_version, version, gateway_id,"
            " deleted, seal_key FROM identities WHERE key_id=?",
            (key_id,),
        ).fetchone()
        if row is None:
            return None
        self.wal.note_read(key_id)  # its version is bumped by keyed commits
        last_seen, software_version = self._seen(row[0], row[2], row[3])
        return Identity(row[0], bytes(row[1]), last_seen, software_version, row[4], row[5],
                        bool(row[6]), bytes(row[7]) if row[7] is not None else None)

    def issue_key(
        self,
        key_id: str,
        public_key: bytes,
        key: str,
        region: str,
        endpoint_type: str,
        ip_version: str | None,
        vpc_endpoint: str | None,
        software_version: str | None,
        now: float,
        lifetime: float,
    ) -> ActivationKey:
        """Register the identity if new and record a key bound to it; refuse a used identity.

        The identity is kept, if never activated, until PENDING_RETENTION after this key
        expires (see `purge`).
        """
        pending_until = now + lifetime + PENDING_RETENTION
        with self._tx() as db:
            row = db.execute(
                "SELECT gateway_id, deleted FROM identities WHERE key_id=?", (key_id,)
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO identities (key_id, public_key, registered_at, last_seen,"
                    " software_version, pending_until) VALUES (?, ?, ?, ?, ?, ?)",
                    (key_id, public_key, now, now, software_version, pending_until),
                )
            else:
                arn = self._arn_of(db, row[0])
                if row[1]:
                    raise StoreError(
                        "GatewayDeleted",
                        "this gateway was deleted and can never be activated again",
                        arn,
                    )
                if row[0]:
                    raise StoreError("AlreadyActivated", f"this gateway is already {arn}", arn)
                db.execute(
                    "UPDATE identities SET last_seen=?, software_version=COALESCE(?,"
                    " software_version), pending_until=? WHERE key_id=?",
                    (now, software_version, pending_until, key_id),
                )
            db.execute(
                "INSERT INTO activation_keys (key, key_id, region, endpoint_type, ip_version,"
                " vpc_endpoint, issued_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, key_id, region, endpoint_type, ip_version, vpc_endpoint, now,
                 now + lifetime),
            )
            db.execute(
                "DELETE FROM activation_keys WHERE key IN (SELECT key FROM activation_keys"
                " WHERE key_id=? AND used_at IS NULL ORDER BY issued_at DESC, rowid DESC"
                " LIMIT -1 OFFSET ?)",
                (key_id, MAX_OPEN_KEYS),
            )
        return ActivationKey(key, key_id, region, endpoint_type, ip_version, vpc_endpoint, now,
                             now + lifetime, None)

    @staticmethod
    def _arn_of(db: sqlite3.Connection, gateway_id: str | None) -> str | None:
        if not gateway_id:
            return None
        row = db.execute("SELECT arn FROM gateways WHERE gateway_id=?", (gateway_id,)).fetchone()
        return str(row[0]) if row else None

    def create_gateway(
        self,
        key: str,
        region: str,
        account: str,
        name: str,
        gateway_type: str,
        tags: list[tuple[str, str]],
        now: float,
    ) -> Gateway:
        """Use an activation key once and create its gateway, in one transaction."""
        with self._tx() as db:
            row = db.execute(
                "SELECT key, key_id, region, endpoint_type, ip_version, vpc_endpoint, issued_at,"
                " expires_at, used_at, gateway_id FROM activation_keys WHERE key=?",
                (key,),
            ).fetchone()
            if row is None:
                raise StoreError("UnknownKey", f"ActivationKey '{key}' was not issued by this "
                                 "control plane, or it expired (keys last 30 minutes) and was "
                                 "forgotten; get a new key from the gateway")
            akey = ActivationKey(*row[:9])
            if akey.used_at is not None:
                arn = self._arn_of(db, row[9])
                raise StoreError("KeyUsed", f"ActivationKey '{key}' was already used to "
                                 f"activate {arn}; keys are used once", arn)
            if now >= akey.expires_at:
                raise StoreError("KeyExpired", f"ActivationKey '{key}' expired (keys last 30 "
                                 "minutes); get a new key from the gateway")
            if akey.region != region:
                raise StoreError("WrongRegion", f"ActivationKey '{key}' was issued for region "
                                 f"{akey.region}, but this request is signed for region "
                                 f"{region}; call with --region {akey.region}")
            ident = db.execute(
                "SELECT gateway_id, deleted FROM identities WHERE key_id=?", (akey.key_id,)
            ).fetchone()
            if ident[1] or ident[0]:
                arn = self._arn_of(db, ident[0])
                raise StoreError("KeyUsed", f"the gateway holding ActivationKey '{key}' is "
                                 f"already activated as {arn}", arn)
            while True:
                gateway_id = "bgw-" + secrets.token_hex(4).upper()
                if not db.execute(
                    "SELECT 1 FROM gateways WHERE gateway_id=?", (gateway_id,)
                ).fetchone():
                    break
            arn = (
                f"arn:{partition_of(region)}:backup-gateway:{region}:{account}:"
                f"gateway/{gateway_id}"
            )
            db.execute(
                "INSERT INTO gateways (gateway_id, arn, key_id, region, name, gateway_type,"
                " endpoint_type, ip_version, vpc_endpoint, created_at) VALUES"
                " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (gateway_id, arn, akey.key_id, region, name, gateway_type, akey.endpoint_type,
                 akey.ip_version, akey.vpc_endpoint, now),
            )
            db.execute(
                "UPDATE activation_keys SET used_at=?, gateway_id=? WHERE key=? AND used_at IS"
                " NULL",
                (now, gateway_id, key),
            )
            db.execute(
                "UPDATE identities SET gateway_id=?, version=version+1 WHERE key_id=?",
                (gateway_id, akey.key_id),
            )
            db.executemany(
                "INSERT OR REPLACE INTO tags (arn, key, value) VALUES (?, ?, ?)",
                [(arn, k, v) for k, v in tags],
            )
            return self._get(db, arn)

    # -- gateways -----------------------------------------------------------------------

    def _get(self, db: sqlite3.Connection, arn: str) -> Gateway:
        row = db.execute(_GATEWAY_SELECT + " WHERE g.arn=?", (arn,)).fetchone()
        return self._gateway(row)

    def _gateway(self, row: sqlite3.Row | tuple[Any, ...]) -> Gateway:
        """A gateway row, with its heartbeat if one is still buffered; every gateway read
        goes through here, so it is where a keyed read is noted (walsync.keyed_reads)."""
        gateway = _gateway(row)
        self.wal.note_read(gateway.key_id)
        if self._heartbeats:
            last_seen, version = self._seen(gateway.key_id, gateway.last_seen,
                                            gateway.software_version)
            if last_seen != gateway.last_seen or version != gateway.software_version:
                return dataclasses.replace(gateway, last_seen=last_seen,
                                           software_version=version)
        return gateway

    def gateway(self, arn: str) -> Gateway | None:
        """The live gateway with this ARN (deleted ones are gone for the API)."""
        row = self._db.execute(
            _GATEWAY_SELECT + " WHERE g.arn=? AND g.deleted_at IS NULL", (arn,)
        ).fetchone()
        return self._gateway(row) if row else None

    def gateway_by_id(self, gateway_id: str) -> Gateway | None:
        row = self._db.execute(
            _GATEWAY_SELECT + " WHERE g.gateway_id=?", (gateway_id,)
        ).fetchone()
        return self._gateway(row) if row else None

    def list_gateways(self, region: str, after_seq: int, limit: int) -> list[Gateway]:
        rows = self._db.execute(
            _GATEWAY_SELECT + " WHERE g.region=? AND g.deleted_at IS NULL AND g.seq>?"
            " ORDER BY g.seq LIMIT ?",
            (region, after_seq, limit),
        ).fetchall()
        return [self._gateway(r) for r in rows]

    def update_gateway(self, arn: str, bump: bool = True, **changes: Any) -> Gateway | None:
        """Change columns of a live gateway; `bump` tells its appliance (config version + 1)."""
        allowed = {"name", "schedule", "maintenance", "software_update_request"}
        if not set(changes) <= allowed:  # column names go into the SQL text: allow-list only
            raise ValueError(f"cannot update {sorted(set(changes) - allowed)}")
        keys: list[str] = []  # this gateway's rows only: a keyed commit
        with self._tx(keys) as db:
            row = db.execute(
                "SELECT key_id FROM gateways WHERE arn=? AND deleted_at IS NULL", (arn,)
            ).fetchone()
            if row is None:
                return None
            keys.append(row[0])
            for column, value in changes.items():
                if column == "software_update_request":
                    db.execute(
                        "UPDATE gateways SET software_update_request=software_update_request+1"
                        " WHERE arn=?",
                        (arn,),
                    )
                    continue
                if column in ("schedule", "maintenance"):
                    value = json.dumps(value)
                db.execute(f"UPDATE gateways SET {column}=? WHERE arn=?", (value, arn))
            if bump:
                db.execute("UPDATE identities SET version=version+1 WHERE key_id=?", (row[0],))
            return self._get(db, arn)

    def delete_gateway(self, arn: str, now: float) -> Gateway | None:
        """Delete a gateway and tombstone its identity: it can never be activated again."""
        with self._tx() as db:
            row = db.execute(
                "SELECT key_id FROM gateways WHERE arn=? AND deleted_at IS NULL", (arn,)
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE gateways SET deleted_at=?, hypervisor_id=NULL WHERE arn=?",
                       (now, arn))
            db.execute(
                "UPDATE identities SET deleted=1, version=version+1 WHERE key_id=?", (row[0],)
            )
            db.execute("DELETE FROM tags WHERE arn=?", (arn,))
            return self._get(db, arn)

    # -- tags ---------------------------------------------------------------------------

    def tags(self, arn: str) -> list[tuple[str, str]]:
        return [
            (r[0], r[1])
            for r in self._db.execute(
                "SELECT key, value FROM tags WHERE arn=? ORDER BY key", (arn,)
            )
        ]

    def tag(self, arn: str, tags: list[tuple[str, str]]) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO tags (arn, key, value) VALUES (?, ?, ?)",
                [(arn, k, v) for k, v in tags],
            )

    def untag(self, arn: str, keys: list[str]) -> None:
        with self._tx() as db:
            db.executemany("DELETE FROM tags WHERE arn=? AND key=?", [(arn, k) for k in keys])

    # -- hypervisors and virtual machines ---------------------------------------------
    #
    # A gateway is associated with at most one hypervisor (gateways.hypervisor_id), a
    # hypervisor with any number of gateways. What a gateway must learn of its hypervisor
    # (host, credentials, a sync request) reaches it through its poll, so every change of
    # those bumps the version of each associated gateway's identity, in the same
    # transaction; the key ids returned are the polls to wake.

    _HYPERVISOR_COLUMNS = (
        "seq, hypervisor_id, arn, region, name, host, username, password, kms_key_arn,"
        " log_group_arn, state, sync_request, sync_status, sync_message, last_sync, mappings,"
        " iam_role_arn, created_at"
    )
    _VM_COLUMNS = (
        "seq, arn, hypervisor_id, region, uuid, name, path, host_name, tags, last_backup"
    )
    # Columns update_hypervisor may set (they go into the SQL text: allow-list only), and
    # those whose change the gateways must act on (a new sync with the new settings).
    _HYPERVISOR_SETTABLE = frozenset({"name", "host", "username", "password", "log_group_arn"})
    _HYPERVISOR_RESYNC = frozenset({"host", "username", "password"})

    @staticmethod
    def _hypervisor_row(row: sqlite3.Row | tuple[Any, ...]) -> Hypervisor:
        return Hypervisor(
            seq=row[0], hypervisor_id=row[1], arn=row[2], region=row[3], name=row[4],
            host=row[5], username=row[6],
            password=bytes(row[7]) if row[7] is not None else None,
            kms_key_arn=row[8], log_group_arn=row[9], state=row[10], sync_request=row[11],
            sync_status=row[12], sync_message=row[13], last_sync=row[14],
            mappings=json.loads(row[15]), iam_role_arn=row[16], created_at=row[17],
        )

    @staticmethod
    def _vm_row(row: sqlite3.Row | tuple[Any, ...]) -> VirtualMachine:
        return VirtualMachine(
            seq=row[0], arn=row[1], hypervisor_id=row[2], region=row[3], uuid=row[4],
            name=row[5], path=row[6], host_name=row[7], tags=json.loads(row[8]),
            last_backup=row[9],
        )

    def _hypervisor_where(self, db: sqlite3.Connection, where: str, *args: Any
                          ) -> Hypervisor | None:
        row = db.execute(
            f"SELECT {self._HYPERVISOR_COLUMNS} FROM hypervisors WHERE {where}", args
        ).fetchone()
        return self._hypervisor_row(row) if row else None

    @staticmethod
    def _host_taken(db: sqlite3.Connection, region: str, host: str, other_than: str = ""
                    ) -> None:
        row = db.execute(
            "SELECT arn FROM hypervisors WHERE region=? AND lower(host)=lower(?) AND arn<>?",
            (region, host, other_than),
        ).fetchone()
        if row:
            raise StoreError("HostTaken", f"Host '{host}' is already imported as {row[0]}",
                             row[0])

    @staticmethod
    def _bump_gateways_of(db: sqlite3.Connection, hypervisor_id: str) -> list[str]:
        key_ids = [
            str(r[0]) for r in db.execute(
                "SELECT key_id FROM gateways WHERE hypervisor_id=? AND deleted_at IS NULL",
                (hypervisor_id,),
            )
        ]
        db.executemany("UPDATE identities SET version=version+1 WHERE key_id=?",
                       [(k,) for k in key_ids])
        return key_ids

    def create_hypervisor(
        self,
        hypervisor_id: str,
        arn: str,
        region: str,
        name: str,
        host: str,
        username: str | None,
        password: bytes | None,
        kms_key_arn: str | None,
        tags: list[tuple[str, str]],
        now: float,
    ) -> Hypervisor:
        """Record an imported hypervisor (PENDING until a gateway reports on it).

        StoreError("HostTaken") when the region already holds a hypervisor of that host:
        two records of one server would split its VMs between two ARNs.
        """
        with self._tx() as db:
            self._host_taken(db, region, host)
            db.execute(
                "INSERT INTO hypervisors (hypervisor_id, arn, region, name, host, username,"
                " password, kms_key_arn, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (hypervisor_id, arn, region, name, host, username, password, kms_key_arn, now),
            )
            db.executemany(
                "INSERT OR REPLACE INTO tags (arn, key, value) VALUES (?, ?, ?)",
                [(arn, k, v) for k, v in tags],
            )
            hypervisor = self._hypervisor_where(db, "arn=?", arn)
            assert hypervisor is not None
            return hypervisor

    def hypervisor(self, arn: str) -> Hypervisor | None:
        return self._hypervisor_where(self._db, "arn=?", arn)

    def hypervisor_by_id(self, hypervisor_id: str) -> Hypervisor | None:
        return self._hypervisor_where(self._db, "hypervisor_id=?", hypervisor_id)

    def list_hypervisors(self, region: str, after_seq: int, limit: int) -> list[Hypervisor]:
        rows = self._db.execute(
            f"SELECT {self._HYPERVISOR_COLUMNS} FROM hypervisors WHERE region=? AND seq>?"
            " ORDER BY seq LIMIT ?",
            (region, after_seq, limit),
        ).fetchall()
        return [self._hypervisor_row(r) for r in rows]

    def update_hypervisor(self, arn: str, **changes: Any) -> tuple[Hypervisor, list[str]] | None:
        """Set columns of a hypervisor; a new host or new credentials ask its gateways to
        sync again (PENDING, sync status CREATED). None when it does not exist."""
        if not set(changes) <= self._HYPERVISOR_SETTABLE:
            raise ValueError(f"cannot update {sorted(set(changes) - self._HYPERVISOR_SETTABLE)}")
        with self._tx() as db:
            current = self._hypervisor_where(db, "arn=?", arn)
            if current is None:
                return None
            if "host" in changes:
                self._host_taken(db, current.region, changes["host"], other_than=arn)
            for column, value in changes.items():
                db.execute(f"UPDATE hypervisors SET {column}=? WHERE arn=?", (value, arn))
            key_ids: list[str] = []
            if self._HYPERVISOR_RESYNC & set(changes):
                db.execute(
                    "UPDATE hypervisors SET sync_request=sync_request+1, state='PENDING',"
                    " sync_status='CREATED', sync_message=NULL WHERE arn=?",
                    (arn,),
                )
                key_ids = self._bump_gateways_of(db, current.hypervisor_id)
            updated = self._hypervisor_where(db, "arn=?", arn)
            assert updated is not None
            return updated, key_ids

    def gateways_of(self, hypervisor_id: str) -> list[Gateway]:
        rows = self._db.execute(
            _GATEWAY_SELECT + " WHERE g.hypervisor_id=? AND g.deleted_at IS NULL ORDER BY g.seq",
            (hypervisor_id,),
        ).fetchall()
        return [self._gateway(r) for r in rows]

    def delete_hypervisor(self, arn: str) -> Hypervisor | None:
        """Delete a hypervisor with its VMs and their tags; StoreError("InUse") while a
        gateway is associated with it (its gateways would lose their settings silently)."""
        with self._tx() as db:
            current = self._hypervisor_where(db, "arn=?", arn)
            if current is None:
                return None
            users = [
                str(r[0]) for r in db.execute(
                    "SELECT arn FROM gateways WHERE hypervisor_id=? AND deleted_at IS NULL"
                    " ORDER BY seq", (current.hypervisor_id,),
                )
            ]
            if users:
                raise StoreError("InUse", ", ".join(users))
            db.execute(
                "DELETE FROM tags WHERE arn IN (SELECT arn FROM vms WHERE hypervisor_id=?)",
                (current.hypervisor_id,),
            )
            db.execute("DELETE FROM vms WHERE hypervisor_id=?", (current.hypervisor_id,))
            db.execute("DELETE FROM tags WHERE arn=?", (arn,))
            db.execute("DELETE FROM hypervisors WHERE arn=?", (arn,))
            return current

    def associate(self, gateway_arn: str, hypervisor_id: str) -> list[str]:
        """Associate a live gateway with a hypervisor and ask for a sync (syncRequest + 1).

        StoreError("Associated") when the gateway is associated with another hypervisor;
        associating it again with its own is a new sync request. Returns the polls to wake.
        """
        with self._tx() as db:
            row = db.execute(
                "SELECT hypervisor_id FROM gateways WHERE arn=? AND deleted_at IS NULL",
                (gateway_arn,),
            ).fetchone()
            if row is None:
                raise StoreError("NoGateway", f"Gateway {gateway_arn} was not found")
            if db.execute("SELECT 1 FROM hypervisors WHERE hypervisor_id=?",
                          (hypervisor_id,)).fetchone() is None:
                raise StoreError("NoHypervisor", f"hypervisor {hypervisor_id} was not found")
            if row[0] is not None and row[0] != hypervisor_id:
                other = db.execute("SELECT arn FROM hypervisors WHERE hypervisor_id=?",
                                   (row[0],)).fetchone()
                raise StoreError("Associated", str(other[0]) if other else row[0])
            db.execute("UPDATE gateways SET hypervisor_id=? WHERE arn=?",
                       (hypervisor_id, gateway_arn))
            db.execute(
                "UPDATE hypervisors SET sync_request=sync_request+1, sync_status='CREATED',"
                " sync_message=NULL WHERE hypervisor_id=?",
                (hypervisor_id,),
            )
            return self._bump_gateways_of(db, hypervisor_id)

    def disassociate(self, gateway_arn: str) -> str | None:
        """Clear a live gateway's hypervisor; returns the hypervisor id it had (None: it
        had none) and bumps the gateway's version so its poll drops the settings."""
        with self._tx() as db:
            row = db.execute(
                "SELECT hypervisor_id, key_id FROM gateways WHERE arn=? AND deleted_at IS NULL",
                (gateway_arn,),
            ).fetchone()
            if row is None or row[0] is None:
                return None
            db.execute("UPDATE gateways SET hypervisor_id=NULL WHERE arn=?", (gateway_arn,))
            db.execute("UPDATE identities SET version=version+1 WHERE key_id=?", (row[1],))
            return str(row[0])

    def request_sync(self, arn: str) -> tuple[Hypervisor, list[str]] | None:
        """StartVirtualMachinesMetadataSync: syncRequest + 1, seen by every associated
        gateway's poll."""
        with self._tx() as db:
            current = self._hypervisor_where(db, "arn=?", arn)
            if current is None:
                return None
            db.execute(
                "UPDATE hypervisors SET sync_request=sync_request+1, sync_status='CREATED',"
                " sync_message=NULL WHERE arn=?",
                (arn,),
            )
            key_ids = self._bump_gateways_of(db, current.hypervisor_id)
            updated = self._hypervisor_where(db, "arn=?", arn)
            assert updated is not None
            return updated, key_ids

    def put_mappings(self, arn: str, mappings: list[dict[str, str]], iam_role_arn: str) -> bool:
        with self._tx() as db:
            return db.execute(
                "UPDATE hypervisors SET mappings=?, iam_role_arn=? WHERE arn=?",
                (json.dumps(mappings), iam_role_arn, arn),
            ).rowcount == 1

    def set_hypervisor_state(self, hypervisor_id: str, state: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE hypervisors SET state=? WHERE hypervisor_id=?",
                       (state, hypervisor_id))

    def record_inventory(
        self,
        hypervisor_id: str,
        vms: list[ReportedVm] | None,
        vm_arn: Callable[[str], str],
        state: str,
        sync_status: str,
        message: str | None,
        now: float,
        sync_request: int,
    ) -> SyncOutcome:
        """Record a sync's outcome; with `vms` (a successful sync) they replace the
        hypervisor's list: a VM keeps its row, ARN and tags while reported, one no longer
        reported goes with its tags. One transaction, so a reader sees the old list or the
        new one, never half of each."""
        with self._tx() as db:
            region_row = db.execute(
                "SELECT region, reported_request FROM hypervisors WHERE hypervisor_id=?",
                (hypervisor_id,),
            ).fetchone()
            if region_row is None:
                return SyncOutcome(0, 0, 0)
            if sync_request < region_row[1]:
                kept = int(db.execute("SELECT COUNT(*) FROM vms WHERE hypervisor_id=?",
                                      (hypervisor_id,)).fetchone()[0])
                return SyncOutcome(kept, 0, 0, stale=True)
            added = removed = 0
            if vms is not None:
                before = {
                    str(r[0]) for r in db.execute(
                        "SELECT arn FROM vms WHERE hypervisor_id=?", (hypervisor_id,)
                    )
                }
                reported = set()
                for vm in vms:
                    arn = vm_arn(vm.uuid)
                    reported.add(arn)
                    db.execute(
                        "INSERT INTO vms (arn, hypervisor_id, region, uuid, name, path,"
                        " host_name, tags) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(arn)"
                        " DO UPDATE SET name=excluded.name, path=excluded.path,"
                        " host_name=excluded.host_name, tags=excluded.tags",
                        (arn, hypervisor_id, region_row[0], vm.uuid, vm.name, vm.path,
                         vm.host_name, json.dumps(vm.tags)),
                    )
                gone = sorted(before - reported)
                db.executemany("DELETE FROM tags WHERE arn=?", [(a,) for a in gone])
                db.executemany("DELETE FROM vms WHERE arn=?", [(a,) for a in gone])
                added, removed = len(reported - before), len(gone)
            db.execute(
                "UPDATE hypervisors SET state=?, sync_status=?, sync_message=?,"
                " last_sync=CASE WHEN ? THEN ? ELSE last_sync END, reported_request=?"
                " WHERE hypervisor_id=?",
                (state, sync_status, message, vms is not None, now, sync_request,
                 hypervisor_id),
            )
            kept = int(db.execute("SELECT COUNT(*) FROM vms WHERE hypervisor_id=?",
                                  (hypervisor_id,)).fetchone()[0])
            return SyncOutcome(kept, added, removed)

    def vm(self, arn: str) -> VirtualMachine | None:
        row = self._db.execute(
            f"SELECT {self._VM_COLUMNS} FROM vms WHERE arn=?", (arn,)
        ).fetchone()
        return self._vm_row(row) if row else None

    def list_vms(self, region: str, hypervisor_id: str | None, after_seq: int, limit: int
                 ) -> list[VirtualMachine]:
        if hypervisor_id is None:
            rows = self._db.execute(
                f"SELECT {self._VM_COLUMNS} FROM vms WHERE region=? AND seq>? ORDER BY seq"
                " LIMIT ?", (region, after_seq, limit),
            ).fetchall()
        else:
            rows = self._db.execute(
                f"SELECT {self._VM_COLUMNS} FROM vms WHERE hypervisor_id=? AND region=?"
                " AND seq>? ORDER BY seq LIMIT ?", (hypervisor_id, region, after_seq, limit),
            ).fetchall()
        return [self._vm_row(r) for r in rows]

    def set_seal_key(self, key_id: str, seal_key: bytes) -> bool:
        """Keep the newest sealing key of an identity; True (and version + 1, so the
        passwords held back for want of a key go out at once) when it changed."""
        with self._tx() as db:
            return db.execute(
                "UPDATE identities SET seal_key=?, version=version+1 WHERE key_id=? AND"
                " (seal_key IS NULL OR seal_key<>?)",
                (seal_key, key_id, seal_key),
            ).rowcount == 1

    def bump_version(self, key_id: str) -> None:
        """Something only the poll carries changed (a test to run): wake its gateway."""
        with self._tx() as db:
            db.execute("UPDATE identities SET version=version+1 WHERE key_id=?", (key_id,))

    # -- the link -----------------------------------------------------------------------

    def purge(self, now: float) -> dict[str, int]:
        """Delete expired unused keys and lapsed pending identities. `now` is business time
        (key expiry). Returns how many rows
        of each kind went, for the log. Committed without an fsync (NORMAL): a purge lost
        in a power cut is simply done again.
        """
        with self._unsynced(), self._tx() as db:
            return {kind: db.execute(PURGE_QUERIES[kind], (now,)).rowcount
                    for kind in ("keys", "identities")}

    @contextlib.contextmanager
    def _unsynced(self) -> Iterator[None]:
        """The transactions inside commit with synchronous=NORMAL: in WAL mode no fsync
        (they survive a crash of the process; a power cut may lose them, and the next FULL
        commit makes them durable too). Only for writes that are harmless to lose."""
        if self._unsynced_depth == 0:
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._unsynced_depth += 1
        try:
            yield
        finally:
            self._unsynced_depth -= 1
            if self._unsynced_depth == 0:
                self._db.execute("PRAGMA synchronous=FULL")

    def counts(self) -> dict[str, int]:
        """Rows per table that strangers can grow (tests and the purge log)."""
        return {
            table: int(self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
            for table in ("identities", "activation_keys")
        }

    def heartbeat(self, key_id: str, software_version: str | None, now: float) -> None:
        """Note that `key_id` polled: buffered, not committed.

        Every gateway polls every 20 s, so one commit per poll was one fsync per poll on the
        event loop (10,000 gateways: 500 a second). Heartbeats are kept here and written
        together by `flush_heartbeats` (the link flushes a moment after the first one, in
        one unsynced commit), or with the next transaction of anything. Readers never see
        the difference: `identity` and the gateway reads lay buffered ones over the rows,
        and a transaction writes them first. A crash loses at most the last moment's
        last-seen times, which the next polls put back.
        """
        with self._heartbeat_lock:
            if software_version is None and key_id in self._heartbeats:
                software_version = self._heartbeats[key_id][1]
            self._heartbeats[key_id] = (now, software_version)

    def pending_heartbeats(self) -> int:
        return len(self._heartbeats)

    def flush_heartbeats(self) -> int:
        """Write the buffered heartbeats in one unsynced transaction; returns how many."""
        if not self._heartbeats:
            return 0
        if self._db.in_transaction:  # a caller's transaction: they go with it
            return self._write_heartbeats(self._db)
        with self._unsynced():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                written = self._write_heartbeats(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return written

    def _write_heartbeats(self, db: sqlite3.Connection) -> int:
        if not self._heartbeats:
            return 0
        with self._heartbeat_lock:
            pending, self._heartbeats = self._heartbeats, {}
        db.executemany(
            "UPDATE identities SET last_seen=?, software_version=COALESCE(?,"
            " software_version) WHERE key_id=?",
            [(seen, version, key_id) for key_id, (seen, version) in pending.items()],
        )
        return len(pending)

    def _seen(self, key_id: str, last_seen: float | None, software_version: str | None
              ) -> tuple[float | None, str | None]:
        """(last seen, software version) of an identity, a buffered heartbeat first."""
        pending = self._heartbeats.get(key_id)
        if pending is None:
            return last_seen, software_version
        return pending[0], pending[1] if pending[1] is not None else software_version

    # -- uploads ------------------------------------------------------------------------
    #
    # A commit is three steps: `begin_upload` writes the record with `part` set (in the same
    # transaction that refuses a taken name), the part file is renamed into place, then
    # `finish_upload` clears `part`. A crash between any two leaves a state that start-up
    # (GatewayLink.reconcile) repairs: a record with `part` is rolled forward.

    _UPLOAD_COLUMNS = "gateway_id, name, size, sha256, stored_at, part"

    def upload_record(self, gateway_id: str, name: str) -> UploadRecord | None:
        row = self._db.execute(
            f"SELECT {self._UPLOAD_COLUMNS} FROM uploads WHERE gateway_id=? AND name=?",
            (gateway_id, name),
        ).fetchone()
        return UploadRecord(*row) if row else None

    def upload(self, gateway_id: str, name: str) -> tuple[int, str] | None:
        """(size, sha256) of a committed upload."""
        record = self.upload_record(gateway_id, name)
        if record is None or record.part is not None:
            return None
        return record.size, record.sha256

    def upload_records(self) -> list[UploadRecord]:
        """Every record (start-up reconciliation only: this one reads the whole table)."""
        rows = self._db.execute(f"SELECT {self._UPLOAD_COLUMNS} FROM uploads").fetchall()
        return [UploadRecord(*row) for row in rows]

    def begin_upload(self, record: UploadRecord, replace: bool) -> UploadRecord | None:
        """Record an upload about to be renamed into place; returns the record it replaces.

        UploadExists if the name is taken and `replace` is false. Atomic: of two racing
        uploads of one name, one wins.
        """
        assert record.part is not None
        with self._tx() as db:
            row = db.execute(
                f"SELECT {self._UPLOAD_COLUMNS} FROM uploads WHERE gateway_id=? AND name=?",
                (record.gateway_id, record.name),
            ).fetchone()
            previous = UploadRecord(*row) if row else None
            if previous is not None and not replace:
                raise UploadExists(previous)
            self._put_upload(db, record)
        return previous

    def undo_upload(self, record: UploadRecord, previous: UploadRecord | None) -> None:
        """The rename after `begin_upload` failed: put back what was recorded before."""
        with self._tx() as db:
            db.execute(
                "DELETE FROM uploads WHERE gateway_id=? AND name=? AND part=?",
                (record.gateway_id, record.name, record.part),
            )
            if previous is not None:
                self._put_upload(db, previous)

    def finish_upload(self, gateway_id: str, name: str, part: str) -> None:
        """The rename of `part` is done and durable: the record is complete."""
        with self._tx() as db:
            db.execute(
                "UPDATE uploads SET part=NULL WHERE gateway_id=? AND name=? AND part=?",
                (gateway_id, name, part),
            )

    def put_upload(self, record: UploadRecord) -> None:
        """Write a record as it is (start-up repairs)."""
        with self._tx() as db:
            self._put_upload(db, record)

    @staticmethod
    def _put_upload(db: sqlite3.Connection, r: UploadRecord) -> None:
        db.execute(
            "INSERT OR REPLACE INTO uploads (gateway_id, name, size, sha256, stored_at, part)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (r.gateway_id, r.name, r.size, r.sha256, r.stored_at, r.part),
        )

    def delete_upload(self, gateway_id: str, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM uploads WHERE gateway_id=? AND name=?", (gateway_id, name))


def _private_files(path: Path) -> None:
    """Create the database 0600 before SQLite opens it, and narrow side files left wider.

    SQLite creates `-wal` and `-shm` with the mode of the database file, so a database born
    0600 has private side files; chmod after the fact (as an older version did) left them
    0644 for as long as they existed. Files of such a version are narrowed here.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm", "-journal"):
        side = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            side.chmod(0o600)
