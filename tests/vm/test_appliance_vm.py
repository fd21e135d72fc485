"""The appliance image booted in QEMU: what a user of the OVA sees, end to end.

One BIOS boot is shared by the checks of this module (in file order: ready, console,
services, activation, reboot), and one fresh UEFI boot proves both firmwares work and that
two VMs from the same OVA get different identities. Boot-to-ready seconds are printed
(`-s` shows them), never asserted.
"""

from __future__ import annotations

import re
import socket
import subprocess

import pytest
from pexpect.fdpexpect import fdspawn
from vmharness import KEY_RE, ControlPlane, Guest, poll  # type: ignore[import-not-found]

pytestmark = [pytest.mark.vm, pytest.mark.slow]

RECORD: dict[str, object] = {}


def test_bios_boot_reaches_the_activation_endpoint(bios_guest: Guest, figure) -> None:
    seconds, key = bios_guest.wait_for_key()
    figure(f"boot-to-ready (BIOS, power-on to a key on port 80): {seconds:.1f} s")
    assert KEY_RE.match(key)


def test_console_answers_on_ttyS0(bios_guest: Guest) -> None:
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


def test_no_failed_unit_and_daemon_not_root(bios_guest: Guest) -> None:
    bios_guest.qga.sync(timeout=120)
    poll(lambda: bios_guest.qga.exec(["systemctl", "is-system-running", "--wait"], 120)[1]
         .strip() in ("running", "degraded"), 150, "systemd to finish starting")
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
    RECORD["bios_machine_id"] = bios_guest.qga.sh("cat /etc/machine-id").strip()
    assert re.fullmatch(r"[0-9a-f]{32}", str(RECORD["bios_machine_id"]))


def test_activation_with_curl_and_the_aws_cli(bios_guest: Guest,
                                              vm_control_plane: ControlPlane) -> None:
    url = (f"{bios_guest.url}/?activationRegion=us-west-2&gatewayType=BACKUP_VM"
           "&endpointType=DUALSTACK&ipVersion=ipv4&no_redirect")
    done = subprocess.run(["curl", "-sS", "--max-time", "60", url], capture_output=True,
                          text=True, timeout=90, check=True)
    key = done.stdout.splitlines()[0].strip()
    assert KEY_RE.match(key), done.stdout
    arn = vm_control_plane.aws("create-gateway", "--activation-key", key,
                               "--gateway-display-name", "vm-test",
                               "--gateway-type", "BACKUP_VM")["GatewayArn"]
    bios_guest.qga.sync(timeout=60)

    def activated() -> dict[str, object] | None:
        status = bios_guest.status()
        return status if status.get("activated") else None

    status = poll(activated, 90, "the appliance to report itself activated", interval=1)
    assert status["gatewayArn"] == arn
    assert status["gatewayName"] == "vm-test"
    RECORD["bios_key_id"] = status["keyId"]
    RECORD["arn"] = arn


def test_identity_and_activation_survive_a_reboot(bios_guest: Guest) -> None:
    before = bios_guest.status()
    assert before["keyId"] == RECORD["bios_key_id"]
    first_boot = bios_guest.qga.sh("cat /proc/sys/kernel/random/boot_id").strip()
    bios_guest.qga.sh("systemd-run --on-active=1 systemctl reboot")
    bios_guest.qga.close()

    def new_boot() -> bool:
        try:
            bios_guest.qga.sync(timeout=10)
            boot_id = bios_guest.qga.sh("cat /proc/sys/kernel/random/boot_id").strip()
        except (AssertionError, OSError):
            bios_guest.qga.close()
            return False
        return boot_id != first_boot

    poll(new_boot, 240, "the guest to come back from the reboot", interval=1)
    after = poll(lambda: _status_or_none(bios_guest), 120, "the daemon after the reboot")
    assert after["keyId"] == before["keyId"]
    assert after["activated"] is True and after["gatewayArn"] == RECORD["arn"]
    assert bios_guest.qga.sh("cat /etc/machine-id").strip() == RECORD["bios_machine_id"]


def _status_or_none(guest: Guest) -> dict[str, object] | None:
    try:
        return guest.status()
    except AssertionError:
        return None


def test_uefi_fresh_boot_has_its_own_identity(appliance_disk, vm_workdir, vm_control_plane,
                                              accel: str, figure) -> None:
    guest = Guest("uefi", appliance_disk, vm_workdir, vm_control_plane.port, "uefi", accel)
    try:
        seconds, key = guest.wait_for_key()
        figure(f"boot-to-ready (UEFI, fresh disk, power-on to a key on port 80): {seconds:.1f} s")
        assert KEY_RE.match(key)
        guest.qga.sync(timeout=120)
        assert guest.qga.sh("test -d /sys/firmware/efi && echo uefi").strip() == "uefi"
        status = guest.status()
        assert status["activated"] is False
        assert status["keyId"] != RECORD["bios_key_id"]
        machine_id = guest.qga.sh("cat /etc/machine-id").strip()
        assert machine_id != RECORD["bios_machine_id"]
    finally:
        guest.stop()
