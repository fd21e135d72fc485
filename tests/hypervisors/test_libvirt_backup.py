"""Backups and restores of libvirt VMs against the private libvirtd: real QEMU domains under
TCG (no guest OS: the disks are written from the test through QEMU's own block layer, with
`qemu-io` over the monitor), pull-mode backups read over NBD with libnbd, restores through
libvirt's storage API. Nothing is mocked.

What "the disk at the backup's instant" is: the domains have no OS, so nothing writes their
disks but the test; `qemu-img convert -U` of the disk right after begin_backup (before the
test writes again) is the disk at that instant.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import libvirtd
import pytest
from guests import DISK, MiB, Vm, admin, ensure_default_pool, sha_file

from appliance.hypervisors import HypervisorError, Target, connector_for
from appliance.hypervisors.libvirt import LibvirtConnector
from appliance.hypervisors.libvirtbackup import SCRATCH_MARK
from gatewaycore.manifest import ALIGN, CHUNK_SIZE, cut

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]



# -- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(libvirt_daemon: libvirtd.Libvirtd) -> Iterator[libvirtd.Libvirtd]:
    """The session's libvirtd with a "default" dir storage pool for restores."""
    ensure_default_pool(libvirt_daemon)
    yield libvirt_daemon


@pytest.fixture()
def connector(daemon: libvirtd.Libvirtd) -> Iterator[LibvirtConnector]:
    c = connector_for(Target(daemon.tcp_uri(), libvirtd.SASL_USER, libvirtd.SASL_PASSWORD))
    assert isinstance(c, LibvirtConnector)
    yield c
    c.close()


@pytest.fixture()
def vm(daemon: libvirtd.Libvirtd, request: pytest.FixtureRequest) -> Iterator[Vm]:
    machine = Vm(daemon, request.node.name.replace("_", "-")[:40])
    yield machine
    machine.remove()


def read_all(reader: object) -> dict[int, bytes]:
    """Every extent of a DiskReader, read in chunk-cut pieces by 4 threads as the job runner
    does (one NBD connection each)."""
    pieces = [p for o, n in reader.extents() for p in cut(o, n)]  # type: ignore[attr-defined]
    with ThreadPoolExecutor(4) as pool:
        datas = list(pool.map(lambda p: reader.read(*p), pieces))  # type: ignore[attr-defined]
    return {o: d for (o, _), d in zip(pieces, datas, strict=True)}


def image(capacity: int, *layers: dict[int, bytes]) -> bytes:
    out = bytearray(capacity)
    for layer in layers:
        for offset, data in layer.items():
            out[offset:offset + len(data)] = data
    return bytes(out)


def scratch_files(daemon: libvirtd.Libvirtd) -> list[Path]:
    return list(daemon.domains_dir.glob(f"*{SCRATCH_MARK}*"))


# -- backups --------------------------------------------------------------------------------


def test_full_then_incremental_point_in_time(vm: Vm, connector: LibvirtConnector,
                                             tmp_path: Path) -> None:
    full = connector.begin_backup(vm.uuid, "job-full", None)
    try:
        at_begin = vm.image_sha(tmp_path / "begin.raw")
        vm.write("write -P 0x5a 0 1M")      # after begin: must not be in this backup
        assert not full.incremental and full.note == "" and full.checkpoint
        assert full.checkpoint.startswith("bg-job-full-")
        (disk,) = full.disks                 # the cdrom is skipped
        assert (disk.key, disk.label, disk.capacity) == ("sda", vm.disk.name, DISK)
        # only the allocated data: 1 MiB at 1 MiB and 3 MiB at 20 MiB, nothing of the holes
        assert disk.extents() == [(1 * MiB, 1 * MiB), (20 * MiB, 3 * MiB)]
        data = read_all(disk)
        assert hashlib.sha256(image(DISK, data)).hexdigest() == at_begin
        config = full.vm_config
        assert config["kind"] == "libvirt" and config["uuid"] == vm.uuid
        assert config["disks"] == [{"key": "sda", "label": vm.disk.name, "capacity": DISK,
                                    "format": "qcow2"}]
        assert f"<name>{vm.name}</name>" in config["domainXml"]
    finally:
        full.finish(ok=True)
    full.finish(ok=True)                     # idempotent
    assert scratch_files(vm.daemon) == []
    assert vm.checkpoints() == [full.checkpoint]

    # a write over data with zeros must be listed (it overrides the base), like new data
    vm.write("write -P 0x77 5M 100k")
    vm.write("write -z 21M 64k")
    inc = connector.begin_backup(vm.uuid, "job-inc", full.checkpoint)
    try:
        now = vm.image_sha(tmp_path / "now.raw")
        assert inc.incremental and inc.note == "" and inc.checkpoint != full.checkpoint
        (disk,) = inc.disks
        # rounded to the bitmap's 64 KiB: 100k at 5M dirties two granules
        assert disk.extents() == [(0, 1 * MiB), (5 * MiB, 2 * ALIGN), (21 * MiB, ALIGN)]
        changes = read_all(disk)
        assert changes[21 * MiB] == bytes(ALIGN)
        assert hashlib.sha256(image(DISK, data, changes)).hexdigest() == now
    finally:
        inc.finish(ok=True)
    assert vm.checkpoints() == [inc.checkpoint]   # the older one went with success


def test_deleted_checkpoint_gives_full_with_note_and_failure_keeps_base(
        vm: Vm, connector: LibvirtConnector) -> None:
    first = connector.begin_backup(vm.uuid, "j1", None)
    first.finish(ok=True)
    second = connector.begin_backup(vm.uuid, "j2", first.checkpoint)
    assert second.incremental
    second.finish(ok=False)                   # not durable: its checkpoint is no valid base
    assert vm.checkpoints() == [first.checkpoint]

    conn = admin(vm.daemon)
    try:
        conn.lookupByName(vm.name).checkpointLookupByName(first.checkpoint).delete(0)
    finally:
        conn.close()
    third = connector.begin_backup(vm.uuid, "j3", first.checkpoint)
    try:
        assert not third.incremental
        assert third.note == f"checkpoint {first.checkpoint} is gone: full backup"
        assert sum(n for _, n in third.disks[0].extents()) == 4 * MiB
    finally:
        third.finish(ok=True)


def test_leftover_job_of_a_dead_gateway_is_ended(vm: Vm, connector: LibvirtConnector,
                                                 daemon: libvirtd.Libvirtd) -> None:
    dead = connector.begin_backup(vm.uuid, "dead", None)  # never finished: the gateway "died"
    assert len(scratch_files(daemon)) == 1
    other = connector_for(Target(daemon.tcp_uri(), libvirtd.SASL_USER, libvirtd.SASL_PASSWORD))
    try:
        fresh = other.begin_backup(vm.uuid, "after", None)  # type: ignore[attr-defined]
        try:
            (left,) = scratch_files(daemon)
            assert SCRATCH_MARK + "after-" in left.name
            with pytest.raises(HypervisorError):
                dead.disks[0].read(1 * MiB, 4096)  # its export is gone
            assert fresh.disks[0].read(1 * MiB, 4096) == b"\x11" * 4096
        finally:
            fresh.finish(ok=True)
    finally:
        other.close()
    dead.finish(ok=False)
    assert scratch_files(daemon) == []
    assert vm.checkpoints() == [fresh.checkpoint]


def test_raw_disk_and_shut_off_vm(daemon: libvirtd.Libvirtd, connector: LibvirtConnector,
                                  tmp_path: Path) -> None:
    """A raw disk cannot carry a bitmap: no checkpoint, full each time. A shut-off VM is
    run paused for the backup and stopped again by finish."""
    machine = Vm(daemon, "raw-off", fmt="raw", start=False)
    try:
        expected = machine.image_sha(tmp_path / "raw.raw")
        session = connector.begin_backup(machine.uuid, "raw", "bg-anything")
        try:
            assert session.checkpoint is None and not session.incremental
            assert "not qcow2" in session.note
            (disk,) = session.disks
            assert hashlib.sha256(image(DISK, read_all(disk))).hexdigest() == expected
        finally:
            session.finish(ok=True)
        conn = admin(daemon)
        try:
            assert not conn.lookupByName("raw-off").isActive()
        finally:
            conn.close()
    finally:
        machine.remove()


def test_unknown_vm_is_named(connector: LibvirtConnector) -> None:
    missing = str(uuidlib.uuid4())
    with pytest.raises(HypervisorError) as info:
        connector.begin_backup(missing, "j", None)
    assert info.value.code == "HypervisorError" and missing in info.value.message


# -- restores -------------------------------------------------------------------------------


def restore(connector: LibvirtConnector, session: object, name: str, **options: str) -> object:
    disks = [(d.key, d.label, d.capacity) for d in session.disks]  # type: ignore[attr-defined]
    return connector.begin_restore(session.vm_config, name,  # type: ignore[attr-defined]
                                   options, disks)


def test_restore_makes_a_new_domain_with_the_same_disk(vm: Vm, connector: LibvirtConnector,
                                                       tmp_path: Path) -> None:
    import libvirt

    backup = connector.begin_backup(vm.uuid, "for-restore", None)
    try:
        source_sha = vm.image_sha(tmp_path / "source.raw")
        data = read_all(backup.disks[0])
        target = restore(connector, backup, f"{vm.name}-copy")
    finally:
        backup.finish(ok=True)
    (writer,) = target.disks  # type: ignore[attr-defined]
    for offset in sorted(data):               # increasing offsets, holes between
        writer.write(offset, data[offset])
    made = target.commit()  # type: ignore[attr-defined]
    assert made.name == f"{vm.name}-copy" and made.uuid != vm.uuid
    assert made.path == f"127.0.0.1/{made.name}"
    conn = libvirt.open(vm.daemon.admin_uri)
    try:
        dom = conn.lookupByName(made.name)
        assert not dom.isActive() and dom.listAllCheckpoints() == []
        root = ET.fromstring(dom.XMLDesc(0))
        (disk, cdrom) = root.findall("devices/disk")
        path = disk.find("source").get("file")
        assert path == str(vm.daemon.root / "pool-default" / f"{made.name}-sda.qcow2")
        assert cdrom.get("device") == "cdrom" and cdrom.find("source") is None
        mac = root.find("devices/interface/mac").get("address")
        assert mac != "52:54:00:aa:bb:01"
        info = subprocess.run(["qemu-img", "info", "--output=json", path], check=True,
                              capture_output=True, text=True).stdout
        assert '"format": "qcow2"' in info and '"compat": "1.1"' in info
        restored = tmp_path / "restored.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", path, str(restored)], check=True)
        assert sha_file(restored) == source_sha
        pool = conn.storagePoolLookupByName("default")
        pool.refresh()
        assert sorted(pool.listVolumes()) == [f"{made.name}-sda.qcow2"]  # no staging left
        dom.create()                          # a definition QEMU accepts
        dom.destroy()

        with pytest.raises(HypervisorError) as info_exists:
            restore(connector, backup, made.name)
        assert repr(made.name) in info_exists.value.message
        assert "already exists" in info_exists.value.message
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(made.name).undefine()
        with contextlib.suppress(libvirt.libvirtError):
            conn.storagePoolLookupByName("default").storageVolLookupByName(
                f"{made.name}-sda.qcow2").delete(0)
        conn.close()


def test_restore_refusals_and_abort(vm: Vm, connector: LibvirtConnector) -> None:
    import libvirt

    backup = connector.begin_backup(vm.uuid, "refusals", None)
    try:
        with pytest.raises(HypervisorError) as info:
            restore(connector, backup, "nowhere-vm", storagePool="no-such-pool")
        assert "'no-such-pool' does not exist" in info.value.message
        assert "its pools: default" in info.value.message
        data = read_all(backup.disks[0])
        target = restore(connector, backup, "aborted-vm", storagePool="default")
    finally:
        backup.finish(ok=True)
    conn = libvirt.open(vm.daemon.admin_uri)
    try:
        pool = conn.storagePoolLookupByName("default")
        pool.refresh()
        assert "aborted-vm-sda.restore.raw" in pool.listVolumes()
        (writer,) = target.disks  # type: ignore[attr-defined]
        first = min(data)
        writer.write(first, data[first])
        target.abort()  # type: ignore[attr-defined]
        target.abort()  # type: ignore[attr-defined]  # idempotent
        pool.refresh()
        assert not [v for v in pool.listVolumes() if v.startswith("aborted-vm")]
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName("aborted-vm")
    finally:
        conn.close()
    with pytest.raises(HypervisorError):
        writer.write(CHUNK_SIZE * 15, b"x")   # the session is over


def test_a_refused_export_name_is_a_hypervisor_error(vm: Vm,
                                                     connector: LibvirtConnector) -> None:
    """The NBD server refuses an export it does not serve: the reader says so as a
    HypervisorError (libnbd's bindings have no close(); letting go of the handle must not
    turn the refusal into an AttributeError)."""
    import dataclasses

    from appliance.hypervisors.libvirtbackup import NbdDiskReader

    session = connector.begin_backup(vm.uuid, "job-refused", None)
    try:
        (disk,) = session.disks
        assert isinstance(disk, NbdDiskReader)
        wrong = dataclasses.replace(disk._export, exportname="no-such-export")
        with pytest.raises(HypervisorError, match="connecting to disk sda") as err:
            NbdDiskReader(wrong, disk._address, disk._port, disk._timeout, False)
        assert "no-such-export" in err.value.message
        assert disk.extents()  # the real export still reads
    finally:
        session.finish(False)
