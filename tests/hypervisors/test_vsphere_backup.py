"""vSphere backups and restores (appliance/hypervisors/vspherebackup.py) against the govmomi
simulator, over real HTTPS with the certificate verified.

The simulator's VM disks are empty placeholder files, so the module makes a source VM the
way an administrator would: it PUTs a real flat disk (9 MiB of patterned data with holes)
and its descriptor to the datastore, then CreateVM points the VM's disk at them.

What the simulator shows here: finding a VM by instanceUuid, snapshots made and removed
(seen in the inventory), CBT switched on by ReconfigVM, the snapshot's own disk list,
datastore files read with Range requests and written with streamed PUTs byte for byte,
MakeDirectory, CreateVM, Destroy and DeleteDatastoreFile.

What it cannot show, and a real vCenter adds:
- QueryChangedDiskAreas does not exist there (MethodNotFound), nor NBD/VDDK on port 902, so
  incremental backups from change tracking, and full backups that read only the allocated
  areas (changeId "*"), cannot be shown; here the gateway must detect the fault and read
  each disk whole, which these tests check.
- A snapshot is a copy of the configuration with no delta disks, so "the guest writes while
  the backup reads the frozen base disk" cannot be shown; nor consolidation on removal.
- /folder URLs are not checked against the session cookie (a real vCenter answers 401
  without it), and sessions never expire.
- No guest runs: a restored VM is never booted, so the descriptor written for its disks is
  checked by the files it points at, not by ESXi opening them.
- CreateVM does not refuse a duplicate name in a folder: the gateway's own check does.
"""

from __future__ import annotations

import hashlib
import http.client
import ssl
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
import vcsim

from appliance.hypervisors import HypervisorError, Target, connector_for
from appliance.hypervisors.vsphere import VsphereConnector
from appliance.hypervisors.vspherebackup import VsphereDiskReader
from appliance.hypervisors.vspheredatastore import DatastoreFile
from gatewaycore.manifest import CHUNK_SIZE

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
DATASTORE = "LocalDS_0"
DC_PATH = "F0/DC0"
DATASTORE_PATH = f"/F0/DC0/datastore/F0/{DATASTORE}"
FOLDER = "/F0/DC0/vm/F0"
SOURCE = "bgsrc"


def _disk_bytes() -> bytes:
    """9 MiB: patterned data, a 3 MiB hole across a 4 MiB chunk edge, data, a hole, a last
    64 KiB of data (the last chunk is not a whole 4 MiB)."""
    data = bytearray(9 * MIB)
    for start, length in ((0, MIB + 4096), (4 * MIB + 65536, 2 * MIB), (9 * MIB - 65536,
                                                                         65536)):
        seed = hashlib.sha256(str(start).encode()).digest()
        block = (seed * (length // len(seed) + 1))[:length]
        data[start:start + length] = block
    return bytes(data)


DISK = _disk_bytes()


def _https(server: vcsim.Vcsim) -> http.client.HTTPSConnection:
    context = ssl.create_default_context(cafile=str(server.ca_file))
    return http.client.HTTPSConnection("127.0.0.1", server.port, timeout=20, context=context)


def _url(path: str) -> str:
    return f"/folder/{quote(path)}?dcPath={quote(DC_PATH)}&dsName={DATASTORE}"


def _put(server: vcsim.Vcsim, path: str, data: bytes) -> None:
    conn = _https(server)
    try:
        conn.request("PUT", _url(path), body=data)
        assert conn.getresponse().status in (200, 201)
    finally:
        conn.close()


def _get(server: vcsim.Vcsim, path: str) -> tuple[int, bytes]:
    conn = _https(server)
    try:
        conn.request("GET", _url(path))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@dataclass
class Admin:
    """An administrator's pyvmomi session, to set up and to look at what the gateway did."""

    si: Any

    def find(self, path: str) -> Any:
        return self.si.content.searchIndex.FindByInventoryPath(path)

    def prop(self, obj: Any, path: str) -> Any:
        """One property by RetrievePropertiesEx (None when unset, without crashing vcsim)."""
        from pyVmomi import vmodl

        pc = vmodl.query.PropertyCollector
        spec = pc.FilterSpec(objectSet=[pc.ObjectSpec(obj=obj)],
                             propSet=[pc.PropertySpec(type=type(obj), pathSet=[path])])
        result = self.si.content.propertyCollector.RetrievePropertiesEx(
            [spec], pc.RetrieveOptions())
        props = {p.name: p.val for p in result.objects[0].propSet} if result else {}
        return props.get(path)

    def snapshots(self, vm: Any) -> list[str]:
        info = self.prop(vm, "snapshot")
        out: list[str] = []
        stack = list(info.rootSnapshotList) if info else []
        while stack:
            node = stack.pop()
            out.append(node.name)
            stack.extend(node.childSnapshotList or [])
        return sorted(out)

    def wait(self, task: Any) -> Any:
        from pyVim.task import WaitForTask

        WaitForTask(task, si=self.si)
        return task.info.result


@pytest.fixture(scope="module")
def admin(vcsim_server: vcsim.Vcsim) -> Iterator[Admin]:
    from pyVim.connect import Disconnect, SmartConnect

    context = ssl.create_default_context(cafile=str(vcsim_server.ca_file))
    si = SmartConnect(host="127.0.0.1", port=vcsim_server.port, user=vcsim.USERNAME,
                      pwd=vcsim.PASSWORD, sslContext=context)
    try:
        yield Admin(si)
    finally:
        Disconnect(si)


@pytest.fixture(scope="module")
def source(vcsim_server: vcsim.Vcsim, admin: Admin) -> Iterator[Any]:
    """VM `bgsrc` on host DC0_H0 whose one disk is a real 9 MiB flat file."""
    from pyVmomi import vim

    descriptor = (f'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                  f'createType="vmfs"\nRW {len(DISK) // 512} VMFS "{SOURCE}-flat.vmdk"\n')
    _put(vcsim_server, f"{SOURCE}/{SOURCE}-flat.vmdk", DISK)
    _put(vcsim_server, f"{SOURCE}/{SOURCE}.vmdk", descriptor.encode())
    neighbour = admin.find(f"{FOLDER.lstrip('/')}/DC0_H0_VM0")
    spec = vim.vm.ConfigSpec(
        name=SOURCE, guestId="otherGuest64", numCPUs=2, memoryMB=512,
        files=vim.vm.FileInfo(vmPathName=f"[{DATASTORE}] {SOURCE}/{SOURCE}.vmx"),
        deviceChange=[
            vim.vm.device.VirtualDeviceSpec(operation="add", device=(
                vim.vm.device.ParaVirtualSCSIController(key=-100, busNumber=0,
                                                        sharedBus="noSharing"))),
            vim.vm.device.VirtualDeviceSpec(operation="add", device=vim.vm.device.VirtualDisk(
                key=-1, controllerKey=-100, unitNumber=0, capacityInKB=len(DISK) // 1024,
                backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                    fileName=f"[{DATASTORE}] {SOURCE}/{SOURCE}.vmdk",
                    diskMode="persistent")))])
    folder = admin.prop(neighbour, "parent")
    pool = admin.prop(neighbour, "resourcePool")
    vm = admin.wait(folder.CreateVM_Task(config=spec, pool=pool))
    yield vm
    # the simulator is shared by the session: other modules count its VMs
    admin.wait(vm.Destroy_Task())


@pytest.fixture()
def connector(vcsim_server: vcsim.Vcsim) -> Iterator[VsphereConnector]:
    made = connector_for(Target(f"127.0.0.1:{vcsim_server.port}", vcsim.USERNAME,
                                vcsim.PASSWORD), 10.0, ca_file=str(vcsim_server.ca_file))
    assert isinstance(made, VsphereConnector)
    try:
        yield made
    finally:
        made.close()


def _uuid(admin: Admin, vm: Any) -> str:
    return str(admin.prop(vm, "config.instanceUuid"))


def _read_all(reader: Any, threads: int = 4, piece: int = CHUNK_SIZE) -> bytes:
    """The disk as the job runner reads it: piece by piece, several threads at once, each
    extent read (the rest is zeros)."""
    image = bytearray(reader.capacity)
    pieces = [(offset, min(piece, start + length - offset))
              for start, length in reader.extents()
              for offset in range(start, start + length, piece)]
    with ThreadPoolExecutor(threads) as pool:
        for (offset, _length), data in zip(pieces, pool.map(lambda p: reader.read(*p), pieces),
                                           strict=True):
            image[offset:offset + len(data)] = data
    return bytes(image)


def test_backup_reads_the_frozen_disk_and_removes_its_snapshot(
        connector: VsphereConnector, admin: Admin, source: Any) -> None:
    session = connector.begin_backup(_uuid(admin, source), "job-1", None)
    try:
        assert admin.snapshots(source) == ["bg-job-1"]
        # vcsim has no QueryChangedDiskAreas: the fault is detected, each disk read whole
        assert not session.incremental and session.checkpoint is None
        assert "does not offer changed-block tracking" in session.note
        assert "MethodNotFound" in session.note
        assert admin.prop(source, "config.changeTrackingEnabled") is True
        [disk] = session.disks
        assert (disk.capacity, disk.extents()) == (len(DISK), [(0, len(DISK))])
        threads_seen: set[int] = set()
        both_in_flight = threading.Barrier(2, timeout=10)
        original = disk.read

        def read(offset: int, length: int) -> bytes:
            threads_seen.add(threading.get_ident())
            if offset < 2 * MIB:
                both_in_flight.wait()  # the first two reads are made at the same time
            return original(offset, length)

        disk.read = read  # type: ignore[method-assign]
        assert _read_all(disk, piece=MIB) == DISK
        del disk.read
        # one kept-alive HTTPS connection per reading thread, not one per read
        assert 1 < len(session._http._open) == len(threads_seen) <= 4
        config = session.vm_config
        assert config["kind"] == "vsphere" and config["name"] == SOURCE
        assert (config["numCPU"], config["memoryMB"], config["guestId"]) == (2, 512,
                                                                              "otherGuest64")
        assert config["folderPath"] == FOLDER
        assert config["resourcePoolPath"].endswith("/DC0_H0/Resources")
        assert config["datastorePath"] == DATASTORE_PATH
        assert config["disks"] == [{"key": disk.key, "label": disk.label,
                                    "capacity": len(DISK), "datastore": DATASTORE,
                                    "fileName": f"[{DATASTORE}] {SOURCE}/{SOURCE}.vmdk",
                                    "controller": "pvscsi"}]
    finally:
        session.finish(True)
    assert admin.snapshots(source) == []
    session.finish(True)  # idempotent
    with pytest.raises(HypervisorError):
        disk.read(0, 4096)  # the session's connections are closed


def test_a_failed_backup_still_removes_its_snapshot(
        connector: VsphereConnector, admin: Admin, source: Any) -> None:
    session = connector.begin_backup(_uuid(admin, source), "job-2", None)
    assert admin.snapshots(source) == ["bg-job-2"]
    missing = DatastoreFile(DATASTORE, f"{SOURCE}/gone-flat.vmdk", DC_PATH)
    reader = VsphereDiskReader(session._http, missing, "2000", "gone", MIB, [(0, MIB)])
    with pytest.raises(HypervisorError) as info:
        reader.read(0, 4096)
    assert info.value.code == "HypervisorError"
    assert f"GET [{DATASTORE}] {SOURCE}/gone-flat.vmdk" in info.value.message
    assert "404" in info.value.message and vcsim.PASSWORD not in str(info.value)
    with pytest.raises(ValueError):
        session.disks[0].read(len(DISK) - 10, 4096)  # past the disk's end
    session.finish(False)
    assert admin.snapshots(source) == []


def test_a_dead_gateways_snapshot_is_removed_by_the_next_backup(
        connector: VsphereConnector, admin: Admin, source: Any) -> None:
    admin.wait(source.CreateSnapshot_Task(name="bg-dead-job", memory=False, quiesce=False))
    admin.wait(source.CreateSnapshot_Task(name="before-upgrade", memory=False,
                                          quiesce=False))
    assert admin.snapshots(source) == ["before-upgrade", "bg-dead-job"]
    session = connector.begin_backup(_uuid(admin, source), "job-3", None)
    try:
        assert admin.snapshots(source) == ["before-upgrade", "bg-job-3"]
    finally:
        session.finish(True)
    assert admin.snapshots(source) == ["before-upgrade"]  # the user's own is kept
    admin.wait(source.RemoveAllSnapshots_Task())


def test_finish_accepts_a_snapshot_someone_else_removed(
        connector: VsphereConnector, admin: Admin, source: Any) -> None:
    session = connector.begin_backup(_uuid(admin, source), "job-10", None)
    admin.wait(source.RemoveAllSnapshots_Task())  # an administrator tidies up meanwhile
    session.finish(False)
    assert admin.snapshots(source) == []


def test_a_disk_it_cannot_read_fails_the_begin_and_removes_the_snapshot(
        connector: VsphereConnector, admin: Admin, source: Any) -> None:
    """A delta disk (what the VM's own snapshots leave) is not one flat file: begin_backup
    says which disk and why, after removing the snapshot it had made. (vcsim makes no delta
    disks itself, so the VM is created with a disk whose backing names a parent.)"""
    from pyVmomi import vim

    folder = admin.prop(source, "parent")
    parent = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
        fileName=f"[{DATASTORE}] {SOURCE}/{SOURCE}.vmdk", diskMode="persistent")
    spec = vim.vm.ConfigSpec(
        name="bgdelta", guestId="otherGuest64",
        files=vim.vm.FileInfo(vmPathName=f"[{DATASTORE}] bgdelta/bgdelta.vmx"),
        deviceChange=[
            vim.vm.device.VirtualDeviceSpec(operation="add", device=(
                vim.vm.device.ParaVirtualSCSIController(key=-100, busNumber=0,
                                                        sharedBus="noSharing"))),
            vim.vm.device.VirtualDeviceSpec(
                operation="add", fileOperation="create", device=vim.vm.device.VirtualDisk(
                    key=-1, controllerKey=-100, unitNumber=0, capacityInKB=1024,
                    backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                        fileName=f"[{DATASTORE}] bgdelta/bgdelta-000001.vmdk",
                        diskMode="persistent", parent=parent)))])
    vm = admin.wait(folder.CreateVM_Task(config=spec, pool=admin.prop(source,
                                                                       "resourcePool")))
    try:
        with pytest.raises(HypervisorError) as info:
            connector.begin_backup(_uuid(admin, vm), "job-9", None)
        assert info.value.message.endswith(
            f"of VM 'bgdelta' ([{DATASTORE}] bgdelta/bgdelta-000001.vmdk) is a snapshot delta "
            "disk: the VM has snapshots of its own; delete or consolidate them")
        assert admin.snapshots(vm) == []
    finally:
        admin.wait(vm.Destroy_Task())


def test_an_unknown_vm_is_named_in_the_error(connector: VsphereConnector,
                                             vcsim_server: vcsim.Vcsim) -> None:
    uuid = "5029a1f0-0000-4000-8000-00000000beef"
    with pytest.raises(HypervisorError) as info:
        connector.begin_backup(uuid, "job-4", None)
    assert info.value.code == "HypervisorError"
    assert info.value.message == (f"no VM with instance UUID {uuid} on "
                                  f"127.0.0.1:{vcsim_server.port}")


def _backup_config(connector: VsphereConnector, admin: Admin, source: Any,
                   job: str) -> tuple[dict[str, Any], list[tuple[str, str, int]], bytes]:
    session = connector.begin_backup(_uuid(admin, source), job, None)
    try:
        disks = [(d.key, d.label, d.capacity) for d in session.disks]
        return session.vm_config, disks, _read_all(session.disks[0])
    finally:
        session.finish(True)


def test_restore_creates_the_vm_with_a_byte_identical_disk(
        connector: VsphereConnector, admin: Admin, source: Any,
        vcsim_server: vcsim.Vcsim) -> None:
    config, disks, image = _backup_config(connector, admin, source, "job-5")
    assert connector.restore_options() == ("vmFolderPath", "vmResourcePoolPath",
                                           "vmDatastorePath")
    restore = connector.begin_restore(config, "bgrestored", {}, disks)
    try:
        [writer] = restore.disks
        assert (writer.key, writer.capacity) == (disks[0][0], len(DISK))
        # as the job runner writes: the chunks that hold data, in order, holes left out;
        # one chunk in two pieces
        for offset in range(0, len(image), CHUNK_SIZE):
            chunk = image[offset:offset + CHUNK_SIZE]
            if chunk.count(0) == len(chunk):
                continue
            half = len(chunk) // 2
            writer.write(offset, chunk[:half])
            writer.write(offset + half, chunk[half:])
        found = restore.commit()
        assert found.name == "bgrestored" and found.path == f"{FOLDER}/bgrestored"
        assert found.host_name.startswith("DC0_H0") and found.uuid != config["uuid"]
        vm = admin.si.content.searchIndex.FindByUuid(None, found.uuid, True, True)
        assert vm is not None
        assert (admin.prop(vm, "config.hardware.numCPU"),
                admin.prop(vm, "config.hardware.memoryMB")) == (2, 512)
        devices = admin.prop(vm, "config.hardware.device")
        [disk] = [d for d in devices if type(d).__name__.endswith("VirtualDisk")]
        assert disk.backing.fileName == f"[{DATASTORE}] bgrestored/bgrestored.vmdk"
        assert disk.capacityInKB * 1024 == len(DISK)
        assert any(type(d).__name__.endswith("ParaVirtualSCSIController") for d in devices)
        status, flat = _get(vcsim_server, "bgrestored/bgrestored-flat.vmdk")
        assert status == 200 and flat == DISK
        status, descriptor = _get(vcsim_server, "bgrestored/bgrestored.vmdk")
        assert status == 200
        assert f'RW {len(DISK) // 512} VMFS "bgrestored-flat.vmdk"'.encode() in descriptor
    finally:
        restore.abort()  # after commit too: the restore's VM and files go
    assert admin.si.content.searchIndex.FindByUuid(None, found.uuid, True, True) is None
    assert _get(vcsim_server, "bgrestored/bgrestored-flat.vmdk")[0] == 404


def test_restore_refuses_a_name_that_exists(connector: VsphereConnector, admin: Admin,
                                            source: Any) -> None:
    config, disks, _ = _backup_config(connector, admin, source, "job-6")
    with pytest.raises(HypervisorError) as info:
        connector.begin_restore(config, SOURCE, {}, disks)
    assert info.value.message == (f"vmName '{SOURCE}': a VM of that name exists in "
                                  f"{FOLDER} already")


@pytest.mark.parametrize(("key", "value", "says"), [
    ("vmFolderPath", "/F0/DC0/vm/NoSuchFolder", "does not exist"),
    ("vmFolderPath", "/F0/DC0/host", "not a VM folder"),
    ("vmResourcePoolPath", "/F0/DC0/host/F0/DC0_H0/NoPool", "does not exist"),
    ("vmDatastorePath", "/F0/DC0/datastore/F0/NoSuchDS", "does not exist"),
    ("vmDatastorePath", FOLDER, "not a datastore"),
])
def test_restore_refuses_a_wrong_path_naming_the_key(
        connector: VsphereConnector, admin: Admin, source: Any, vcsim_server: vcsim.Vcsim,
        key: str, value: str, says: str) -> None:
    config, disks, _ = _backup_config(connector, admin, source, f"job-7-{key}")
    with pytest.raises(HypervisorError) as info:
        connector.begin_restore(config, "bgwrongpath", {key: value}, disks)
    assert f"{key} {value!r}" in info.value.message and says in info.value.message
    assert _get(vcsim_server, "bgwrongpath/")[0] == 404  # nothing was made


def test_abort_removes_the_half_made_restore(connector: VsphereConnector, admin: Admin,
                                             source: Any, vcsim_server: vcsim.Vcsim) -> None:
    config, disks, image = _backup_config(connector, admin, source, "job-8")
    restore = connector.begin_restore(config, "bgaborted", {
        "vmFolderPath": FOLDER, "vmDatastorePath": DATASTORE_PATH}, disks)
    restore.disks[0].write(0, image[:MIB])
    assert _get(vcsim_server, "bgaborted/")[0] in (200, 301)  # the directory exists
    restore.abort()
    restore.abort()  # idempotent
    assert _get(vcsim_server, "bgaborted/bgaborted-flat.vmdk")[0] == 404
    assert _get(vcsim_server, "bgaborted/")[0] == 404
    assert admin.find(f"{FOLDER.lstrip('/')}/bgaborted") is None
    with pytest.raises(ValueError):
        restore.disks[0].write(2 * MIB, b"late")


def test_changed_areas_are_rounded_out_to_chunk_alignment() -> None:
    """What QueryChangedDiskAreas would return (vcsim cannot) becomes ALIGN-edged, merged,
    clamped extents, so chunk edges stay on the manifest's grid."""
    from appliance.hypervisors.vspherebackup import _aligned

    k = 65536
    assert _aligned([(k + 512, 512), (5 * k - 1, 2), (10 * k, 0), (20 * k, 5 * k)],
                    22 * k + 100) == [(k, k), (4 * k, 2 * k), (20 * k, 2 * k + 100)]
    assert _aligned([(3 * k - 1, 2), (k + 512, 512)], 10 * k) == [(k, 3 * k)]  # touching
    assert _aligned([], 10 * k) == []


@pytest.mark.parametrize(("text", "parsed"), [
    ('{"2000":"52 1a/7"}', {"2000": "52 1a/7"}), (None, None), ("", None),
    ("not json", None), ('["52 1a/7"]', None), ('{"2000": 7}', None)])
def test_only_a_checkpoint_of_ours_is_used_as_a_base(text: str | None,
                                                     parsed: dict[str, str] | None) -> None:
    from appliance.hypervisors.vspherebackup import _parse_checkpoint

    assert _parse_checkpoint(text) == parsed
