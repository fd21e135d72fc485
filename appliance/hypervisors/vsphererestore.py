"""vSphere restores without VDDK: new flat disks PUT over the datastore's HTTPS file URL
(vspheredatastore.py says why that path), then the VM created around them.

The target folder, resource pool and datastore are inventory paths (restore metadata,
defaulting to the source's, which vspherebackup.py keeps in vm_config); a directory named
after the new VM is made on the datastore, each disk is streamed into a new `-flat.vmdk`
there with one HTTPS PUT (holes sent as zeros, in order, never a whole disk in memory)
beside a small descriptor, and commit() creates the VM with CreateVM_Task pointing at those
files. abort() removes the VM and the directory.

Every call blocks (the job runner runs them in worker threads).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import secrets
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from gatewaycore import restorekeys

from .model import HYPERVISOR_ERROR, DiscoveredVm, HypervisorError
from .vspherebackup import controller_classes
from .vspheredatastore import (
    DatastoreFile,
    DatastoreHttp,
    delete_directory,
    descriptor_name,
    ds_path,
    flat_name,
)
from .vspheresoap import (
    Vsphere,
    datacenter_of,
    inventory_path,
    props_of,
    wait_task,
)

log = logging.getLogger(__name__)

ZEROS = bytes(1024 * 1024)      # what a hole of a restored disk is sent as
UPLOAD_QUEUE = 4                # writes buffered per disk between the writer and its PUT
# vSphere SCSI controllers by the short name vm_config keeps; a restore recreates the
# source's kind (a guest boots only with a driver for it)
SCSI_KINDS = ("pvscsi", "lsilogic", "lsilogicsas", "buslogic")


class _Aborted(Exception):
    pass


_END = None
_ABORT = object()


class VsphereDiskWriter:
    """One restored disk streamed into a new flat file by one HTTPS PUT (DiskWriter).

    write() hands its bytes (and a count of zeros for a hole before them) to a small queue
    that the PUT's body generator drains in a thread of its own, so the disk never sits in
    memory and the upload runs while the job fetches chunks. A failed upload drains the
    queue so the writer never blocks, and the next write raises its error."""

    def __init__(self, http: DatastoreHttp, file: DatastoreFile, key: str,
                 capacity: int) -> None:
        self.key = key
        self.capacity = capacity
        self.file = file
        self.size = -(-capacity // 1024) * 1024     # a whole number of KiB (capacityInKB)
        self._http = http
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=UPLOAD_QUEUE)
        self._position = 0
        self._thread: threading.Thread | None = None
        self._failure: HypervisorError | None = None
        self._ended = False     # the body generator saw the end (or the abort)
        self._closed = False

    def write(self, offset: int, data: bytes) -> None:
        if self._closed:
            raise ValueError(f"disk {self.key}: the restore has ended")
        if offset < self._position:
            raise ValueError(f"disk {self.key}: write at {offset} after {self._position} "
                             "(writes must come in increasing offsets)")
        if offset + len(data) > self.capacity:
            raise ValueError(f"disk {self.key}: write past its capacity {self.capacity}")
        self._start()
        if offset > self._position:
            self._put(offset - self._position)
        if data:
            self._put(bytes(data))
        self._position = offset + len(data)

    def close(self) -> None:
        """The rest of the disk as zeros, then wait for the server's answer to the PUT."""
        if self._closed:
            if self._failure is not None:
                raise self._failure
            return
        self._start()
        if self.size > self._position:
            self._put(self.size - self._position)
        self._closed = True
        self._put(_END)
        assert self._thread is not None
        self._thread.join()
        if self._failure is not None:
            raise self._failure

    def cancel(self) -> None:
        """End the upload without completing it (abort); the file is deleted by the caller."""
        if self._thread is None or (self._closed and not self._thread.is_alive()):
            self._closed = True
            return
        self._closed = True
        with contextlib.suppress(HypervisorError):
            self._put(_ABORT)
        self._thread.join()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"vsphere-put-{self.key}",
                                             daemon=True)
            self._thread.start()

    def _put(self, item: Any) -> None:
        if self._failure is not None and item is not _END and item is not _ABORT:
            raise self._failure
        self._queue.put(item)   # never blocks for good: a failed upload drains the queue

    def _body(self) -> Iterator[bytes]:
        view = memoryview(ZEROS)
        while True:
            item = self._queue.get()
            if item is _END or item is _ABORT:
                self._ended = True
                if item is _ABORT:
                    raise _Aborted
                return
            if isinstance(item, int):
                while item > 0:
                    n = min(item, len(ZEROS))
                    yield view[:n]  # type: ignore[misc]
                    item -= n
            else:
                yield item

    def _run(self) -> None:
        try:
            self._http.put(self.file, self.size, self._body())
        except _Aborted:
            self._failure = HypervisorError(HYPERVISOR_ERROR, f"the upload of {self.file} "
                                            "was aborted")
        except HypervisorError as exc:
            self._failure = exc
        except Exception as exc:  # an unexpected library error must not hang the writer
            self._failure = HypervisorError(HYPERVISOR_ERROR, f"PUT {self.file}: "
                                            f"{type(exc).__name__}")
        finally:
            while not self._ended:
                item = self._queue.get()
                self._ended = item is _END or item is _ABORT


def _descriptor(flat_name: str, capacity_bytes: int, adapter: str) -> bytes:
    """A monolithic flat VMDK descriptor (createType "vmfs") for `flat_name`."""
    sectors = capacity_bytes // 512
    cylinders = max(1, min(65535, sectors // (255 * 63)))
    cid = secrets.token_hex(4)
    ddb_adapter = {"pvscsi": "lsilogic", "lsilogicsas": "lsilogic"}.get(adapter, adapter)
    return (
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\n"
        f"CID={cid}\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n"
        "# Extent description\n"
        f"RW {sectors} VMFS \"{flat_name}\"\n\n"
        "# The Disk Data Base\n#DDB\n\n"
        f"ddb.adapterType = \"{ddb_adapter}\"\n"
        f"ddb.geometry.cylinders = \"{cylinders}\"\n"
        "ddb.geometry.heads = \"255\"\nddb.geometry.sectors = \"63\"\n"
        "ddb.virtualHWVersion = \"13\"\n"
    ).encode()


@dataclass(frozen=True)
class _Target:
    folder: Any
    folder_path: str
    pool: Any
    datastore: Any
    datastore_name: str
    datacenter: Any
    dc_path: str


class VsphereRestoreSession:
    """A restore: new disk files in `[ds] <name>/`, the VM created at commit()
    (RestoreSession)."""

    def __init__(self, api: Vsphere, vm_config: Mapping[str, Any], name: str,
                 target: _Target, http: DatastoreHttp,
                 disks: list[tuple[str, str, int]]) -> None:
        self._api = api
        self._name = name
        self._target = target
        self._http = http
        self._config = vm_config
        self._directory = ds_path(target.datastore_name, name)
        controllers = {str(d.get("key")): str(d.get("controller", ""))
                       for d in vm_config.get("disks", []) if isinstance(d, dict)}
        first = next((c for c in controllers.values() if c in SCSI_KINDS), "pvscsi")
        self._controller = first
        self.disks: list[VsphereDiskWriter] = []
        self._labels: dict[str, str] = {}
        for index, (key, label, capacity) in enumerate(disks):
            stem = name if index == 0 else f"{name}_{index}"
            file = DatastoreFile(target.datastore_name, flat_name(f"{name}/{stem}.vmdk"),
                                 target.dc_path)
            self.disks.append(VsphereDiskWriter(http, file, key, capacity))
            self._labels[key] = label
        self._vm: Any = None
        self._committed: DiscoveredVm | None = None
        self._aborted = False
        self._lock = threading.Lock()

    def commit(self) -> DiscoveredVm:
        """Finish every upload, write the descriptors, create the VM (not powered on)."""
        from pyVmomi import vim

        with self._lock:
            if self._committed is not None:
                return self._committed
            if self._aborted:
                raise HypervisorError(HYPERVISOR_ERROR, f"the restore of {self._name!r} "
                                      "was aborted")
            for writer in self.disks:
                writer.close()
            for writer in self.disks:
                flat = writer.file.path.rsplit("/", 1)[-1]
                descriptor = DatastoreFile(writer.file.datastore,
                                           descriptor_name(writer.file.path),
                                           writer.file.dc_path)
                body = _descriptor(flat, writer.size, self._controller)
                self._http.put(descriptor, len(body), body)
            spec = self._spec(vim)
            what = f"creating VM {self._name!r} in {self._target.folder_path}"
            task = self._api.step(what, lambda: self._target.folder.CreateVM_Task(
                config=spec, pool=self._target.pool))
            self._vm = wait_task(self._api, task, what, limit=900.0)
            found = self._discovered()
            self._committed = found
            log.info("event=vsphere_restore_committed vm=%s uuid=%s disks=%s", self._name,
                     found.uuid, len(self.disks))
            return found

    def _spec(self, vim: Any) -> Any:
        """The new VM: CPUs, memory, firmware, guest OS of the source; SCSI controllers of
        the source's kind, 15 disks each (unit 7 is the controller's own), each disk
        pointing at its uploaded file (no file operation: the files exist)."""
        cls = controller_classes()[self._controller]
        units = [u for u in range(16) if u != 7]
        if len(self.disks) > 4 * len(units):
            raise HypervisorError(HYPERVISOR_ERROR, f"{len(self.disks)} disks do not fit "
                                  "on 4 SCSI controllers")
        changes = []
        for bus in range(-(-len(self.disks) // len(units))):
            controller = cls(key=-100 - bus, busNumber=bus, sharedBus="noSharing")
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add",
                                                           device=controller))
        for index, writer in enumerate(self.disks):
            descriptor = descriptor_name(writer.file.path)
            backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=ds_path(writer.file.datastore, descriptor), diskMode="persistent",
                datastore=self._target.datastore)
            disk = vim.vm.device.VirtualDisk(
                key=-(index + 1), controllerKey=-100 - index // len(units),
                unitNumber=units[index % len(units)], capacityInKB=writer.size // 1024,
                backing=backing,
                deviceInfo=vim.Description(label=self._labels.get(writer.key) or
                                           f"Hard disk {index + 1}", summary=""))
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=disk))
        config = self._config
        return vim.vm.ConfigSpec(
            name=self._name, guestId=str(config.get("guestId") or "otherGuest64"),
            numCPUs=int(config.get("numCPU") or 1), memoryMB=int(config.get("memoryMB") or 256),
            firmware=str(config.get("firmware") or "bios"),
            files=vim.vm.FileInfo(vmPathName=f"{self._directory}/{self._name}.vmx"),
            deviceChange=changes)

    def _discovered(self) -> DiscoveredVm:
        props = props_of(self._api, self._vm, ["name", "config.instanceUuid", "runtime.host"],
                         f"reading the new VM {self._name!r}")
        host = props.get("runtime.host")
        host_name = (props_of(self._api, host, ["name"], "reading the VM's host").get("name", "")
                     if host is not None else "")
        return DiscoveredVm(uuid=str(props.get("config.instanceUuid", "")),
                            name=str(props.get("name", self._name)),
                            path=inventory_path(self._api, self._vm),
                            host_name=str(host_name), tags=())

    def abort(self) -> None:
        """Stop the uploads, destroy the VM if it was created, delete the directory with
        the disk files; idempotent."""
        with self._lock:
            if self._aborted:
                return
            for writer in self.disks:
                writer.cancel()
            if self._vm is not None:
                what = f"destroying the restored VM {self._name!r}"
                task = self._api.step(what, self._vm.Destroy_Task)
                wait_task(self._api, task, what, limit=900.0)
                self._vm = None
            delete_directory(self._api, self._directory, self._target.datacenter)
            self._http.close()
            self._aborted = True
        log.info("event=vsphere_restore_aborted vm=%s", self._name)


def _find(api: Vsphere, path: str, kind: Any, key: str, what: str) -> Any:
    """The object at inventory path `path`, which must be a `kind`; HypervisorError naming
    the restore key and the value otherwise."""
    content = api.content()
    found = api.step(f"looking up {key} {path!r}",
                     lambda: content.searchIndex.FindByInventoryPath(path.strip("/")))
    if found is None:
        raise HypervisorError(HYPERVISOR_ERROR, f"{key} {path!r} does not exist on "
                              f"{api.endpoint.netloc}")
    if not isinstance(found, kind):
        raise HypervisorError(HYPERVISOR_ERROR, f"{key} {path!r} on {api.endpoint.netloc} "
                              f"is a {type(found).__name__.rsplit('.', 1)[-1]}, not {what}")
    return found


def _target(api: Vsphere, vm_config: Mapping[str, Any],
            options: Mapping[str, str]) -> _Target:
    """The folder, pool and datastore of the new VM, from the options or the source's."""
    from pyVmomi import vim

    def choose(key: str, source_key: str) -> str:
        value = options.get(key) or str(vm_config.get(source_key) or "")
        if not value:
            raise HypervisorError(HYPERVISOR_ERROR, f"{key} is required: the recovery point "
                                  "does not say where the source VM was")
        if not restorekeys.PATH_RE.fullmatch(value):
            raise HypervisorError(HYPERVISOR_ERROR, f"{key} {value!r} is not an inventory "
                                  "path starting with '/'")
        return value

    folder_path = choose("vmFolderPath", "folderPath")
    pool_path = choose("vmResourcePoolPath", "resourcePoolPath")
    datastore_path = choose("vmDatastorePath", "datastorePath")
    folder = _find(api, folder_path, vim.Folder, "vmFolderPath", "a VM folder")
    if "VirtualMachine" not in (props_of(api, folder, ["childType"], "reading the folder")
                                .get("childType") or []):
        raise HypervisorError(HYPERVISOR_ERROR, f"vmFolderPath {folder_path!r} on "
                              f"{api.endpoint.netloc} is a folder of another kind, not a VM "
                              "folder")
    pool = _find(api, pool_path, vim.ResourcePool, "vmResourcePoolPath", "a resource pool")
    datastore = _find(api, datastore_path, vim.Datastore, "vmDatastorePath", "a datastore")
    datacenter, dc_path = datacenter_of(api, datastore)
    folder_dc = datacenter_of(api, folder)[0]
    if folder_dc._moId != datacenter._moId:
        raise HypervisorError(HYPERVISOR_ERROR, f"vmDatastorePath {datastore_path!r} and "
                              f"vmFolderPath {folder_path!r} are in different datacenters")
    owner = props_of(api, pool, ["owner"], "reading the resource pool").get("owner")
    hosts = (props_of(api, owner, ["host"], "reading the cluster").get("host") or []
             if owner is not None else [])
    if hosts and not any(datastore._moId in {d._moId for d in props_of(
            api, host, ["datastore"], "reading a host").get("datastore") or []}
                         for host in hosts):
        raise HypervisorError(HYPERVISOR_ERROR, f"vmDatastorePath {datastore_path!r} is not "
                              f"mounted on any host of vmResourcePoolPath {pool_path!r}")
    name = props_of(api, datastore, ["name"], "reading the datastore").get("name", "")
    return _Target(folder, folder_path, pool, datastore, str(name), datacenter, dc_path)


def begin_restore(api: Vsphere, vm_config: Mapping[str, Any], name: str,
                  options: Mapping[str, str],
                  disks: list[tuple[str, str, int]]) -> VsphereRestoreSession:
    """Check where the VM goes and that `name` is free, make its datastore directory, and
    return the session whose writers upload its disks (see the module docstring)."""
    from pyVmomi import vim

    if vm_config.get("kind") != "vsphere":
        raise HypervisorError(HYPERVISOR_ERROR, f"the recovery point is of a "
                              f"{vm_config.get('kind')!r} VM; it restores to vSphere only "
                              "from a vSphere backup")
    if not restorekeys.VM_NAME_RE.fullmatch(name):
        raise HypervisorError(HYPERVISOR_ERROR, f"vmName {name!r} is not a VM name this "
                              "gateway creates (1-80 letters, digits, space, _ . ( ) + -)")
    for key, _label, capacity in disks:
        if capacity <= 0:
            raise HypervisorError(HYPERVISOR_ERROR, f"disk {key} has no capacity")
    target = _target(api, vm_config, options)
    content = api.content()
    existing = api.step(f"looking for VM {name!r}", lambda: content.searchIndex.FindChild(
        target.folder, name))
    if existing is not None:
        raise HypervisorError(HYPERVISOR_ERROR, f"vmName {name!r}: a VM of that name exists "
                              f"in {target.folder_path} already")
    directory = ds_path(target.datastore_name, name)

    def make() -> bool:
        try:
            content.fileManager.MakeDirectory(name=directory, datacenter=target.datacenter,
                                              createParentDirectories=False)
        except vim.fault.FileAlreadyExists:
            return False
        return True

    if not api.step(f"making directory {directory}", make):
        raise HypervisorError(HYPERVISOR_ERROR, f"vmName {name!r}: the datastore directory "
                              f"{directory} exists already (files of another VM?)")
    http = DatastoreHttp(api)
    log.info("event=vsphere_restore_started vm=%s folder=%s datastore=%s disks=%s", name,
             target.folder_path, target.datastore_name, len(disks))
    return VsphereRestoreSession(api, vm_config, name, target, http, disks)
