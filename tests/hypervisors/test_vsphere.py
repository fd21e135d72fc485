"""The vSphere connector against the govmomi simulator (vcsim) with TLS verified.

The simulator speaks the real SOAP API (login, ServiceContent, container views,
RetrievePropertiesEx with paging) and the vAPI REST tagging endpoint, so these run the
connector's real code paths. What it cannot show, and a real vCenter adds:
- SSO: vcsim accepts exactly one user; a real vCenter has vsphere.local and AD/LDAP users,
  lockout after failed logins, and per-object permissions that hide VMs from discovery.
- its REST endpoint accepts any non-empty password (the SOAP login is the real check here).
- VMs in vApps, orphaned or inaccessible VMs (no config, so no instanceUuid), templates,
  thousands of VMs (several pages of RetrievePropertiesEx), names with '/' (%2f in paths).
- the VMCA certificate chain and its renewal; vCenter 7/8's /api REST flavour beside /rest.
"""

from __future__ import annotations

import ssl

import pytest
import vcsim

from appliance.hypervisors import HypervisorError, Target, connector_for
from appliance.hypervisors.vsphere import parse_host
from tests.conftest import free_port

pytestmark = pytest.mark.slow


def good(server: vcsim.Vcsim, password: str = vcsim.PASSWORD) -> Target:
    return Target(f"127.0.0.1:{server.port}", vcsim.USERNAME, password)


def expect(code: str, t: Target, ca_file: str | None) -> HypervisorError:
    with pytest.raises(HypervisorError) as info:
        connector_for(t, 10.0, ca_file=ca_file).test()
    assert info.value.code == code, info.value.message
    return info.value


def test_right_password_passes(vcsim_server: vcsim.Vcsim) -> None:
    connector = connector_for(good(vcsim_server), ca_file=str(vcsim_server.ca_file))
    connector.test()
    connector.test()  # the session is reused
    connector.close()
    connector.test()  # and made again after close()
    connector.close()


def test_wrong_password_is_authentication_failed(vcsim_server: vcsim.Vcsim) -> None:
    error = expect("AuthenticationFailed", good(vcsim_server, "Wrong-pass-123"),
                   str(vcsim_server.ca_file))
    assert "Wrong-pass-123" not in str(error)
    assert "refused the user name or password" in error.message


def test_closed_port_is_host_unreachable(vcsim_server: vcsim.Vcsim) -> None:
    error = expect("HostUnreachable", Target(f"127.0.0.1:{free_port()}", "u", "p"),
                   str(vcsim_server.ca_file))
    assert "connection refused" in error.message


def test_untrusted_certificate_is_certificate_error(vcsim_server: vcsim.Vcsim) -> None:
    """Verification is on by default (system CA store), and the simulator's CA is not in it;
    the message carries the fingerprint a person compares with vCenter's."""
    error = expect("CertificateError", good(vcsim_server), None)
    der = ssl.PEM_cert_to_DER_cert(
        ssl.get_server_certificate(("127.0.0.1", vcsim_server.port)))
    import hashlib

    digest = hashlib.sha256(der).hexdigest().upper()
    assert ":".join(digest[i:i + 2] for i in range(0, 64, 2)) in error.message


@pytest.mark.parametrize(("text", "host", "port"), [
    ("vcenter.example.com", "vcenter.example.com", 443),
    ("VC01:8443", "vc01", 8443),
    ("192.0.2.10", "192.0.2.10", 443),
    ("[2001:db8::10]:9443", "2001:db8::10", 9443),
    ("2001:db8::10", "2001:db8::10", 443),
])
def test_host_forms(text: str, host: str, port: int) -> None:
    where = parse_host(text)
    assert (where.host, where.port) == (host, port)


@pytest.mark.parametrize("text", ["vc:0", "vc:65536", "vc:", "[::1", "[::1]x", "[vc]:443",
                                  "999.0.0.1", "vc_01", "a b", "vc:44a3", "fe80::1%eth0"])
def test_bad_host_forms(text: str) -> None:
    with pytest.raises(HypervisorError) as info:
        connector_for(Target(text, "u", "p"))
    assert info.value.code == "InvalidHost"


def _moid_of(server: vcsim.Vcsim, instance_uuid: str) -> str:
    """The VM's managed object id, as an administrator's script would find it."""
    from pyVim.connect import Disconnect, SmartConnect

    context = ssl.create_default_context(cafile=str(server.ca_file))
    si = SmartConnect(host="127.0.0.1", port=server.port, user=vcsim.USERNAME,
                      pwd=vcsim.PASSWORD, sslContext=context)
    try:
        vm = si.content.searchIndex.FindByUuid(None, instance_uuid, True, True)
        return vm._moId
    finally:
        Disconnect(si)


def test_inventory_paths_uuids_hosts_and_tags(vcsim_server: vcsim.Vcsim) -> None:
    connector = connector_for(good(vcsim_server), ca_file=str(vcsim_server.ca_file))
    try:
        vms = connector.inventory()
        # the model: a folder F0 holding datacenter DC0, whose vm folder holds folder F0;
        # a cluster C0 of 3 hosts and a standalone host H0, 2 VMs per resource pool
        assert {vm.name for vm in vms} == {"DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1", "DC0_H0_VM0",
                                           "DC0_H0_VM1"}
        for vm in vms:
            assert vm.path == f"/F0/DC0/vm/F0/{vm.name}"
            assert vm.host_name.startswith("DC0_C0_H" if "_C0_" in vm.name else "DC0_H0")
            assert len(vm.uuid) == 36 and vm.tags == ()
        assert len({vm.uuid for vm in vms}) == 4

        session = vcsim_server.rest("POST", "/com/vmware/cis/session")
        category = vcsim_server.rest("POST", "/com/vmware/cis/tagging/category", {"create_spec": {
            "name": "backup-policy", "description": "", "cardinality": "SINGLE",
            "associable_types": []}}, session)
        tag = vcsim_server.rest("POST", "/com/vmware/cis/tagging/tag", {"create_spec": {
            "name": "daily", "description": "", "category_id": category}}, session)
        chosen = next(vm for vm in vms if vm.name == "DC0_H0_VM1")
        vcsim_server.rest(
            "POST", f"/com/vmware/cis/tagging/tag-association/id:{tag}?~action=attach",
            {"object_id": {"type": "VirtualMachine", "id": _moid_of(vcsim_server, chosen.uuid)}},
            session)

        again = {vm.uuid: vm for vm in connector.inventory()}
        assert again[chosen.uuid].tags == (("backup-policy", "daily"),)
        assert all(vm.tags == () for uuid, vm in again.items() if uuid != chosen.uuid)
    finally:
        connector.close()


def test_silent_host_times_out_as_host_unreachable(vcsim_server: vcsim.Vcsim) -> None:
    """A port that accepts and never starts TLS: the socket timeout ends the handshake."""
    import socket
    import time

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        started = time.monotonic()
        with pytest.raises(HypervisorError) as info:
            connector_for(Target(f"127.0.0.1:{silent.getsockname()[1]}", "u", "p"), 1.5,
                          ca_file=str(vcsim_server.ca_file)).test()
        assert info.value.code == "HostUnreachable", info.value.message
        assert time.monotonic() - started < 5
