"""The AWS Backup API (service `backup`) over the real restJson1 wire: boto3's `backup`
client and the real AWS CLI against an in-process control plane; recovery points are made
by a gateway played over the signed job link (test_job_link's harness).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.controlplane.cpharness import AWS, REGION, aws_env
from tests.controlplane.test_job_link import (
    ROLE,
    BackupPlane,
    Setup,
    backup_plane,
    completed_point,
    one_gateway,
)


@pytest.fixture
def bp(tmp_path: Path) -> Iterator[BackupPlane]:
    with backup_plane(tmp_path / "state") as plane:
        yield plane


def fails(call: Any, code: str, *words: str, **kwargs: Any) -> str:
    """Call; it must fail with `code`, its message holding each of `words`."""
    with pytest.raises(ClientError) as err:
        call(**kwargs)
    assert err.value.response["Error"]["Code"] == code, err.value.response
    message = str(err.value.response["Error"]["Message"])
    for word in words:
        assert word in message, message
    return message


def test_vault_crud(bp: BackupPlane, tmp_path: Path) -> None:
    backup = bp.backup
    made = backup.create_backup_vault(BackupVaultName="daily", CreatorRequestId="req-1",
                                      BackupVaultTags={"team": "ops"})
    assert made["BackupVaultArn"].endswith(":backup-vault:daily")
    assert made["BackupVaultArn"].startswith(f"arn:aws:backup:{REGION}:")
    # A retried create (same CreatorRequestId) answers the same vault; another is refused.
    again = backup.create_backup_vault(BackupVaultName="daily", CreatorRequestId="req-1")
    assert again["BackupVaultArn"] == made["BackupVaultArn"]
    fails(backup.create_backup_vault, "AlreadyExistsException", "daily",
          BackupVaultName="daily")
    fails(backup.create_backup_vault, "InvalidParameterValueException",
          BackupVaultName="no spaces allowed")
    backup.create_backup_vault(BackupVaultName="weekly")
    got = backup.describe_backup_vault(BackupVaultName="daily")
    assert got["NumberOfRecoveryPoints"] == 0 and got["VaultState"] == "AVAILABLE"
    assert got["CreatorRequestId"] == "req-1" and got["Locked"] is False
    first = backup.list_backup_vaults(MaxResults=1)
    assert [v["BackupVaultName"] for v in first["BackupVaultList"]] == ["daily"]
    rest = backup.list_backup_vaults(MaxResults=1, NextToken=first["NextToken"])
    assert [v["BackupVaultName"] for v in rest["BackupVaultList"]] == ["weekly"]
    assert "NextToken" not in rest
    fails(backup.list_backup_vaults, "InvalidParameterValueException", "NextToken",
          NextToken="forged")

    # The real AWS CLI sees the same.
    env = aws_env(bp.plane.access_key_id, bp.plane.secret_access_key, tmp_path)
    proc = subprocess.run(
        [AWS, "backup", "list-backup-vaults", "--endpoint-url", bp.url, "--region", REGION,
         "--output", "json"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    names = [v["BackupVaultName"] for v in json.loads(proc.stdout)["BackupVaultList"]]
    assert names == ["daily", "weekly"]

    backup.delete_backup_vault(BackupVaultName="weekly")
    fails(backup.describe_backup_vault, "ResourceNotFoundException", "weekly",
          BackupVaultName="weekly")
    fails(backup.delete_backup_vault, "ResourceNotFoundException", BackupVaultName="monthly")


def test_a_vault_with_points_is_not_deleted(bp: BackupPlane) -> None:
    s = one_gateway(bp)
    point = completed_point(s)
    fails(bp.backup.delete_backup_vault, "InvalidRequestException", "1 recovery point",
          BackupVaultName="vault1")
    assert bp.backup.describe_backup_vault(BackupVaultName="vault1")[
        "NumberOfRecoveryPoints"] == 1
    bp.backup.delete_recovery_point(BackupVaultName="vault1", RecoveryPointArn=point)
    assert bp.backup.list_recovery_points_by_backup_vault(BackupVaultName="vault1")[
        "RecoveryPoints"] == []
    bp.backup.delete_backup_vault(BackupVaultName="vault1")


def test_start_backup_job_checks_its_resource(bp: BackupPlane) -> None:
    s = one_gateway(bp)
    backup = bp.backup
    fails(backup.start_backup_job, "InvalidParameterValueException",
          "not a virtual machine of this control plane", BackupVaultName="vault1",
          ResourceArn="arn:aws:ec2:us-west-2:123456789012:instance/i-0123", IamRoleArn=ROLE)
    unknown = s.web[:-17] + "0" * 17
    fails(backup.start_backup_job, "ResourceNotFoundException", unknown,
          BackupVaultName="vault1", ResourceArn=unknown, IamRoleArn=ROLE)
    fails(backup.start_backup_job, "ResourceNotFoundException", "nosuch",
          BackupVaultName="nosuch", ResourceArn=s.web, IamRoleArn=ROLE)
    fails(backup.start_backup_job, "InvalidParameterValueException", "DeleteAfterDays only",
          BackupVaultName="vault1", ResourceArn=s.web, IamRoleArn=ROLE,
          Lifecycle={"MoveToColdStorageAfterDays": 30})
    # The same IdempotencyToken is the same job.
    one = bp.start(s.web, IdempotencyToken="tok-1")
    two = bp.start(s.web, IdempotencyToken="tok-1")
    assert one["BackupJobId"] == two["BackupJobId"]
    assert one["RecoveryPointArn"] == two["RecoveryPointArn"]
    fails(backup.start_backup_job, "InvalidParameterValueException", "IdempotencyToken",
          BackupVaultName="vault1", ResourceArn=s.db, IamRoleArn=ROLE, IdempotencyToken="tok-1")
    job = bp.state(one["BackupJobId"])
    assert job["ResourceType"] == "VirtualMachine" and job["IamRoleArn"] == ROLE
    assert job["BackupVaultArn"].endswith(":backup-vault:vault1")
    assert job["PercentDone"] == "0.0" and job["StatusMessage"].startswith("running on gateway")
    fails(backup.describe_backup_job, "ResourceNotFoundException", BackupJobId="nope")


def test_list_backup_jobs_filters_and_pages(bp: BackupPlane) -> None:
    s = one_gateway(bp)
    web = bp.start(s.web)["BackupJobId"]
    db = bp.start(s.db)["BackupJobId"]
    assert s.gw.link.backup(web, [], []).status == 200  # an empty disk: a valid backup
    backup = bp.backup
    by_vm = backup.list_backup_jobs(ByResourceArn=s.db)["BackupJobs"]
    assert [j["BackupJobId"] for j in by_vm] == [db]
    done = backup.list_backup_jobs(ByState="COMPLETED")["BackupJobs"]
    assert [j["BackupJobId"] for j in done] == [web]
    assert backup.list_backup_jobs(ByResourceType="EC2")["BackupJobs"] == []
    assert len(backup.list_backup_jobs(ByBackupVaultName="vault1")["BackupJobs"]) == 2
    page = backup.list_backup_jobs(MaxResults=1)
    assert [j["BackupJobId"] for j in page["BackupJobs"]] == [web]
    page = backup.list_backup_jobs(MaxResults=1, NextToken=page["NextToken"])
    assert [j["BackupJobId"] for j in page["BackupJobs"]] == [db] and "NextToken" not in page
    completed = backup.describe_backup_job(BackupJobId=web)["CompletionDate"]
    later = backup.list_backup_jobs(ByCompleteAfter=completed.timestamp() - 1)["BackupJobs"]
    assert [j["BackupJobId"] for j in later] == [web]


def test_recovery_points_and_protected_resources(bp: BackupPlane) -> None:
    s = one_gateway(bp)
    point = completed_point(s)
    backup = bp.backup
    by_vault = backup.list_recovery_points_by_backup_vault(
        BackupVaultName="vault1", ByResourceArn=s.web)["RecoveryPoints"]
    assert [p["RecoveryPointArn"] for p in by_vault] == [point]
    assert by_vault[0]["Status"] == "COMPLETED" and by_vault[0]["ResourceName"] == "web"
    by_vm = backup.list_recovery_points_by_resource(ResourceArn=s.web)["RecoveryPoints"]
    assert [(p["RecoveryPointArn"], p["BackupSizeBytes"]) for p in by_vm] == [(point, 131072)]
    assert backup.list_recovery_points_by_resource(ResourceArn=s.db)["RecoveryPoints"] == []
    fails(backup.describe_recovery_point, "ResourceNotFoundException",
          BackupVaultName="vault1", RecoveryPointArn=point + "0")
    results = backup.list_protected_resources()["Results"]
    assert [(r["ResourceArn"], r["ResourceType"]) for r in results] == [
        (s.web, "VirtualMachine")]
    fails(backup.describe_protected_resource, "ResourceNotFoundException",
          ResourceArn=s.db)


def restore_fails(s: Setup, point: str, code: str, *words: str,
                  **metadata: str) -> str:
    return fails(s.bp.backup.start_restore_job, code, *words, RecoveryPointArn=point,
                 Metadata=metadata)


def test_start_restore_job_checks_its_metadata(bp: BackupPlane) -> None:
    s = one_gateway(bp)
    point = completed_point(s)
    restore_fails(s, point, "MissingParameterValueException", "vmName",
                  hypervisorArn=s.hv)
    message = restore_fails(s, point, "InvalidParameterValueException", "vmFolderPath",
                            vmName="new", vmFolderPath="/dc/vm")
    assert "accepted: RestoreTo, hypervisorArn, vmName, vmId, storagePool" in message
    restore_fails(s, point, "InvalidParameterValueException", "'web' already exists",
                  vmName="web")
    restore_fails(s, point, "InvalidParameterValueException", "RestoreTo",
                  vmName="new", RestoreTo="VMware")
    restore_fails(s, point, "ResourceNotFoundException", "hypervisorArn",
                  vmName="new", hypervisorArn=s.hv[:-8] + "00000000")
    fails(bp.backup.start_restore_job, "ResourceNotFoundException",
          RecoveryPointArn=point + "0", Metadata={"vmName": "new"})
    # A vSphere hypervisor takes the vSphere keys instead.
    vsphere = str(bp.bgw.import_hypervisor_configuration(
        Name="vc", Host="vcenter.lab", Username="u", Password="password-1")["HypervisorArn"])
    job_id = bp.backup.start_restore_job(
        RecoveryPointArn=point, Metadata={"vmName": "copy", "hypervisorArn": vsphere,
                                          "vmFolderPath": "/dc/vm/restored"})["RestoreJobId"]
    job = bp.backup.describe_restore_job(RestoreJobId=job_id)
    assert job["Status"] == "PENDING"
    assert job["StatusMessage"] == f"no gateway is associated with hypervisor {vsphere}"
    listed = bp.backup.list_restore_jobs(ByStatus="PENDING")["RestoreJobs"]
    assert [j["RestoreJobId"] for j in listed] == [job_id]
    # A point being restored is not deleted under the restore.
    fails(bp.backup.delete_recovery_point, "InvalidResourceStateException", job_id,
          BackupVaultName="vault1", RecoveryPointArn=point)
