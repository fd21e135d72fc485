"""The gateway side of hypervisors, end to end with real processes: the control plane driven
by the real AWS CLI, the appliance daemon, and a private libvirtd with SASL over TCP
(tests/hypervisors/libvirtd.py). The gateway tests and discovers; the control plane asks
and records (docs/link-protocol.md, "Hypervisors")."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import activate, free_port
from tests.hypervisors import libvirtd as lv

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # libvirtd probes QEMU first
# libvirtd's probe of QEMU is cached here, across tests and runs (as tests/hypervisors does)
QEMU_CACHE = Path(__file__).resolve().parents[2] / "build" / "libvirt-cache"


@pytest.fixture
def kvm() -> Iterator[lv.Libvirtd]:
    """A private libvirtd on 127.0.0.1 with two domains defined."""
    daemon = lv.start("127.0.0.1", free_port(), QEMU_CACHE)
    try:
        daemon.define("vm-a", tags=[("env", "prod")])
        daemon.define("vm-b")
        yield daemon
    finally:
        daemon.stop()


def vm_names(cp: Any, hypervisor_arn: str) -> set[str]:
    doc = cp.aws("list-virtual-machines", "--hypervisor-arn", hypervisor_arn)
    return {vm["Name"] for vm in doc.get("VirtualMachines", [])}


def import_kvm(cp: Any, kvm: lv.Libvirtd, name: str = "kvm",
               password: str = lv.SASL_PASSWORD) -> str:
    return str(cp.aws("import-hypervisor-configuration", "--name", name, "--host",
                      kvm.tcp_uri(), "--username", lv.SASL_USER, "--password",
                      password)["HypervisorArn"])


def associated(cp: Any, app: Any, kvm: lv.Libvirtd, **kw: Any) -> tuple[str, str]:
    gateway_arn = activate(cp, app)
    hypervisor_arn = import_kvm(cp, kvm, **kw)
    cp.aws("associate-gateway-to-server", "--gateway-arn", gateway_arn,
           "--server-arn", hypervisor_arn)
    return gateway_arn, hypervisor_arn


def assert_no_clear_password(app: Any) -> None:
    for path in app.state_dir.iterdir():
        if path.is_file():
            assert lv.SASL_PASSWORD.encode() not in path.read_bytes(), path
    assert lv.SASL_PASSWORD not in app.proc.output()


def test_association_syncs_and_a_new_domain_appears_after_a_sync_request(
    control_plane, make_appliance, kvm, wait_until: Callable[..., Any]
) -> None:
    app = make_appliance(control_plane.url)
    _, hv = associated(control_plane, app, kvm)
    wait_until(lambda: vm_names(control_plane, hv) == {"vm-a", "vm-b"}, timeout=60,
               what="the association's sync in ListVirtualMachines")
    status = wait_until(lambda: (s := app.status()["hypervisor"]) and s["lastSync"] and s,
                        what="the sync in the status")
    assert status["hypervisorArn"] == hv and status["host"] == kvm.tcp_uri()
    assert status["lastSync"]["ok"] is True and status["vmCount"] == 2
    assert "password" not in json.dumps(status).lower().replace("passwordpending", "")
    before = {vm["Name"]: vm["ResourceArn"] for vm in control_plane.aws(
        "list-virtual-machines", "--hypervisor-arn", hv)["VirtualMachines"]}

    kvm.define("vm-c")
    control_plane.aws("start-virtual-machines-metadata-sync", "--hypervisor-arn", hv)
    wait_until(lambda: vm_names(control_plane, hv) == {"vm-a", "vm-b", "vm-c"}, timeout=60,
               what="the new domain after StartVirtualMachinesMetadataSync")
    after = {vm["Name"]: vm["ResourceArn"] for vm in control_plane.aws(
        "list-virtual-machines", "--hypervisor-arn", hv)["VirtualMachines"]}
    assert {k: after[k] for k in before} == before  # a VM keeps its ARN across syncs

    kvm.undefine("vm-b")
    control_plane.aws("start-virtual-machines-metadata-sync", "--hypervisor-arn", hv)
    wait_until(lambda: vm_names(control_plane, hv) == {"vm-a", "vm-c"}, timeout=60,
               what="the removed domain gone")
    code, result = app.api("POST", "/v1/hypervisor/test")
    assert code == 200 and result["ok"] is True and result["errorCode"] is None
    assert_no_clear_password(app)


def test_test_hypervisor_configuration_right_and_wrong_password(
    control_plane, make_appliance, kvm
) -> None:
    app = make_appliance(control_plane.url)
    gateway_arn = activate(control_plane, app)
    base = ["test-hypervisor-configuration", "--gateway-arn", gateway_arn,
            "--host", kvm.tcp_uri(), "--username", lv.SASL_USER]
    control_plane.aws(*base, "--password", lv.SASL_PASSWORD)  # exit 0: the test passed
    wrong = control_plane.aws(*base, "--password", "not-the-password", check=False)
    assert wrong.returncode != 0
    assert "AuthenticationFailed" in wrong.stderr or "Username and Password" in wrong.stderr, \
        wrong.stderr
    assert "not-the-password" not in wrong.stderr
    unreachable = control_plane.aws(
        "test-hypervisor-configuration", "--gateway-arn", gateway_arn,
        "--host", f"qemu+tcp://127.0.0.1:{free_port()}/system", "--username", "u",
        "--password", "p", check=False)
    assert unreachable.returncode != 0
    assert ("HostUnreachable" in unreachable.stderr
            or "cannot reach" in unreachable.stderr), unreachable.stderr
    assert_no_clear_password(app)


def test_wrong_password_association_shows_authentication_failed(
    control_plane, make_appliance, kvm, wait_until: Callable[..., Any]
) -> None:
    app = make_appliance(control_plane.url)
    _, hv = associated(control_plane, app, kvm, password="wrong-password")
    last = wait_until(lambda: (s := app.status()["hypervisor"]) and s["lastSync"],
                      timeout=60, what="the failed sync in the status")
    assert (last["ok"], last["errorCode"]) == (False, "AuthenticationFailed")
    code, result = app.api("POST", "/v1/hypervisor/test")
    assert code == 200 and (result["ok"], result["errorCode"]) == (False,
                                                                   "AuthenticationFailed")
    assert vm_names(control_plane, hv) == set()


def test_daemon_killed_mid_sync_leaves_a_consistent_inventory(
    control_plane, make_appliance, kvm, wait_until: Callable[..., Any]
) -> None:
    app = make_appliance(control_plane.url)
    _, hv = associated(control_plane, app, kvm)
    wait_until(lambda: vm_names(control_plane, hv) == {"vm-a", "vm-b"}, timeout=60,
               what="the first sync")
    kvm.define("vm-c")
    # libvirtd frozen: the next sync connects and hangs there, mid-sync, when it is killed
    os.kill(kvm.process.pid, signal.SIGSTOP)
    try:
        mark = len(app.proc.lines)
        control_plane.aws("start-virtual-machines-metadata-sync", "--hypervisor-arn", hv)
        app.proc.wait_for_line(r"event=hypervisor_sync_started", start=mark, timeout=30)
        app.proc.kill()
        assert vm_names(control_plane, hv) == {"vm-a", "vm-b"}  # the old list, whole
    finally:
        os.kill(kvm.process.pid, signal.SIGCONT)
    state = json.loads((app.state_dir / "state.json").read_text())
    assert state["hypervisor_synced_request"] < state["hypervisor_sync_request"]  # owed
    app.start()
    wait_until(lambda: vm_names(control_plane, hv) == {"vm-a", "vm-b", "vm-c"}, timeout=60,
               what="the owed sync after the restart")
    wait_until(lambda: (s := json.loads((app.state_dir / "state.json").read_text()))
               and s["hypervisor_synced_request"] == s["hypervisor_sync_request"],
               what="the sync request reported")


def test_local_api_test_without_association_is_409(control_plane, make_appliance) -> None:
    app = make_appliance(control_plane.url)
    code, doc = app.api("POST", "/v1/hypervisor/test")
    assert code == 409 and doc["error"] == "NotAssociated" and doc["message"]
    assert app.status()["hypervisor"] is None
    assert (app.state_dir / "seal.key").stat().st_mode & 0o777 == 0o600


def test_agent_with_the_real_libvirt_connector(kvm, tmp_path: Path) -> None:
    """The agent in-process, the real connector and libvirtd; the link's reports recorded.

    Independent of the control plane: the sealed password opens in memory, the right one
    syncs both domains with their tags, the wrong one is a clear AuthenticationFailed."""
    import asyncio

    from appliance import sealkey
    from appliance.hypervisoragent import HypervisorAgent
    from appliance.link import HypervisorOrder, TestRequest
    from gatewaycore import sealed
    from tests.unit.test_hypervisoragent import Recorder, make_gateway, settle

    seal, _ = sealkey.load_or_create(tmp_path)
    public = sealed.decode_public(seal.public_b64)

    async def main() -> Recorder:
        link = Recorder()
        agent = HypervisorAgent(make_gateway(tmp_path), link, seal, period=3600)
        runner = asyncio.create_task(agent.run())
        box = sealed.seal(public, lv.SASL_PASSWORD.encode())
        agent.offer(HypervisorOrder("arn:aws:backup-gateway:us-west-2:1:hypervisor/hype-1",
                                    kvm.tcp_uri(), lv.SASL_USER, box, False, 1), [
            TestRequest("right", kvm.tcp_uri(), lv.SASL_USER, box),
            TestRequest("wrong", kvm.tcp_uri(), lv.SASL_USER, sealed.seal(public, b"nope")),
        ])
        await settle(lambda: link.inventories and len(link.tests) == 2, timeout=60)
        runner.cancel()
        await agent.close()
        return link

    link = asyncio.run(main())
    vms = {vm["name"]: vm for vm in link.inventories[0]["vms"]}
    assert set(vms) == {"vm-a", "vm-b"} and link.inventories[0]["ok"] is True
    assert vms["vm-a"]["tags"] == [{"key": "env", "value": "prod"}]
    results = {t[0]: t[1:3] for t in link.tests}
    assert results == {"right": (True, None), "wrong": (False, "AuthenticationFailed")}
    assert lv.SASL_PASSWORD.encode() not in (tmp_path / "state.json").read_bytes()
