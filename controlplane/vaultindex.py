"""The vault's own index: what a rebuild needs to recreate its database rows, kept in the
vault's storage (its `meta` store) beside the chunks and manifests.

Why in the vault and not only in the database: the database lives on the control plane's
disk; the vault may live in a bucket that outlives it. Each record is written durably
before the API acknowledges what it describes (CreateBackupVault: `vault.json`; a backup's
completion: the point's record, before its manifest, so a manifest never lacks its record),
and removed before or with it (a dropped vault loses `vault.json` first; a deleted point
loses its manifest, then its record), so a rebuild imports what the API had acknowledged.

The records are JSON objects with the AWS Backup API's member names where there is one,
sealed by vaultkeys.RecordSeal. This module builds them and turns them back into the
columns of backupstore.py's tables, checking every field (a record is read from storage
that may be old or damaged).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from controlplane.backupstore import Job, NewPoint

VAULT_OBJECT = "vault.json"
POINT_PREFIX = "rp-"
POINT_SUFFIX = ".json"
RESOURCE_TYPE = "VirtualMachine"
META_NAME_RE = re.compile(r"[a-z0-9._-]{1,64}")
_FORMAT = 1


class IndexRecordError(ValueError):
    """A record lacks a field or has one of the wrong type; the message names it."""


def point_object(point_id: str) -> str:
    """The meta object of a point's record: `rp-<id>.json`, or, for an id that is not a
    valid meta name (upper case, too long), `rp-h<SHA-256 of the id>.json` (the record
    holds the id either way)."""
    name = f"{POINT_PREFIX}{point_id}{POINT_SUFFIX}"
    if META_NAME_RE.fullmatch(name):
        return name
    digest = hashlib.sha256(point_id.encode()).hexdigest()[:48]
    return f"{POINT_PREFIX}h{digest}{POINT_SUFFIX}"


def is_point_object(name: str) -> bool:
    return name.startswith(POINT_PREFIX) and name.endswith(POINT_SUFFIX)


def vault_record(*, region: str, name: str, arn: str, account: str, storage: str,
                 created_at: float, creator_request_id: str | None,
                 encryption_key_arn: str | None, tags: dict[str, str]) -> dict[str, Any]:
    """vault.json: what CreateBackupVault made (a vault's tags are set only there)."""
    return {
        "format": _FORMAT, "kind": "vault", "BackupVaultName": name, "BackupVaultArn": arn,
        "Region": region, "AccountId": account, "Storage": storage,
        "CreationDate": created_at, "CreatorRequestId": creator_request_id,
        "EncryptionKeyArn": encryption_key_arn, "BackupVaultTags": dict(tags),
    }


def point_record(job: Job, point: NewPoint, completed_at: float) -> dict[str, Any]:
    """A recovery point's record, from its backup job and what its completion adds: every
    column of backupstore's recovery_points (but seq, status and last_restore) and what
    DescribeRecoveryPoint, ListRecoveryPoints* and GetRecoveryPointRestoreMetadata show."""
    # As backupstore.complete_backup: AWS counts DeleteAfterDays from the point's creation.
    delete_at = (job.created_at + job.delete_after_days * 86400.0
                 if job.delete_after_days is not None else None)
    return {
        "format": _FORMAT, "kind": "recovery-point",
        "RecoveryPointArn": job.recovery_point_arn, "RecoveryPointId": job.point_id,
        "Region": job.region, "BackupVaultName": job.vault_name,
        "BackupVaultArn": job.vault_arn, "Storage": job.storage,
        "ResourceArn": job.resource_arn, "ResourceName": job.resource_name,
        "ResourceType": RESOURCE_TYPE, "HypervisorId": job.hypervisor_id,
        "HypervisorArn": point.hypervisor_arn, "HypervisorKind": point.hypervisor_kind,
        "VmUuid": job.vm_uuid or "", "BackupJobId": job.job_id,
        "IamRoleArn": job.iam_role_arn, "CreationDate": job.created_at,
        "CompletionDate": completed_at, "BackupSizeInBytes": point.backup_size,
        "Lifecycle": {"DeleteAfterDays": job.delete_after_days},
        "CalculatedLifecycle": {"DeleteAt": delete_at},
        "Checkpoint": point.checkpoint, "Incremental": point.incremental,
        "BasePointArn": job.base_point_arn if point.incremental else None,
        "RestoreDefaults": dict(point.restore_defaults),
        "RecoveryPointTags": dict(job.tags),
    }


# -- reading them back ------------------------------------------------------------------------


def _get(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], *,
         optional: bool = False, where: str) -> Any:
    value = doc.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        value = None  # True is an int to Python, not to a record
    if not isinstance(value, kind):
        raise IndexRecordError(f"{where}: {key} is missing or not a "
                          f"{getattr(kind, '__name__', 'value')}")
    return value


def _strings(doc: dict[str, Any], key: str, where: str) -> dict[str, str]:
    value = doc.get(key) or {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise IndexRecordError(f"{where}: {key} is not an object of strings")
    return dict(value)


def vault_row(doc: dict[str, Any], storage: str) -> dict[str, Any]:
    """backup_vaults' columns from vault.json (bound to `storage`, the vault it sits in)."""
    where = f"vault {storage}: {VAULT_OBJECT}"
    if doc.get("format") != _FORMAT or doc.get("kind") != "vault":
        raise IndexRecordError(f"{where}: not a vault record of format {_FORMAT}")
    if doc.get("Storage") != storage:
        raise IndexRecordError(f"{where}: names storage {doc.get('Storage')!r}, not {storage}")
    number = (int, float)
    return {
        "region": _get(doc, "Region", str, where=where),
        "name": _get(doc, "BackupVaultName", str, where=where),
        "arn": _get(doc, "BackupVaultArn", str, where=where),
        "storage": storage,
        "created_at": float(_get(doc, "CreationDate", number, where=where)),
        "creator_request_id": _get(doc, "CreatorRequestId", str, optional=True, where=where),
        "encryption_key_arn": _get(doc, "EncryptionKeyArn", str, optional=True, where=where),
        "tags": _strings(doc, "BackupVaultTags", where),
    }


def point_row(doc: dict[str, Any], storage: str) -> dict[str, Any]:
    """recovery_points' columns (status COMPLETED) from a point's record."""
    where = f"vault {storage}: record of {doc.get('RecoveryPointArn', '?')}"
    if doc.get("format") != _FORMAT or doc.get("kind") != "recovery-point":
        raise IndexRecordError(f"{where}: not a recovery point record of format {_FORMAT}")
    if doc.get("Storage") != storage:
        raise IndexRecordError(f"{where}: names storage {doc.get('Storage')!r}, not {storage}")
    number = (int, float)
    lifecycle = doc.get("Lifecycle") or {}
    calculated = doc.get("CalculatedLifecycle") or {}
    if not isinstance(lifecycle, dict) or not isinstance(calculated, dict):
        raise IndexRecordError(f"{where}: Lifecycle and CalculatedLifecycle must be objects")
    delete_at = _get(calculated, "DeleteAt", number, optional=True, where=where)
    return {
        "arn": _get(doc, "RecoveryPointArn", str, where=where),
        "point_id": _get(doc, "RecoveryPointId", str, where=where),
        "region": _get(doc, "Region", str, where=where),
        "vault_name": _get(doc, "BackupVaultName", str, where=where),
        "vault_arn": _get(doc, "BackupVaultArn", str, where=where),
        "storage": storage,
        "status": "COMPLETED",
        "resource_arn": _get(doc, "ResourceArn", str, where=where),
        "resource_name": _get(doc, "ResourceName", str, optional=True, where=where),
        "hypervisor_id": _get(doc, "HypervisorId", str, where=where),
        "hypervisor_arn": _get(doc, "HypervisorArn", str, where=where),
        "hypervisor_kind": _get(doc, "HypervisorKind", str, where=where),
        "vm_uuid": _get(doc, "VmUuid", str, where=where),
        "job_id": _get(doc, "BackupJobId", str, where=where),
        "iam_role_arn": _get(doc, "IamRoleArn", str, optional=True, where=where),
        "created_at": float(_get(doc, "CreationDate", number, where=where)),
        "completed_at": float(_get(doc, "CompletionDate", number, where=where)),
        "backup_size": _get(doc, "BackupSizeInBytes", int, where=where),
        "delete_after_days": _get(lifecycle, "DeleteAfterDays", int, optional=True,
                                  where=where),
        "delete_at": float(delete_at) if delete_at is not None else None,
        "checkpoint": _get(doc, "Checkpoint", str, optional=True, where=where),
        "incremental": bool(_get(doc, "Incremental", bool, where=where)),
        "restore_defaults": _strings(doc, "RestoreDefaults", where),
    }
