"""The AWS Backup operations (service `backup`) this control plane serves: vaults, backup
and restore jobs of the gateways' virtual machines, recovery points, protected resources.
One method per operation, over backupstore.py; the wire (restjson.py) has validated the
input against the model and hands a dict keyed by the model's member names, timestamps as
epoch seconds; every method returns the output dict (or a coroutine of it: the ones that
touch the vault's files, which run in worker threads).

Here are the rules the model cannot express (docs/backups.md): a backup's ResourceArn is a
VM of this control plane's inventory; a vault is deleted only empty; a restore's Metadata
follows gatewaycore.restorekeys for the target hypervisor's kind and must name a new VM.
IAM is not modelled: IamRoleArn is kept and shown, never enforced.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from controlplane import vaultindex
from controlplane.backupstore import (
    BACKUP,
    ENDED,
    RESTORE,
    BackupStore,
    BackupStoreError,
    Job,
    JobFilter,
    Point,
    PointFilter,
    Vault,
)
from controlplane.clock import Clock
from controlplane.errors import ApiError
from controlplane.jobscheduler import JobScheduler
from controlplane.sigv4 import Caller
from controlplane.store import Hypervisor, Store, VirtualMachine, partition_of
from controlplane.vaults import Vaults
from gatewaycore import restorekeys, rules

log = logging.getLogger("controlplane.backup")

RESOURCE_TYPE = "VirtualMachine"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEFAULT_START_WINDOW_MINUTES = 8 * 60   # AWS's default StartWindowMinutes
MAX_DELETE_AFTER_DAYS = 36500
VM_ARN_RE = re.compile(
    r"arn:(?P<partition>aws|aws-cn|aws-us-gov):backup-gateway:(?P<region>[a-z0-9-]+):"
    r"(?P<account>[0-9]{12}):vm/vm-[0-9a-f]{17}"
)
HYPERVISOR_ARN_RE = re.compile(
    r"arn:(aws|aws-cn|aws-us-gov):backup-gateway:[a-z0-9-]+:[0-9]{12}:hypervisor/hype-[0-9A-F]+"
)
_TOKEN_RE = re.compile(
    r"v1\|(?P<region>[a-z0-9-]{1,32})\|(?P<kind>[a-z]{1,16})\|(?P<pos>.{1,2048})"
)


def invalid(message: str) -> ApiError:
    return ApiError("InvalidParameterValueException", message)


def missing(message: str) -> ApiError:
    return ApiError("MissingParameterValueException", message)


def not_found(message: str) -> ApiError:
    return ApiError("ResourceNotFoundException", message)


def bad_request(message: str) -> ApiError:
    return ApiError("InvalidRequestException", message)


def _operation_name(method: str) -> str:
    return "".join(part.capitalize() for part in method.split("_"))


def percent(value: float) -> str:
    """PercentDone as AWS shows it: a string with one decimal ("42.0")."""
    return f"{max(0.0, min(100.0, value)):.1f}"


def hypervisor_kind(hypervisor: Hypervisor) -> str:
    """"libvirt" for a libvirt URI host, else "vsphere" (restorekeys' kinds)."""
    try:
        return rules.hypervisor_host(hypervisor.host).kind
    except rules.RuleError:
        return "vsphere"


def _token(region: str, kind: str, position: str) -> str:
    return base64.urlsafe_b64encode(f"v1|{region}|{kind}|{position}".encode()).decode()


def _parse_token(token: str, region: str, kind: str, op: str) -> str:
    """The position in a NextToken of ours for this list and region; anything else is an
    InvalidParameterValueException saying what is accepted."""
    text = ""
    if re.fullmatch(r"[A-Za-z0-9_=-]{1,4000}", token):
        try:
            text = base64.urlsafe_b64decode(token).decode("utf-8")
        except (ValueError, binascii.Error):
            text = ""
    parts = _TOKEN_RE.fullmatch(text)
    if parts is None or parts["kind"] != kind:
        raise invalid(f"NextToken: not a token {op} returned (pass the NextToken of the "
                      "previous response unchanged)")
    if parts["region"] != region:
        raise invalid(f"NextToken: was returned for region {parts['region']}, not {region}")
    return parts["pos"]


class BackupApi:
    """What each `backup` call does. `operations` maps the model's names to methods."""

    def __init__(self, store: Store, backups: BackupStore, vaults: Vaults,
                 scheduler: JobScheduler, clock: Clock) -> None:
        self.store = store
        self.backups = backups
        self.vaults = vaults
        self.scheduler = scheduler
        self.clock = clock
        self.account = store.account_id()
        self.operations: dict[
            str, Callable[[Caller, dict[str, Any]], dict[str, Any] | Awaitable[dict[str, Any]]]
        ] = {
            _operation_name(name): getattr(self, name)
            for name in (
                "create_backup_vault", "describe_backup_vault", "list_backup_vaults",
                "delete_backup_vault", "start_backup_job", "describe_backup_job",
                "list_backup_jobs", "stop_backup_job", "list_recovery_points_by_backup_vault",
                "list_recovery_points_by_resource", "describe_recovery_point",
                "delete_recovery_point", "get_recovery_point_restore_metadata",
                "start_restore_job", "describe_restore_job", "list_restore_jobs",
                "list_protected_resources", "describe_protected_resource",
            )
        }

    # -- helpers --------------------------------------------------------------------------

    def _vault_arn(self, region: str, name: str) -> str:
        return f"arn:{partition_of(region)}:backup:{region}:{self.account}:backup-vault:{name}"

    def _vault(self, caller: Caller, name: str) -> Vault:
        vault = self.backups.vault(caller.region, name)
        if vault is None:
            raise not_found(f"Backup vault {name} was not found in region {caller.region} "
                            "(CreateBackupVault first)")
        return vault

    def _vm(self, caller: Caller, arn: str) -> VirtualMachine:
        """A VM of this control plane's inventory in the caller's region."""
        parts = VM_ARN_RE.fullmatch(arn)
        if parts is None:
            raise invalid(
                f"ResourceArn '{arn}' is not a virtual machine of this control plane; "
                "accepted: arn:aws:backup-gateway:REGION:ACCOUNT:vm/vm-<17 hex> as "
                "ListVirtualMachines (backup-gateway) shows it")
        vm = self.store.vm(arn)
        if vm is None or parts["account"] != self.account or vm.region != caller.region:
            raise not_found(f"Virtual machine {arn} is not in the inventory of region "
                            f"{caller.region} (see backup-gateway list-virtual-machines; "
                            "StartVirtualMachinesMetadataSync to refresh it)")
        return vm

    def _job(self, caller: Caller, job_id: str, job_type: str) -> Job:
        job = self.backups.job(job_id)
        if job is None or job.job_type != job_type or job.region != caller.region:
            what = "Backup job" if job_type == BACKUP else "Restore job"
            raise not_found(f"{what} {job_id} was not found in region {caller.region}")
        return job

    def _point(self, caller: Caller, arn: str, vault_name: str | None = None) -> Point:
        point = self.backups.point(arn)
        if point is None or point.region != caller.region or (
            vault_name is not None and point.vault_name != vault_name
        ):
            where = f" in backup vault {vault_name}" if vault_name else ""
            raise not_found(f"Recovery point {arn} was not found{where} (region "
                            f"{caller.region})")
        return point

    @staticmethod
    def _limit(body: dict[str, Any]) -> int:
        return min(body.get("MaxResults") or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)

    def _after_seq(self, caller: Caller, body: dict[str, Any], kind: str, op: str) -> int:
        if not body.get("NextToken"):
            return 0
        pos = _parse_token(body["NextToken"], caller.region, kind, op)
        if not pos.isascii() or not pos.isdigit() or len(pos) > 18:
            raise invalid(f"NextToken: not a token {op} returned")
        return int(pos)

    # -- vaults ---------------------------------------------------------------------------

    def _vault_view(self, vault: Vault) -> dict[str, Any]:
        out: dict[str, Any] = {
            "BackupVaultName": vault.name,
            "BackupVaultArn": vault.arn,
            "VaultType": "BACKUP_VAULT",
            "VaultState": "AVAILABLE",
            "CreationDate": vault.created_at,
            "NumberOfRecoveryPoints": self.backups.point_count(vault.region, vault.name),
            "Locked": False,
            "EncryptionKeyType": ("CUSTOMER_MANAGED_KMS_KEY" if vault.encryption_key_arn
                                  else "AWS_OWNED_KMS_KEY"),
        }
        if vault.encryption_key_arn:
            out["EncryptionKeyArn"] = vault.encryption_key_arn
        if vault.creator_request_id:
            out["CreatorRequestId"] = vault.creator_request_id
        return out

    async def create_backup_vault(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        """A vault's storage is made first (idempotent, under a key of its own), then its
        row: of two racing creates one row wins and the other drops its storage."""
        name = body["BackupVaultName"]
        request_id = body.get("CreatorRequestId")
        existing = self.backups.vault(caller.region, name)
        if existing is not None and request_id and existing.creator_request_id == request_id:
            return {"BackupVaultName": name, "BackupVaultArn": existing.arn,
                    "CreationDate": existing.created_at}  # a retried create
        if existing is not None:
            raise ApiError("AlreadyExistsException",
                           f"Backup vault {name} already exists in region {caller.region}")
        storage = "v-" + secrets.token_hex(8)
        arn, now = self._vault_arn(caller.region, name), self.clock.now()
        tags = dict(body.get("BackupVaultTags") or {})
        # Its vault.json (what a rebuild reads) is durable before the row, so before the answer.
        await _in_thread(self.vaults.create, storage, vaultindex.vault_record(
            region=caller.region, name=name, arn=arn, account=self.account, storage=storage,
            created_at=now, creator_request_id=request_id,
            encryption_key_arn=body.get("EncryptionKeyArn"), tags=tags))
        try:
            vault = self.backups.create_vault(
                caller.region, name, arn, storage, now, request_id,
                body.get("EncryptionKeyArn"), tags,
            )
        except BackupStoreError as exc:
            await _in_thread(self.vaults.drop, storage)
            raise ApiError("AlreadyExistsException", exc.message) from None
        log.info("event=backup_vault_created arn=%s storage=%s", vault.arn, storage)
        return {"BackupVaultName": vault.name, "BackupVaultArn": vault.arn,
                "CreationDate": vault.created_at}

    def describe_backup_vault(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("BackupVaultAccountId") not in (None, self.account):
            raise not_found(f"Backup vault {body['BackupVaultName']} was not found in "
                            f"account {body['BackupVaultAccountId']}")
        return self._vault_view(self._vault(caller, body["BackupVaultName"]))

    def list_backup_vaults(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("ByVaultType") not in (None, "BACKUP_VAULT") or body.get("ByShared"):
            return {"BackupVaultList": []}  # only plain vaults of this account exist here
        limit = self._limit(body)
        after = self._after_seq(caller, body, "vaults", "ListBackupVaults")
        page = self.backups.list_vaults(caller.region, after, limit + 1)
        out: dict[str, Any] = {"BackupVaultList": [self._vault_view(v) for v in page[:limit]]}
        if len(page) > limit:
            out["NextToken"] = _token(caller.region, "vaults", str(page[limit - 1].seq))
        return out

    async def delete_backup_vault(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        vault = self._vault(caller, body["BackupVaultName"])
        try:
            self.backups.delete_vault(caller.region, vault.name)
        except BackupStoreError as exc:
            raise bad_request(exc.message) from None
        await _in_thread(self.vaults.drop, vault.storage)
        log.info("event=backup_vault_deleted arn=%s", vault.arn)
        return {}

    # -- backup jobs ----------------------------------------------------------------------

    def start_backup_job(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        for member in ("LogicallyAirGappedBackupVaultArn", "Index"):
            if body.get(member) is not None:
                raise invalid(f"{member}: not supported for virtual machines of a backup "
                              "gateway (leave it out)")
        if body.get("BackupOptions"):
            raise invalid("BackupOptions: virtual machines of a backup gateway take no "
                          "backup options (WindowsVSS is for EC2); leave it out")
        vault = self._vault(caller, body["BackupVaultName"])
        vm = self._vm(caller, body["ResourceArn"])
        lifecycle = body.get("Lifecycle") or {}
        if lifecycle.get("MoveToColdStorageAfterDays") is not None or lifecycle.get(
                "OptInToArchiveForSupportedResources"):
            raise invalid("Lifecycle.MoveToColdStorageAfterDays: cold storage is not offered "
                          "by this control plane; accepted: Lifecycle.DeleteAfterDays only")
        if lifecycle.get("DeleteAfterEvent") is not None:
            raise invalid("Lifecycle.DeleteAfterEvent: there are no copy jobs here; "
                          "accepted: Lifecycle.DeleteAfterDays only")
        delete_after = lifecycle.get("DeleteAfterDays")
        if delete_after is not None and not 1 <= delete_after <= MAX_DELETE_AFTER_DAYS:
            raise invalid(f"Lifecycle.DeleteAfterDays: must be from 1 to "
                          f"{MAX_DELETE_AFTER_DAYS}, got {delete_after}")
        window = body.get("StartWindowMinutes")
        if window is not None and window < 60:
            raise invalid(f"StartWindowMinutes: must be at least 60, got {window}")
        now = self.clock.now()
        token = body.get("IdempotencyToken")
        if token:
            earlier = self.backups.job_by_token(caller.region, BACKUP, token)
            if earlier is not None:
                return self._same_backup(earlier, vault, vm)
        point_id = str(uuid.uuid4())
        job = self.backups.insert_job({
            "job_id": str(uuid.uuid4()).upper(),
            "job_type": BACKUP,
            "region": caller.region,
            "state": "PENDING",
            "status_message": "waiting to be scheduled",
            "vault_name": vault.name,
            "vault_arn": vault.arn,
            "storage": vault.storage,
            "resource_arn": vm.arn,
            "resource_name": vm.name,
            "hypervisor_id": vm.hypervisor_id,
            "vm_uuid": vm.uuid,
            "iam_role_arn": body["IamRoleArn"],
            "idempotency_token": token or None,
            "created_at": now,
            "recovery_point_arn": (f"arn:{partition_of(caller.region)}:backup:{caller.region}:"
                                   f"{self.account}:recovery-point:{point_id}"),
            "point_id": point_id,
            "delete_after_days": delete_after,
            "start_by": now + 60.0 * (window or DEFAULT_START_WINDOW_MINUTES),
            "tags": dict(body.get("RecoveryPointTags") or {}),
        })
        if token and (job.resource_arn, job.vault_name) != (vm.arn, vault.name):
            return self._same_backup(job, vault, vm)  # a racing call with the token won
        log.info("event=backup_job_created job=%s vm=%s vault=%s", job.job_id, vm.arn,
                 vault.name)
        self.scheduler.run()
        return {"BackupJobId": job.job_id, "RecoveryPointArn": job.recovery_point_arn,
                "CreationDate": job.created_at, "IsParent": False}

    @staticmethod
    def _same_backup(job: Job, vault: Vault, vm: VirtualMachine) -> dict[str, Any]:
        if (job.resource_arn, job.vault_name) != (vm.arn, vault.name):
            raise invalid(f"IdempotencyToken: was used for backup job {job.job_id} of "
                          f"{job.resource_arn} into {job.vault_name}; use a new token for "
                          "another job")
        return {"BackupJobId": job.job_id, "RecoveryPointArn": job.recovery_point_arn,
                "CreationDate": job.created_at, "IsParent": False}

    def _gateway_arn(self, job: Job) -> str | None:
        if job.gateway_id is None:
            return None
        gateway = self.store.gateway_by_id(job.gateway_id)
        return gateway.arn if gateway else None

    def _backup_view(self, job: Job) -> dict[str, Any]:
        out: dict[str, Any] = {
            "AccountId": self.account,
            "BackupJobId": job.job_id,
            "BackupVaultName": job.vault_name,
            "BackupVaultArn": job.vault_arn,
            "VaultType": "BACKUP_VAULT",
            "RecoveryPointArn": job.recovery_point_arn,
            "ResourceArn": job.resource_arn,
            "ResourceType": RESOURCE_TYPE,
            "CreationDate": job.created_at,
            "State": job.state,
            "PercentDone": percent(job.percent_done),
            "BackupSizeInBytes": job.backup_size,
            "BytesTransferred": job.bytes_transferred,
            "IamRoleArn": job.iam_role_arn,
            "IsEncrypted": True,
            "IsParent": False,
        }
        optional = {
            "StatusMessage": job.status_message,
            "CompletionDate": job.completed_at,
            "ResourceName": job.resource_name,
            "BackupType": job.backup_type,
            "StartBy": job.start_by,
            "InitiationDate": job.started_at,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        if job.delete_after_days is not None:
            out["RecoveryPointLifecycle"] = {"DeleteAfterDays": job.delete_after_days}
        return out

    def describe_backup_job(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        return self._backup_view(self._job(caller, body["BackupJobId"], BACKUP))

    def _list_filters(self, body: dict[str, Any], state_member: str) -> JobFilter | None:
        """The filters of a list-jobs call; None when one can match nothing here."""
        if body.get("ByAccountId") not in (None, self.account, "*"):
            return None
        if body.get("ByResourceType") not in (None, RESOURCE_TYPE):
            return None
        for member in ("ByParentJobId", "ByMessageCategory", "ByRestoreTestingPlanArn"):
            if body.get(member):
                return None  # no composite jobs, message categories or testing plans here
        return JobFilter(
            resource_arn=body.get("ByResourceArn"),
            state=body.get(state_member),
            vault_name=body.get("ByBackupVaultName"),
            created_before=body.get("ByCreatedBefore"),
            created_after=body.get("ByCreatedAfter"),
            complete_before=body.get("ByCompleteBefore"),
            complete_after=body.get("ByCompleteAfter"),
        )

    def list_backup_jobs(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        filters = self._list_filters(body, "ByState")
        if filters is None:
            return {"BackupJobs": []}
        limit = self._limit(body)
        after = self._after_seq(caller, body, "backupjobs", "ListBackupJobs")
        page = self.backups.list_jobs(caller.region, BACKUP, filters, after, limit + 1)
        out: dict[str, Any] = {"BackupJobs": [self._backup_view(j) for j in page[:limit]]}
        if len(page) > limit:
            out["NextToken"] = _token(caller.region, "backupjobs", str(page[limit - 1].seq))
        return out

    def stop_backup_job(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        """A job not yet on a gateway is ABORTED at once; a running one is ABORTING until its
        gateway confirms (or its lease ends)."""
        job = self._job(caller, body["BackupJobId"], BACKUP)
        now = self.clock.now()
        if job.state in ENDED:
            raise bad_request(f"Backup job {job.job_id} has already ended ({job.state}); "
                              "only a job CREATED, PENDING or RUNNING can be stopped")
        if job.state == "ABORTING":
            return {}
        if job.state in ("CREATED", "PENDING"):
            done = self.backups.update_job(
                job.job_id, ("CREATED", "PENDING"), state="ABORTED", completed_at=now,
                status_message="stopped by StopBackupJob before a gateway started it")
        else:
            done = self.backups.update_job(
                job.job_id, ("RUNNING",), state="ABORTING",
                status_message=f"stopping: StopBackupJob at {now:.0f}; waiting for the "
                               "gateway to confirm")
        if done is None:  # it changed meanwhile (a gateway completed it): say what it is
            return self.stop_backup_job(caller, body)
        if done.state == "ABORTED":
            self.scheduler.forget(job.job_id)
        log.info("event=backup_job_stop job=%s state=%s", job.job_id, done.state)
        self.scheduler.run()
        return {}

    # -- recovery points ------------------------------------------------------------------

    def _point_view(self, point: Point) -> dict[str, Any]:
        out: dict[str, Any] = {
            "RecoveryPointArn": point.arn,
            "BackupVaultName": point.vault_name,
            "BackupVaultArn": point.vault_arn,
            "ResourceArn": point.resource_arn,
            "ResourceType": RESOURCE_TYPE,
            "Status": point.status,
            "CreationDate": point.created_at,
            "InitiationDate": point.created_at,
            "CompletionDate": point.completed_at,
            "BackupSizeInBytes": point.backup_size,
            "IsEncrypted": True,
            "IsParent": False,
            "VaultType": "BACKUP_VAULT",
            "EncryptionKeyType": "AWS_OWNED_KMS_KEY",
            "StorageClass": "WARM",
        }
        if point.iam_role_arn:
            out["IamRoleArn"] = point.iam_role_arn
        if point.resource_name:
            out["ResourceName"] = point.resource_name
        if point.delete_after_days is not None:
            out["Lifecycle"] = {"DeleteAfterDays": point.delete_after_days}
            out["CalculatedLifecycle"] = {"DeleteAt": point.delete_at}
        if point.last_restore is not None:
            out["LastRestoreTime"] = point.last_restore
        return out

    def _point_filters(self, body: dict[str, Any]) -> PointFilter | None:
        if body.get("ByResourceType") not in (None, RESOURCE_TYPE):
            return None
        if body.get("ByBackupPlanId") or body.get("ByParentRecoveryPointArn"):
            return None  # no backup plans or composite points here
        return PointFilter(resource_arn=body.get("ByResourceArn"),
                           created_before=body.get("ByCreatedBefore"),
                           created_after=body.get("ByCreatedAfter"))

    def list_recovery_points_by_backup_vault(self, caller: Caller, body: dict[str, Any]
                                             ) -> dict[str, Any]:
        vault = self._vault(caller, body["BackupVaultName"])
        filters = self._point_filters(body)
        if filters is None:
            return {"RecoveryPoints": []}
        limit = self._limit(body)
        after = self._after_seq(caller, body, "vaultpoints", "ListRecoveryPointsByBackupVault")
        page = self.backups.list_points(caller.region, vault.name, filters, after, limit + 1)
        out: dict[str, Any] = {"RecoveryPoints": [self._point_view(p) for p in page[:limit]]}
        if len(page) > limit:
            out["NextToken"] = _token(caller.region, "vaultpoints", str(page[limit - 1].seq))
        return out

    def list_recovery_points_by_resource(self, caller: Caller, body: dict[str, Any]
                                         ) -> dict[str, Any]:
        arn = body["ResourceArn"]
        limit = self._limit(body)
        after = self._after_seq(caller, body, "resourcepoints", "ListRecoveryPointsByResource")
        page = self.backups.list_points(caller.region, None, PointFilter(resource_arn=arn),
                                        after, limit + 1)
        if not page and not after and VM_ARN_RE.fullmatch(arn) is None:
            raise not_found(f"ResourceArn '{arn}' names no resource with recovery points")
        out: dict[str, Any] = {"RecoveryPoints": [
            {
                "RecoveryPointArn": p.arn,
                "CreationDate": p.created_at,
                "Status": p.status,
                "BackupSizeBytes": p.backup_size,
                "BackupVaultName": p.vault_name,
                "IsParent": False,
                "VaultType": "BACKUP_VAULT",
                "EncryptionKeyType": "AWS_OWNED_KMS_KEY",
                **({"ResourceName": p.resource_name} if p.resource_name else {}),
            }
            for p in page[:limit]
        ]}
        if len(page) > limit:
            out["NextToken"] = _token(caller.region, "resourcepoints", str(page[limit - 1].seq))
        return out

    def describe_recovery_point(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        self._vault(caller, body["BackupVaultName"])
        point = self._point(caller, body["RecoveryPointArn"], body["BackupVaultName"])
        return self._point_view(point)

    async def delete_recovery_point(self, caller: Caller, body: dict[str, Any]
                                    ) -> dict[str, Any]:
        """The point goes, then the chunks no other point references (reclaim)."""
        self._vault(caller, body["BackupVaultName"])
        point = self._point(caller, body["RecoveryPointArn"], body["BackupVaultName"])
        if point.status != "COMPLETED":
            raise ApiError("InvalidResourceStateException",
                           f"Recovery point {point.arn} is {point.status}")
        try:
            await self.scheduler.delete_point(point)
        except BackupStoreError as exc:
            raise ApiError("InvalidResourceStateException", exc.message) from None
        return {}

    def restore_metadata(self, point: Point) -> dict[str, str]:
        """The keys of gatewaycore.restorekeys with the source's values: what a restore of
        this point to where it came from needs, but for a new vmName."""
        out = {
            "RestoreTo": (restorekeys.RESTORE_TO_LIBVIRT if point.hypervisor_kind == "libvirt"
                          else restorekeys.RESTORE_TO_VMWARE),
            "hypervisorArn": point.hypervisor_arn,
            "vmId": point.vm_uuid,
        }
        if point.resource_name:
            out["vmName"] = point.resource_name
        out.update(point.restore_defaults)
        return out

    def get_recovery_point_restore_metadata(self, caller: Caller, body: dict[str, Any]
                                            ) -> dict[str, Any]:
        vault = self._vault(caller, body["BackupVaultName"])
        point = self._point(caller, body["RecoveryPointArn"], vault.name)
        return {"BackupVaultArn": vault.arn, "RecoveryPointArn": point.arn,
                "ResourceType": RESOURCE_TYPE, "RestoreMetadata": self.restore_metadata(point)}

    # -- restore jobs ---------------------------------------------------------------------

    def _target(self, caller: Caller, point: Point, metadata: dict[str, str]) -> Hypervisor:
        arn = metadata.get("hypervisorArn") or point.hypervisor_arn
        hypervisor = self.store.hypervisor(arn) if HYPERVISOR_ARN_RE.fullmatch(arn) else None
        if hypervisor is None or hypervisor.region != caller.region:
            raise not_found(f"Metadata hypervisorArn: hypervisor {arn} was not found in region "
                            f"{caller.region} (see backup-gateway list-hypervisors)")
        return hypervisor

    def start_restore_job(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        point = self._point(caller, body["RecoveryPointArn"])
        if point.status != "COMPLETED":
            raise bad_request(f"Recovery point {point.arn} is {point.status}; only a COMPLETED "
                              "one can be restored")
        if body.get("ResourceType") not in (None, RESOURCE_TYPE):
            raise invalid(f"ResourceType: must be {RESOURCE_TYPE} for a recovery point of a "
                          f"virtual machine, got {body['ResourceType']!r}")
        metadata = dict(body["Metadata"])
        hypervisor = self._target(caller, point, metadata)
        kind = hypervisor_kind(hypervisor)
        accepted = restorekeys.accepted(kind)
        unknown = sorted(k for k in metadata if k not in accepted)
        if unknown:
            raise invalid(f"Metadata key {unknown[0]!r} is not accepted for a {kind} restore; "
                          f"accepted: {', '.join(accepted)}")
        for key in restorekeys.REQUIRED:
            if not metadata.get(key):
                raise missing(f"Metadata key {key!r} is required: the name of the new VM "
                              "(GetRecoveryPointRestoreMetadata shows the source's)")
        try:
            checked = restorekeys.check(kind, metadata)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        name = checked["vmName"]
        self._name_free(hypervisor, name)
        token = body.get("IdempotencyToken")
        if token:
            earlier = self.backups.job_by_token(caller.region, RESTORE, token)
            if earlier is not None:
                return {"RestoreJobId": earlier.job_id}
        options = {k: v for k, v in checked.items() if k not in restorekeys.COMMON}
        job = self.backups.insert_job({
            "job_id": str(uuid.uuid4()).upper(),
            "job_type": RESTORE,
            "region": caller.region,
            "state": "PENDING",
            "status_message": "waiting to be scheduled",
            "vault_name": point.vault_name,
            "vault_arn": point.vault_arn,
            "storage": point.storage,
            "resource_arn": point.resource_arn,
            "resource_name": point.resource_name,
            "hypervisor_id": hypervisor.hypervisor_id,
            "vm_uuid": point.vm_uuid,
            "iam_role_arn": body.get("IamRoleArn"),
            "idempotency_token": token or None,
            "created_at": self.clock.now(),
            "recovery_point_arn": point.arn,
            "point_id": point.point_id,
            "backup_size": point.backup_size,
            "restore_name": name,
            "restore_options": options,
        })
        log.info("event=restore_job_created job=%s point=%s hypervisor=%s name=%s", job.job_id,
                 point.arn, hypervisor.arn, name)
        self.scheduler.run()
        return {"RestoreJobId": job.job_id}

    def _name_free(self, hypervisor: Hypervisor, name: str) -> None:
        """A restore makes a new VM: its name must not be taken on the hypervisor (its
        inventory), nor by another restore not ended."""
        db = self.store.connection
        if db.execute("SELECT 1 FROM vms WHERE hypervisor_id=? AND name=?",
                      (hypervisor.hypervisor_id, name)).fetchone():
            raise invalid(f"Metadata vmName: a VM named {name!r} already exists on hypervisor "
                          f"{hypervisor.arn}; choose a new name")
        row = db.execute(
            "SELECT job_id FROM backup_jobs WHERE job_type='RESTORE' AND hypervisor_id=? AND"
            " restore_name=? AND state IN ('CREATED','PENDING','RUNNING','ABORTING')",
            (hypervisor.hypervisor_id, name)).fetchone()
        if row:
            raise invalid(f"Metadata vmName: restore job {row[0]} is already creating a VM "
                          f"named {name!r} on hypervisor {hypervisor.arn}; choose a new name")

    def _restore_view(self, job: Job) -> dict[str, Any]:
        status = {"CREATED": "PENDING", "ABORTING": "RUNNING", "EXPIRED": "FAILED"}.get(
            job.state, job.state)
        point = self.backups.point(job.recovery_point_arn)
        out: dict[str, Any] = {
            "AccountId": self.account,
            "RestoreJobId": job.job_id,
            "RecoveryPointArn": job.recovery_point_arn,
            "SourceResourceArn": job.resource_arn,
            "BackupVaultArn": job.vault_arn,
            "CreationDate": job.created_at,
            "Status": status,
            "PercentDone": percent(job.percent_done),
            "BackupSizeInBytes": job.backup_size,
            "ResourceType": RESOURCE_TYPE,
            "IsParent": False,
        }
        optional = {
            "StatusMessage": job.status_message,
            "CompletionDate": job.completed_at,
            "IamRoleArn": job.iam_role_arn,
            "CreatedResourceArn": job.created_resource_arn,
            "RecoveryPointCreationDate": point.created_at if point else None,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        return out

    def describe_restore_job(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        return self._restore_view(self._job(caller, body["RestoreJobId"], RESTORE))

    def list_restore_jobs(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        filters = self._list_filters(body, "ByStatus")
        if filters is None:
            return {"RestoreJobs": []}
        limit = self._limit(body)
        after = self._after_seq(caller, body, "restorejobs", "ListRestoreJobs")
        page = self.backups.list_jobs(caller.region, RESTORE, filters, after, limit + 1)
        out: dict[str, Any] = {"RestoreJobs": [self._restore_view(j) for j in page[:limit]]}
        if len(page) > limit:
            out["NextToken"] = _token(caller.region, "restorejobs", str(page[limit - 1].seq))
        return out

    # -- protected resources --------------------------------------------------------------

    def list_protected_resources(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        limit = self._limit(body)
        after = ""
        if body.get("NextToken"):
            after = _parse_token(body["NextToken"], caller.region, "resources",
                                 "ListProtectedResources")
        page = self.backups.protected(caller.region, after, limit + 1)
        out: dict[str, Any] = {"Results": [
            {"ResourceArn": p.resource_arn, "ResourceType": RESOURCE_TYPE,
             "LastBackupTime": p.last_backup, "LastBackupVaultArn": p.vault_arn,
             "LastRecoveryPointArn": p.point_arn,
             **({"ResourceName": p.resource_name} if p.resource_name else {})}
            for p in page[:limit]
        ]}
        if len(page) > limit:
            out["NextToken"] = _token(caller.region, "resources", page[limit - 1].resource_arn)
        return out

    def describe_protected_resource(self, caller: Caller, body: dict[str, Any]
                                    ) -> dict[str, Any]:
        arn = body["ResourceArn"]
        found = self.backups.protected_resource(caller.region, arn)
        if found is None:
            raise not_found(f"Resource {arn} has no COMPLETED recovery point in region "
                            f"{caller.region}")
        out: dict[str, Any] = {
            "ResourceArn": found.resource_arn, "ResourceType": RESOURCE_TYPE,
            "LastBackupTime": found.last_backup, "LastBackupVaultArn": found.vault_arn,
            "LastRecoveryPointArn": found.point_arn,
        }
        if found.resource_name:
            out["ResourceName"] = found.resource_name
        restore = self.backups.latest_restore(arn)
        if restore is not None:
            out["LatestRestoreJobCreationDate"] = restore.created_at
            point = self.backups.point(restore.recovery_point_arn)
            if point is not None:
                out["LatestRestoreRecoveryPointCreationDate"] = point.created_at
            if restore.state == "COMPLETED" and restore.completed_at and restore.started_at:
                out["LatestRestoreExecutionTimeMinutes"] = max(
                    0, round((restore.completed_at - restore.started_at) / 60))
        return out


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Vault work blocks (files, hashing, encryption): off the event loop."""
    return await asyncio.to_thread(fn, *args)
