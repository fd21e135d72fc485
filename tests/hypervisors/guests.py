"""Guests for the backup tests: TCG domains with a qcow2 disk on virtio-scsi and no OS,
written from the test through QEMU's own block layer (`qemu-io` over the monitor), and the
"default" storage pool restores write to. Shared by the connector tests and the end-to-end
tests, on the session's private libvirtd (conftest.py)."""

from __future__ import annotations

import hashlib
import subprocess
import uuid as uuidlib
from pathlib import Path

import libvirtd

MiB = 1024 * 1024
DISK = 64 * MiB


def admin(daemon: libvirtd.Libvirtd) -> object:
    import libvirt
    return libvirt.open(daemon.admin_uri)


def ensure_default_pool(daemon: libvirtd.Libvirtd) -> None:
    """A "default" dir storage pool on the daemon, active (restores write there)."""
    daemon.ensure_pool("default")


class Vm:
    """A TCG domain with one disk (sda, virtio-scsi) and a cdrom, made by the test."""

    def __init__(self, daemon: libvirtd.Libvirtd, name: str, fmt: str = "qcow2",
                 start: bool = True) -> None:
        import libvirt

        self.daemon, self.name, self.fmt = daemon, name, fmt
        self.disk = daemon.domains_dir / f"{name}.{fmt}"
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(self.disk), str(DISK)],
                       check=True)
        # data before the domain starts: 1 MiB of 0x11 at 1 MiB, 3 MiB of varied bytes at 20 MiB
        pattern = daemon.domains_dir / f"{name}.pattern"
        pattern.write_bytes(hashlib.sha256(name.encode()).digest() * (3 * MiB // 32))
        subprocess.run(["qemu-io", "-f", fmt, "-c", "write -P 0x11 1M 1M",
                        "-c", f"write -s {pattern} 20M 3M", str(self.disk)],
                       check=True, stdout=subprocess.DEVNULL)
        self.uuid = str(uuidlib.uuid4())
        xml = f"""<domain type='qemu'><name>{name}</name><uuid>{self.uuid}</uuid>
  <memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <controller type='scsi' model='virtio-scsi'/>
    <disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>
      <source file='{self.disk}'/><target dev='sda' bus='scsi'/></disk>
    <disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>
    <interface type='user'><mac address='52:54:00:aa:bb:01'/><model type='e1000'/></interface>
  </devices>
</domain>"""
        conn = libvirt.open(daemon.admin_uri)
        try:
            dom = conn.defineXML(xml)
            if start:
                dom.create()
        finally:
            conn.close()

    def hmp(self, command: str) -> str:
        done = subprocess.run(["virsh", "-c", self.daemon.admin_uri, "qemu-monitor-command",
                               self.name, "--hmp", command], capture_output=True, text=True,
                              check=True)
        return done.stdout

    def write(self, io: str) -> None:
        """A guest-side write (qemu-io through the running QEMU's block layer), flushed."""
        out = self.hmp(f'qemu-io -d scsi0-0-0-0 "{io}"') + self.hmp(
            'qemu-io -d scsi0-0-0-0 "flush"')
        assert "error" not in out.lower(), out

    def image_sha(self, out: Path) -> str:
        """SHA-256 of the disk's contents now, as raw bytes (qemu-img convert -U)."""
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(self.disk), str(out)],
                       check=True)
        return sha_file(out)

    def checkpoints(self) -> list[str]:
        conn = admin(self.daemon)
        try:
            return sorted(c.getName() for c in conn.lookupByName(self.name).listAllCheckpoints())
        finally:
            conn.close()

    def remove(self) -> None:
        import libvirt

        conn = libvirt.open(self.daemon.admin_uri)
        try:
            dom = conn.lookupByName(self.name)
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()
        self.disk.unlink(missing_ok=True)


def sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * MiB):
            h.update(block)
    return h.hexdigest()
