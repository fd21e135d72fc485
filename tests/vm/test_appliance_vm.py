"""The appliance image booted in QEMU: what a user of the OVA sees, end to end.

One BIOS boot is shared by the checks of this module, and one fresh UEFI boot proves both
firmwares work and that two VMs from the same OVA get different identities. Each test asks
the module's fixtures for what it needs (the guest up, its agent answering, its identity,
its activation), so any test runs alone or in any order: `pytest tests/vm/...::test_x`
boots what test_x needs and nothing else. Boot-to-ready seconds are recorded as figures,
never asserted.

Deadlines (pytest-timeout, fixtures included): a TCG boot takes 40-130 s here and its wait
is bounded at 300 s; the agent and systemd 120 + 150 s more; each mark adds the bounded
waits its test and its fixtures can reach, with room for a loaded host.
"""

from __future__ import annotations

import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Any

import pytest
from pexpect.fdpexpect import fdspawn
from vmharness import (  # type: ignore[import-not-found]
    KEY_RE,
    ControlPlane,
    Guest,
    poll,
    vm_timeout,
)

pytestmark = [pytest.mark.vm, pytest.mark.slow]

# Bounded waits the fixtures below can reach: the boot (300 s), the agent (120 s), systemd
# (150 s), an activation (90 s + the AWS CLI, 120 s).
UP = 300 + 120 + 150
ACTIVATED = UP + 90 + 120


@dataclass(frozen=True)
class Ready:
    seconds: float  # power-on to a key on port 80
    key: str


@dataclass(frozen=True)
class Identity:
    key_id: str
    machine_id: str


@dataclass(frozen=True)
class Activation:
    key: str
    arn: str
    status: dict[str, Any]


@pytest.fixture(scope="module")
def bios_ready(bios_guest: Guest) -> Ready:
    """The BIOS guest once port 80 hands out a key: up, whichever test asks first."""
    seconds, key = bios_guest.wait_for_key()
    return Ready(seconds, key)


def wait_system_started(guest: Guest) -> None:
    """Until systemd has finished starting (at once if it has): after a boot or a reboot."""
    guest.qga.sync(timeout=120)
    poll(lambda: guest.qga.exec(["systemctl", "is-system-running", "--wait"], 120)[1]
         .strip() in ("running", "degraded"), 150, "systemd to finish starting")


@pytest.fixture(scope="module")
def bios_agent(bios_guest: Guest, bios_ready: Ready) -> Guest:
    """The BIOS guest once its agent answers and systemd has finished starting."""
    wait_system_started(bios_guest)
    return bios_guest


@pytest.fixture(scope="module")
def bios_identity(bios_agent: Guest) -> Identity:
    """The BIOS guest's identity key id and machine-id, read once (a reboot keeps both)."""
    return Identity(key_id=str(bios_agent.status()["keyId"]),
                    machine_id=bios_agent.qga.sh("cat /etc/machine-id").strip())


@pytest.fixture(scope="module")
def bios_activation(bios_agent: Guest, vm_control_plane: ControlPlane) -> Activation:
    """The BIOS guest activated once, as a user would: curl on port 80, then the AWS CLI."""
    url = (f"{bios_agent.url}/?activationRegion=us-west-2&gatewayType=BACKUP_VM"
           "&endpointType=DUALSTACK&ipVersion=ipv4&no_redirect")
    done = subprocess.run(["curl", "-sS", "--max-time", "60", url], capture_output=True,
                          text=True, timeout=90, check=True)
    key = done.stdout.splitlines()[0].strip()
    assert KEY_RE.match(key), done.stdout
    arn = vm_control_plane.aws("create-gateway", "--activation-key", key,
                               "--gateway-display-name", "vm-test",
                               "--gateway-type", "BACKUP_VM")["GatewayArn"]
    bios_agent.qga.sync(timeout=60)

    def activated() -> dict[str, Any] | None:
        status = bios_agent.status()
        return status if status.get("activated") else None

    status = poll(activated, 90, "the appliance to report itself activated", interval=1)
    return Activation(key, str(arn), status)


@vm_timeout(UP + 60)
def test_bios_boot_reaches_the_activation_endpoint(bios_ready: Ready, figure) -> None:
    figure(f"boot-to-ready (BIOS, power-on to a key on port 80): {bios_ready.seconds:.1f} s")
    assert KEY_RE.match(bios_ready.key)


@vm_timeout(UP + 90 + 60)
def test_console_answers_on_ttyS0(bios_guest: Guest, bios_ready: Ready) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(bios_guest.serial_socket))
    try:
        con = fdspawn(sock.fileno(), timeout=90, encoding="utf-8",
                              codec_errors="replace")
        # The login prompt was drawn before we connected: Ctrl-L redraws it, submitting nothing.
        con.send("\x0c")
        con.expect("login:")
        con.send("admin\r")
        con.expect("Password:")
        con.send("password\r")
        # First login with the documented default forces a change.
        con.expect("New password:")
        con.send("vm-test-Passw0rd\r")
        con.expect("Retype new password:")
        con.send("vm-test-Passw0rd\r")
        con.expect("Password changed")
        con.expect("eth0: 10.0.2.15")  # the header lists the adapter and its DHCP address
        con.expect("Get activation key")
    finally:
        sock.close()


@vm_timeout(UP + 120 + 150 + 120)
def test_no_failed_unit_and_daemon_not_root(bios_agent: Guest, bios_identity: Identity) -> None:
    bios_guest = bios_agent
    wait_system_started(bios_guest)  # again: a reboot test may have run since the fixture
    failed = bios_guest.qga.sh("systemctl list-units --failed --no-legend --plain")
    assert failed.strip() == "", f"failed units:\n{failed}"
    pid = bios_guest.qga.sh("systemctl show -p MainPID --value appliance.service").strip()
    uid_line = bios_guest.qga.sh(f"grep '^Uid:' /proc/{pid}/status")
    uids = uid_line.split()[1:]
    user = bios_guest.qga.sh(f"stat -c %U /proc/{pid}").strip()
    assert user == "appliance" and "0" not in uids, (user, uid_line)
    caps = bios_guest.qga.sh(f"grep '^CapEff:' /proc/{pid}/status").split()[1]
    assert int(caps, 16) == 1 << 10, f"effective capabilities {caps}: only CAP_NET_BIND_SERVICE"
    for unit in ("appliance-guestconfig", "systemd-networkd", "systemd-timesyncd",
                 "qemu-guest-agent", "serial-getty@ttyS0", "getty@tty1"):
        state = bios_guest.qga.exec(["systemctl", "is-active", unit])[1].strip()
        assert state == "active", f"{unit} is {state}"
    # The hypervisor's settings reached the daemon (SMBIOS OEM string -> appliance.toml).
    toml = bios_guest.qga.sh("cat /etc/appliance/appliance.toml")
    assert 'control_plane_url = "http://10.0.2.100:8443"' in toml
    # Nothing left from the build: no sshd, no authorized keys, this VM's own machine-id.
    assert bios_guest.qga.exec(["test", "-e", "/usr/sbin/sshd"])[0] != 0
    assert bios_guest.qga.exec(["test", "-e", "/root/.ssh/authorized_keys"])[0] != 0
    assert re.fullmatch(r"[0-9a-f]{32}", bios_identity.machine_id), bios_identity


@vm_timeout(ACTIVATED + 60)
def test_activation_with_curl_and_the_aws_cli(bios_activation: Activation,
                                              bios_identity: Identity) -> None:
    assert KEY_RE.match(bios_activation.key)
    assert bios_activation.arn.startswith("arn:aws:backup-gateway:us-west-2:")
    status = bios_activation.status
    assert status["gatewayArn"] == bios_activation.arn
    assert status["gatewayName"] == "vm-test"
    assert status["keyId"] == bios_identity.key_id  # the key was issued to this identity


@vm_timeout(ACTIVATED + 240 + 120 + 120)
def test_identity_and_activation_survive_a_reboot(
    bios_agent: Guest, bios_activation: Activation, bios_identity: Identity
) -> None:
    bios_guest = bios_agent
    before = bios_guest.status()
    assert before["keyId"] == bios_identity.key_id
    assert before["activated"] is True and before["gatewayArn"] == bios_activation.arn
    bios_guest.reboot(240)
    after = poll(lambda: _status_or_none(bios_guest), 120, "the daemon after the reboot")
    assert after["keyId"] == before["keyId"]
    assert after["activated"] is True and after["gatewayArn"] == bios_activation.arn
    assert bios_guest.qga.sh("cat /etc/machine-id").strip() == bios_identity.machine_id


def _status_or_none(guest: Guest) -> dict[str, object] | None:
    try:
        return guest.status()
    except AssertionError:
        return None


@vm_timeout(UP + UP + 120)  # the BIOS guest's identity too, when this test runs alone
def test_uefi_fresh_boot_has_its_own_identity(appliance_disk, vm_workdir, vm_control_plane,
                                              accel: str, bios_identity: Identity,
                                              figure) -> None:
    guest = Guest("uefi", appliance_disk, vm_workdir, vm_control_plane.port, "uefi", accel)
    try:
        seconds, key = guest.wait_for_key()
        figure(f"boot-to-ready (UEFI, fresh disk, power-on to a key on port 80): {seconds:.1f} s")
        assert KEY_RE.match(key)
        guest.qga.sync(timeout=120)
        assert guest.qga.sh("test -d /sys/firmware/efi && echo uefi").strip() == "uefi"
        status = guest.status()
        assert status["activated"] is False
        assert status["keyId"] != bios_identity.key_id
        machine_id = guest.qga.sh("cat /etc/machine-id").strip()
        assert re.fullmatch(r"[0-9a-f]{32}", machine_id)
        assert machine_id != bios_identity.machine_id
    finally:
        guest.stop()
