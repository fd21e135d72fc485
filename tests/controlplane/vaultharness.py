"""A control plane over chosen vault store settings, and the backup-then-rebuild scenario
that test_vault_rebuild.py (local directory) and tests/objectstore (Ceph RGW) both run.

Built on test_job_link.py's harness (BackupPlane, the signed gateway link, its chunks),
whose `backup_plane` takes no vault store: `vault_plane` is the same with one.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.store import DB_FILE
from controlplane.vaultsettings import VaultStoreSettings
from tests.controlplane.cpharness import FakeClock
from tests.controlplane.test_job_link import (
    ROLE,
    TIMINGS,
    A,
    B,
    BackupPlane,
    C,
    MiB,
    Setup,
    backup_plane,
    one_gateway,
)

REPO = Path(__file__).resolve().parents[2]
CHUNKS = {cid: data for cid, data in (A, B, C)}
FULL_EXTENTS = [[0, 65536, A[0], 0], [4 * MiB, 65536, B[0], 0]]
INCREMENTAL_EXTENTS = [[0, 65536, C[0], 0]]
COMPOSED_EXTENTS = [[0, 65536, C[0], 0], [4 * MiB, 65536, B[0], 0]]


@contextlib.contextmanager
def vault_plane(state_dir: Path, settings: VaultStoreSettings,
                clock: FakeClock | None = None) -> Iterator[BackupPlane]:
    """test_job_link.backup_plane with `settings` as its vault store."""
    with backup_plane(state_dir, clock, TIMINGS, vault_store=settings) as bp:
        yield bp


@dataclass
class Backed:
    """What the first control plane showed: to compare with the rebuilt one."""

    vault: dict[str, Any]
    points: list[dict[str, Any]]          # ListRecoveryPointsByBackupVault, in order
    described: dict[str, dict[str, Any]]  # DescribeRecoveryPoint by ARN
    restore_metadata: dict[str, str]      # of the newest point


def back_up(bp: BackupPlane) -> tuple[Setup, Backed]:
    """A vault, a full backup (DeleteAfterDays 30) then an incremental one of VM web."""
    setup = one_gateway(bp)
    full = bp.start(setup.web, Lifecycle={"DeleteAfterDays": 30})
    done = setup.gw.link.backup(full["BackupJobId"], [A, B], FULL_EXTENTS, checkpoint="bg-1")
    assert done.status == 200, done.body
    bp.clock.advance(3600)  # points made at different times, as they are
    assert setup.gw.link.poll().status == 200  # the gateway is heard from since
    incremental = bp.start(setup.web)
    done = setup.gw.link.backup(incremental["BackupJobId"], [C], INCREMENTAL_EXTENTS,
                                incremental=True, checkpoint="bg-2")
    assert done.status == 200, done.body
    return setup, snapshot(bp)


def snapshot(bp: BackupPlane, vault: str = "vault1") -> Backed:
    described = bp.backup.describe_backup_vault(BackupVaultName=vault)
    points = bp.backup.list_recovery_points_by_backup_vault(
        BackupVaultName=vault)["RecoveryPoints"]
    by_arn = {p["RecoveryPointArn"]: _strip(bp.backup.describe_recovery_point(
        BackupVaultName=vault, RecoveryPointArn=p["RecoveryPointArn"])) for p in points}
    newest = points[-1]["RecoveryPointArn"] if points else ""
    metadata = bp.backup.get_recovery_point_restore_metadata(
        BackupVaultName=vault, RecoveryPointArn=newest)["RestoreMetadata"] if newest else {}
    return Backed(_strip(described), points, by_arn, metadata)


def _strip(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k != "ResponseMetadata"}


def forget_database(state_dir: Path) -> None:
    """The control plane's disk lost, but for the vaults: its database and secrets.key."""
    for path in state_dir.glob(f"{DB_FILE}*"):
        path.unlink()
    (state_dir / "secrets.key").unlink()


def rebuild_cli(state_dir: Path, settings_file: Path, *extra: str
                ) -> subprocess.CompletedProcess[str]:
    """`python -m controlplane rebuild-vaults`, the real CLI in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "controlplane", "rebuild-vaults", "--state-dir",
         str(state_dir), "--vault-store", str(settings_file), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def restore_reads(bp: BackupPlane, point_arn: str, metadata: dict[str, str]) -> None:
    """On a rebuilt control plane (no gateways, hypervisors or VMs any more): register a
    gateway and a hypervisor, start a restore of the point onto it, and read its manifest
    and every chunk through the job link, decrypted with the vault's unwrapped key."""
    gw = bp.gateway("gw-after")
    hv = bp.hypervisor([gw], [("uuid-other", "other")], name="kvm-after",
                       host="qemu+tcp://kvm-after.lab/system")
    job_id = bp.backup.start_restore_job(
        RecoveryPointArn=point_arn, IamRoleArn=ROLE,
        Metadata={**metadata, "hypervisorArn": hv, "vmName": "web-restored"})["RestoreJobId"]
    (entry,) = gw.link.jobs()
    assert entry["type"] == "RESTORE" and entry["recoveryPointArn"] == point_arn
    got = gw.link.raw("GET", f"/gateway/jobs/{job_id}/manifest")
    assert got.status == 200, got.body
    extents = got.json()["disks"][0]["extents"]
    assert extents == COMPOSED_EXTENTS
    for _, _, chunk_id, _ in extents:
        data = gw.link.raw("GET", f"/gateway/jobs/{job_id}/chunks/{chunk_id}")
        assert data.status == 200, data.body
        encoding = data.headers["x-gateway-chunk-encoding"]
        plain = zlib.decompress(data.body) if encoding == "zlib" else data.body
        assert plain == CHUNKS[chunk_id]
    done = gw.link.job(job_id, "complete", vm={"uuid": "uuid-new", "name": "web-restored",
                                               "path": "/vms/web-restored.xml",
                                               "hostName": "kvm"})
    assert done.status == 200, done.body
    assert bp.backup.describe_restore_job(RestoreJobId=job_id)["Status"] == "COMPLETED"


def assert_same(before: Backed, after: Backed) -> None:
    """The rebuilt control plane shows the vault and its points as the first one did."""
    assert after.vault["BackupVaultArn"] == before.vault["BackupVaultArn"]
    assert after.vault["CreationDate"] == before.vault["CreationDate"]
    assert after.vault["NumberOfRecoveryPoints"] == before.vault["NumberOfRecoveryPoints"]
    assert after.points == before.points
    assert after.described == before.described
    assert {k: v for k, v in after.restore_metadata.items() if k != "hypervisorArn"} == {
        k: v for k, v in before.restore_metadata.items() if k != "hypervisorArn"}
    assert after.restore_metadata["hypervisorArn"] == before.restore_metadata["hypervisorArn"]
