"""A private libvirtd (with its virtlogd), listening for SASL over TCP: the hypervisor that the
connector tests, the VM test and the README's demo (tools/demohypervisor.py) connect to.

Why a mount namespace: libvirtd running as root keeps its state in fixed places (/etc/libvirt
for defined domains, /run/libvirt for sockets and pid files, /var/lib/libvirt, ...). The
daemon is started under `unshare --mount` with a directory of ours bound over each of them,
so its domains never land in the machine's own libvirt, several daemons (IPv4 and IPv6, the
tests and the demo) can run at once, and a system libvirtd, if one runs, is not touched. The
network is the host's, so a client reaches it on 127.0.0.1 or [::1] like a remote hypervisor.
Hence root: `unshare --mount` and libvirtd's system mode need it.

SASL: libvirtd reads its SASL configuration from SASL_CONF_PATH (cyrus-sasl honours it for a
process that is not setuid), so /etc/sasl2/libvirt.conf is never written. The mechanism is
DIGEST-MD5: libvirtd refuses a mechanism without a security layer (SSF < 56) on a plain TCP
connection, and SCRAM has none; with TLS (qemu+tls) SCRAM-SHA-256 would do.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import quoteattr

BOUND_DIRS = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt",
              "/var/cache/libvirt")
TAGS_NS = "https://backup-gateway.invalid/tags/1"
SASL_USER = "bgtest"
SASL_PASSWORD = "S3cret-libvirt-pw"
REQUIRED_PROGRAMS = ("libvirtd", "virtlogd", "unshare", "saslpasswd2", "qemu-img")


@dataclass
class Libvirtd:
    """One running private libvirtd; `tcp_uri(...)` builds client URIs for it.

    `process` is None for a daemon this process did not start (the demo's `stop`, a later
    command): then `pid` is read from the daemon's pid file."""

    root: Path
    listen_host: str
    port: int
    process: subprocess.Popen[bytes] | None
    started_s: float
    sasl_user: str = SASL_USER
    domains_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.domains_dir = self.root / "disks"
        self.domains_dir.mkdir(exist_ok=True)

    @property
    def pid(self) -> int:
        if self.process is not None:
            return self.process.pid
        return int((self.root / "libvirtd.pid").read_text().strip())

    @property
    def admin_uri(self) -> str:
        """The daemon's own Unix socket (auth none): how domains are defined."""
        return f"qemu+unix:///system?socket={self.root}/run/libvirt-sock"

    def tcp_uri(self, port: int | None = None) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"qemu+tcp://{host}:{port or self.port}/system"

    def log_text(self) -> str:
        path = self.root / "libvirtd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def define(self, name: str, tags: list[tuple[str, str]] | None = None) -> str:
        """Define (not start) a 128 MiB TCG domain with a small empty qcow2 disk; returns its
        UUID. Tags go into the domain's <metadata> as the connector reads them."""
        import libvirt

        disk = self.domains_dir / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"],
                       check=True)
        dom_uuid = str(uuidlib.uuid4())
        metadata = ""
        if tags is not None:
            items = "".join(f"<bg:tag key={quoteattr(k)} value={quoteattr(v)}/>" for k, v in tags)
            metadata = f"<metadata><bg:tags xmlns:bg='{TAGS_NS}'>{items}</bg:tags></metadata>"
        xml = f"""<domain type='qemu'>
  <name>{name}</name><uuid>{dom_uuid}</uuid>
  <memory unit='MiB'>128</memory><vcpu>1</vcpu>{metadata}
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <controller type='scsi' model='virtio-scsi'/>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{disk}'/><target dev='sda' bus='scsi'/></disk>
  </devices>
</domain>"""
        conn = libvirt.open(self.admin_uri)
        try:
            conn.defineXML(xml)
        finally:
            conn.close()
        return dom_uuid

    def ensure_pool(self, name: str = "default") -> None:
        """A dir storage pool `name` (in this daemon's directory), defined and active:
        where restores write the new VMs' disks."""
        import libvirt

        pool_dir = self.root / f"pool-{name}"
        pool_dir.mkdir(exist_ok=True)
        conn = libvirt.open(self.admin_uri)
        try:
            try:
                pool = conn.storagePoolLookupByName(name)
            except libvirt.libvirtError:
                pool = conn.storagePoolDefineXML(
                    f"<pool type='dir'><name>{name}</name><target><path>{pool_dir}</path>"
                    "</target></pool>")
            if not pool.isActive():
                pool.create()
        finally:
            conn.close()

    def write_data(self, name: str, seed: bytes, writes: tuple[tuple[int, int], ...] = (
            (1 << 20, 1 << 20), (8 << 20, 2 << 20))) -> None:
        """Data in a defined, stopped domain's disk (from define()): at each (offset, length),
        bytes made from `seed` (SHA-256 in counter mode: incompressible, reproducible), so a
        backup has something to send. Written with qemu-io while QEMU does not run."""
        disk = self.domains_dir / f"{name}.qcow2"
        blob = self.domains_dir / f"{name}.data"
        try:
            for offset, length in writes:
                blob.write_bytes(b"".join(hashlib.sha256(seed + i.to_bytes(8, "big")).digest()
                                          for i in range(length // 32)))
                subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                                f"write -s {blob} {offset} {length}", str(disk)],
                               check=True, stdout=subprocess.DEVNULL)
        finally:
            blob.unlink(missing_ok=True)

    def undefine(self, name: str) -> None:
        import libvirt

        conn = libvirt.open(self.admin_uri)
        try:
            conn.lookupByName(name).undefine()
        finally:
            conn.close()

    def stop(self, remove: bool = True, timeout: float = 15.0) -> None:
        """Stop libvirtd, then virtlogd, each by its PID; remove the state directory unless
        `remove` is false. A daemon that outlives `timeout` after SIGTERM gets SIGKILL."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(5)
        else:
            with contextlib.suppress(OSError, ValueError):
                pid = self.pid
                if _is_our_libvirtd(pid, self.root):
                    os.kill(pid, signal.SIGTERM)
                    if not _wait_gone(pid, timeout):
                        os.kill(pid, signal.SIGKILL)
                        _wait_gone(pid, 5)
        pid_file = self.root / "virtlogd.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)


def _is_our_libvirtd(pid: int, root: Path) -> bool:
    """Whether `pid` is still the libvirtd started with root's config (not a reused PID)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(root / "libvirtd.conf").encode() in argv


def _wait_gone(pid: int, timeout: float) -> bool:
    """Until `pid` is gone (it is not our child: no wait(), so /proc is watched)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state == "Z":  # exited, waiting for a parent that is not us to reap it
            return True
        time.sleep(0.05)
    return False


def missing_programs() -> list[str]:
    return [p for p in REQUIRED_PROGRAMS if shutil.which(p) is None]


def _config(root: Path, listen_host: str, port: int, sasl_user: str) -> str:
    return f"""listen_tls = 0
listen_tcp = 1
listen_addr = "{listen_host}"
tcp_port = "{port}"
auth_tcp = "sasl"
auth_unix_rw = "none"
auth_unix_ro = "none"
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
unix_sock_admin_perms = "0700"
sasl_allowed_username_list = ["{sasl_user}"]
log_outputs = "3:file:{root}/libvirtd.log"
"""


def start(listen_host: str, port: int, cache_dir: Path, timeout: float = 30.0, *,
          root: Path | None = None, sasl_user: str = SASL_USER,
          sasl_password: str = SASL_PASSWORD, detach: bool = False) -> Libvirtd:
    """Start a private libvirtd on listen_host:port; returns once its TCP port accepts.

    `root` is the daemon's state directory (made now, empty or absent; a new temporary one if
    None). `detach` starts it in a session of its own, so it outlives this process and the
    terminal's Ctrl-C (the demo); its PID is then in root/libvirtd.pid.

    `cache_dir` is bound over /var/cache/libvirt and kept between runs: libvirt probes QEMU's
    capabilities (about 4 s under TCG here) before the first domain is defined and caches
    the result there, checked against the QEMU binary's and libvirtd's timestamps."""
    start_s = time.monotonic()
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="bg-libvirtd-"))
    else:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for directory in BOUND_DIRS:
        (root / directory.strip("/").replace("/", "_")).mkdir()
    sasl_dir = root / "sasl2"
    sasl_dir.mkdir()
    sasldb = root / "passwd.db"
    (sasl_dir / "libvirt.conf").write_text(f"mech_list: digest-md5\nsasldb_path: {sasldb}\n")
    subprocess.run(["saslpasswd2", "-a", "libvirt", "-f", str(sasldb), "-c", "-p", sasl_user],
                   input=sasl_password.encode(), check=True)
    (root / "libvirtd.conf").write_text(_config(root, listen_host, port, sasl_user))
    # QEMU as root in this private daemon: libvirt checks /dev/kvm as the QEMU user, and on
    # this machine kind root's probe sees KVM while libvirt-qemu's access check does not, so
    # the cached capabilities were judged outdated and re-probed (40 s) on every define.
    (root / "etc_libvirt" / "qemu.conf").write_text('user = "root"\ngroup = "root"\n')
    (root / "virtlogd.conf").write_text(f'log_outputs = "3:file:{root}/virtlogd.log"\n')
    cache_dir.mkdir(parents=True, exist_ok=True)
    sources = {d: root / d.strip("/").replace("/", "_") for d in BOUND_DIRS}
    sources["/var/cache/libvirt"] = cache_dir
    binds = " ".join(f"mkdir -p {d} && mount --bind {src} {d} &&" for d, src in sources.items())
    script = (f"{binds} virtlogd -d -f {root}/virtlogd.conf -p {root}/virtlogd.pid && "
              f"exec libvirtd --listen -f {root}/libvirtd.conf -p {root}/libvirtd.pid")
    env = dict(os.environ, SASL_CONF_PATH=str(sasl_dir))
    # the bound /run/libvirt is root/run_libvirt: link a short name for the admin URI
    (root / "run").symlink_to(root / "run_libvirt")
    with open(root / "stderr.log", "wb") as stderr:
        process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=detach)
    daemon = Libvirtd(root, listen_host, port, process, 0.0, sasl_user)
    family = socket.AF_INET6 if ":" in listen_host else socket.AF_INET
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            text = (root / "stderr.log").read_text(errors="replace") + daemon.log_text()
            daemon.stop()
            raise RuntimeError(f"libvirtd exited with {process.returncode}: {text[-2000:]}")
        with socket.socket(family) as sock:
            if sock.connect_ex((listen_host, port)) == 0 and (root / "run/libvirt-sock").exists():
                break
        if time.monotonic() > deadline:
            daemon.stop()
            raise RuntimeError(f"libvirtd did not listen on {listen_host}:{port} in {timeout}s")
        time.sleep(0.05)
    daemon.started_s = time.monotonic() - start_s
    return daemon
