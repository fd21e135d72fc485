"""Backups and restores end to end, as the README walks a user through them: the real AWS
CLI (`aws backup ...`) drives a real control plane process, whose real appliance daemon
backs up a running QEMU domain of the session's private libvirtd over NBD and restores it
as a new domain. Nothing is mocked: the restored disk is read back from libvirt's pool and
compared byte for byte (SHA-256 of its raw contents) with the source at backup time.

The domains have no OS: nothing writes their disks but the test, so the disk's contents
right before a job starts are its contents at the backup's instant (that a write after
the instant stays out is tested at the connector, tests/hypervisors/test_libvirt_backup.py).
"""

from __future__ import annotations

import configparser
import contextlib
import os
import subprocess
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import libvirtd
import pytest
from guests import MiB, Vm, sha_file

from tests.conftest import activate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROLE = "arn:aws:iam::123456789012:role/backup"
JOB_TIMEOUT = 120.0


def backup_client(cp: Any) -> Any:
    """boto3's `backup` client with the control plane's generated credentials (polling
    through boto3 in-process is quicker than a CLI process per look)."""
    creds = configparser.ConfigParser()
    creds.read(cp.state_dir / "credentials")
    return boto3.client(
        "backup", endpoint_url=cp.url, region_name="us-west-2",
        aws_access_key_id=creds["default"]["aws_access_key_id"],
        aws_secret_access_key=creds["default"]["aws_secret_access_key"])


def aws_backup(cp: Any, *args: str, check: bool = True) -> Any:
    return cp.aws(*args, service="backup", check=check)


def wait_job(client: Any, job_id: str, kind: str = "backup",
             until: tuple[str, ...] = ("COMPLETED", "FAILED", "ABORTED", "EXPIRED"),
             timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
    """Poll the job until its state is one of `until`; fail with its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if kind == "backup":
            job = client.describe_backup_job(BackupJobId=job_id)
            state = job["State"]
        else:
            job = client.describe_restore_job(RestoreJobId=job_id)
            state = job["Status"]
        if state in until:
            return dict(job)
        if time.monotonic() > deadline:
            raise AssertionError(f"{kind} job {job_id} still {state} after {timeout}s: {job}")
        time.sleep(0.25)


def gateway_for(cp: Any, make_appliance: Callable[..., Any], kvm: libvirtd.Libvirtd,
                wait_until: Callable[..., Any], vm_names: list[str]) -> tuple[Any, str, dict]:
    """An activated appliance daemon associated with the private libvirtd; the VMs' ARNs."""
    app = make_appliance(cp.url)
    gateway_arn = activate(cp, app)
    hv = str(cp.aws("import-hypervisor-configuration", "--name", f"kvm-{uuidlib.uuid4().hex[:6]}",
                    "--host", kvm.tcp_uri(), "--username", libvirtd.SASL_USER,
                    "--password", libvirtd.SASL_PASSWORD)["HypervisorArn"])
    cp.aws("associate-gateway-to-server", "--gateway-arn", gateway_arn, "--server-arn", hv)

    def arns() -> dict[str, str]:
        vms = cp.aws("list-virtual-machines", "--hypervisor-arn", hv)["VirtualMachines"]
        return {vm["Name"]: vm["ResourceArn"] for vm in vms}

    found = wait_until(lambda: (a := arns()) and all(n in a for n in vm_names) and a,
                       timeout=30, what="the VMs in list-virtual-machines")
    return app, hv, found


def restored_disk_sha(kvm: libvirtd.Libvirtd, name: str, out: Path) -> tuple[str, str]:
    """(SHA-256 of the restored domain's first disk as raw bytes, its format)."""
    import libvirt

    conn = libvirt.open(kvm.admin_uri)
    try:
        root = ET.fromstring(conn.lookupByName(name).XMLDesc(0))
    finally:
        conn.close()
    disk = next(d for d in root.iter("disk") if d.get("device") == "disk")
    source = disk.find("source")
    driver = disk.find("driver")
    assert source is not None and driver is not None
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", source.get("file", ""),
                    str(out)], check=True)
    return sha_file(out), driver.get("type", "")


def remove_domain(kvm: libvirtd.Libvirtd, name: str) -> None:
    import libvirt

    conn = libvirt.open(kvm.admin_uri)
    try:
        with contextlib.suppress(libvirt.libvirtError):
            dom = conn.lookupByName(name)
            paths = [s.get("file") for s in ET.fromstring(dom.XMLDesc(0)).iter("source")]
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
            for path in paths:
                if path:
                    with contextlib.suppress(libvirt.libvirtError):
                        conn.storageVolLookupByPath(path).delete(0)
    finally:
        conn.close()


@contextlib.contextmanager
def guest(kvm: libvirtd.Libvirtd, name: str, random_mib: int = 0) -> Iterator[Vm]:
    """A running domain with the Vm's data plus `random_mib` MiB of incompressible bytes at
    32 MiB (written before it starts), removed at the end."""
    vm = Vm(kvm, name, start=False)
    try:
        if random_mib:
            blob = kvm.domains_dir / f"{name}.random"
            blob.write_bytes(os.urandom(random_mib * MiB))
            subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                            f"write -s {blob} 32M {random_mib}M", str(vm.disk)],
                           check=True, stdout=subprocess.DEVNULL)
            blob.unlink()
        import libvirt

        conn = libvirt.open(kvm.admin_uri)
        try:
            conn.lookupByName(name).create()
        finally:
            conn.close()
        yield vm
    finally:
        vm.remove()


@pytest.mark.long
def test_backup_incremental_and_restore_with_the_aws_cli(
    control_plane: Any, make_appliance: Callable[..., Any], kvm: libvirtd.Libvirtd,
    wait_until: Callable[..., Any], tmp_path: Path,
) -> None:
    cp = control_plane
    client = backup_client(cp)
    name = f"e2e-{uuidlib.uuid4().hex[:6]}"
    restored: list[str] = []
    with guest(kvm, name) as vm:
        _, hv, arns = gateway_for(cp, make_appliance, kvm, wait_until, [name])
        vm_arn = arns[name]
        vault = f"vault-{name}"
        made = aws_backup(cp, "create-backup-vault", "--backup-vault-name", vault)
        assert made["BackupVaultName"] == vault

        # 1. a full backup
        sha_full = vm.image_sha(tmp_path / "full.raw")
        job = aws_backup(cp, "start-backup-job", "--backup-vault-name", vault,
                         "--resource-arn", vm_arn, "--iam-role-arn", ROLE,
                         "--lifecycle", "DeleteAfterDays=7")["BackupJobId"]
        done = wait_job(client, job)
        assert done["State"] == "COMPLETED", done
        assert done["PercentDone"] == "100.0" and done["ResourceArn"] == vm_arn
        assert done["BackupSizeInBytes"] >= 4 * MiB  # 1 MiB of 0x11 + 3 MiB of pattern
        point_full = done["RecoveryPointArn"]

        # 2. an incremental one after a guest write: only the change is sent
        vm.write("write -P 0x77 8M 256k")
        sha_incr = vm.image_sha(tmp_path / "incr.raw")
        assert sha_incr != sha_full
        job = aws_backup(cp, "start-backup-job", "--backup-vault-name", vault,
                         "--resource-arn", vm_arn, "--iam-role-arn", ROLE)["BackupJobId"]
        done = wait_job(client, job)
        assert done["State"] == "COMPLETED", done
        assert done["BackupType"] == "INCREMENTAL", done
        assert done["BytesTransferred"] < 1 * MiB, done  # 256 KiB of one byte value
        point_incr = done["RecoveryPointArn"]

        points = aws_backup(cp, "list-recovery-points-by-resource", "--resource-arn",
                            vm_arn)["RecoveryPoints"]
        assert {p["RecoveryPointArn"] for p in points} == {point_full, point_incr}
        in_vault = aws_backup(cp, "list-recovery-points-by-backup-vault",
                              "--backup-vault-name", vault)["RecoveryPoints"]
        assert all(p["Status"] == "COMPLETED" for p in in_vault) and len(in_vault) == 2
        got = cp.aws("get-virtual-machine", "--resource-arn", vm_arn)["VirtualMachine"]
        assert "LastBackupDate" in got, got

        # 3. restores: each point as a new domain, byte-identical to the source then
        meta = aws_backup(cp, "get-recovery-point-restore-metadata", "--backup-vault-name",
                          vault, "--recovery-point-arn", point_full)["RestoreMetadata"]
        assert meta["vmName"] == name and meta["hypervisorArn"] == hv, meta
        refused = aws_backup(cp, "start-restore-job", "--recovery-point-arn", point_full,
                             "--iam-role-arn", ROLE, "--metadata", f"vmName={name}",
                             check=False)
        assert refused.returncode != 0 and "InvalidParameterValueException" in refused.stderr
        assert name in refused.stderr
        refused = aws_backup(cp, "start-restore-job", "--recovery-point-arn", point_full,
                             "--iam-role-arn", ROLE, "--metadata",
                             f"vmName={name}-x,colour=blue", check=False)
        assert refused.returncode != 0 and "storagePool" in refused.stderr, refused.stderr
        try:
            for point, want in ((point_full, sha_full), (point_incr, sha_incr)):
                new_name = f"{name}-r{len(restored)}"
                restored.append(new_name)
                job = aws_backup(cp, "start-restore-job", "--recovery-point-arn", point,
                                 "--iam-role-arn", ROLE, "--metadata",
                                 f"vmName={new_name},storagePool=default")["RestoreJobId"]
                done = wait_job(client, job, kind="restore")
                assert done["Status"] == "COMPLETED", done
                assert done["CreatedResourceArn"].startswith(hv.rsplit(":", 1)[0] + ":vm/vm-")
                sha, fmt = restored_disk_sha(kvm, new_name, tmp_path / f"{new_name}.raw")
                assert (sha, fmt) == (want, "qcow2")

            # 4. a vault holding points is not deleted
            refused = aws_backup(cp, "delete-backup-vault", "--backup-vault-name", vault,
                                 check=False)
            assert refused.returncode != 0 and "InvalidRequestException" in refused.stderr
        finally:
            for new_name in restored:
                remove_domain(kvm, new_name)
