"""Backups and restores of libvirt/QEMU VMs: the gateway's data path for libvirt.

Backup: a libvirt *pull-mode* backup (virDomainBackupBegin). QEMU freezes every disk at one
instant (copy-before-write into a scratch file) and serves it as an NBD export until the
job ends; the gateway reads the exports with libnbd. A checkpoint (a persistent dirty
bitmap in each qcow2 disk) is created at the same instant, so the next backup reads only
the ranges written since (`qemu:dirty-bitmap:` meta context) instead of the allocated data
(`base:allocation`).

Why NBD over TCP, and what it exposes: the gateway reaches the hypervisor over the network,
so the export cannot be a Unix socket. QEMU listens on the address the gateway already uses
for libvirt (the URI's host; 127.0.0.1 for a local URI), on a port of libvirt's backup range
(TCP 10809-10872, which a firewall between them must allow). Without TLS, anyone who can
reach that address and port may read the VM's disks for as long as the backup runs (the
exports are read-only). libvirt's remedy is NBD TLS (`backup_tls_x509_cert_dir` in
qemu.conf and `<server tls='yes'>`); this module does not use it yet.

Scratch files: libvirt 9.0 wants one per disk (it will not invent a path when the disk is
named), on the hypervisor host; the gateway cannot create files there, so it names a path
beside the disk (libvirt's own default) and libvirt creates, labels and removes it. Their
names carry SCRATCH_MARK, which is how a backup job left running by a gateway that died is
recognised as ours (and ended) rather than someone else's (refused).

A VM that is shut off is started paused for the backup (its CPU never runs), with
AUTODESTROY so that it stops when the session's connection closes, even if the gateway dies.

Restore goes through libvirt only (the hypervisor may be remote): one sparse raw volume per
disk is written through libvirt's volume upload stream (holes sent as holes), then converted
by the storage pool into the final qcow2 volume (virStorageVolCreateXMLFrom, i.e. qemu-img
convert) and the raw one deleted. Uploading straight into a qcow2 volume is not possible:
libvirt writes the stream's bytes into the file as they come, which turns the qcow2 into a
raw file (measured with libvirt 9.0).
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import socket
import threading
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Protocol, TypeVar
from xml.sax.saxutils import quoteattr

from gatewaycore import restorekeys
from gatewaycore.manifest import CHUNK_SIZE

from . import libvirtbindings
from .model import HYPERVISOR_ERROR, DiscoveredVm, HypervisorError, reach_error


class LibvirtConnector(Protocol):
    """What the sessions use of appliance.hypervisors.libvirt.LibvirtConnector (a Protocol
    here, so the two modules do not import each other)."""

    @property
    def timeout(self) -> float: ...
    @property
    def uri(self) -> Any: ...
    @property
    def nbd_address(self) -> str: ...
    def call(self, what: str, work: Callable[[Any], T], timeout: float | None = None) -> T: ...
    def discovered(self, conn: Any, dom: Any) -> DiscoveredVm: ...
    def close(self) -> None: ...

log = logging.getLogger(__name__)
T = TypeVar("T")

CHECKPOINT_PREFIX = "bg-"
CHECKPOINT_RE = re.compile(r"bg-[A-Za-z0-9_.-]{1,80}")
SCRATCH_MARK = ".bg-scratch-"
# libvirt's default backup_port_min..backup_port_max (qemu.conf): what an admin opens
NBD_PORTS = range(10809, 10873)
READ_CONNECTIONS = 4            # NBD connections per disk when the export allows multi-conn
BLOCK_STATUS_STEP = 1 << 30     # bytes asked per NBD_CMD_BLOCK_STATUS (the protocol's is 32-bit)
NBD_STATE_HOLE, NBD_STATE_ZERO = 1, 2
NBD_STATE_DIRTY = 1
DATA_RATE_FLOOR = 20e6          # bytes/s: bound for calls that move a whole disk (conversion)
SEND_PIECE = 4 * 1024 * 1024

VM_GONE = "the VM {!r} does not exist on {} (deleted, or recreated with another UUID)"


# -- the domain's disks -------------------------------------------------------------------


@dataclass(frozen=True)
class SourceDisk:
    """One disk of the domain to back up (target dev, where its data is, its format)."""

    key: str
    path: str
    kind: str       # "file" or "block": what the path is on the hypervisor
    fmt: str        # the driver type: "qcow2", "raw", ...

    @property
    def label(self) -> str:
        return PurePosixPath(self.path).name or self.path


def domain_disks(domain_xml: str, resolve_volume: Callable[[str, str], tuple[str, str]]
                 ) -> tuple[list[SourceDisk], list[str]]:
    """The disks a backup reads, and why each other disk is skipped: cdroms, floppies and
    LUN pass-through are not VM data we can restore; network disks (rbd, iscsi, ...) and
    empty drives have no file or device QEMU can freeze for us. `resolve_volume(pool, vol)`
    gives the (path, kind) of a type='volume' disk."""
    root = ET.fromstring(domain_xml)
    disks: list[SourceDisk] = []
    skipped: list[str] = []
    for disk in root.iterfind("devices/disk"):
        target = disk.find("target")
        key = target.get("dev", "") if target is not None else ""
        device, kind = disk.get("device", "disk"), disk.get("type", "file")
        source = disk.find("source")
        if device != "disk":
            skipped.append(f"{key} ({device})")
            continue
        if disk.find("transient") is not None:
            skipped.append(f"{key} (transient)")
            continue
        path = None
        if source is not None and kind == "file":
            path = source.get("file")
        elif source is not None and kind == "block":
            path = source.get("dev")
        elif source is not None and kind == "volume":
            path, kind = resolve_volume(source.get("pool", ""), source.get("volume", ""))
        if not path or kind not in ("file", "block"):
            skipped.append(f"{key} ({kind} disk without a local file or device)")
            continue
        driver = disk.find("driver")
        fmt = driver.get("type", "raw") if driver is not None else "raw"
        disks.append(SourceDisk(key, path, kind, fmt))
    return disks, skipped


def backup_xml(disks: list[SourceDisk], skipped_keys: list[str], address: str, port: int,
               scratch: dict[str, str], incremental: str | None) -> str:
    """The <domainbackup> of a pull-mode backup of `disks`, exported as NBD over TCP."""
    items = []
    for d in disks:
        items.append(f"<disk name={quoteattr(d.key)} backup='yes' type='file' "
                     f"exportname={quoteattr(d.key)}>"
                     f"<scratch file={quoteattr(scratch[d.key])}/></disk>")
    items += [f"<disk name={quoteattr(k)} backup='no'/>" for k in skipped_keys]
    inc = f"<incremental>{incremental}</incremental>" if incremental else ""
    return (f"<domainbackup mode='pull'>{inc}<server transport='tcp' "
            f"name={quoteattr(address)} port='{port}'/><disks>{''.join(items)}</disks>"
            "</domainbackup>")


def wildcard(address: str) -> str:
    """The any-address of `address`'s family (an IPv6 literal has a colon)."""
    return "::" if ":" in address else "0.0.0.0"


def checkpoint_xml(name: str, disks: list[SourceDisk], skipped_keys: list[str]) -> str:
    """The <domaincheckpoint> taken with the backup: a bitmap in every backed-up disk."""
    items = [f"<disk name={quoteattr(d.key)} checkpoint='bitmap'/>" for d in disks]
    items += [f"<disk name={quoteattr(k)} checkpoint='no'/>" for k in skipped_keys]
    return (f"<domaincheckpoint><name>{name}</name><disks>{''.join(items)}</disks>"
            "</domaincheckpoint>")


@dataclass(frozen=True)
class Export:
    """One disk as the running backup job serves it."""

    key: str
    exportname: str
    bitmap: str | None
    scratch: str


def running_backup(xml_text: str) -> tuple[int, list[Export]]:
    """The NBD port and the disks' exports of a running job (virDomainBackupGetXMLDesc)."""
    root = ET.fromstring(xml_text)
    server = root.find("server")
    port = int(server.get("port", "0")) if server is not None else 0
    exports = []
    for disk in root.iterfind("disks/disk"):
        if disk.get("backup") != "yes":
            continue
        scratch = disk.find("scratch")
        exports.append(Export(disk.get("name", ""), disk.get("exportname") or disk.get("name", ""),
                              disk.get("exportbitmap"),
                              scratch.get("file", "") if scratch is not None else ""))
    return port, exports


def _token(job_id: str) -> str:
    """A name part unique to this attempt of this job: a job restarted after a lease ran out
    must not collide with the checkpoint its dead attempt left."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "", job_id)[:40] or "job"
    return f"{safe}-{secrets.token_hex(3)}"


# -- reading an export --------------------------------------------------------------------


def _nbd() -> Any:
    try:
        import nbd
    except ImportError:
        raise HypervisorError(HYPERVISOR_ERROR, "libnbd's Python bindings are not installed "
                              "(Debian: python3-libnbd)") from None
    return nbd


class NbdDiskReader:
    """One disk of a running pull-mode backup, read over NBD (a DiskReader).

    libnbd serialises the calls on one handle, so parallel readers each take a handle of
    their own from a small pool: up to READ_CONNECTIONS connections when the server allows
    multi-conn (QEMU does for its read-only backup exports), else one. Reads are libnbd's
    synchronous calls (they release the GIL; its asynchronous commands polled from Python
    against a deadline read at half the speed here); a hypervisor that vanishes mid-read is
    caught by TCP keepalive and TCP_USER_TIMEOUT on the socket, set from the timeout."""

    def __init__(self, export: Export, address: str, port: int, timeout: float,
                 incremental: bool) -> None:
        self.key = export.key
        self.label = export.key
        self._export = export
        self._address, self._port = address, port
        self._timeout = timeout
        self._context = (f"qemu:dirty-bitmap:{export.bitmap}" if incremental
                         else "base:allocation")
        self._cond = threading.Condition()
        self._idle: list[Any] = []
        self._handles: list[Any] = []
        self._closed = False
        self._extents: list[tuple[int, int]] | None = None
        first = self._connect()
        self._handles.append(first)
        self._idle.append(first)
        self.capacity: int = first.get_size()
        self._max = READ_CONNECTIONS if first.can_multi_conn() else 1

    @property
    def where(self) -> str:
        host = f"[{self._address}]" if ":" in self._address else self._address
        return f"NBD {host}:{self._port} export {self._export.exportname!r}"

    def _connect(self) -> Any:
        nbd = _nbd()
        try:
            sock = socket.create_connection((self._address, self._port), timeout=self._timeout)
        except OSError as exc:
            raise reach_error(exc, self._address, self.where, self._timeout,
                              "the hypervisor's NBD backup server is not listening there "
                              f"(a firewall must let TCP {NBD_PORTS.start}-{NBD_PORTS.stop - 1} "
                              "through)") from None
        _keepalive(sock, self._timeout)
        h = nbd.NBD()
        try:
            h.set_export_name(self._export.exportname)
            h.add_meta_context(self._context)
            h.connect_socket(sock.detach())
            if not h.can_meta_context(self._context):
                raise HypervisorError(HYPERVISOR_ERROR, f"{self.where} does not offer "
                                      f"{self._context!r}")
        except nbd.Error as exc:
            _let_go(h)
            del h  # the traceback keeps this frame: drop the handle now, not with it
            raise self._error("connecting to", exc) from None
        except BaseException:
            _let_go(h)
            del h
            raise
        return h

    def _error(self, doing: str, exc: Exception) -> HypervisorError:
        return HypervisorError(HYPERVISOR_ERROR, f"{doing} disk {self.key} ({self.where}) "
                               f"failed: {exc}")

    def _take(self) -> Any:
        with self._cond:
            while True:
                if self._closed:
                    raise HypervisorError(HYPERVISOR_ERROR, f"disk {self.key}: the backup "
                                          "session is finished")
                if self._idle:
                    return self._idle.pop()
                if len(self._handles) < self._max:
                    self._handles.append(None)   # a place taken while connecting
                    break
                self._cond.wait()
        try:
            h = self._connect()
        except BaseException:
            with self._cond:
                self._handles.remove(None)
                self._cond.notify()
            raise
        with self._cond:
            self._handles[self._handles.index(None)] = h
        return h

    def _give(self, h: Any, broken: bool = False) -> None:
        with self._cond:
            if broken or self._closed:
                self._handles.remove(h)
                _let_go(h)
            else:
                self._idle.append(h)
            self._cond.notify()

    def extents(self) -> list[tuple[int, int]]:
        with self._cond:
            if self._extents is not None:
                return list(self._extents)
        found: list[tuple[int, int]] = []
        incremental = self._context.startswith("qemu:")
        h = self._take()
        broken = True
        try:
            offset = 0
            seen = [0]      # where the server's last answer ended

            def status(context: str, start: int, entries: list[int], err: int) -> int:
                if context != self._context:
                    return 0
                at = start
                for i in range(0, len(entries) - 1, 2):
                    length, flags = entries[i], entries[i + 1]
                    wanted = (flags & NBD_STATE_DIRTY if incremental
                              else not flags & NBD_STATE_ZERO)
                    if wanted and length:
                        _add(found, at, length)
                    at += length
                seen[0] = max(seen[0], at)
                return 0

            while offset < self.capacity:
                h.block_status(min(BLOCK_STATUS_STEP, self.capacity - offset), offset, status)
                if seen[0] <= offset:
                    raise HypervisorError(HYPERVISOR_ERROR, f"{self.where} described no "
                                          f"extent at offset {offset}")
                offset = min(seen[0], self.capacity)
            broken = False
        except _nbd().Error as exc:
            raise self._error("listing the extents of", exc) from None
        finally:
            self._give(h, broken)
        result = [(o, min(n, self.capacity - o)) for o, n in found if o < self.capacity]
        with self._cond:
            self._extents = result
        return list(result)

    def read(self, offset: int, length: int) -> bytes:
        if not 0 < length <= CHUNK_SIZE or offset < 0 or offset + length > self.capacity:
            raise ValueError(f"disk {self.key}: cannot read {length} bytes at {offset} of "
                             f"{self.capacity}")
        nbd = _nbd()
        h = self._take()
        broken = True
        try:
            data: bytes = h.pread(length, offset)
            broken = False
        except nbd.Error as exc:
            raise self._error("reading", exc) from None
        finally:
            self._give(h, broken)
        return data

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            for h in idle:
                self._handles.remove(h)
            self._cond.notify_all()
        for h in idle:
            _let_go(h)


def _let_go(h: Any) -> None:
    """End an NBD handle: `shutdown` (a clean NBD_CMD_DISC when connected), then the
    caller drops its reference and the bindings' destructor closes it. Debian's libnbd 1.14
    bindings have no `close()`; calling it raised AttributeError, which replaced the
    HypervisorError of a refused export. Only the bindings' own error is ignored (a handle
    that never connected, or a server already gone, cannot shut down)."""
    with contextlib.suppress(_nbd().Error):
        h.shutdown()


def _keepalive(sock: socket.socket, timeout: float) -> None:
    """A peer that stops answering (host down, link cut) ends the connection within about
    `timeout` seconds instead of leaving a read blocked for ever."""
    seconds = max(1, int(timeout))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, seconds // 2))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, seconds // 6))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, seconds * 1000)


def _add(found: list[tuple[int, int]], offset: int, length: int) -> None:
    """Append a range, merged with the previous one when they touch (fewer, larger reads)."""
    if found and found[-1][0] + found[-1][1] == offset:
        found[-1] = (found[-1][0], found[-1][1] + length)
    else:
        found.append((offset, length))


# -- the backup ---------------------------------------------------------------------------


@dataclass
class LibvirtBackupSession:
    """A running pull-mode backup of one domain (a BackupSession)."""

    connector: LibvirtConnector
    vm_uuid: str
    vm_name: str
    token: str
    incremental: bool
    checkpoint: str | None
    note: str
    vm_config: dict[str, Any]
    disks: list[NbdDiskReader]
    started_domain: bool = False
    _finished: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def finish(self, ok: bool) -> None:
        """End the job (libvirt removes the exports and scratch files), then the checkpoints:
        ok -> every older checkpoint of ours goes (deleting one merges its bitmap into its
        parent, so the new one stays exact); not ok -> the one this backup made goes (it
        is no valid base) and the base stays. Cleanup failures are logged, not raised: the
        recovery point's fate is already decided, a job left over is ended by the next
        begin_backup and checkpoints left over by the next successful finish."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
        for reader in self.disks:
            reader.close()
        try:
            self.connector.call("backup-finish", lambda conn: self._finish(conn, ok))
        except HypervisorError as exc:
            log.warning("event=libvirt_backup_finish_failed vm=%s message=%s", self.vm_name,
                        exc.message)
        finally:
            self.connector.close()
        log.info("event=libvirt_backup_finished vm=%s ok=%s checkpoint=%s", self.vm_name, ok,
                 self.checkpoint)

    def _finish(self, conn: Any, ok: bool) -> None:
        libvirt = conn_module()
        try:
            dom = conn.lookupByUUIDString(self.vm_uuid)
        except libvirt.libvirtError:
            return
        _end_our_job(libvirt, dom, self.token)
        if self.checkpoint and dom.isActive():
            if ok:
                doomed = [c for c in dom.listAllCheckpoints(0)
                          if c.getName().startswith(CHECKPOINT_PREFIX)
                          and c.getName() != self.checkpoint]
            else:
                doomed = [c for c in dom.listAllCheckpoints(0) if c.getName() == self.checkpoint]
            for cp in doomed:
                try:
                    cp.delete(0)
                except libvirt.libvirtError as exc:
                    log.warning("event=libvirt_checkpoint_delete_failed vm=%s checkpoint=%s "
                                "message=%s", self.vm_name, cp.getName(),
                                exc.get_error_message())
        if self.started_domain:
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()


def conn_module() -> Any:
    return libvirtbindings.load()


def _end_our_job(libvirt: Any, dom: Any, token: str | None = None) -> bool:
    """Abort the domain's backup job if it is ours (this session's when `token` is given),
    so that its exports and scratch files go; False when there was none to end. A backup
    job that is not ours (another tool's) is refused rather than killed."""
    try:
        xml_text = dom.backupGetXMLDesc(0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN_BACKUP,
                                    libvirt.VIR_ERR_OPERATION_INVALID):
            return False
        raise
    mark = SCRATCH_MARK + (token or "")
    if mark not in xml_text:
        if token is not None:
            return False
        raise HypervisorError(HYPERVISOR_ERROR, f"the VM {dom.name()!r} has a backup job the "
                              "gateway did not start (another backup tool?): end it or wait "
                              "for it, then retry")
    try:
        dom.abortJob()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # ended meanwhile
            raise
    _wait_job_gone(libvirt, dom)
    return True


def _wait_job_gone(libvirt: Any, dom: Any, limit: float = 10.0) -> None:
    """Until the aborted job is gone: libvirt answers abortJob before QEMU has torn the
    exports down and libvirt has deleted the scratch files (about 50 ms here), and a new
    backup begun meanwhile is refused. Polled: libvirt reports the job's end as an event
    only to a client running libvirt's event loop, which this process does not."""
    deadline = time.monotonic() + limit
    pause = 0.01
    while True:
        try:
            dom.backupGetXMLDesc(0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN_BACKUP,
                                        libvirt.VIR_ERR_OPERATION_INVALID):
                return
            raise
        if time.monotonic() > deadline:
            raise HypervisorError(HYPERVISOR_ERROR, f"the backup job of {dom.name()!r} did "
                                  f"not end within {limit:g}s of being aborted")
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def begin_backup(connector: LibvirtConnector, vm_uuid: str, job_id: str,
                 base_checkpoint: str | None) -> LibvirtBackupSession:
    """Start a pull-mode backup of the domain `vm_uuid` (see the module's docstring); the
    session owns `connector` (a connector of its own) and closes it in finish()."""
    try:
        session, exports, port = connector.call("backup-begin", lambda conn: _begin(
            connector, conn, vm_uuid, job_id, base_checkpoint))
    except BaseException:
        connector.close()
        raise
    try:
        # the readers connect outside the libvirt worker (its deadline is for libvirt calls)
        for export in exports:
            session.disks.append(NbdDiskReader(export, connector.nbd_address, port,
                                               connector.timeout, session.incremental))
        for reader, disk in zip(session.disks, session.vm_config["disks"], strict=True):
            reader.label = disk["label"]
            disk["capacity"] = reader.capacity
    except BaseException:
        session.finish(ok=False)
        raise
    log.info("event=libvirt_backup_begun vm=%s incremental=%s checkpoint=%s disks=%s note=%s",
             session.vm_name, session.incremental, session.checkpoint, len(session.disks),
             session.note)
    return session


Begun = tuple["LibvirtBackupSession", list[Export], int]


def _begin(connector: LibvirtConnector, conn: Any, vm_uuid: str, job_id: str,
           base: str | None) -> Begun:
    """The libvirt half of begin_backup, in one bounded worker: find the domain, end a job
    of ours left over, start the job on a free port, read back what it serves."""
    libvirt = conn_module()
    try:
        dom = conn.lookupByUUIDString(vm_uuid)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise HypervisorError(HYPERVISOR_ERROR, VM_GONE.format(vm_uuid,
                                                                   connector.uri.uri)) from None
        raise
    name = dom.name()
    started = False
    if dom.isActive():
        if _end_our_job(libvirt, dom):
            log.warning("event=libvirt_backup_leftover_ended vm=%s", name)
    else:
        # a pull-mode backup needs QEMU: run it paused, gone with our connection
        dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED | libvirt.VIR_DOMAIN_START_AUTODESTROY)
        started = True
    try:
        return _begin_job(connector, conn, dom, name, vm_uuid, job_id, base, started)
    except BaseException:
        if started:
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
        raise


def _resolver(conn: Any) -> Callable[[str, str], tuple[str, str]]:
    libvirt = conn_module()

    def resolve(pool: str, volume: str) -> tuple[str, str]:
        try:
            vol = conn.storagePoolLookupByName(pool).storageVolLookupByName(volume)
            kind = "block" if vol.info()[0] == libvirt.VIR_STORAGE_VOL_BLOCK else "file"
            return vol.path(), kind
        except libvirt.libvirtError:
            return "", "volume"
    return resolve


def _begin_job(connector: LibvirtConnector, conn: Any, dom: Any, name: str, vm_uuid: str,
               job_id: str, base: str | None, started: bool) -> Begun:
    libvirt = conn_module()
    domain_xml = dom.XMLDesc(0)
    disks, skipped = domain_disks(domain_xml, _resolver(conn))
    if not disks:
        raise HypervisorError(HYPERVISOR_ERROR, f"the VM {name!r} has no disk the gateway "
                              f"can back up (skipped: {', '.join(skipped) or 'none'})")
    skipped_keys = [s.split(" ", 1)[0] for s in skipped if s.split(" ", 1)[0]]
    token = _token(job_id)
    scratch_dir = _scratch_dir(conn, disks)
    scratch = {d.key: (f"{d.path}{SCRATCH_MARK}{token}" if d.kind == "file"
                       else f"{scratch_dir}/{d.key}{SCRATCH_MARK}{token}") for d in disks}
    note = ""
    bitmaps = all(d.fmt == "qcow2" for d in disks)
    checkpoint = f"{CHECKPOINT_PREFIX}{token}" if bitmaps else None
    incremental: str | None = None
    if base and not bitmaps:
        note = (f"the VM {name!r} has disks that are not qcow2 (no dirty bitmaps): full backup")
    elif base and not CHECKPOINT_RE.fullmatch(base):
        note = f"checkpoint {base[:80]!r} is not one of the gateway's: full backup"
    elif base:
        try:
            dom.checkpointLookupByName(base)
            incremental = base
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                raise
            note = f"checkpoint {base} is gone: full backup"
    cp_xml = checkpoint_xml(checkpoint, disks, skipped_keys) if checkpoint else None
    first = NBD_PORTS.start + secrets.randbelow(len(NBD_PORTS))
    ports = [NBD_PORTS.start + (first - NBD_PORTS.start + i) % len(NBD_PORTS)
             for i in range(len(NBD_PORTS))]
    listen = connector.nbd_address
    tries = iter(ports)
    port = next(tries)
    while True:
        xml = backup_xml(disks, skipped_keys, listen, port, scratch, incremental)
        try:
            dom.backupBegin(xml, cp_xml, 0)
            break
        except libvirt.libvirtError as exc:
            text = exc.get_error_message() or ""
            if "Address already in use" in text or "available port" in text:
                port = next(tries, 0)
                if not port:
                    raise HypervisorError(
                        HYPERVISOR_ERROR, "no free NBD port for the backup on the hypervisor "
                        f"({NBD_PORTS.start}-{NBD_PORTS.stop - 1} all in use)") from None
                continue
            if "Cannot assign requested address" in text and listen != wildcard(listen):
                # The address the gateway reaches the hypervisor on is not one of the
                # hypervisor's own: a NAT or relay is in between (make run's VM reaches the
                # host through QEMU's 10.0.2.101). Listen on every address instead.
                log.warning("event=nbd_listen_wildcard vm=%s address=%s", name, listen)
                listen = wildcard(listen)
                continue
            if incremental is None:
                raise
            # the base's bitmap is missing or broken in a disk (a disk replaced or added)
            note = f"incremental from checkpoint {incremental} refused ({text[:200]}): full"
            incremental = None
            xml = backup_xml(disks, skipped_keys, listen, port, scratch, None)
            dom.backupBegin(xml, cp_xml, 0)
            break
    port, exports = running_backup(dom.backupGetXMLDesc(0))
    by_key = {e.key: e for e in exports}
    vm_config = {
        "kind": "libvirt", "domainXml": domain_xml, "name": name, "uuid": vm_uuid,
        "disks": [{"key": d.key, "label": d.label, "capacity": 0, "format": d.fmt,
                   **_pool_of(conn, d.path)} for d in disks],
    }
    session = LibvirtBackupSession(
        connector=connector, vm_uuid=vm_uuid, vm_name=name, token=token,
        incremental=incremental is not None, checkpoint=checkpoint, note=note,
        vm_config=vm_config, disks=[], started_domain=started)
    return session, [by_key[d.key] for d in disks], port


def _scratch_dir(conn: Any, disks: list[SourceDisk]) -> str:
    """Where scratch files of block-device disks go: beside a file disk of the VM, else in
    the "default" storage pool's directory (a file disk's goes beside it)."""
    for d in disks:
        if d.kind == "file":
            return str(PurePosixPath(d.path).parent)
    if all(d.kind == "file" for d in disks):
        return ""
    try:
        xml = conn.storagePoolLookupByName(restorekeys.DEFAULT_STORAGE_POOL).XMLDesc(0)
        path = ET.fromstring(xml).findtext("target/path")
    except Exception:
        path = None
    if not path:
        raise HypervisorError(HYPERVISOR_ERROR, "the VM's disks are block devices and there "
                              "is no 'default' storage pool directory for the backup's "
                              "scratch files")
    return path


def _pool_of(conn: Any, path: str) -> dict[str, str]:
    """{"pool": NAME} when the disk is a volume of a storage pool (a hint for restores)."""
    try:
        return {"pool": conn.storageVolLookupByPath(path).storagePoolLookupByVolume().name()}
    except Exception:
        return {}


# -- the restore --------------------------------------------------------------------------


def restore_domain_xml(source_xml: str, name: str, new_uuid: str,
                       volumes: Mapping[str, tuple[str, str]]) -> str:
    """The source domain's XML made into a new VM: `name` and `new_uuid`, a new generation
    id, no MAC addresses (libvirt makes new ones, so the copy can share a network with the
    original), each restored disk (by target dev) on its new qcow2 volume `volumes[key]` =
    (path, "file"|"block"), cdroms and floppies empty, every other disk dropped (it would be
    the source's own disk, written by two VMs), runtime-only attributes gone."""
    root = ET.fromstring(source_xml)
    for attr in ("id",):
        root.attrib.pop(attr, None)
    root.find("name").text = name  # type: ignore[union-attr]
    uuid_el = root.find("uuid")
    if uuid_el is None:
        uuid_el = ET.SubElement(root, "uuid")
    uuid_el.text = new_uuid
    genid = root.find("genid")
    if genid is not None:
        genid.text = None       # empty: libvirt generates a new one
    devices = root.find("devices")
    if devices is None:
        raise HypervisorError(HYPERVISOR_ERROR, "the recovery point's domain XML has no "
                              "<devices>")
    for disk in list(devices.iterfind("disk")):
        target = disk.find("target")
        key = target.get("dev", "") if target is not None else ""
        for child in list(disk):
            if child.tag in ("backingStore", "alias", "mirror"):
                disk.remove(child)
        if key in volumes:
            path, kind = volumes[key]
            disk.set("type", kind)
            for child in disk.findall("source"):
                disk.remove(child)
            source = ET.Element("source", {"file" if kind == "file" else "dev": path})
            disk.insert(1 if disk.find("driver") is not None else 0, source)
            driver = disk.find("driver")
            if driver is None:
                driver = ET.SubElement(disk, "driver", {"name": "qemu"})
            driver.set("type", "qcow2")
        elif disk.get("device", "disk") in ("cdrom", "floppy"):
            for child in disk.findall("source"):
                disk.remove(child)
        else:
            devices.remove(disk)
    for iface in devices.iterfind("interface"):
        for child in list(iface):
            if child.tag in ("mac", "alias") or (child.tag == "target"
                                                 and child.get("managed") != "no"):
                iface.remove(child)
    return ET.tostring(root, encoding="unicode")


class VolumeWriter:
    """One disk of a restore (a DiskWriter): a sparse raw volume filled through libvirt's
    upload stream, holes sent as holes; commit() converts it into the final qcow2."""

    def __init__(self, session: LibvirtRestoreSession, key: str, capacity: int,
                 raw_name: str, final_name: str) -> None:
        self.key = key
        self.capacity = capacity
        self.raw_name = raw_name
        self.final_name = final_name
        self._session = session
        self._stream: Any = None
        self._position = 0
        self.finished = False

    def _open(self, conn: Any) -> None:
        libvirt = conn_module()
        vol = self._session.pool(conn).storageVolLookupByName(self.raw_name)
        stream = conn.newStream(0)
        vol.upload(stream, 0, self.capacity, libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM)
        self._stream = stream

    def _send(self, conn: Any, hole: int, data: memoryview) -> None:
        if self._stream is None:
            self._open(conn)
        if hole:
            self._stream.sendHole(hole, 0)
        while len(data):
            sent = self._stream.send(data[:SEND_PIECE].tobytes())
            data = data[sent:]

    def write(self, offset: int, data: bytes) -> None:
        if self.finished or self._session.done:
            raise HypervisorError(HYPERVISOR_ERROR, f"disk {self.key}: the restore of "
                                  f"{self._session.name!r} is already committed or aborted")
        if offset < self._position or offset + len(data) > self.capacity:
            raise ValueError(f"disk {self.key}: a write at {offset} of {len(data)} bytes is "
                             f"before {self._position} or past the {self.capacity} bytes")
        hole = offset - self._position
        self._session.connector.call(f"upload-{self.key}", lambda conn: self._send(
            conn, hole, memoryview(data)), self._session.data_timeout(len(data)))
        self._position = offset + len(data)

    def complete(self, conn: Any) -> None:
        """The rest of the disk as a hole, and the stream closed (libvirt then syncs)."""
        if self.finished:
            return
        self._send(conn, self.capacity - self._position, memoryview(b""))
        self._stream.finish()
        self._stream = None
        self._position = self.capacity
        self.finished = True

    def abandon(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.abort()


class LibvirtRestoreSession:
    """A new domain being restored (a RestoreSession): volumes first, the domain at commit."""

    def __init__(self, connector: LibvirtConnector, vm_config: Mapping[str, Any], name: str,
                 pool_name: str, disks: list[tuple[str, str, int]]) -> None:
        self.connector = connector
        self.name = name
        self.pool_name = pool_name
        self._source_xml = str(vm_config["domainXml"])
        self._uuid = str(uuidlib.uuid4())
        self._created: list[str] = []       # volume names made, to delete on abort
        self._defined = False
        self._done = False
        self._lock = threading.Lock()
        self.disks: list[VolumeWriter] = [
            VolumeWriter(self, key, capacity, f"{name}-{key}.restore.raw", f"{name}-{key}.qcow2")
            for key, _label, capacity in disks]

    @property
    def done(self) -> bool:
        return self._done

    def pool(self, conn: Any) -> Any:
        return conn.storagePoolLookupByName(self.pool_name)

    def data_timeout(self, size: int) -> float:
        """A deadline for a call that moves `size` bytes: the connector's, plus the time
        the bytes take at DATA_RATE_FLOOR."""
        return self.connector.timeout + size / DATA_RATE_FLOOR

    def prepare(self, conn: Any) -> None:
        """Refuse a name or volume that exists; make the raw volumes (sparse: allocation 0)."""
        libvirt = conn_module()
        if _domain_exists(libvirt, conn, self.name):
            raise HypervisorError(HYPERVISOR_ERROR, f"a VM named {self.name!r} already exists "
                                  f"on {self.connector.uri.uri}: choose another vmName")
        pool = self.pool(conn)
        existing = set(pool.listVolumes())
        for w in self.disks:
            for vol in (w.final_name, w.raw_name):
                if vol in existing:
                    raise HypervisorError(HYPERVISOR_ERROR, f"the storage pool "
                                          f"{self.pool_name!r} already has a volume {vol!r}: "
                                          "choose another vmName or remove it")
        for w in self.disks:
            pool.createXML(_volume_xml(w.raw_name, w.capacity, "raw"), 0)
            self._created.append(w.raw_name)

    def commit(self) -> DiscoveredVm:
        with self._lock:
            if self._done:
                raise HypervisorError(HYPERVISOR_ERROR, f"the restore of {self.name!r} is "
                                      "already committed or aborted")
        total = sum(w.capacity for w in self.disks)
        try:
            vm = self.connector.call("restore-commit", self._commit, self.data_timeout(total))
        except BaseException:
            self.abort()
            raise
        with self._lock:
            self._done = True
        self.connector.close()
        log.info("event=libvirt_restore_committed vm=%s uuid=%s pool=%s disks=%s", vm.name,
                 vm.uuid, self.pool_name, len(self.disks))
        return vm

    def _commit(self, conn: Any) -> DiscoveredVm:
        libvirt = conn_module()
        pool = self.pool(conn)
        volumes: dict[str, tuple[str, str]] = {}
        for w in self.disks:
            w.complete(conn)
            raw = pool.storageVolLookupByName(w.raw_name)
            final = pool.createXMLFrom(_volume_xml(w.final_name, w.capacity, "qcow2"), raw, 0)
            self._created.append(w.final_name)
            raw.delete(0)
            self._created.remove(w.raw_name)
            kind = "block" if final.info()[0] == libvirt.VIR_STORAGE_VOL_BLOCK else "file"
            volumes[w.key] = (final.path(), kind)
        if _domain_exists(libvirt, conn, self.name):
            raise HypervisorError(HYPERVISOR_ERROR, f"a VM named {self.name!r} already exists "
                                  f"on {self.connector.uri.uri}: choose another vmName")
        xml = restore_domain_xml(self._source_xml, self.name, self._uuid, volumes)
        dom = conn.defineXML(xml)
        self._defined = True
        return self.connector.discovered(conn, dom)

    def abort(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        for w in self.disks:
            w.abandon()
        try:
            self.connector.call("restore-abort", self._abort)
        except HypervisorError as exc:
            log.warning("event=libvirt_restore_abort_failed vm=%s message=%s", self.name,
                        exc.message)
        finally:
            self.connector.close()
        log.info("event=libvirt_restore_aborted vm=%s", self.name)

    def _abort(self, conn: Any) -> None:
        libvirt = conn_module()
        if self._defined:
            with contextlib.suppress(libvirt.libvirtError):
                conn.lookupByUUIDString(self._uuid).undefine()
        pool = self.pool(conn)
        for vol in list(self._created):
            try:
                pool.storageVolLookupByName(vol).delete(0)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                    raise
            self._created.remove(vol)


def _volume_xml(name: str, capacity: int, fmt: str) -> str:
    # qcow2 compat 1.1: dirty bitmaps (checkpoints, so the restored VM's next backups can be
    # incremental) need it, and libvirt 9.0 makes 0.10 images when not told
    compat = "<compat>1.1</compat>" if fmt == "qcow2" else ""
    return (f"<volume><name>{_text(name)}</name><capacity unit='bytes'>{capacity}</capacity>"
            f"<allocation>0</allocation><target><format type='{fmt}'/>{compat}</target>"
            "</volume>")


def _text(value: str) -> str:
    from xml.sax.saxutils import escape
    return escape(value)


def _domain_exists(libvirt: Any, conn: Any, name: str) -> bool:
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise
    return True


def begin_restore(connector: LibvirtConnector, vm_config: Mapping[str, Any], name: str,
                  options: Mapping[str, str], disks: list[tuple[str, str, int]]
                  ) -> LibvirtRestoreSession:
    """Check the target (name, pool) and make the staging volumes; the session owns
    `connector` (a connector of its own) and closes it at commit or abort."""
    if vm_config.get("kind") != "libvirt" or not isinstance(vm_config.get("domainXml"), str):
        connector.close()
        raise HypervisorError(HYPERVISOR_ERROR, "the recovery point's VM configuration is not "
                              "a libvirt domain (restore it to the kind of hypervisor it "
                              "came from)")
    if not restorekeys.VM_NAME_RE.fullmatch(name):
        connector.close()
        raise HypervisorError(HYPERVISOR_ERROR, f"vmName {name[:80]!r} is not a valid VM name")
    pool_name = options.get("storagePool") or restorekeys.DEFAULT_STORAGE_POOL
    if not restorekeys.POOL_RE.fullmatch(pool_name):
        connector.close()
        raise HypervisorError(HYPERVISOR_ERROR, f"storagePool {pool_name[:80]!r} is not a "
                              "libvirt pool name")
    session = LibvirtRestoreSession(connector, vm_config, name, pool_name, disks)

    def prepare(conn: Any) -> None:
        libvirt = conn_module()
        try:
            pool = session.pool(conn)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise
            names = sorted(p.name() for p in conn.listAllStoragePools(0))
            raise HypervisorError(HYPERVISOR_ERROR, f"storagePool {pool_name!r} does not "
                                  f"exist on {connector.uri.uri}; its pools: "
                                  f"{', '.join(names) or 'none'}") from None
        if not pool.isActive():
            raise HypervisorError(HYPERVISOR_ERROR, f"storagePool {pool_name!r} is not "
                                  f"active on {connector.uri.uri}: start it first")
        session.prepare(conn)

    try:
        connector.call("restore-begin", prepare)
    except BaseException:
        session.abort()
        raise
    log.info("event=libvirt_restore_begun vm=%s pool=%s disks=%s", name, pool_name, len(disks))
    return session
