"""The libvirt connector against a real libvirtd: SASL (DIGEST-MD5) over TCP checks the
password for real, domains are defined through the daemon's own socket, nothing is mocked.

The first test of a run on a fresh machine waits for libvirt's QEMU capability probe (about
4 s under TCG, then cached in build/libvirt-cache); the deadline leaves room for a loaded host.
"""

from __future__ import annotations

import libvirtd
import pytest

from appliance.hypervisors import HypervisorError, Target, connector_for
from appliance.hypervisors.libvirt import parse_tags, tags_metadata_xml
from tests.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def target(daemon: libvirtd.Libvirtd, password: str | None = libvirtd.SASL_PASSWORD,
           username: str | None = libvirtd.SASL_USER, uri: str | None = None) -> Target:
    return Target(uri or daemon.tcp_uri(), username, password)


def expect(code: str, t: Target, timeout: float = 20.0) -> HypervisorError:
    with pytest.raises(HypervisorError) as info:
        connector = connector_for(t, timeout)
        try:
            connector.test()
        finally:
            connector.close()
    assert info.value.code == code, info.value.message
    return info.value


def test_right_password_passes(libvirt_daemon: libvirtd.Libvirtd) -> None:
    connector = connector_for(target(libvirt_daemon))
    connector.test()
    connector.test()  # the connection is reused
    connector.close()
    connector.test()  # and opened again after close()
    connector.close()


def test_wrong_password_is_authentication_failed(libvirt_daemon: libvirtd.Libvirtd) -> None:
    error = expect("AuthenticationFailed", target(libvirt_daemon, password="not-the-password"))
    assert "not-the-password" not in str(error)
    assert "refused the user name or password" in error.message


def test_unknown_user_and_no_credentials(libvirt_daemon: libvirtd.Libvirtd) -> None:
    expect("AuthenticationFailed", target(libvirt_daemon, username="mallory"))
    error = expect("AuthenticationFailed", target(libvirt_daemon, username=None, password=None))
    assert "asks for a user name" in error.message


def test_closed_port_is_host_unreachable() -> None:
    error = expect("HostUnreachable", Target(f"qemu+tcp://127.0.0.1:{free_port()}/system",
                                             "u", "p"))
    assert "connection refused" in error.message


def test_unresolvable_name_is_host_unreachable() -> None:
    error = expect("HostUnreachable", Target("qemu+tcp://no-such-host.invalid/system", "u", "p"))
    assert "does not resolve" in error.message


@pytest.mark.parametrize("host", [
    "qemu+ext:///system?command=/bin/sh",          # runs a local command
    "qemu+tcp://10.0.0.1/system?pkipath=/etc",     # URI parameters name local files
    "qemu+ssh://h/system?command=id",
    "qemu+tcp://h:99999/system",
    "qemu+tcp://h/nowhere",
    "qemu+tcp:///system",                          # no host
    "qemu:///system#x",
    "qemu+tcp://user:pw@h/system",                 # password in the URI
    "qemu+tcp://bad_host!/system",
    "qemu+tcp://[::1/system",
    "qemu+tcp://999.1.1.1/system",
    "qemu://h/system",                             # local scheme with a host
    "xen:///system",
    "http://vcenter.example",
    "not a host",
    "",
    "vc\x00enter",
    "a" * 300,
])
def test_garbage_is_invalid_host(host: str) -> None:
    with pytest.raises(HypervisorError) as info:
        connector_for(Target(host, "u", "p"))
    assert info.value.code == "InvalidHost", (host, info.value.message)


def test_inventory_lists_domains_with_paths_and_tags(libvirt_daemon: libvirtd.Libvirtd) -> None:
    tagged = libvirt_daemon.define("inv-web", [("env", "prod"), ("owner", "a&b <ops>")])
    plain = libvirt_daemon.define("inv-db")
    try:
        connector = connector_for(target(libvirt_daemon))
        try:
            vms = {vm.name: vm for vm in connector.inventory()}
        finally:
            connector.close()
        web, db = vms["inv-web"], vms["inv-db"]
        assert web.uuid == tagged and db.uuid == plain
        assert web.path == "127.0.0.1/inv-web" and web.host_name == "127.0.0.1"
        assert web.tags == (("env", "prod"), ("owner", "a&b <ops>"))
        assert db.tags == ()
    finally:
        libvirt_daemon.undefine("inv-web")
        libvirt_daemon.undefine("inv-db")


def test_defined_appears_and_undefined_disappears(libvirt_daemon: libvirtd.Libvirtd) -> None:
    libvirt_daemon.define("life-a")
    connector = connector_for(target(libvirt_daemon))
    try:
        first = {vm.name for vm in connector.inventory()}
        assert "life-a" in first and "life-b" not in first
        new_uuid = libvirt_daemon.define("life-b", [("k", "v")])
        libvirt_daemon.undefine("life-a")
        second = {vm.name: vm for vm in connector.inventory()}  # the same connection
        assert "life-a" not in second
        assert second["life-b"].uuid == new_uuid and second["life-b"].tags == (("k", "v"),)
    finally:
        connector.close()
        libvirt_daemon.undefine("life-b")


def test_ipv6_uri(libvirt_daemon_v6: libvirtd.Libvirtd) -> None:
    uri = libvirt_daemon_v6.tcp_uri()
    assert uri.startswith("qemu+tcp://[::1]:")
    libvirt_daemon_v6.define("v6-vm", [("site", "lab")])
    connector = connector_for(Target(uri, libvirtd.SASL_USER, libvirtd.SASL_PASSWORD))
    try:
        connector.test()
        (vm,) = [vm for vm in connector.inventory() if vm.name == "v6-vm"]
        assert vm.path == "[::1]/v6-vm" and vm.host_name == "::1"
        assert vm.tags == (("site", "lab"),)
    finally:
        connector.close()
        libvirt_daemon_v6.undefine("v6-vm")
    expect("AuthenticationFailed", Target(uri, libvirtd.SASL_USER, "wrong"))


def test_tags_metadata_round_trip_and_bad_input() -> None:
    tags = (("env", "prod"), ("quote'\"", "<&>"))
    assert parse_tags(tags_metadata_xml(tags)) == tags
    assert parse_tags("<tags><tag key='a' value='1'/><tag key='a' value='2'/></tags>") == (
        ("a", "1"),)  # the first of a repeated key
    assert parse_tags("<tags><tag value='no key'/><tag key='" + "k" * 129 + "'/></tags>") == ()
    assert parse_tags("<tags><unclosed></tags>") == ()


def test_silent_host_times_out_as_host_unreachable() -> None:
    """A port that accepts and then says nothing: libvirt's connect has no timeout of its
    own, so the connector's worker-thread deadline must end it."""
    import socket
    import time

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        error = expect("HostUnreachable", Target(f"qemu+tcp://127.0.0.1:{port}/system", "u",
                                                 "p"), timeout=1.5)
        assert time.monotonic() - started < 5
        assert "did not answer within 1.5s" in error.message
