"""A private libvirtd (with its virtlogd) for the connector tests, listening for SASL over TCP.

Why a mount namespace: libvirtd running as root keeps its state in fixed places (/etc/libvirt
for defined domains, /run/libvirt for sockets and pid files, /var/lib/libvirt, ...). The
daemon is started under `unshare --mount` with a temporary directory bound over each of them,
so the test domains never land in the machine's own libvirt, two daemons (IPv4 and IPv6) can
run at once, and a system libvirtd, if one runs, is not touched. The network is the host's,
so the test reaches it on 127.0.0.1 or [::1] like a remote hypervisor.

SASL: libvirtd reads its SASL configuration from SASL_CONF_PATH (cyrus-sasl honours it for a
process that is not setuid), so /etc/sasl2/libvirt.conf is never written. The mechanism is
DIGEST-MD5: libvirtd refuses a mechanism without a security layer (SSF < 56) on a plain TCP
connection, and SCRAM has none; with TLS (qemu+tls) SCRAM-SHA-256 would do.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
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


@dataclass
class Libvirtd:
    """One running private libvirtd; `uri(...)` builds client URIs for it."""

    root: Path
    listen_host: str
    port: int
    process: subprocess.Popen[bytes]
    started_s: float
    domains_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.domains_dir = self.root / "disks"
        self.domains_dir.mkdir(exist_ok=True)

    @property
    def admin_uri(self) -> str:
        """The daemon's own Unix socket (auth none): how the fixture defines domains."""
        return f"qemu+unix:///system?socket={self.root}/run/libvirt-sock"

    def tcp_uri(self, port: int | None = None) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"qemu+tcp://{host}:{port or self.port}/system"

    def log_text(self) -> str:
        path = self.root / "libvirtd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def define(self, name: str, tags: list[tuple[str, str]] | None = None) -> str:
        """Define (not start) a 128 MiB TCG domain with a small qcow2 disk; returns its
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

    def undefine(self, name: str) -> None:
        import libvirt

        conn = libvirt.open(self.admin_uri)
        try:
            conn.lookupByName(name).undefine()
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop libvirtd, then virtlogd, each by its PID; remove the state directory."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        pid_file = self.root / "virtlogd.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        shutil.rmtree(self.root, ignore_errors=True)


def _config(root: Path, listen_host: str, port: int) -> str:
    return f"""listen_tls = 0
listen_tcp = 1
listen_addr = "{listen_host}"
tcp_port = "{port}"
auth_tcp = "sasl"
auth_unix_rw = "none"
auth_unix_ro = "none"
unix_sock_group = "root"
sasl_allowed_username_list = ["{SASL_USER}"]
log_outputs = "3:file:{root}/libvirtd.log"
"""


def start(listen_host: str, port: int, cache_dir: Path, timeout: float = 30.0) -> Libvirtd:
    """Start a private libvirtd on listen_host:port; returns once its TCP port accepts.

    `cache_dir` is bound over /var/cache/libvirt and kept between runs: libvirt probes QEMU's
    capabilities (about 4 s under TCG here) before the first domain is defined and caches
    the result there, checked against the QEMU binary's and libvirtd's timestamps."""
    import socket

    start_s = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="bg-libvirtd-"))
    for directory in BOUND_DIRS:
        (root / directory.strip("/").replace("/", "_")).mkdir()
    sasl_dir = root / "sasl2"
    sasl_dir.mkdir()
    sasldb = root / "passwd.db"
    (sasl_dir / "libvirt.conf").write_text(f"mech_list: digest-md5\nsasldb_path: {sasldb}\n")
    subprocess.run(["saslpasswd2", "-a", "libvirt", "-f", str(sasldb), "-c", "-p", SASL_USER],
                   input=SASL_PASSWORD.encode(), check=True)
    (root / "libvirtd.conf").write_text(_config(root, listen_host, port))
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
    process = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env=env, stdout=subprocess.DEVNULL, stderr=open(root / "stderr.log", "wb"))  # noqa: SIM115
    daemon = Libvirtd(root, listen_host, port, process, 0.0)
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
