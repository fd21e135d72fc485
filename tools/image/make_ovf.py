"""Package a streamOptimized VMDK as an OVA: OVF 1.0 descriptor, SHA256 manifest, the disk.

The descriptor is generated from ovf/appliance.toml (what the appliance declares) and the
real disk (file size, capacity from the VMDK header), never written by hand, so the sizes and
hashes cannot drift from the file they describe. vSphere checks both on import.

usage: python3 tools/image/make_ovf.py --version 0.1.0 --disk disk.vmdk --out x.ova
"""

from __future__ import annotations

import argparse
import hashlib
import io
import struct
import sys
import tarfile
import time
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

OVF = "http://schemas.dmtf.org/ovf/envelope/1"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
VMW = "http://www.vmware.com/schema/ovf"
NAMESPACES = {
    "": OVF,
    "ovf": OVF,
    "rasd": RASD,
    "vssd": VSSD,
    "vmw": VMW,
    "cim": "http://schemas.dmtf.org/wbem/wscim/1/common",
    "xsi": "http://www.w3.org/2001/XMLSchema-instance",
}
STREAM_OPTIMIZED = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
# CIM ResourceType values
CPU, MEMORY, SCSI, NIC, DISK = 3, 4, 6, 10, 17


class OvfError(Exception):
    """The description or the disk cannot be packaged; the message names what is wrong."""


def vmdk_capacity(path: Path) -> int:
    """Capacity in bytes from a sparse VMDK's header (magic 'KDMV', capacity in sectors)."""
    with path.open("rb") as fh:
        header = fh.read(20)
    if len(header) < 20 or header[:4] != b"KDMV":
        raise OvfError(f"{path}: not a sparse/streamOptimized VMDK (no KDMV magic)")
    (sectors,) = struct.unpack_from("<Q", header, 12)
    return sectors * 512


# The VMDK descriptor's ddb.adapterType each OVF SCSI controller takes: VMware's own tools write
# "lsilogic" for a disk on PVSCSI ("VirtualSCSI") or LSI Logic SAS too.
DDB_ADAPTER = {"VirtualSCSI": "lsilogic", "lsilogic": "lsilogic", "lsilogicsas": "lsilogic",
               "buslogic": "buslogic"}


def vmdk_adapter_type(path: Path) -> str | None:
    """The ddb.adapterType of the VMDK's embedded descriptor (vSphere matches the controller)."""
    with path.open("rb") as fh:
        header = fh.read(512)
        desc_offset, desc_size = struct.unpack_from("<QQ", header, 28)
        fh.seek(desc_offset * 512)
        text = fh.read(desc_size * 512).split(b"\0", 1)[0].decode("ascii", "replace")
    for line in text.splitlines():
        name, _, value = line.partition("=")
        if name.strip() == "ddb.adapterType":
            return value.strip().strip('"')
    return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _sub(
    parent: ET.Element, ns: str, tag: str, text: str | None = None, **attrs: str
) -> ET.Element:
    el = ET.SubElement(parent, f"{{{ns}}}{tag}", {_attr(k): v for k, v in attrs.items()})
    if text is not None:
        el.text = text
    return el


def _attr(name: str) -> str:
    prefix, _, local = name.partition("_")
    return f"{{{NAMESPACES[prefix]}}}{local}" if prefix in ("ovf", "vmw") else name


def _item(hw: ET.Element, fields: dict[str, str]) -> None:
    """A hardware Item; CIM's schema is a sequence in alphabetical order, which vSphere enforces."""
    item = _sub(hw, OVF, "Item")
    for name in sorted(fields):
        _sub(item, RASD, name, fields[name])


def build_descriptor(
    desc: dict[str, Any], version: str, disk_name: str, disk_size: int, capacity: int
) -> ET.Element:
    product, hw = desc["product"], desc["hardware"]
    env = ET.Element(f"{{{OVF}}}Envelope")
    refs = _sub(env, OVF, "References")
    _sub(refs, OVF, "File", ovf_href=disk_name, ovf_id="file1", ovf_size=str(disk_size))

    disks = _sub(env, OVF, "DiskSection")
    _sub(disks, OVF, "Info", "Virtual disk information")
    _sub(
        disks,
        OVF,
        "Disk",
        ovf_capacity=str(capacity),
        ovf_capacityAllocationUnits="byte",
        ovf_diskId="vmdisk1",
        ovf_fileRef="file1",
        ovf_format=STREAM_OPTIMIZED,
    )

    nets = _sub(env, OVF, "NetworkSection")
    _sub(nets, OVF, "Info", "The list of logical networks")
    net = _sub(nets, OVF, "Network", ovf_name=hw["network"])
    _sub(net, OVF, "Description", f"The {hw['network']} network")

    vs = _sub(env, OVF, "VirtualSystem", ovf_id=product["id"])
    _sub(vs, OVF, "Info", product["name"])
    _sub(vs, OVF, "Name", product["id"])
    if product.get("annotation"):
        ann = _sub(vs, OVF, "AnnotationSection")
        _sub(ann, OVF, "Info", "A human-readable annotation")
        _sub(ann, OVF, "Annotation", product["annotation"])
    os_sec = _sub(
        vs, OVF, "OperatingSystemSection", ovf_id=str(hw["os_cim_id"]), vmw_osType=hw["os_type"]
    )
    _sub(os_sec, OVF, "Info", "The kind of installed guest operating system")

    # ovf:transport=com.vmware.guestInfo: vSphere hands the vApp properties to VMware Tools.
    vhs = _sub(vs, OVF, "VirtualHardwareSection", ovf_transport="com.vmware.guestInfo")
    _sub(vhs, OVF, "Info", "Virtual hardware requirements")
    system = _sub(vhs, OVF, "System")
    for name, value in (
        ("ElementName", "Virtual Hardware Family"),
        ("InstanceID", "0"),
        ("VirtualSystemIdentifier", product["id"]),
        ("VirtualSystemType", hw["system_type"]),
    ):
        _sub(system, VSSD, name, value)
    cpus, mem = int(hw["cpus"]), int(hw["memory_mib"])
    _item(
        vhs,
        {
            "AllocationUnits": "hertz * 10^6",
            "Description": "Number of Virtual CPUs",
            "ElementName": f"{cpus} virtual CPU(s)",
            "InstanceID": "1",
            "ResourceType": str(CPU),
            "VirtualQuantity": str(cpus),
        },
    )
    _item(
        vhs,
        {
            "AllocationUnits": "byte * 2^20",
            "Description": "Memory Size",
            "ElementName": f"{mem}MB of memory",
            "InstanceID": "2",
            "ResourceType": str(MEMORY),
            "VirtualQuantity": str(mem),
        },
    )
    _item(
        vhs,
        {
            "Address": "0",
            "Description": "SCSI Controller",
            "ElementName": "SCSI controller 0",
            "InstanceID": "3",
            "ResourceSubType": hw["scsi_controller"],
            "ResourceType": str(SCSI),
        },
    )
    _item(
        vhs,
        {
            "AddressOnParent": "0",
            "ElementName": "Hard disk 1",
            "HostResource": "ovf:/disk/vmdisk1",
            "InstanceID": "4",
            "Parent": "3",
            "ResourceType": str(DISK),
        },
    )
    _item(
        vhs,
        {
            "AddressOnParent": "7",
            "AutomaticAllocation": "true",
            "Connection": hw["network"],
            "Description": f'{hw["nic"]} ethernet adapter on "{hw["network"]}"',
            "ElementName": "Network adapter 1",
            "InstanceID": "5",
            "ResourceSubType": hw["nic"],
            "ResourceType": str(NIC),
        },
    )
    config = {"firmware": hw.get("firmware", "bios"), **hw.get("vmware_config", {})}
    for key, value in config.items():
        _sub(vhs, VMW, "Config", ovf_required="false", vmw_key=key, vmw_value=str(value))

    ps = _sub(vs, OVF, "ProductSection", ovf_required="false")
    _sub(ps, OVF, "Info", "Information about the installed software")
    _sub(ps, OVF, "Product", product["name"])
    _sub(ps, OVF, "Vendor", product["vendor"])
    _sub(ps, OVF, "Version", version)
    _sub(ps, OVF, "FullVersion", version)
    category = None
    for prop in desc.get("property", []):
        for field in ("key", "label", "description", "value"):
            if field not in prop:
                raise OvfError(f"property {prop.get('key', '?')}: missing field {field!r}")
        if prop.get("category") and prop["category"] != category:
            category = prop["category"]
            _sub(ps, OVF, "Category", category)
        attrs = {
            "ovf_key": prop["key"],
            "ovf_type": "string",
            "ovf_userConfigurable": "true",
            "ovf_value": prop["value"],
        }
        if prop.get("choices"):
            attrs["ovf_qualifiers"] = (
                "ValueMap{" + ",".join(f'"{c}"' for c in prop["choices"]) + "}"
            )
        el = _sub(ps, OVF, "Property", **attrs)
        _sub(el, OVF, "Label", prop["label"])
        _sub(el, OVF, "Description", prop["description"])
    return env


def make_ova(description: Path, version: str, disk: Path, out: Path) -> Path:
    desc = tomllib.loads(description.read_text(encoding="utf-8"))
    adapter = vmdk_adapter_type(disk)
    controller = desc["hardware"]["scsi_controller"]
    if controller not in DDB_ADAPTER:
        raise OvfError(f"scsi_controller={controller!r}: accepted values are "
                       + ", ".join(repr(c) for c in DDB_ADAPTER))
    if adapter != DDB_ADAPTER[controller]:
        raise OvfError(
            f"the VMDK's adapter type {adapter!r} does not match scsi_controller={controller!r} "
            f"(which takes {DDB_ADAPTER[controller]!r})"
        )
    base = out.name.removesuffix(".ova")
    disk_name = f"{base}-disk1.vmdk"
    env = build_descriptor(desc, version, disk_name, disk.stat().st_size, vmdk_capacity(disk))
    for prefix, uri in NAMESPACES.items():
        ET.register_namespace(prefix, uri)
    ET.indent(env)
    ovf_bytes = ET.tostring(env, encoding="UTF-8", xml_declaration=True) + b"\n"
    ovf_name, mf_name = f"{base}.ovf", f"{base}.mf"
    manifest = (
        f"SHA256({ovf_name})= {hashlib.sha256(ovf_bytes).hexdigest()}\n"
        f"SHA256({disk_name})= {sha256_file(disk)}\n"
    ).encode()

    tmp = out.with_name(out.name + ".partial")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in ((ovf_name, ovf_bytes), (mf_name, manifest)):
            _add_bytes(tar, name, data)
        info = tar.gettarinfo(str(disk), arcname=disk_name)
        _normalise(info)
        with disk.open("rb") as fh:
            tar.addfile(info, fh)
    tmp.replace(out)
    return out


def _normalise(info: tarfile.TarInfo) -> None:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = 0o644


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    _normalise(info)
    tar.addfile(info, io.BytesIO(data))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--description",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "ovf" / "appliance.toml",
    )
    parser.add_argument("--version", required=True)
    parser.add_argument("--disk", type=Path, required=True, help="streamOptimized VMDK")
    parser.add_argument("--out", type=Path, required=True, help="the .ova to write")
    args = parser.parse_args(argv)
    try:
        make_ova(args.description, args.version, args.disk, args.out)
    except KeyError as exc:
        print(f"make_ovf: {args.description}: missing setting {exc}", file=sys.stderr)
        return 1
    except (OvfError, OSError, tomllib.TOMLDecodeError) as exc:
        print(f"make_ovf: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: {args.out.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
