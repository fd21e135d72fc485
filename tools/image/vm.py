"""Boot the appliance's OVA in QEMU: one place that knows the disk, firmware and network flags.

Used by tools/run-vm.sh (`make run`) and by the VM tests, so both boot the image the same way:

- the OVA's streamOptimized VMDK, read-only, under a qcow2 overlay (QEMU cannot write it);
- SeaBIOS or OVMF (the image boots under both);
- QEMU user networking with `restrict=on`: the guest can send nothing beyond this host. Port
  80 is forwarded from 127.0.0.1, and the guest's 10.0.2.100:8443 is relayed (guestfwd, one
  `relay` process per connection) to the control plane on the host's loopback; when asked
  (`hypervisor_port`), the guest's 10.0.2.101:16509 is relayed the same way to a libvirtd on
  the host's loopback (`qemu+tcp://10.0.2.101/system` in the guest), with libvirt's NBD
  backup ports (10809-10872, where a pull-mode backup serves the disks the gateway reads)
  relayed from 10.0.2.101 to the same ports of the host's loopback, and nothing else is;
- the control plane's URL handed to the guest as an SMBIOS OEM string, which the image's
  appliance-guestconfig.service writes into the daemon's settings at boot;
- optionally a virtio-serial port for qemu-guest-agent (what tests use inside the guest) and
  the serial console on a Unix socket with a log file.

`python3 tools/image/vm.py argv ...` prints the QEMU command line NUL-separated for shell
scripts; `python3 tools/image/vm.py relay HOST PORT` is the per-connection relay.
"""

from __future__ import annotations

import argparse
import os
import selectors
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

# libvirt's backup_port_min..max (qemu.conf): the ports a libvirt backup's NBD server takes
# (appliance/hypervisors/libvirtbackup.py; a test checks the two agree)
NBD_PORTS = range(10809, 10873)
GUEST_CONTROL_PLANE = ("10.0.2.100", 8443)
# libvirt's own TCP port, so the guest's URI is the same whatever port the host's daemon has
GUEST_HYPERVISOR = ("10.0.2.101", 16509)
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
SMBIOS_PREFIX = "backupgateway."


def extract_disk(ova: Path, dest: Path) -> Path:
    """The OVA's VMDK, extracted to `dest` (reused while the OVA is unchanged)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(ova) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(".vmdk")), None)
        if member is None:
            raise SystemExit(f"{ova}: no .vmdk inside")
        target = dest / Path(member.name).name
        stamp = f"{ova.stat().st_size}:{ova.stat().st_mtime_ns}"
        stamp_file = target.with_suffix(".from-ova")
        if target.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
            return target
        src = tar.extractfile(member)
        assert src is not None
        tmp = target.with_suffix(".partial")
        with src, tmp.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        tmp.replace(target)
        stamp_file.write_text(stamp)
    return target


def make_overlay(disk: Path, overlay: Path) -> Path:
    """A fresh qcow2 overlay over the read-only VMDK: the VM's writable disk."""
    overlay.unlink(missing_ok=True)
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(disk.resolve()),
            "-F",
            "vmdk",
            str(overlay),
        ],
        check=True,
    )
    return overlay


@dataclass
class VmConfig:
    overlay: Path
    http_port: int  # host loopback port forwarded to the guest's port 80
    control_plane_port: int  # the control plane on the host's loopback
    accel: str = "tcg"
    firmware: str = "bios"  # or "uefi"
    memory_mib: int = 1024
    cpus: int = 2
    serial: str = "stdio"  # "stdio" (with -nographic) or a Unix socket path
    serial_log: Path | None = None
    qga_socket: Path | None = None
    ovmf_vars: Path | None = None  # a writable copy, made beside the overlay if None
    # a libvirtd on the host's loopback, reached by the guest at GUEST_HYPERVISOR; None: no relay
    hypervisor_port: int | None = None

    def argv(self) -> list[str]:
        cp_host, cp_port = GUEST_CONTROL_PLANE
        netdev = (
            "user,id=net0,restrict=on,"
            f"hostfwd=tcp:127.0.0.1:{self.http_port}-:80,"
            f"{guestfwd(cp_host, cp_port, self.control_plane_port)}"
        )
        if self.hypervisor_port is not None:
            hv_host, hv_port = GUEST_HYPERVISOR
            netdev += f",{guestfwd(hv_host, hv_port, self.hypervisor_port)}"
            # a backup's NBD exports: libvirtbackup listens on every address when the
            # hypervisor's URI address (10.0.2.101 here) is not the host's own
            netdev += "".join(f",{guestfwd(hv_host, p, p)}" for p in NBD_PORTS)
        smbios_url = f"{SMBIOS_PREFIX}control_plane_url=http://{cp_host}:{cp_port}"
        accel = "kvm:tcg" if self.accel == "kvm" else self.accel
        argv = [
            "qemu-system-x86_64",
            "-machine",
            f"q35,accel={accel}",
            "-m",
            str(self.memory_mib),
            "-smp",
            str(self.cpus),
            "-nodefaults",
            "-no-user-config",
            "-drive",
            f"file={self.overlay},format=qcow2,if=virtio,discard=unmap",
            "-netdev",
            netdev,
            "-device",
            "virtio-net-pci,netdev=net0",
            "-smbios",
            f"type=11,value={smbios_url}",
            "-device",
            "virtio-rng-pci",
            "-vga",
            "std",
            "-display",
            "none",
        ]
        if self.firmware == "uefi":
            vars_file = self.ovmf_vars or self.overlay.with_suffix(".ovmf-vars.fd")
            if not vars_file.exists():
                shutil.copyfile(OVMF_VARS, vars_file)
            argv += [
                "-drive",
                f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                "-drive",
                f"if=pflash,format=raw,unit=1,file={vars_file}",
            ]
        if self.serial == "stdio":
            log = f",logfile={self.serial_log}" if self.serial_log else ""
            argv += [
                "-chardev",
                f"stdio,id=ser0,mux=on,signal=off{log}",
                "-serial",
                "chardev:ser0",
                "-mon",
                "chardev=ser0,mode=readline",
            ]
        else:
            log = f",logfile={self.serial_log}" if self.serial_log else ""
            argv += [
                "-chardev",
                f"socket,id=ser0,path={self.serial},server=on,wait=off{log}",
                "-serial",
                "chardev:ser0",
                "-monitor",
                "none",
            ]
        if self.qga_socket is not None:
            argv += [
                "-chardev",
                f"socket,id=qga0,path={self.qga_socket},server=on,wait=off",
                "-device",
                "virtio-serial-pci",
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ]
        return argv


def guestfwd(guest_host: str, guest_port: int, host_port: int) -> str:
    """The -netdev user option relaying the guest's guest_host:guest_port, one `relay`
    process per connection, to 127.0.0.1:host_port (commas doubled: QEMU's option quoting)."""
    relay_cmd = " ".join(
        shlex.quote(a)
        for a in (sys.executable, str(Path(__file__).resolve()), "relay", "127.0.0.1",
                  str(host_port))
    )
    return f"guestfwd=tcp:{guest_host}:{guest_port}-cmd:{relay_cmd.replace(',', ',,')}"


def relay(host: str, port: int) -> int:
    """Copy bytes between stdin/stdout (QEMU's end of a guest connection) and HOST:PORT."""
    try:
        upstream = socket.create_connection((host, port), timeout=10)
    except OSError as exc:
        print(f"relay: cannot reach {host}:{port}: {exc}", file=sys.stderr)
        return 1
    upstream.settimeout(None)
    guest_in, guest_out = sys.stdin.fileno(), sys.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(guest_in, selectors.EVENT_READ, "guest")
    sel.register(upstream, selectors.EVENT_READ, "upstream")
    open_ends = 2
    while open_ends:
        for key, _ in sel.select():
            if key.data == "guest":
                data = os.read(guest_in, 65536)
                if data:
                    upstream.sendall(data)
                else:
                    sel.unregister(guest_in)
                    upstream.shutdown(socket.SHUT_WR)
                    open_ends -= 1
            else:
                data = upstream.recv(65536)
                if data:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(guest_out, view) :]
                else:
                    sel.unregister(upstream)
                    os.close(guest_out)
                    open_ends -= 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("argv", help="prepare the disk and print QEMU's argv, NUL-separated")
    a.add_argument("--ova", type=Path, required=True)
    a.add_argument("--workdir", type=Path, required=True)
    a.add_argument("--http-port", type=int, default=8080)
    a.add_argument("--control-plane-port", type=int, default=8443)
    a.add_argument("--hypervisor-port", type=int, default=None,
                   help=f"relay the guest's {GUEST_HYPERVISOR[0]}:{GUEST_HYPERVISOR[1]} to "
                   "this port on the host's loopback (a libvirtd); none by default")
    a.add_argument("--accel", default="tcg")
    a.add_argument("--firmware", choices=["bios", "uefi"], default="bios")
    a.add_argument("--memory-mib", type=int, default=2048)
    a.add_argument("--fresh", action="store_true", help="a new overlay even if one exists")
    r = sub.add_parser("relay", help="stdin/stdout <-> HOST:PORT (QEMU guestfwd cmd)")
    r.add_argument("host")
    r.add_argument("port", type=int)
    args = parser.parse_args(argv)
    if args.cmd == "relay":
        return relay(args.host, args.port)
    disk = extract_disk(args.ova, args.workdir)
    overlay = args.workdir / "overlay.qcow2"
    # The overlay (the VM's own disk: its identity, its activation) lives until the OVA changes.
    if args.fresh or not overlay.exists() or overlay.stat().st_mtime < disk.stat().st_mtime:
        make_overlay(disk, overlay)
        overlay.with_suffix(".ovmf-vars.fd").unlink(missing_ok=True)
    cfg = VmConfig(
        overlay,
        args.http_port,
        args.control_plane_port,
        accel=args.accel,
        firmware=args.firmware,
        memory_mib=args.memory_mib,
        serial_log=args.workdir / "serial.log",
        hypervisor_port=args.hypervisor_port,
    )
    sys.stdout.write("\0".join(cfg.argv()) + "\0")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, 20 s to exit cleanly, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
