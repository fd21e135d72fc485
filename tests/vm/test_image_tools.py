"""The image's helpers without a VM: hypervisor settings at boot, and the OVF generator.

Fast (no `vm` marker): they run in `make test-fast`.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from vmharness import REPO  # type: ignore[import-not-found]

from tools.image import make_ovf


def _load_guestconfig():
    spec = importlib.util.spec_from_file_location(
        "guestconfig", REPO / "tools" / "image" / "guest" / "guestconfig.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


gc = _load_guestconfig()

OVF_ENV = """<?xml version="1.0" encoding="UTF-8"?>
<Environment xmlns="http://schemas.dmtf.org/ovf/environment/1"
     xmlns:oe="http://schemas.dmtf.org/ovf/environment/1" oe:id="">
  <PlatformSection><Kind>VMware ESXi</Kind></PlatformSection>
  <PropertySection>
    <Property oe:key="appliance.hostname" oe:value="gw-lab-1"/>
    <Property oe:key="appliance.ipv4_mode" oe:value="static"/>
    <Property oe:key="appliance.ipv4_address" oe:value="192.0.2.10/24"/>
    <Property oe:key="appliance.ipv4_gateway" oe:value="192.0.2.1"/>
    <Property oe:key="appliance.dns_servers" oe:value="192.0.2.53, 192.0.2.54"/>
    <Property oe:key="appliance.control_plane_url" oe:value="https://cp.example.test:8443/"/>
    <Property oe:key="other.key" oe:value="ignored"/>
  </PropertySection>
</Environment>
"""


def _smbios_raw(*strings: str) -> bytes:
    body = b"".join(s.encode() + b"\0" for s in strings) + b"\0"
    return bytes([11, 5, 0, 1, len(strings)]) + body


def test_ovf_environment_properties_are_read() -> None:
    props = gc.parse_ovf_env(OVF_ENV)
    assert props["hostname"] == "gw-lab-1"
    assert props["ipv4_address"] == "192.0.2.10/24"
    assert "other.key" not in props and len(props) == 6


def test_smbios_oem_strings_are_read(tmp_path: Path) -> None:
    (tmp_path / "11-0").mkdir()
    (tmp_path / "11-0" / "raw").write_bytes(
        _smbios_raw("vendor-thing", "backupgateway.control_plane_url=http://10.0.2.100:8443"))
    assert gc.read_smbios(tmp_path) == {"control_plane_url": "http://10.0.2.100:8443"}


def test_vapp_settings_are_applied_once_per_change(tmp_path: Path) -> None:
    root, state = tmp_path / "root", tmp_path / "state"
    (root / "etc/appliance").mkdir(parents=True)
    (root / "etc/appliance/appliance.toml").write_text('listen = ["0.0.0.0:80"]\n')
    raw = gc.parse_ovf_env(OVF_ENV)
    assert gc.apply_if_changed("vapp", raw, root, state, live=False) is True
    assert (root / "etc/hostname").read_text() == "gw-lab-1\n"
    network = (root / "etc/systemd/network/10-appliance-eth0.network").read_text()
    assert "Address=192.0.2.10/24" in network and "Gateway=192.0.2.1" in network
    assert "DNS=192.0.2.53" in network and "DNS=192.0.2.54" in network
    toml = (root / "etc/appliance/appliance.toml").read_text()
    assert 'control_plane_url = "https://cp.example.test:8443"' in toml
    assert 'listen = ["0.0.0.0:80"]' in toml  # the other settings are kept
    # Unchanged settings are not applied again: a console edit in between survives.
    (root / "etc/hostname").write_text("edited-on-console\n")
    assert gc.apply_if_changed("vapp", raw, root, state, live=False) is False
    assert (root / "etc/hostname").read_text() == "edited-on-console\n"


def test_bad_values_are_named_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="guestconfig"):
        good = gc.validate({"hostname": "-bad-", "ipv4_mode": "manual",
                            "control_plane_url": "ftp://x", "dns_servers": "1.1.1.1,nope",
                            "colour": "blue", "ipv4_gateway": "192.0.2.1"})
    assert good == {"ipv4_gateway": "192.0.2.1"}
    text = caplog.text
    for name in ("setting=hostname", "setting=ipv4_mode", "setting=control_plane_url",
                 "setting=dns_servers", "setting=colour"):
        assert name in text
    assert "dhcp, static" in text


def test_static_without_an_address_is_refused() -> None:
    assert gc.validate({"ipv4_mode": "static"}) == {}


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
def test_make_ovf_packages_a_vmdk(tmp_path: Path) -> None:
    vmdk = tmp_path / "d.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o",
                    "subformat=streamOptimized,adapter_type=lsilogic", str(vmdk), "1G"],
                   check=True)
    out = tmp_path / "x-1.ova"
    assert make_ovf.main(["--version", "9.9.9", "--disk", str(vmdk), "--out", str(out)]) == 0
    with tarfile.open(out) as tar:
        names = tar.getnames()
        ovf = tar.extractfile(names[0]).read().decode()  # type: ignore[union-attr]
    assert names == ["x-1.ovf", "x-1.mf", "x-1-disk1.vmdk"]
    assert 'ovf:capacity="1073741824"' in ovf and "<ovf:Version>9.9.9</ovf:Version>" in ovf


def test_make_ovf_refuses_a_mismatched_adapter(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    vmdk = tmp_path / "d.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o",
                    "subformat=streamOptimized,adapter_type=ide", str(vmdk), "1G"], check=True)
    assert make_ovf.main(["--version", "1", "--disk", str(vmdk),
                          "--out", str(tmp_path / "y.ova")]) == 1
    assert "adapter type 'ide'" in capsys.readouterr().err
    assert not (tmp_path / "y.ova").exists()


def test_vm_argv_relays_the_hypervisor_only_when_asked(tmp_path: Path) -> None:
    """restrict=on, one guestfwd per relay: the hypervisor's is there only with a port, and
    its `relay` goes to that port on the host's loopback (commas doubled for QEMU)."""
    from tools.image.vm import GUEST_HYPERVISOR, NBD_PORTS, VmConfig

    def netdev(cfg: VmConfig) -> str:
        argv = cfg.argv()
        return argv[argv.index("-netdev") + 1]

    plain = netdev(VmConfig(tmp_path / "o.qcow2", 8080, 8443))
    assert plain.startswith("user,id=net0,restrict=on,") and plain.count("guestfwd=") == 1
    relayed = netdev(VmConfig(tmp_path / "o.qcow2", 8080, 8443, hypervisor_port=23456))
    # the control plane, libvirtd, and each of libvirt's NBD backup ports
    assert relayed.count("guestfwd=") == 2 + len(NBD_PORTS) and "restrict=on" in relayed
    host, port = GUEST_HYPERVISOR
    assert f"guestfwd=tcp:{host}:{port}-cmd:" in relayed
    assert " relay 127.0.0.1 23456," in relayed
    for nbd in (NBD_PORTS[0], NBD_PORTS[-1]):
        assert f"guestfwd=tcp:{host}:{nbd}-cmd:" in relayed
        assert f" relay 127.0.0.1 {nbd}" in relayed
    # the same range the gateway's libvirt backups listen on
    from appliance.hypervisors import libvirtbackup
    assert libvirtbackup.NBD_PORTS == NBD_PORTS
