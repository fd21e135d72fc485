"""The appliance image connecting to a hypervisor on the host, as `make run` wires it.

A private libvirtd (tools/libvirtd.py, the README's demo hypervisor's daemon) listens on a free
port of the host's loopback with two domains defined; the guest boots with the second relay
(tools/image/vm.py: its 10.0.2.101:16509 to that port) and is activated; the hypervisor is
imported as `qemu+tcp://10.0.2.101:16509/system` with the real AWS CLI and associated. What
this proves beyond tests/integration/test_hypervisor_agent.py: the image's python3-libvirt,
python3-libnbd and SASL modules, and the daemon under its hardened unit (its own user, one
capability, a syscall filter, MemoryDenyWriteExecute) can load libvirt, reach the host, log
in, read a backup's NBD export through the relays and restore through libvirt's streams.

Each test asks this module's fixtures for what it needs (the host's libvirtd, the guest up,
its activation, the association), so any test runs alone or in any order.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from vmharness import (  # type: ignore[import-not-found]
    KEY_RE,
    REPO,
    ControlPlane,
    Guest,
    free_port,
    poll,
    vm_timeout,
)

from tools import libvirtd
from tools.image.vm import GUEST_HYPERVISOR

pytestmark = [pytest.mark.vm, pytest.mark.slow]

# Bounded waits the fixtures can reach: the boot (300 s), the agent (120 s), systemd (150 s),
# an activation (90 s + the AWS CLI, 120 s), libvirtd (30 s + a first capability probe, 60 s).
UP = 300 + 120 + 150
ACTIVATED = UP + 90 + 120 + 90
SYNC_WAIT = 120  # the association's first sync, reported over the link
ASSOCIATED = ACTIVATED + 3 * 120 + SYNC_WAIT

GUEST_URI = f"qemu+tcp://{GUEST_HYPERVISOR[0]}:{GUEST_HYPERVISOR[1]}/system"
DOMAINS = {"vm-web": [("env", "prod"), ("app", "web")], "vm-db": [("env", "prod")]}


@dataclass(frozen=True)
class Association:
    gateway_arn: str
    hypervisor_arn: str


@pytest.fixture(scope="module")
def host_libvirtd() -> Iterator[libvirtd.Libvirtd]:
    """A private libvirtd on a free port of the host's loopback, two domains defined."""
    if os.geteuid() != 0:
        pytest.skip("a private libvirtd needs root (mount namespace)")
    missing = libvirtd.missing_programs()
    assert not missing, f"missing {', '.join(missing)}: run tools/install-deps.sh"
    daemon = libvirtd.start("127.0.0.1", free_port(), REPO / "build" / "libvirt-cache")
    try:
        for name, tags in DOMAINS.items():
            daemon.define(name, tags)
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def hv_guest(appliance_disk: Path, vm_workdir: Path, vm_control_plane: ControlPlane,
             accel: str, host_libvirtd: libvirtd.Libvirtd) -> Iterator[Guest]:
    """A BIOS guest whose 10.0.2.101:16509 is relayed to the host's libvirtd, up and with
    systemd finished starting."""
    guest = Guest("hv", appliance_disk, vm_workdir, vm_control_plane.port, "bios", accel,
                  hypervisor_port=host_libvirtd.port)
    try:
        guest.wait_for_key()
        guest.qga.sync(timeout=120)
        poll(lambda: guest.qga.exec(["systemctl", "is-system-running", "--wait"], 120)[1]
             .strip() in ("running", "degraded"), 150, "systemd to finish starting")
        yield guest
    finally:
        guest.stop()


@pytest.fixture(scope="module")
def hv_gateway_arn(hv_guest: Guest, vm_control_plane: ControlPlane) -> str:
    """The guest activated as a user would: curl on port 80, then create-gateway."""
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "60",
         f"{hv_guest.url}/?activationRegion=us-west-2&gatewayType=BACKUP_VM&no_redirect"],
        capture_output=True, text=True, timeout=90, check=True)
    key = done.stdout.splitlines()[0].strip()
    assert KEY_RE.match(key), done.stdout
    arn = str(vm_control_plane.aws("create-gateway", "--activation-key", key,
                                   "--gateway-display-name", "vm-hypervisor",
                                   "--gateway-type", "BACKUP_VM")["GatewayArn"])
    poll(lambda: hv_guest.status().get("activated"), 90,
         "the appliance to report itself activated", interval=1)
    return arn


def vm_names(cp: ControlPlane, hypervisor_arn: str) -> set[str]:
    doc = cp.aws("list-virtual-machines", "--hypervisor-arn", hypervisor_arn)
    return {vm["Name"] for vm in doc.get("VirtualMachines", [])}


@pytest.fixture(scope="module")
def association(hv_guest: Guest, hv_gateway_arn: str, vm_control_plane: ControlPlane,
                host_libvirtd: libvirtd.Libvirtd) -> Association:
    """The host's libvirtd imported as the guest sees it and associated with the gateway."""
    hv_arn = str(vm_control_plane.aws(
        "import-hypervisor-configuration", "--name", "host-kvm", "--host", GUEST_URI,
        "--username", libvirtd.SASL_USER, "--password", libvirtd.SASL_PASSWORD,
    )["HypervisorArn"])
    vm_control_plane.aws("associate-gateway-to-server", "--gateway-arn", hv_gateway_arn,
                         "--server-arn", hv_arn)
    return Association(hv_gateway_arn, hv_arn)


@vm_timeout(ASSOCIATED + 60)
def test_gateway_in_the_vm_syncs_the_hosts_libvirt(
    hv_guest: Guest, association: Association, vm_control_plane: ControlPlane,
    host_libvirtd: libvirtd.Libvirtd,
) -> None:
    # the association's sync: the daemon, under its unit, loaded libvirt and logged in
    poll(lambda: vm_names(vm_control_plane, association.hypervisor_arn) == set(DOMAINS),
         SYNC_WAIT, "the domains in ListVirtualMachines", interval=2)
    status = hv_guest.status()["hypervisor"]
    assert status["host"] == GUEST_URI and status["hypervisorArn"] == association.hypervisor_arn
    assert status["lastSync"]["ok"] is True and status["vmCount"] == len(DOMAINS)
    # a domain defined now shows up after StartVirtualMachinesMetadataSync
    host_libvirtd.define("vm-new")
    try:
        vm_control_plane.aws("start-virtual-machines-metadata-sync", "--hypervisor-arn",
                             association.hypervisor_arn)
        poll(lambda: vm_names(vm_control_plane, association.hypervisor_arn)
             == {*DOMAINS, "vm-new"}, SYNC_WAIT, "the new domain after a sync", interval=2)
    finally:
        host_libvirtd.undefine("vm-new")


@vm_timeout(ASSOCIATED + 60)
def test_test_hypervisor_configuration_passes_from_the_vm(
    association: Association, vm_control_plane: ControlPlane,
) -> None:
    base = ["test-hypervisor-configuration", "--gateway-arn", association.gateway_arn,
            "--host", GUEST_URI, "--username", libvirtd.SASL_USER]
    vm_control_plane.aws(*base, "--password", libvirtd.SASL_PASSWORD)  # exit 0: it passed
    with pytest.raises(AssertionError, match=r"AuthenticationFailed|Username and Password"):
        vm_control_plane.aws(*base, "--password", "not-the-password")


def _guest_connects(guest: Guest, host: str, port: int) -> bool:
    """Whether a TCP connection from the guest to host:port succeeds within 5 s."""
    script = ("import socket, sys\n"
              "try:\n"
              f"    socket.create_connection(({host!r}, {port}), timeout=5).close()\n"
              "except OSError:\n"
              "    sys.exit(1)\n")
    return guest.qga.exec(["python3", "-c", script], timeout=30)[0] == 0


@vm_timeout(UP + 90 + 120)
def test_restrict_on_lets_only_the_two_relays_out(
    hv_guest: Guest, host_libvirtd: libvirtd.Libvirtd, vm_control_plane: ControlPlane,
) -> None:
    """The second relay is one more door, and only that one: the host's libvirtd port is not
    reachable by the gateway address, nor another port of 10.0.2.101, nor the outside."""
    assert _guest_connects(hv_guest, *GUEST_HYPERVISOR)
    assert _guest_connects(hv_guest, "10.0.2.100", 8443)
    assert not _guest_connects(hv_guest, "10.0.2.2", host_libvirtd.port)
    assert not _guest_connects(hv_guest, "10.0.2.2", vm_control_plane.port)
    assert not _guest_connects(hv_guest, GUEST_HYPERVISOR[0], 22)
    assert not _guest_connects(hv_guest, "10.0.2.101", host_libvirtd.port)
    assert not _guest_connects(hv_guest, "1.1.1.1", 443)


def _disk_sha(daemon: libvirtd.Libvirtd, domain: str, tmp: Path) -> str:
    """SHA-256 of a domain's first disk as raw bytes (qemu-img convert -U)."""
    import hashlib
    import xml.etree.ElementTree as ET

    import libvirt

    conn = libvirt.open(daemon.admin_uri)
    try:
        root = ET.fromstring(conn.lookupByName(domain).XMLDesc(0))
    finally:
        conn.close()
    source = next(d for d in root.iter("disk") if d.get("device") == "disk").find("source")
    assert source is not None
    out = tmp / f"{domain}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", source.get("file", ""),
                    str(out)], check=True)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return digest


def _job_state(cp: ControlPlane, kind: str, job_id: str) -> dict:
    if kind == "backup":
        return dict(cp.aws("describe-backup-job", "--backup-job-id", job_id, service="backup"))
    return dict(cp.aws("describe-restore-job", "--restore-job-id", job_id, service="backup"))


@vm_timeout(ASSOCIATED + SYNC_WAIT + 2 * 180)
def test_gateway_in_the_vm_backs_up_and_restores(
    association: Association, vm_control_plane: ControlPlane,
    host_libvirtd: libvirtd.Libvirtd, tmp_path: Path,
) -> None:
    """A backup of a domain on the host, read by the gateway in the VM over NBD through the
    relays, then restored as a new domain whose disk is byte-identical."""
    cp = vm_control_plane
    name, restored = "vm-backup", "vm-backup-restored"
    host_libvirtd.define(name)
    host_libvirtd.write_data(name, b"vm-test")
    host_libvirtd.ensure_pool("default")
    try:
        sha = _disk_sha(host_libvirtd, name, tmp_path)
        cp.aws("start-virtual-machines-metadata-sync", "--hypervisor-arn",
               association.hypervisor_arn)
        poll(lambda: name in vm_names(cp, association.hypervisor_arn), SYNC_WAIT,
             "the new domain after a sync", interval=2)
        vms = cp.aws("list-virtual-machines", "--hypervisor-arn",
                     association.hypervisor_arn)["VirtualMachines"]
        vm_arn = next(vm["ResourceArn"] for vm in vms if vm["Name"] == name)
        cp.aws("create-backup-vault", "--backup-vault-name", "vm-vault", service="backup")
        job = cp.aws("start-backup-job", "--backup-vault-name", "vm-vault", "--resource-arn",
                     vm_arn, "--iam-role-arn", "arn:aws:iam::123456789012:role/backup",
                     service="backup")["BackupJobId"]
        done = poll(lambda: (j := _job_state(cp, "backup", job))["State"] in (
            "COMPLETED", "FAILED", "ABORTED") and j, 180, "the backup job", interval=2)
        assert done["State"] == "COMPLETED", done
        assert done["BackupSizeInBytes"] >= 3 * 1024 * 1024, done
        rjob = cp.aws("start-restore-job", "--recovery-point-arn", done["RecoveryPointArn"],
                      "--iam-role-arn", "arn:aws:iam::123456789012:role/backup",
                      "--metadata", f"vmName={restored}", service="backup")["RestoreJobId"]
        rdone = poll(lambda: (j := _job_state(cp, "restore", rjob))["Status"] in (
            "COMPLETED", "FAILED", "ABORTED") and j, 180, "the restore job", interval=2)
        assert rdone["Status"] == "COMPLETED", rdone
        assert _disk_sha(host_libvirtd, restored, tmp_path) == sha
    finally:
        for domain in (restored, name):
            with contextlib.suppress(Exception):
                host_libvirtd.undefine(domain)
