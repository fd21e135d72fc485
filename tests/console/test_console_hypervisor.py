"""The console's hypervisor line and menu 8 in a real pseudo-terminal, against the real
daemon, control plane (driven by the AWS CLI) and a private libvirtd with SASL over TCP."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.console import hypervisor
from tests.conftest import activate, free_port
from tests.hypervisors import libvirtd as lv

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # libvirtd probes QEMU first
# libvirtd's probe of QEMU (about 40 s under TCG) is cached here, across tests and runs
QEMU_CACHE = Path(tempfile.gettempdir()) / "bg-test-libvirt-cache"


@pytest.fixture
def kvm() -> Iterator[lv.Libvirtd]:
    daemon = lv.start("127.0.0.1", free_port(), QEMU_CACHE)
    try:
        daemon.define("vm-a")
        daemon.define("vm-b")
        yield daemon
    finally:
        daemon.stop()


def test_header_line_shapes() -> None:
    """The one header line for each state the status can be in (no daemon needed)."""
    assert hypervisor.header_line(None) == "Hypervisor: none associated"
    ok = {"ok": True, "errorCode": None, "message": None, "at": "2024-01-01T00:00:00Z"}
    failed = {**ok, "ok": False, "errorCode": "AuthenticationFailed"}
    line = hypervisor.header_line({"host": "kvm1", "lastSync": ok, "lastTest": failed,
                                   "vmCount": 3})
    assert line == "Hypervisor: kvm1 - sync OK (3 VMs), test FAILED (AuthenticationFailed)"
    assert hypervisor.header_line({"host": "kvm1"}) == "Hypervisor: kvm1 - not yet synced"
    assert len(hypervisor.header_line({"host": "h" * 200, "lastSync": ok})) <= 79


def test_header_shows_the_hypervisor_and_menu_8_tests_it(
    control_plane, appliance, console_factory, kvm, wait_until: Callable[..., Any]
) -> None:
    gateway_arn = activate(control_plane, appliance)
    con = console_factory(appliance.socket_path)
    con.login()
    con.send("8")
    con.seen("No hypervisor is associated")
    con.answer("Press Return", "")

    hv = control_plane.aws("import-hypervisor-configuration", "--name", "kvm", "--host",
                           kvm.tcp_uri(), "--username", lv.SASL_USER, "--password",
                           lv.SASL_PASSWORD)["HypervisorArn"]
    control_plane.aws("associate-gateway-to-server", "--gateway-arn", gateway_arn,
                      "--server-arn", hv)
    wait_until(lambda: (s := appliance.status()["hypervisor"]) and s["lastSync"], timeout=60,
               what="the association's sync")
    con.seen("Enter command:")  # the menu shown after menu 8's Return
    con.send("\x0c")  # Ctrl-L: a fresh header
    con.seen("Hypervisor: qemu+tcp://127.0.0.1")
    assert "sync OK (2 VMs)" in con.seen("Enter command:")
    con.send("8")
    shown = con.seen("Press Return")
    assert hv in shown.replace("\r\n", "").replace("\n", "") or "Hypervisor:" in shown
    assert "[PASSED] Connected to" in shown
    assert lv.SASL_PASSWORD not in shown
    con.send("")
    con.seen("Enter command:")
    con.send("\x0c")  # the header now names the passed test too
    con.seen("sync OK (2 VMs), test OK")
    con.seen("Enter command:")


def test_jobs_header_line_shapes() -> None:
    from appliance.console.app import jobs_header_line

    assert jobs_header_line({"running": 0, "waiting": 0}) == "Jobs: none running"
    assert jobs_header_line({"running": 4, "waiting": 2}) == "Jobs: 4 running, 2 waiting"
    assert jobs_header_line(None) == jobs_header_line({"running": "4"}) == "Jobs: unknown"


def test_header_shows_a_running_backup(
    control_plane, appliance, console_factory, kvm, wait_until: Callable[..., Any]
) -> None:
    """A backup job shaped to take seconds shows in the header while it runs (the jobs
    line comes from the daemon's status, which the job runner feeds)."""
    cp = control_plane
    gateway_arn = activate(cp, appliance)
    kvm.define("vm-job")
    kvm.write_data("vm-job", b"console")  # 3 MiB of incompressible data
    cp.aws("put-bandwidth-rate-limit-schedule", "--gateway-arn", gateway_arn,
           "--bandwidth-rate-limit-intervals",
           "AverageUploadRateLimitInBitsPerSec=1000000,StartHourOfDay=0,StartMinuteOfHour=0,"
           "EndHourOfDay=23,EndMinuteOfHour=59,DaysOfWeek=0,1,2,3,4,5,6")
    hv = cp.aws("import-hypervisor-configuration", "--name", "kvm", "--host", kvm.tcp_uri(),
                "--username", lv.SASL_USER, "--password", lv.SASL_PASSWORD)["HypervisorArn"]
    cp.aws("associate-gateway-to-server", "--gateway-arn", gateway_arn, "--server-arn", hv)
    vm_arn = wait_until(lambda: next((vm["ResourceArn"] for vm in cp.aws(
        "list-virtual-machines", "--hypervisor-arn", hv)["VirtualMachines"]
        if vm["Name"] == "vm-job"), None), timeout=60, what="vm-job in the inventory")
    con = console_factory(appliance.socket_path)
    con.login()
    con.send("\x0c")  # Ctrl-L: a fresh header
    con.seen("Jobs: none running")
    cp.aws("create-backup-vault", "--backup-vault-name", "console", service="backup")
    cp.aws("start-backup-job", "--backup-vault-name", "console", "--resource-arn", vm_arn,
           "--iam-role-arn", "arn:aws:iam::123456789012:role/backup", service="backup")
    wait_until(lambda: appliance.status()["jobs"]["running"] == 1, timeout=30,
               what="the job running on the gateway")
    con.send("\x0c")  # Ctrl-L: a fresh header
    con.seen("Jobs: 1 running, 0 waiting")
