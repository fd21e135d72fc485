"""`python -m controlplane rebuild-vaults`: recreate the vaults' database rows from their
storage alone, after the control plane's disk (database, secrets.key) was lost.

Why this exists: with an S3 bucket the vaults outlive the machine that served them; what a
rebuilt control plane needs is in each vault's storage (controlplane/vaultindex.py:
vault.json and one record per recovery point, sealed under the vault's data key, which
key.json holds wrapped under the master key). With the settings file and the master key
file, this command brings back every vault and every COMPLETED recovery point, with the
ARNs, dates, lifecycle and sizes the API showed (and the account id the ARNs carry, when
the database has none yet).

What it does not bring back: jobs (backup and restore jobs live in the database only),
recovery point tags (no column holds them; they are in the record), the gateways,
hypervisors and VM inventory (register them again; a restore then names the new
hypervisor in its Metadata `hypervisorArn`), and LastRestoreTime.

Rules: run it with the control plane stopped (it writes the database the control plane
holds). Every vault's key is checked first and a key.json that does not unwrap with the
configured key refuses the whole rebuild before anything is written (the wrong key file).
Vaults and points already in the database are skipped (it can be run again). A point
whose manifest names chunks the vault lacks is reported as damaged and not imported; a
record whose manifest is gone (a commit or a delete cut short) is skipped.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane import atrest
from controlplane.backupstore import BackupStore, BackupStoreError
from controlplane.chunkstore import ChunkStore, VaultStores
from controlplane.store import DB_FILE, Store
from controlplane.vaultindex import (
    VAULT_OBJECT,
    IndexRecordError,
    point_object,
    point_row,
    vault_row,
)
from controlplane.vaultkeys import VaultKeyError
from controlplane.vaults import VaultError, Vaults
from controlplane.vaultsettings import VAULTS_DIR, VaultStoreSettings

log = logging.getLogger("controlplane.rebuild")

HAS_BATCH = 256        # chunk ids looked up per batch
HAS_WORKERS = 16       # lookups at once (a bucket answers each in a round trip)


class RebuildRefused(Exception):
    """Nothing was written: the message says why (the wrong key file, most often)."""


@dataclass
class VaultReport:
    """What the rebuild did with one vault's storage."""

    storage: str
    name: str | None = None
    region: str | None = None
    vault: str = "skipped"          # "restored", "present" or "skipped"
    reason: str = ""                # why skipped
    restored: int = 0
    present: int = 0
    damaged: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        if self.vault == "skipped":
            return [f"vault storage {self.storage}: skipped: {self.reason}"]
        head = (f"vault {self.name} ({self.region}, storage {self.storage}): {self.vault}; "
                f"recovery points: {self.restored} restored, {self.present} already present, "
                f"{len(self.damaged)} damaged")
        return ([head] + [f"  damaged, not imported: {d}" for d in self.damaged]
                + [f"  note: {n}" for n in self.notes])


def rebuild(state_dir: Path, settings: VaultStoreSettings, vault_name: str | None = None
            ) -> list[VaultReport]:
    """Rebuild the rows of every vault (or the vaults named `vault_name`) into the
    database of `state_dir`; RebuildRefused when nothing may be written."""
    settings.check()
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path = state_dir / atrest.KEY_FILE
    secrets = atrest.SecretsAtRest.load_or_create(key_path) if key_path.exists() else None
    try:
        keyring = settings.keyring(secrets, create=False)
    except VaultKeyError as exc:
        raise RebuildRefused(str(exc)) from None
    stores = settings.stores(state_dir)
    vaults = Vaults(state_dir / VAULTS_DIR, secrets, stores=stores, keyring=keyring)
    try:
        found = _read_vaults(vaults, vault_name)
    finally:
        vaults.close()
    store = Store(state_dir / DB_FILE)
    try:
        backups = BackupStore(store)
        for report, record in found:
            if record is not None:
                _import(vaults, stores, backups, report, record)
    finally:
        store.close()
    return [report for report, _ in found]


def _read_vaults(vaults: Vaults, vault_name: str | None
                 ) -> list[tuple[VaultReport, dict[str, Any] | None]]:
    """Each vault's report and vault.json; every key checked before anything is written."""
    out: list[tuple[VaultReport, dict[str, Any] | None]] = []
    refused: list[str] = []
    for storage in vaults.storages():
        report = VaultReport(storage)
        try:
            if not vaults.has_key_object(storage):
                report.reason = (f"no key.json: made before vaults kept their key and index "
                                 f"(start the old control plane once with its secrets.key to "
                                 f"migrate it); it has no {VAULT_OBJECT} to rebuild from")
                out.append((report, None))
                continue
            vaults.check_key(storage)
            doc = vaults.record(storage, VAULT_OBJECT)
        except VaultKeyError as exc:
            refused.append(str(exc))
            continue
        except VaultError as exc:
            report.reason = exc.message
            out.append((report, None))
            continue
        if doc is None:
            report.reason = (f"no {VAULT_OBJECT}: a creation cut short before the API "
                             "answered, or a vault being dropped")
            out.append((report, None))
            continue
        try:
            row = vault_row(doc, storage)
        except IndexRecordError as exc:
            report.reason = str(exc)
            out.append((report, None))
            continue
        report.name, report.region = row["name"], row["region"]
        if vault_name is None or row["name"] == vault_name:
            out.append((report, doc))
    if refused:
        raise RebuildRefused("nothing was rebuilt: " + "; ".join(refused))
    if vault_name is not None:
        out = [(report, doc) for report, doc in out if doc is not None]
        if not out:
            raise RebuildRefused(f"no vault named {vault_name!r} in the vault store")
    return out


def _import(vaults: Vaults, stores: VaultStores, backups: BackupStore, report: VaultReport,
            doc: dict[str, Any]) -> None:
    storage = report.storage
    row = vault_row(doc, storage)
    account = doc.get("AccountId")
    if isinstance(account, str) and account:
        held = backups.adopt_account(account)
        if held != account:
            report.reason = (f"vault {row['name']} belongs to account {account}, this "
                             f"database to account {held}: rebuild into a new state directory")
            return
    try:
        report.vault = "restored" if backups.insert_rebuilt_vault(row) else "present"
    except BackupStoreError as exc:
        report.reason = exc.message
        return
    points: list[dict[str, Any]] = []
    for name in vaults.point_record_names(storage):
        try:
            record = vaults.record(storage, name)
            if record is None:
                continue  # deleted since listed
            point = point_row(record, storage)
        except (VaultError, IndexRecordError) as exc:
            report.damaged.append(f"{name}: {getattr(exc, 'message', exc)}")
            continue
        if point_object(point["point_id"]) != name or (
                point["vault_name"], point["vault_arn"]) != (row["name"], row["arn"]):
            report.damaged.append(f"{name}: its record names another point or vault")
            continue
        points.append(point)
    chunks = stores.chunks(storage)
    # In the order they were made, so that listings come out as they did.
    for point in sorted(points, key=lambda p: (p["created_at"], p["completed_at"], p["arn"])):
        try:
            manifest = vaults.manifest(storage, point["point_id"])
        except VaultError as exc:
            if exc.code == "UnknownPoint":
                report.notes.append(f"{point['arn']}: a record without a manifest (a "
                                    "backup or a delete cut short): skipped")
            else:
                report.damaged.append(f"{point['arn']}: {exc.message}")
            continue
        needed = sorted(manifest.chunks())
        absent = _absent(chunks, needed)
        if absent:
            report.damaged.append(f"{point['arn']}: the vault lacks {len(absent)} of the "
                                  f"{len(needed)} chunks its manifest names (first: "
                                  f"{absent[0]})")
            continue
        if backups.insert_rebuilt_point(point):
            report.restored += 1
        else:
            report.present += 1
    log.info("event=vault_rebuilt vault=%s storage=%s state=%s restored=%d present=%d "
             "damaged=%d", row["name"], storage, report.vault, report.restored,
             report.present, len(report.damaged))


def _absent(chunks: ChunkStore, ids: list[str]) -> list[str]:
    """The ids the store lacks, looked up HAS_BATCH at a time, HAS_WORKERS at once."""
    out: list[str] = []
    with ThreadPoolExecutor(max_workers=HAS_WORKERS) as pool:
        for start in range(0, len(ids), HAS_BATCH):
            batch = ids[start:start + HAS_BATCH]
            out += [c for c, held in zip(batch, pool.map(chunks.has, batch), strict=True)
                    if not held]
    return out
