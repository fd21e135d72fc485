"""The restore metadata keys of a VM recovery point: one table for the control plane (which
refuses a StartRestoreJob naming an unknown key, or missing a required one) and the
gateway's connectors (which use the values). docs/backups.md lists them for users.

AWS documents `RestoreTo`, `vmName` and vSphere inventory paths for a VMware restore; the
libvirt keys are ours. A key that names something on the hypervisor (a folder, a pool) is
checked by the gateway when the job runs: the control plane cannot see the hypervisor.
"""

from __future__ import annotations

import re

RESTORE_TO_VMWARE = "VMware"
RESTORE_TO_LIBVIRT = "libvirt"

COMMON = ("RestoreTo", "hypervisorArn", "vmName", "vmId")
REQUIRED = ("vmName",)
VSPHERE = ("vmFolderPath", "vmResourcePoolPath", "vmDatastorePath")
LIBVIRT = ("storagePool",)

DEFAULT_STORAGE_POOL = "default"
# A VM name a restore may create: printable, no path separators, at most 80 characters
# (libvirt domain names and vSphere names both accept these).
VM_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.()+-]{0,79}")
# vSphere inventory paths ("/DC0/vm/Folder", "/DC0/host/Cluster/Resources") and libvirt
# pool names: printable, bounded.
PATH_RE = re.compile(r"/[^\x00-\x1f\x7f]{1,1023}")
POOL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def accepted(kind: str) -> tuple[str, ...]:
    """Every key a restore to a hypervisor of `kind` ("libvirt" or "vsphere") accepts."""
    return COMMON + (LIBVIRT if kind == "libvirt" else VSPHERE)


def check(kind: str, metadata: dict[str, str]) -> dict[str, str]:
    """`metadata` checked against the table; ValueError names the key and what is accepted."""
    allowed = accepted(kind)
    for key in metadata:
        if key not in allowed:
            raise ValueError(f"Metadata key {key!r} is not accepted for a {kind} restore; "
                             f"accepted: {', '.join(allowed)}")
    for key in REQUIRED:
        if not metadata.get(key):
            raise ValueError(f"Metadata key {key!r} is required (the new VM's name)")
    if not VM_NAME_RE.fullmatch(metadata["vmName"]):
        raise ValueError("Metadata vmName must be 1-80 characters of letters, digits, space "
                         "and _ . ( ) + -, starting with a letter or digit")
    want = RESTORE_TO_LIBVIRT if kind == "libvirt" else RESTORE_TO_VMWARE
    if metadata.get("RestoreTo", want) != want:
        raise ValueError(f"Metadata RestoreTo must be {want!r} for a {kind} hypervisor")
    for key in VSPHERE:
        if key in metadata and not PATH_RE.fullmatch(metadata[key]):
            raise ValueError(f"Metadata {key} must be an inventory path starting with '/'")
    if "storagePool" in metadata and not POOL_RE.fullmatch(metadata["storagePool"]):
        raise ValueError("Metadata storagePool must be a libvirt pool name: 1-64 of "
                         "A-Z a-z 0-9 _ . -, starting with a letter or digit")
    return dict(metadata)
