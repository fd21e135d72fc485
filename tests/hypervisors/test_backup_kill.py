"""A gateway, then its control plane, killed with SIGKILL in the middle of a shaped backup
of a real QEMU domain of the session's private libvirtd (test_backup_e2e.py's parts): the
job resumes each time, nothing of the point shows before it completes, and it restores
byte-identical. test_backup_kill_s3.py runs this test with the vaults in a Ceph bucket.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirtd
import pytest
from guests import MiB

from tests.conftest import ControlPlane, free_port
from tests.hypervisors.test_backup_e2e import (
    ROLE,
    aws_backup,
    backup_client,
    gateway_for,
    guest,
    remove_domain,
    restored_disk_sha,
    wait_job,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def plane_on(tmp_path: Path) -> Iterator[tuple[Any, Callable[[], set[str]]]]:
    """A control plane process with its vaults in its state directory (the default), and a
    function listing the recovery-point manifests they hold (test_backup_kill_s3.py: the
    same test with the vaults in a bucket)."""
    cp = ControlPlane(tmp_path / "controlplane", free_port())

    def manifests() -> set[str]:
        return {p.name for p in (cp.state_dir / "vaults").glob("*/points/*")}
    cp.start()
    try:
        yield cp, manifests
    finally:
        cp.stop()


@pytest.mark.long
def test_gateway_and_control_plane_killed_mid_backup(
    plane_on: tuple[Any, Callable[[], set[str]]], make_appliance: Callable[..., Any],
    kvm: libvirtd.Libvirtd, wait_until: Callable[..., Any], tmp_path: Path,
) -> None:
    """kill -9 of the gateway, then of the control plane, in the middle of one shaped
    backup, with the vault on the local disk and in an S3 bucket: the job resumes each
    time, no recovery point (nor its manifest in the storage) shows before the job is
    COMPLETED, and the point restores byte-identical."""
    cp, manifests = plane_on
    client = backup_client(cp)
    name = f"kill-{uuidlib.uuid4().hex[:6]}"
    with guest(kvm, name, random_mib=12) as vm:
        app, _, arns = gateway_for(cp, make_appliance, kvm, wait_until, [name])
        gateway_arn = cp.aws("list-gateways")["Gateways"][0]["GatewayArn"]
        # 8 Mbit/s: about 16 s for the 16 MiB of data, time enough to kill things midway
        cp.aws("put-bandwidth-rate-limit-schedule", "--gateway-arn", gateway_arn,
               "--bandwidth-rate-limit-intervals",
               "AverageUploadRateLimitInBitsPerSec=8000000,StartHourOfDay=0,"
               "StartMinuteOfHour=0,EndHourOfDay=23,EndMinuteOfHour=59,"
               "DaysOfWeek=0,1,2,3,4,5,6")
        wait_until(lambda: app.status()["shaping"]["limitBitsPerSec"] == 8000000,
                   what="the schedule applied by the gateway")
        vault = f"vault-{name}"
        aws_backup(cp, "create-backup-vault", "--backup-vault-name", vault)
        sha = vm.image_sha(tmp_path / "src.raw")
        job = aws_backup(cp, "start-backup-job", "--backup-vault-name", vault,
                         "--resource-arn", arns[name], "--iam-role-arn", ROLE)["BackupJobId"]

        def sent_over(n: int) -> bool:
            return client.describe_backup_job(BackupJobId=job)["BytesTransferred"] > n

        wait_until(lambda: sent_over(2 * MiB), timeout=60, what="2 MiB sent")
        app.proc.kill()                     # the gateway dies mid-job
        assert client.describe_backup_job(BackupJobId=job)["State"] == "RUNNING"
        listed = client.list_recovery_points_by_backup_vault(BackupVaultName=vault)
        assert listed["RecoveryPoints"] == [] and manifests() == set()
        app.start()                         # same state dir: the same gateway returns
        wait_until(lambda: sent_over(4 * MiB), timeout=60, what="4 MiB sent after restart")
        assert cp.proc is not None
        cp.proc.kill()                      # then the control plane dies mid-job
        cp.start()
        done = wait_job(client, job)
        assert done["State"] == "COMPLETED", done
        point_id = done["RecoveryPointArn"].rsplit(":", 1)[1]
        assert manifests() == {f"{point_id}.json"}

        new_name = f"{name}-r"
        try:
            rjob = aws_backup(cp, "start-restore-job", "--recovery-point-arn",
                              done["RecoveryPointArn"], "--iam-role-arn", ROLE,
                              "--metadata", f"vmName={new_name}")["RestoreJobId"]
            rdone = wait_job(client, rjob, kind="restore")
            assert rdone["Status"] == "COMPLETED", rdone
            assert restored_disk_sha(kvm, new_name, tmp_path / "r.raw")[0] == sha
        finally:
            remove_domain(kvm, new_name)
