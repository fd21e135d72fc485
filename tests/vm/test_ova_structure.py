"""The OVA as vSphere reads it: tar order, manifest, descriptor fields and sizes."""

from __future__ import annotations

import hashlib
import re
import struct
import tarfile
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from vmharness import REPO, vm_timeout  # type: ignore[import-not-found]

# Reading and hashing the 210 MiB OVA takes seconds; the build, when needed, comes on top.
pytestmark = [pytest.mark.vm, vm_timeout(120)]

OVF = "{http://schemas.dmtf.org/ovf/envelope/1}"
RASD = "{http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData}"
VSSD = "{http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData}"
VMW = "{http://www.vmware.com/schema/ovf}"


@pytest.fixture(scope="module")
def ova(appliance_ova: Path) -> dict[str, object]:
    with tarfile.open(appliance_ova) as tar:
        members = tar.getmembers()
        ovf_member, mf_member, disk_member = members
        ovf = tar.extractfile(ovf_member).read()  # type: ignore[union-attr]
        mf = tar.extractfile(mf_member).read().decode()  # type: ignore[union-attr]
        digest = hashlib.sha256()
        disk = tar.extractfile(disk_member)
        assert disk is not None
        header = disk.read(512)
        digest.update(header)
        while chunk := disk.read(1 << 20):
            digest.update(chunk)
    return {"members": members, "ovf": ovf, "mf": mf, "disk_sha256": digest.hexdigest(),
            "disk_header": header, "size_mib": appliance_ova.stat().st_size / 2**20}


def test_tar_holds_ovf_then_manifest_then_disk(ova: dict, figure) -> None:
    names = [m.name for m in ova["members"]]
    assert len(names) == 3
    assert names[0].endswith(".ovf") and names[1].endswith(".mf") and names[2].endswith(".vmdk")
    assert all(m.isfile() and "/" not in m.name for m in ova["members"])
    figure(f"OVA size: {ova['size_mib']:.1f} MiB")


def test_manifest_hashes_match(ova: dict) -> None:
    ovf_name, _, disk_name = (m.name for m in ova["members"])
    lines = dict(re.findall(r"^SHA256\((.+)\)= ([0-9a-f]{64})$", ova["mf"], re.M))
    assert lines == {ovf_name: hashlib.sha256(ova["ovf"]).hexdigest(),
                     disk_name: ova["disk_sha256"]}


def test_descriptor_fields_and_sizes(ova: dict) -> None:
    root = ET.fromstring(ova["ovf"])  # well-formed, or this raises
    desc = tomllib.loads((REPO / "ovf" / "appliance.toml").read_text())
    disk_member = ova["members"][2]
    (ref,) = root.iter(f"{OVF}File")
    assert ref.get(f"{OVF}href") == disk_member.name
    assert int(ref.get(f"{OVF}size")) == disk_member.size
    (disk,) = root.iter(f"{OVF}Disk")
    header = ova["disk_header"]
    assert header[:4] == b"KDMV"
    assert int(disk.get(f"{OVF}capacity")) == struct.unpack_from("<Q", header, 12)[0] * 512
    assert disk.get(f"{OVF}format").endswith("#streamOptimized")

    assert root.find(f".//{VSSD}VirtualSystemType").text == "vmx-14"
    os_section = root.find(f".//{OVF}OperatingSystemSection")
    assert os_section.get(f"{VMW}osType") == "debian11_64Guest"
    hw = root.find(f".//{OVF}VirtualHardwareSection")
    assert hw.get(f"{OVF}transport") == "com.vmware.guestInfo"
    items = {int(i.find(f"{RASD}ResourceType").text): i for i in hw.iter(f"{OVF}Item")}
    assert items[3].find(f"{RASD}VirtualQuantity").text == str(desc["hardware"]["cpus"])
    assert items[4].find(f"{RASD}VirtualQuantity").text == str(desc["hardware"]["memory_mib"])
    # PVSCSI: the cloud kernel's driver (tools/image/packages.txt)
    assert items[6].find(f"{RASD}ResourceSubType").text == "VirtualSCSI"
    assert items[10].find(f"{RASD}ResourceSubType").text == "VmxNet3"
    assert items[17].find(f"{RASD}HostResource").text == "ovf:/disk/vmdisk1"
    assert items[17].find(f"{RASD}Parent").text == items[6].find(f"{RASD}InstanceID").text
    for item in items.values():  # CIM's schema: rasd elements in alphabetical order
        tags = [child.tag for child in item]
        assert tags == sorted(tags)
    keys = {p.get(f"{OVF}key") for p in root.iter(f"{OVF}Property")}
    assert keys == {p["key"] for p in desc["property"]}
    assert {"appliance.hostname", "appliance.ipv4_mode", "appliance.ipv4_address",
            "appliance.ipv4_gateway", "appliance.dns_servers",
            "appliance.control_plane_url"} <= keys
