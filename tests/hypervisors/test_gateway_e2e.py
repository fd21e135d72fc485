"""Hypervisors through the gateway, end to end, on the session's hypervisors: the real AWS
CLI drives a real control plane, whose real appliance daemons test and sync the private
libvirtd daemons (IPv4 and [::1]) and the vSphere simulator started once for this directory
(conftest.py). Nothing is mocked.

What these add to tests/integration/test_hypervisor_agent.py: vSphere (with its CA trusted
through the daemon's `hypervisor_ca_file`), an IPv6 libvirt URI, the control plane restarted
while a sync's report is in flight, and two gateways syncing one hypervisor. The session's
hypervisors are shared with the connector tests, so each test names its own domains and
compares with what the daemon really holds, and removes them at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import uuid as uuidlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import libvirtd
import pytest
import vcsim

from tests.conftest import activate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SYNC_TIMEOUT = 30.0  # a sync of a handful of VMs takes well under a second here


# -- helpers ---------------------------------------------------------------------------------


def vms_of(cp: Any, hypervisor_arn: str) -> list[dict[str, Any]]:
    """Every VM ListVirtualMachines shows for the hypervisor (all pages)."""
    out: list[dict[str, Any]] = []
    token: list[str] = []
    while True:
        doc = cp.aws("list-virtual-machines", "--hypervisor-arn", hypervisor_arn,
                     "--no-paginate", *token)
        out.extend(doc.get("VirtualMachines", []))
        if not doc.get("NextToken"):
            return out
        token = ["--next-token", doc["NextToken"]]


def arns_by_name(cp: Any, hypervisor_arn: str) -> dict[str, str]:
    """Name -> ResourceArn; fails on a duplicated name (a VM listed twice)."""
    vms = vms_of(cp, hypervisor_arn)
    names = [vm["Name"] for vm in vms]
    assert len(names) == len(set(names)), f"a VM is listed twice: {sorted(names)}"
    return {vm["Name"]: vm["ResourceArn"] for vm in vms}


def domains(daemon: libvirtd.Libvirtd) -> set[str]:
    """The domains the libvirtd really holds, read through its own socket."""
    import libvirt

    conn = libvirt.open(daemon.admin_uri)
    try:
        return {dom.name() for dom in conn.listAllDomains()}
    finally:
        conn.close()


def expected_vm_arn(daemon: libvirtd.Libvirtd, hypervisor_arn: str, name: str) -> str:
    """The ARN docs/controlplane.md promises a VM: from the hypervisor and the VM's uuid
    only, so whichever gateway reports it, it is the same."""
    import hashlib

    import libvirt

    conn = libvirt.open(daemon.admin_uri)
    try:
        uuid = conn.lookupByName(name).UUIDString()
    finally:
        conn.close()
    hypervisor_id = hypervisor_arn.rsplit("/", 1)[1]
    digest = hashlib.sha256(f"{hypervisor_id}\0{uuid}".encode()).hexdigest()
    return f"{hypervisor_arn.rsplit(':', 1)[0]}:vm/vm-{digest[:17]}"


@contextmanager
def defined(daemon: libvirtd.Libvirtd, *names: str) -> Iterator[list[str]]:
    """Domains with unique names on a shared daemon, undefined at the end."""
    suffix = uuidlib.uuid4().hex[:6]
    made: list[str] = []
    try:
        for name in names:
            daemon.define(f"{name}-{suffix}")
            made.append(f"{name}-{suffix}")
        yield made
    finally:
        for name in made:
            with contextlib.suppress(Exception):  # already gone is fine at cleanup
                daemon.undefine(name)


def state_of(app: Any) -> dict[str, Any]:
    return dict(json.loads((app.state_dir / "state.json").read_text()))


def synced(app: Any, request: int) -> bool:
    """The gateway has reported the sync for `request` (or a later one)."""
    st = state_of(app)
    return st.get("hypervisor_synced_request", 0) >= request and (
        st.get("hypervisor_synced_request") == st.get("hypervisor_sync_request"))


def import_libvirt(cp: Any, daemon: libvirtd.Libvirtd, name: str) -> str:
    return str(cp.aws("import-hypervisor-configuration", "--name", name, "--host",
                      daemon.tcp_uri(), "--username", libvirtd.SASL_USER, "--password",
                      libvirtd.SASL_PASSWORD)["HypervisorArn"])


def associate(cp: Any, gateway_arn: str, hypervisor_arn: str) -> None:
    cp.aws("associate-gateway-to-server", "--gateway-arn", gateway_arn,
           "--server-arn", hypervisor_arn)


# -- 1. vSphere through the gateway ---------------------------------------------------------


@contextmanager
def _attached_tag(server: vcsim.Vcsim, vm_name: str, category: str, tag: str
                  ) -> Iterator[None]:
    """`category`/`tag` created and attached to the VM, as a vCenter administrator would;
    detached and deleted at the end (the simulator is shared with test_vsphere.py, which
    expects untagged VMs)."""
    from pyVim.connect import Disconnect, SmartConnect
    from pyVmomi import vim

    context = ssl.create_default_context(cafile=str(server.ca_file))
    si = SmartConnect(host="127.0.0.1", port=server.port, user=vcsim.USERNAME,
                      pwd=vcsim.PASSWORD, sslContext=context)
    try:
        view = si.content.viewManager.CreateContainerView(
            si.content.rootFolder, [vim.VirtualMachine], True)
        moid = next(vm._moId for vm in view.view if vm.name == vm_name)
        view.Destroy()
    finally:
        Disconnect(si)
    session = server.rest("POST", "/com/vmware/cis/session")
    category_id = server.rest("POST", "/com/vmware/cis/tagging/category", {"create_spec": {
        "name": category, "description": "", "cardinality": "SINGLE",
        "associable_types": []}}, session)
    tag_id = server.rest("POST", "/com/vmware/cis/tagging/tag", {"create_spec": {
        "name": tag, "description": "", "category_id": category_id}}, session)
    association = f"/com/vmware/cis/tagging/tag-association/id:{tag_id}"
    vm = {"object_id": {"type": "VirtualMachine", "id": moid}}
    server.rest("POST", f"{association}?~action=attach", vm, session)
    try:
        yield
    finally:
        server.rest("POST", f"{association}?~action=detach", vm, session)
        server.rest("DELETE", f"/com/vmware/cis/tagging/tag/id:{tag_id}", None, session)
        server.rest("DELETE", f"/com/vmware/cis/tagging/category/id:{category_id}", None,
                    session)


def test_vsphere_through_the_gateway(
    control_plane: Any, make_appliance: Callable[..., Any], vcsim_server: vcsim.Vcsim,
    wait_until: Callable[..., Any],
) -> None:
    """The daemon trusts the simulator's CA through --hypervisor-ca-file (the setting a
    self-signed vCenter needs); tests pass with the right password and fail clearly with a
    wrong one; the inventory carries folder paths and ESXi host names; a mapped VMware tag
    becomes the VM's AWS tag."""
    cp = control_plane
    app = make_appliance(cp.url, extra_args=["--hypervisor-ca-file", str(vcsim_server.ca_file)])
    gateway_arn = activate(cp, app)
    host = f"127.0.0.1:{vcsim_server.port}"
    base = ["test-hypervisor-configuration", "--gateway-arn", gateway_arn, "--host", host,
            "--username", vcsim.USERNAME]
    cp.aws(*base, "--password", vcsim.PASSWORD)  # exit 0: the gateway connected and logged in
    wrong = cp.aws(*base, "--password", "Not-the-pass-9", check=False)
    assert wrong.returncode != 0 and "AuthenticationFailed" in wrong.stderr, wrong.stderr
    assert "Not-the-pass-9" not in wrong.stderr

    suffix = uuidlib.uuid4().hex[:6]
    category, tag = f"e2e-tier-{suffix}", "gold"
    with _attached_tag(vcsim_server, "DC0_C0_RP0_VM0", category, tag):
        hv = str(cp.aws("import-hypervisor-configuration", "--name", "vcsim", "--host",
                        host, "--username", vcsim.USERNAME, "--password",
                        vcsim.PASSWORD)["HypervisorArn"])
        cp.aws("put-hypervisor-property-mappings", "--hypervisor-arn", hv,
               "--iam-role-arn", "arn:aws:iam::123456789012:role/backup-gateway-tags",
               "--vmware-to-aws-tag-mappings",
               f"VmwareCategory={category},VmwareTagName={tag},AwsTagKey=tier,AwsTagValue=gold")
        associate(cp, gateway_arn, hv)

        expected = {"DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1", "DC0_H0_VM0", "DC0_H0_VM1"}
        wait_until(lambda: set(arns_by_name(cp, hv)) == expected, timeout=SYNC_TIMEOUT,
                   what="the simulator's VMs in ListVirtualMachines")
        for vm in vms_of(cp, hv):
            assert vm["Path"] == f"/F0/DC0/vm/F0/{vm['Name']}", vm
            prefix = "DC0_C0_H" if "_C0_" in vm["Name"] else "DC0_H0"
            assert vm["HostName"].startswith(prefix), vm
        details = cp.aws("get-hypervisor", "--hypervisor-arn", hv)["Hypervisor"]
        assert details["State"] == "ONLINE" and details["LatestMetadataSyncStatus"] == "SUCCEEDED"

        arns = arns_by_name(cp, hv)
        tags = cp.aws("list-tags-for-resource", "--resource-arn", arns["DC0_C0_RP0_VM0"])["Tags"]
        assert {"Key": "tier", "Value": "gold"} in tags, tags
        other = cp.aws("list-tags-for-resource", "--resource-arn", arns["DC0_H0_VM0"])["Tags"]
        assert {"Key": "tier", "Value": "gold"} not in other, other
        vm = cp.aws("get-virtual-machine", "--resource-arn", arns["DC0_C0_RP0_VM0"])
        assert {"VmwareCategory": category, "VmwareTagName": tag} in [
            {k: t[k] for k in ("VmwareCategory", "VmwareTagName")}
            for t in vm["VirtualMachine"]["VmwareTags"]]
        assert vcsim.PASSWORD not in app.proc.output()


def test_vsphere_without_the_ca_file_is_a_certificate_error(
    control_plane: Any, make_appliance: Callable[..., Any], vcsim_server: vcsim.Vcsim,
) -> None:
    """Without the setting the system store is used and the simulator's CA is not in it:
    a CertificateError naming the remedy, never a silent trust."""
    app = make_appliance(control_plane.url)
    gateway_arn = activate(control_plane, app)
    done = control_plane.aws(
        "test-hypervisor-configuration", "--gateway-arn", gateway_arn,
        "--host", f"127.0.0.1:{vcsim_server.port}", "--username", vcsim.USERNAME,
        "--password", vcsim.PASSWORD, check=False)
    assert done.returncode != 0 and "CertificateError" in done.stderr, done.stderr


# -- 2. an IPv6 hypervisor address ----------------------------------------------------------


def test_ipv6_libvirt_uri_syncs(
    control_plane: Any, make_appliance: Callable[..., Any],
    libvirt_daemon_v6: libvirtd.Libvirtd, wait_until: Callable[..., Any],
) -> None:
    cp = control_plane
    uri = libvirt_daemon_v6.tcp_uri()
    assert uri.startswith("qemu+tcp://[::1]:")
    app = make_appliance(cp.url)
    gateway_arn = activate(cp, app)
    with defined(libvirt_daemon_v6, "v6-e2e-a", "v6-e2e-b") as names:
        hv = import_libvirt(cp, libvirt_daemon_v6, "kvm-v6")
        associate(cp, gateway_arn, hv)
        want = domains(libvirt_daemon_v6)
        assert set(names) <= want
        wait_until(lambda: set(arns_by_name(cp, hv)) == want, timeout=SYNC_TIMEOUT,
                   what="the [::1] daemon's domains in ListVirtualMachines")
        for vm in vms_of(cp, hv):
            assert vm["Path"] == f"[::1]/{vm['Name']}", vm
        status = app.status()["hypervisor"]
        assert status["host"] == uri and status["lastSync"]["ok"] is True
        assert cp.aws("get-hypervisor", "--hypervisor-arn", hv)["Hypervisor"]["State"] == "ONLINE"


# -- 3. the control plane restarted while a sync is in flight ------------------------------


def _unread_request_bytes(port: int) -> int:
    """Bytes received and not yet read by whoever listens on `port` (ESTABLISHED sockets
    and the accept queue), from /proc/net/tcp: how the test sees a request pending on a
    stopped server without a sleep."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port != port:
                    continue
                rx = int(fields[4].split(":")[1], 16)
                if fields[3] in ("01", "0A"):  # ESTABLISHED, LISTEN (rx = accept backlog)
                    total += rx
    return total


def test_control_plane_restart_mid_sync(
    control_plane: Any, make_appliance: Callable[..., Any],
    libvirt_daemon: libvirtd.Libvirtd, wait_until: Callable[..., Any],
) -> None:
    """The sync is held inside libvirt (SIGSTOP) while the control plane is frozen, then
    the gateway's inventory report is left pending on the frozen control plane, which is
    killed and started again on its state directory. The gateway must sync again and the
    control plane end with the whole list, the same ARNs, a SUCCEEDED status, no duplicates."""
    cp = control_plane
    app = make_appliance(cp.url)
    gateway_arn = activate(cp, app)
    with defined(libvirt_daemon, "rs-a", "rs-b") as first:
        hv = import_libvirt(cp, libvirt_daemon, "kvm-restart")
        associate(cp, gateway_arn, hv)
        wait_until(lambda: set(arns_by_name(cp, hv)) == domains(libvirt_daemon),
                   timeout=SYNC_TIMEOUT, what="the first sync")
        wait_until(lambda: synced(app, 1), what="the first sync recorded by the gateway")
        before = arns_by_name(cp, hv)
        assert set(first) <= set(before)

        with defined(libvirt_daemon, "rs-c") as added:
            libvirt_daemon.undefine(first[0])  # the sync in flight also removes one
            libvirtd_pid = libvirt_daemon.process.pid
            assert cp.proc is not None
            cp_pid = cp.proc.popen.pid
            os.kill(libvirtd_pid, signal.SIGSTOP)  # the next sync hangs inside libvirt
            try:
                mark = len(app.proc.lines)
                cp.aws("start-virtual-machines-metadata-sync", "--hypervisor-arn", hv)
                app.proc.wait_for_line(r"event=hypervisor_sync_started .*sync_request=2",
                                       start=mark, timeout=SYNC_TIMEOUT)
                os.kill(cp_pid, signal.SIGSTOP)  # the control plane freezes mid-sync
            finally:
                os.kill(libvirtd_pid, signal.SIGCONT)
            try:
                # the sync finishes and its report waits, unread, on the frozen control plane
                wait_until(lambda: _unread_request_bytes(cp.port) > 0, timeout=SYNC_TIMEOUT,
                           what="the inventory report pending on the frozen control plane")
                assert "event=hypervisor_sync_done" not in "\n".join(app.proc.lines[mark:])
            finally:
                cp.proc.kill()  # SIGKILL ends a stopped process too
            app.proc.wait_for_line(r"event=hypervisor_sync_unreported", start=mark,
                                   timeout=SYNC_TIMEOUT)
            cp.start()  # same state directory, same port
            want = domains(libvirt_daemon)
            assert set(added) <= want and first[0] not in want
            wait_until(lambda: synced(app, 2), timeout=SYNC_TIMEOUT,
                       what="the owed sync reported to the restarted control plane")
            after = arns_by_name(cp, hv)
            assert set(after) == want
            kept = {k: v for k, v in before.items() if k in want}
            assert {k: after[k] for k in kept} == kept  # stable ARNs across the restart
            assert len(set(after.values())) == len(after)
            details = cp.aws("get-hypervisor", "--hypervisor-arn", hv)["Hypervisor"]
            assert details["State"] == "ONLINE", details
            assert details["LatestMetadataSyncStatus"] == "SUCCEEDED", details
            assert "LastSuccessfulMetadataSyncTime" in details
            status = app.status()["hypervisor"]
            assert status["lastSync"]["ok"] is True and status["vmCount"] == len(want)
            assert state_of(app)["hypervisor_last_sync"]["syncRequest"] == 2


# -- 4. two gateways on one hypervisor ------------------------------------------------------


def test_two_gateways_one_hypervisor(
    control_plane: Any, make_appliance: Callable[..., Any],
    libvirt_daemon: libvirtd.Libvirtd, wait_until: Callable[..., Any],
) -> None:
    """Both gateways sync the same hypervisor: each report replaces the list, so the VMs
    are listed once, with the ARN derived from the hypervisor and the VM (not the gateway)."""
    cp = control_plane
    apps = [make_appliance(cp.url), make_appliance(cp.url)]
    gateway_arns = [activate(cp, app, name=f"gw{i}") for i, app in enumerate(apps)]
    with defined(libvirt_daemon, "two-a", "two-b") as names:
        hv = import_libvirt(cp, libvirt_daemon, "kvm-shared")
        for gateway_arn in gateway_arns:
            associate(cp, gateway_arn, hv)  # each association is a sync request: 1, then 2
        wait_until(lambda: all(synced(app, 2) for app in apps), timeout=SYNC_TIMEOUT,
                   what="both gateways' syncs")
        want = domains(libvirt_daemon)
        first = arns_by_name(cp, hv)
        assert set(first) == want

        with defined(libvirt_daemon, "two-c") as added:
            libvirt_daemon.undefine(names[1])
            cp.aws("start-virtual-machines-metadata-sync", "--hypervisor-arn", hv)
            wait_until(lambda: all(synced(app, 3) for app in apps), timeout=SYNC_TIMEOUT,
                       what="both gateways' syncs of request 3")
            again = arns_by_name(cp, hv)
            assert set(again) == (want | set(added)) - {names[1]}
            assert all(again[k] == v for k, v in first.items() if k != names[1])
            assert again == {k: expected_vm_arn(libvirt_daemon, hv, k) for k in again}
            for app in apps:
                status = app.status()["hypervisor"]
                assert status["lastSync"]["ok"] is True
                assert status["vmCount"] == len(again)
        for gateway_arn in gateway_arns:
            gateway = cp.aws("get-gateway", "--gateway-arn", gateway_arn)["Gateway"]
            assert gateway["HypervisorId"] == hv.rsplit("/", 1)[1]

