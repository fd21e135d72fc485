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
