"""vSphere backups without VDDK: a snapshot freezes the VM's disks, and the frozen flat
disks are read over the datastore's HTTPS file URL (vspheredatastore.py says why that path).

The VM is found by its instanceUuid, a snapshot `bg-<job>` (no memory, not quiesced)
freezes its disks, and the snapshot's own configuration names the frozen files (the running
VM writes to delta disks meanwhile). Extents come from changed-block tracking where the
server offers it (`QueryChangedDiskAreas`: changeId "*" lists the allocated areas of a full
backup, the previous backup's changeId the changes since); where it does not (the method is
missing, as in the govmomi simulator) each disk is read whole as one range, and the vault's
deduplication drops the chunks that did not change. The snapshot is removed by finish() on
every path, and a `bg-*` snapshot left by a gateway that died is removed by the next backup.
The session's vm_config is what vsphererestore.py recreates the VM from.

Every call blocks (the job runner runs them in worker threads); DiskReader.read may be
called from several threads at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gatewaycore.manifest import ALIGN, CHUNK_SIZE

from .model import HYPERVISOR_ERROR, HypervisorError
from .vspheredatastore import DatastoreFile, DatastoreHttp, flat_name, split_ds_path
from .vspheresoap import (
    Vsphere,
    datacenter_of,
    fault_text,
    inventory_path,
    props_of,
    wait_task,
)

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "bg-"


class VsphereDiskReader:
    """One disk frozen by the snapshot, read from its flat file (DiskReader)."""

    def __init__(self, http: DatastoreHttp, file: DatastoreFile, key: str, label: str,
                 capacity: int, ranges: list[tuple[int, int]]) -> None:
        self.key = key
        self.label = label
        self.capacity = capacity
        self.file = file
        self._http = http
        self._ranges = ranges

    def extents(self) -> list[tuple[int, int]]:
        return list(self._ranges)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or length > CHUNK_SIZE or offset + length > self.capacity:
            raise ValueError(f"read of {length} bytes at {offset} is outside disk {self.key} "
                             f"({self.capacity} bytes) or longer than a chunk")
        if length == 0:
            return b""
        return self._http.read(self.file, offset, length)


class VsphereBackupSession:
    """A backup held by snapshot `bg-<job>` until finish() (BackupSession)."""

    def __init__(self, api: Vsphere, vm_name: str, snapshot: Any, snapshot_name: str,
                 http: DatastoreHttp) -> None:
        self.incremental = False
        self.checkpoint: str | None = None
        self.note = ""
        self.vm_config: dict[str, Any] = {}
        self.disks: list[VsphereDiskReader] = []
        self.snapshot_name = snapshot_name
        self._api = api
        self._vm_name = vm_name
        self._snapshot = snapshot
        self._http = http
        self._lock = threading.Lock()
        self._done = False

    def finish(self, ok: bool) -> None:
        """Remove the snapshot (its deltas are consolidated into the disks); idempotent.
        `ok` does not matter here: a changeId stays valid whether or not the recovery point
        was kept, so the base checkpoint is as it was either way."""
        with self._lock:
            if self._done:
                return
            self._http.close()
            _remove_snapshot(self._api, self._snapshot, self.snapshot_name, self._vm_name)
            self._done = True
        log.info("event=vsphere_backup_finished vm=%s snapshot=%s ok=%s", self._vm_name,
                 self.snapshot_name, ok)


def _remove_snapshot(api: Vsphere, snapshot: Any, name: str, vm_name: str) -> None:
    """RemoveSnapshot_Task and its end; a snapshot already gone counts as removed."""
    from pyVmomi import vmodl

    what = f"removing snapshot {name} of VM {vm_name!r}"

    def start() -> Any:
        try:
            return snapshot.RemoveSnapshot_Task(removeChildren=False, consolidate=True)
        except vmodl.fault.ManagedObjectNotFound:
            return None

    task = api.step(what, start)
    if task is None:
        return
    try:
        wait_task(api, task, what)
    except HypervisorError:
        if not _snapshot_gone(api, snapshot):
            raise


def _snapshot_gone(api: Vsphere, snapshot: Any) -> bool:
    """Whether the server no longer knows `snapshot` (removed by someone else meanwhile)."""
    from pyVmomi import vmodl

    pc = vmodl.query.PropertyCollector
    content = api.content()
    spec = pc.FilterSpec(objectSet=[pc.ObjectSpec(obj=snapshot, skip=False)],
                         propSet=[pc.PropertySpec(type=type(snapshot), pathSet=["vm"])])

    def call() -> bool:
        try:
            result = content.propertyCollector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
        except vmodl.fault.ManagedObjectNotFound:
            return True
        return result is None or not result.objects

    return api.step("reading the snapshot", call)


def _snapshots(tree: list[Any] | None) -> Iterator[Any]:
    for node in tree or []:
        yield node
        yield from _snapshots(node.childSnapshotList)


@dataclass
class _Disk:
    key: str
    label: str
    capacity: int
    file_name: str          # the descriptor's datastore path, "[ds] dir/x.vmdk"
    datastore: Any
    change_id: str | None
    controller: str


def controller_classes() -> dict[str, Any]:
    """Disk controller classes by the short name vm_config keeps (and a restore recreates),
    in the order a device is matched against them."""
    from pyVmomi import vim

    return {"pvscsi": vim.vm.device.ParaVirtualSCSIController,
            "lsilogicsas": vim.vm.device.VirtualLsiLogicSASController,
            "lsilogic": vim.vm.device.VirtualLsiLogicController,
            "buslogic": vim.vm.device.VirtualBusLogicController,
            "sata": vim.vm.device.VirtualAHCIController,
            "ide": vim.vm.device.VirtualIDEController}


def _controller_kind(device: Any) -> str:
    for name, cls in controller_classes().items():
        if isinstance(device, cls):
            return name
    return type(device).__name__.rsplit(".", 1)[-1].lower()


def _frozen_disks(api: Vsphere, devices: list[Any], vm_name: str) -> list[_Disk]:
    """The snapshot's disks; each must be a flat disk without a parent, the one kind whose
    bytes are one file on the datastore."""
    from pyVmomi import vim

    by_key = {d.key: d for d in devices}
    disks = []
    for device in devices:
        if not isinstance(device, vim.vm.device.VirtualDisk):
            continue
        label = device.deviceInfo.label if device.deviceInfo else f"disk {device.key}"
        backing = device.backing
        if not isinstance(backing, vim.vm.device.VirtualDisk.FlatVer2BackingInfo):
            raise HypervisorError(HYPERVISOR_ERROR, f"{label} of VM {vm_name!r} has a "
                                  f"{type(backing).__name__.rsplit('.', 1)[-1]} backing; the "
                                  "gateway reads flat (thin or thick) VMDK disks only")
        if backing.parent is not None:
            raise HypervisorError(HYPERVISOR_ERROR, f"{label} of VM {vm_name!r} "
                                  f"({backing.fileName}) is a snapshot delta disk: the VM "
                                  "has snapshots of its own; delete or consolidate them")
        capacity = int(getattr(device, "capacityInBytes", 0) or device.capacityInKB * 1024)
        disks.append(_Disk(str(device.key), label, capacity, backing.fileName,
                           backing.datastore, backing.changeId or None,
                           _controller_kind(by_key.get(device.controllerKey))))
    return disks


@dataclass
class _Refusal:
    why: str            # "unsupported" (no CBT here) or "invalid" (this changeId is not)
    text: str


def _changed_areas(api: Vsphere, vm: Any, snapshot: Any, disk: _Disk,
                   change_id: str) -> list[tuple[int, int]] | _Refusal:
    """The areas QueryChangedDiskAreas lists (change_id "*": every allocated area), rounded
    out to ALIGN and merged; a _Refusal saying why the server would not answer."""
    from pyVmomi import vim, vmodl

    def query() -> list[tuple[int, int]] | _Refusal:
        areas: list[tuple[int, int]] = []
        offset = 0
        try:
            while offset < disk.capacity:
                info = vm.QueryChangedDiskAreas(snapshot=snapshot, deviceKey=int(disk.key),
                                                startOffset=offset, changeId=change_id)
                areas.extend((int(a.start), int(a.length)) for a in info.changedArea or [])
                end = int(info.startOffset) + int(info.length)
                if end <= offset:
                    break
                offset = end
        except (vmodl.fault.MethodNotFound, vmodl.fault.NotImplemented,
                vmodl.fault.NotSupported) as exc:
            return _Refusal("unsupported", f"{type(exc).__name__.rsplit('.', 1)[-1]}")
        except (vim.fault.FileFault, vim.fault.NotFound, vmodl.fault.InvalidArgument) as exc:
            return _Refusal("invalid", fault_text(api, exc))
        return _aligned(areas, disk.capacity)

    return api.step(f"reading the changed areas of {disk.label}", query)


def _aligned(areas: list[tuple[int, int]], capacity: int) -> list[tuple[int, int]]:
    """Areas rounded out to ALIGN (the manifest's chunk edges), clamped, sorted, merged."""
    out: list[tuple[int, int]] = []
    for start, length in sorted(areas):
        if length <= 0:
            continue
        low = start - start % ALIGN
        high = min(capacity, -(-(start + length) // ALIGN) * ALIGN)
        if out and low <= out[-1][0] + out[-1][1]:
            last_start, last_length = out[-1]
            out[-1] = (last_start, max(last_start + last_length, high) - last_start)
        elif high > low:
            out.append((low, high - low))
    return out


def _parse_checkpoint(text: str | None) -> dict[str, str] | None:
    """A checkpoint of ours: {"disk key": "changeId"} as compact JSON; None when unusable."""
    if not text:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in doc.items()):
        return None
    return doc


def begin_backup(api: Vsphere, vm_uuid: str, job_id: str,
                 base_checkpoint: str | None) -> VsphereBackupSession:
    """Freeze the VM `vm_uuid` (an instanceUuid) with snapshot bg-<job_id>; see the module
    docstring. Leftover bg-* snapshots are removed first."""
    content = api.content()
    where = api.endpoint.netloc
    vm = api.step(f"finding VM {vm_uuid}",
                  lambda: content.searchIndex.FindByUuid(None, vm_uuid, True, True))
    if vm is None:
        raise HypervisorError(HYPERVISOR_ERROR, f"no VM with instance UUID {vm_uuid} on "
                              f"{where}")
    props = props_of(api, vm, [
        "name", "config.guestId", "config.hardware.numCPU", "config.hardware.memoryMB",
        "config.firmware", "config.changeTrackingEnabled", "config.template", "parent",
        "resourcePool", "snapshot"], f"reading VM {vm_uuid}")
    vm_name = str(props.get("name", vm_uuid))
    if props.get("config.template"):
        raise HypervisorError(HYPERVISOR_ERROR, f"VM {vm_name!r} ({vm_uuid}) is a template, "
                              "which cannot have snapshots")
    tree = props["snapshot"].rootSnapshotList if props.get("snapshot") else []
    for node in list(_snapshots(tree)):
        if node.name.startswith(SNAPSHOT_PREFIX):
            _remove_snapshot(api, node.snapshot, node.name, vm_name)
            log.info("event=vsphere_leftover_snapshot_removed vm=%s snapshot=%s", vm_name,
                     node.name)

    notes: list[str] = []
    cbt = bool(props.get("config.changeTrackingEnabled"))
    if not cbt:
        cbt = _enable_cbt(api, vm, vm_name, notes)

    name = f"{SNAPSHOT_PREFIX}{job_id}"
    what = f"creating snapshot {name} of VM {vm_name!r}"
    task = api.step(what, lambda: vm.CreateSnapshot_Task(
        name=name, description="backup gateway: removed when the backup ends",
        memory=False, quiesce=False))
    snapshot = wait_task(api, task, what)
    http = DatastoreHttp(api)
    session = VsphereBackupSession(api, vm_name, snapshot, name, http)
    try:
        _fill(api, session, vm, vm_uuid, props, snapshot, cbt, notes,
              _parse_checkpoint(base_checkpoint), base_checkpoint)
    except BaseException:
        with contextlib.suppress(HypervisorError):
            session.finish(False)
        raise
    log.info("event=vsphere_backup_started vm=%s snapshot=%s disks=%s incremental=%s",
             vm_name, name, len(session.disks), session.incremental)
    return session


def _enable_cbt(api: Vsphere, vm: Any, vm_name: str, notes: list[str]) -> bool:
    """Switch changed-block tracking on (it takes effect with the snapshot that follows)."""
    from pyVmomi import vim

    what = f"switching change tracking on for VM {vm_name!r}"
    try:
        task = api.step(what, lambda: vm.ReconfigVM_Task(
            spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))
        wait_task(api, task, what, limit=600.0)
    except HypervisorError as exc:
        notes.append(f"change tracking could not be switched on ({exc.message})")
        return False
    return True


def _fill(api: Vsphere, session: VsphereBackupSession, vm: Any, vm_uuid: str,
          props: dict[str, Any], snapshot: Any, cbt: bool, notes: list[str],
          base: dict[str, str] | None, base_text: str | None) -> None:
    """The session's disks, extents, checkpoint, note and vm_config, from the snapshot."""
    vm_name = session._vm_name
    devices = props_of(api, snapshot, ["config.hardware.device"],
                       f"reading snapshot {session.snapshot_name}").get(
                           "config.hardware.device") or []
    disks = _frozen_disks(api, list(devices), vm_name)
    if base_text and base is None:
        notes.append("the base checkpoint is not one this gateway wrote: full backup")
    ranges, incremental, tracked = _plan(api, vm, snapshot, disks, cbt, base, notes)
    dc_paths: dict[str, str] = {}
    for disk in disks:
        datastore, path = split_ds_path(disk.file_name)
        if datastore not in dc_paths:
            dc_paths[datastore] = datacenter_of(api, disk.datastore)[1]
        file = DatastoreFile(datastore, flat_name(path), dc_paths[datastore])
        session.disks.append(VsphereDiskReader(session._http, file, disk.key, disk.label,
                                               disk.capacity, ranges[disk.key]))
    session.incremental = incremental
    if tracked and not all(d.change_id for d in disks):
        tracked = False
        notes.append("the server reported no change ID for a disk, so the next backup is "
                     "full again")
    session.checkpoint = (json.dumps({d.key: d.change_id for d in disks}, sort_keys=True,
                                     separators=(",", ":")) if tracked else None)
    session.note = "; ".join(notes)
    session.vm_config = _vm_config(api, vm_uuid, vm_name, props, disks)


def _plan(api: Vsphere, vm: Any, snapshot: Any, disks: list[_Disk], cbt: bool,
          base: dict[str, str] | None, notes: list[str],
          ) -> tuple[dict[str, list[tuple[int, int]]], bool, bool]:
    """(extents per disk key, incremental, change tracking works). Incremental from `base`
    where every disk answers for its base changeId; else the allocated areas (changeId
    "*"); else, without change tracking, each disk whole."""
    where = api.endpoint.netloc
    for since in (["base", "*"] if base is not None else ["*"]) if cbt else []:
        ranges: dict[str, list[tuple[int, int]]] = {}
        for disk in disks:
            change_id = (base or {}).get(disk.key, "*") if since == "base" else "*"
            got = _changed_areas(api, vm, snapshot, disk, change_id)
            if isinstance(got, _Refusal) and got.why == "unsupported":
                notes.append(f"{where} does not offer changed-block tracking "
                             f"(QueryChangedDiskAreas: {got.text})")
                return _whole(disks, notes)
            if isinstance(got, _Refusal):
                notes.append(f"the base checkpoint of {disk.label} is no longer valid "
                             f"({got.text}): full backup" if since == "base" else
                             f"change tracking is not active yet ({got.text})")
                break
            ranges[disk.key] = got
        else:
            return ranges, since == "base", True
    return _whole(disks, notes)


def _whole(disks: list[_Disk], notes: list[str],
           ) -> tuple[dict[str, list[tuple[int, int]]], bool, bool]:
    notes.append("every disk is read whole, and the chunks that did not change deduplicate "
                 "in the vault")
    return {d.key: [(0, d.capacity)] if d.capacity else [] for d in disks}, False, False


def _vm_config(api: Vsphere, vm_uuid: str, vm_name: str, props: dict[str, Any],
               disks: list[_Disk]) -> dict[str, Any]:
    """What a restore needs to recreate the VM (JSON)."""
    folder = props.get("parent")
    datastore_ref = disks[0].datastore if disks else None
    return {
        "kind": "vsphere",
        "name": vm_name,
        "uuid": vm_uuid,
        "guestId": props.get("config.guestId") or "otherGuest64",
        "numCPU": int(props.get("config.hardware.numCPU") or 1),
        "memoryMB": int(props.get("config.hardware.memoryMB") or 256),
        "firmware": props.get("config.firmware") or "bios",
        "folderPath": inventory_path(api, folder) if folder is not None else "",
        "resourcePoolPath": (inventory_path(api, props["resourcePool"])
                             if props.get("resourcePool") is not None else ""),
        "datastore": split_ds_path(disks[0].file_name)[0] if disks else "",
        "datastorePath": (inventory_path(api, datastore_ref)
                          if datastore_ref is not None else ""),
        "disks": [{"key": d.key, "label": d.label, "capacity": d.capacity,
                   "datastore": split_ds_path(d.file_name)[0], "fileName": d.file_name,
                   "controller": d.controller} for d in disks],
    }
