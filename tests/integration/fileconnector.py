"""A BackupConnector over local image files: the job runner's hypervisor in tests.

Real files, not a mock: a VM is a set of raw disk images (sparse files). A backup freezes
them by copying their data (SEEK_DATA/SEEK_HOLE) into a job directory; a full backup's
extents are that copy's data ranges; a checkpoint is the frozen copy kept after a backup
that finished well, and an incremental's extents are the 64 KiB blocks that differ from it
(a block zeroed since is listed too: it must override the base). A restore writes new
sparse files and checks the DiskWriter contract (one thread, increasing offsets).

It records what the runner did (`finished`, `sessions`) so tests can assert on it.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.hypervisors.model import HYPERVISOR_ERROR, DiscoveredVm, HypervisorError
from gatewaycore.manifest import ALIGN

HOST = "file-host"


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of the data of a sparse file (SEEK_DATA/SEEK_HOLE)."""
    out: list[tuple[int, int]] = []
    with path.open("rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end - start))
            pos = end
    return out


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` keeping its holes."""
    with src.open("rb") as fin, dst.open("wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        for offset, length in data_ranges(src):
            fin.seek(offset)
            fout.seek(offset)
            remaining = length
            while remaining:
                block = fin.read(min(remaining, 1 << 20))
                fout.write(block)
                remaining -= len(block)
        fout.truncate(size)


@dataclass
class FileVm:
    uuid: str
    name: str
    disks: dict[str, Path]  # key -> image file


class FileDisk:
    """One frozen disk (a DiskReader); preads are thread-safe."""

    def __init__(self, key: str, path: Path, extents: list[tuple[int, int]]) -> None:
        self.key = key
        self.label = path.name
        self.capacity = path.stat().st_size
        self._path = path
        self._extents = extents
        self._fd = os.open(path, os.O_RDONLY)
        self.reads = 0

    def extents(self) -> list[tuple[int, int]]:
        return list(self._extents)

    def read(self, offset: int, length: int) -> bytes:
        self.reads += 1
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def changed_blocks(new: Path, old: Path, capacity: int) -> list[tuple[int, int]]:
    """The ALIGN-sized blocks of `new` that differ from `old` (past its end: from zeros),
    looked for only where either file has data."""
    blocks: set[int] = set()
    for offset, length in data_ranges(new) + data_ranges(old):
        blocks.update(range(offset // ALIGN, (offset + length + ALIGN - 1) // ALIGN))
    out: list[tuple[int, int]] = []
    with new.open("rb") as fn, old.open("rb") as fo:
        for b in sorted(blocks):
            start = b * ALIGN
            if start >= capacity:
                continue
            n = min(ALIGN, capacity - start)
            a = os.pread(fn.fileno(), n, start)
            z = os.pread(fo.fileno(), n, start)
            if a != z.ljust(n, b"\0"):
                if out and out[-1][0] + out[-1][1] == start:
                    out[-1] = (out[-1][0], out[-1][1] + n)
                else:
                    out.append((start, n))
    return out


class FileBackupSession:
    def __init__(self, connector: FileConnector, vm: FileVm, job_id: str,
                 base: str | None) -> None:
        self._connector = connector
        self.job_id = job_id
        self.vm = vm
        self.dir = connector.root / "jobs" / job_id
        shutil.rmtree(self.dir, ignore_errors=True)  # a run of ours left by a dead gateway
        self.dir.mkdir(parents=True)
        self.checkpoint: str | None = f"fc-{job_id}"
        base_dir = connector.checkpoint_dir(vm.uuid, base) if base else None
        self.incremental = base_dir is not None and base_dir.is_dir()
        self.note = "" if self.incremental or base is None else \
            f"checkpoint {base} is gone: full backup"
        self.disks: list[FileDisk] = []
        for key, path in vm.disks.items():
            frozen = self.dir / f"{key}.img"
            sparse_copy(path, frozen)
            if self.incremental:
                assert base_dir is not None
                extents = changed_blocks(frozen, base_dir / f"{key}.img",
                                         frozen.stat().st_size)
            else:
                extents = data_ranges(frozen)
            self.disks.append(FileDisk(key, frozen, extents))
        self.vm_config: dict[str, Any] = {
            "name": vm.name, "uuid": vm.uuid,
            "disks": [{"key": d.key, "capacity": d.capacity} for d in self.disks]}
        self._finished: bool | None = None

    def finish(self, ok: bool) -> None:
        with self._connector.lock:
            if self._finished is not None:
                return
            self._finished = ok
            self._connector.finished.append((self.job_id, ok))
        for disk in self.disks:
            disk.close()
        if ok and self.checkpoint is not None:
            kept = self._connector.checkpoint_dir(self.vm.uuid, self.checkpoint)
            for old in kept.parent.glob("*") if kept.parent.is_dir() else []:
                shutil.rmtree(old)  # older checkpoints of ours may go
            kept.parent.mkdir(parents=True, exist_ok=True)
            self.dir.rename(kept)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


class FileDiskWriter:
    def __init__(self, key: str, path: Path, capacity: int) -> None:
        self.key = key
        self.capacity = capacity
        self.path = path
        with path.open("wb") as f:
            f.truncate(capacity)
        self._fd = os.open(path, os.O_WRONLY)
        self._end = 0
        self._thread: int | None = None

    def write(self, offset: int, data: bytes) -> None:
        me = threading.get_ident()
        if self._thread is None:
            self._thread = me
        if me != self._thread:
            raise AssertionError(f"disk {self.key} written from two threads")
        if offset < self._end or offset + len(data) > self.capacity:
            raise AssertionError(f"disk {self.key}: write at {offset} after {self._end} "
                                 f"or past {self.capacity}")
        os.pwrite(self._fd, data, offset)
        self._end = offset + len(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FileRestoreSession:
    def __init__(self, connector: FileConnector, name: str,
                 disks: list[tuple[str, str, int]]) -> None:
        self._connector = connector
        self.name = name
        self.dir = connector.root / "restored" / name
        self.dir.mkdir(parents=True)
        self.disks = [FileDiskWriter(key, self.dir / f"{key}.img", capacity)
                      for key, _label, capacity in disks]
        self.committed: DiscoveredVm | None = None
        self.aborted = False

    def commit(self) -> DiscoveredVm:
        for d in self.disks:
            d.close()
        self.committed = DiscoveredVm(str(uuidlib.uuid4()), self.name,
                                      f"{HOST}/{self.name}", HOST, ())
        return self.committed

    def abort(self) -> None:
        for d in self.disks:
            d.close()
        self.aborted = True
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class FileConnector:
    """VMs as image files under `root`; one instance serves every job (thread-safe)."""

    root: Path
    vms: dict[str, FileVm] = field(default_factory=dict)
    finished: list[tuple[str, bool]] = field(default_factory=list)
    sessions: dict[str, FileBackupSession] = field(default_factory=dict)
    restores: dict[str, FileRestoreSession] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_vm(self, name: str, disks: dict[str, Path]) -> FileVm:
        vm = FileVm(str(uuidlib.uuid4()), name, disks)
        self.vms[vm.uuid] = vm
        return vm

    def checkpoint_dir(self, vm_uuid: str, checkpoint: str) -> Path:
        return self.root / "checkpoints" / vm_uuid / checkpoint

    # -- Connector ----------------------------------------------------------------------

    def test(self) -> None:
        return None

    def inventory(self) -> list[DiscoveredVm]:
        return [DiscoveredVm(vm.uuid, vm.name, f"{HOST}/{vm.name}", HOST, ())
                for vm in self.vms.values()]

    def close(self) -> None:
        return None

    # -- BackupConnector -----------------------------------------------------------------

    def begin_backup(self, vm_uuid: str, job_id: str,
                     base_checkpoint: str | None) -> FileBackupSession:
        vm = self.vms.get(vm_uuid)
        if vm is None:
            raise HypervisorError(HYPERVISOR_ERROR, f"VM {vm_uuid} does not exist")
        session = FileBackupSession(self, vm, job_id, base_checkpoint)
        with self.lock:
            self.sessions[job_id] = session
        return session

    def restore_options(self) -> tuple[str, ...]:
        return ()

    def begin_restore(self, vm_config: Mapping[str, Any], name: str,
                      options: Mapping[str, str],
                      disks: list[tuple[str, str, int]]) -> FileRestoreSession:
        if (self.root / "restored" / name).exists():
            raise HypervisorError(HYPERVISOR_ERROR, f"vmName: a VM named {name} exists")
        session = FileRestoreSession(self, name, disks)
        with self.lock:
            self.restores[name] = session
        return session
