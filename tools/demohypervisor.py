"""A demo KVM host for the README: a private libvirtd on this machine's loopback, with two
small domains to discover and back up, that the appliance (in `make run`'s VM, or on a
laptop) imports.

    python -m tools.demohypervisor start [--port 16509] [--listen 127.0.0.1]
    python -m tools.demohypervisor password     # prints the SASL password again
    python -m tools.demohypervisor stop

It is the daemon the tests use (tools/libvirtd.py): libvirtd in a mount namespace of its own,
so nothing lands in the machine's libvirt; hence it must run as root. SASL user `demo`, with a
password made at `start`, printed once and kept (0600) in the state directory so `password`
can print it again. The two domains (`demo-web`, `demo-db`) are defined, never started: they
have no OS and a 16 MiB disk with 3 MiB of data (a backup starts a stopped domain paused
while it reads); restores write to the storage pool `default`. `start` returns once the daemon
listens, leaving it running on its own; `stop` stops it by the PID `start` recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import socket
import string
import sys
from pathlib import Path

from tools import libvirtd

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / "build" / "demo-hypervisor"
LIBVIRT_CACHE = REPO / "build" / "libvirt-cache"
USER = "demo"
DEFAULT_PORT = 16509  # libvirt's own; `make run` relays the VM's 10.0.2.101:16509 to it
DOMAINS: tuple[tuple[str, list[tuple[str, str]]], ...] = (
    ("demo-web", [("env", "demo"), ("app", "web")]),
    ("demo-db", [("env", "demo")]),
)


def _state(directory: Path) -> dict[str, object] | None:
    try:
        return dict(json.loads((directory / "state.json").read_text()))
    except (OSError, ValueError):
        return None


def _daemon(directory: Path, state: dict[str, object]) -> libvirtd.Libvirtd:
    return libvirtd.Libvirtd(directory / "daemon", str(state["listen"]), int(str(state["port"])),
                             None, 0.0, USER)


def _running(directory: Path) -> dict[str, object] | None:
    """The recorded state if its libvirtd still runs (a stale record is not a running one)."""
    state = _state(directory)
    if state is None:
        return None
    return state if libvirtd._is_our_libvirtd(int(str(state["pid"])),
                                              directory / "daemon") else None


def _password() -> str:
    # letters and digits only: it is pasted into shells and never starts with "-"
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(24))


def start(directory: Path, listen: str, port: int) -> int:
    if os.geteuid() != 0:
        print("demohypervisor: run as root (libvirtd runs in its own mount namespace)",
              file=sys.stderr)
        return 1
    missing = libvirtd.missing_programs()
    if missing:
        print(f"demohypervisor: missing {', '.join(missing)}: run tools/install-deps.sh",
              file=sys.stderr)
        return 1
    running = _running(directory)
    if running is not None:
        print(f"demohypervisor: already running (PID {running['pid']}, port {running['port']});"
              " `stop` it first", file=sys.stderr)
        return 1
    family = socket.AF_INET6 if ":" in listen else socket.AF_INET
    with socket.socket(family) as probe:
        try:
            probe.bind((listen, port))
        except OSError as exc:
            print(f"demohypervisor: cannot listen on {listen}:{port}: {exc} (use --port)",
                  file=sys.stderr)
            return 1
    # what a stopped or crashed earlier demo left behind
    stale = _state(directory)
    if stale is not None:
        _daemon(directory, stale).stop()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    for name in ("state.json", "password"):
        (directory / name).unlink(missing_ok=True)
    password = _password()
    fd = os.open(directory / "password", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(password)
    daemon = libvirtd.start(listen, port, LIBVIRT_CACHE, root=directory / "daemon",
                            sasl_user=USER, sasl_password=password, detach=True)
    try:
        for name, tags in DOMAINS:
            daemon.define(name, tags)
            daemon.write_data(name, name.encode())
        daemon.ensure_pool("default")
    except BaseException:
        daemon.stop()
        raise
    (directory / "state.json").write_text(json.dumps(
        {"pid": daemon.pid, "listen": listen, "port": port, "user": USER}) + "\n")
    host = f"[{listen}]" if ":" in listen else listen
    print(f"demo hypervisor: libvirtd on {host}:{port} (PID {daemon.pid}), "
          f"domains {', '.join(name for name, _ in DOMAINS)}")
    print(f"  user name: {USER}")
    print(f"  password:  {password}   (again: python -m tools.demohypervisor password)")
    print(f"  from this machine: qemu+tcp://{host}:{port}/system")
    print("  from the VM of `make run`: qemu+tcp://10.0.2.101:16509/system")
    print("  stop it: python -m tools.demohypervisor stop")
    return 0


def password(directory: Path) -> int:
    try:
        print((directory / "password").read_text())
    except FileNotFoundError:
        print("demohypervisor: no demo hypervisor started here (`start` first)",
              file=sys.stderr)
        return 1
    return 0


def stop(directory: Path) -> int:
    state = _state(directory)
    if state is None:
        print("demohypervisor: not running")
        return 0
    _daemon(directory, state).stop()
    for name in ("state.json", "password"):
        (directory / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        directory.rmdir()
    print(f"demo hypervisor stopped (PID {state['pid']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demohypervisor",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                        help=f"its state: PID, password, domains (default {DEFAULT_DIR})")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start libvirtd, define the demo domains, print the login")
    s.add_argument("--listen", default="127.0.0.1")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    sub.add_parser("password", help="print the SASL password of user demo")
    sub.add_parser("stop", help="stop the demo's libvirtd (by its PID) and remove its state")
    args = parser.parse_args(argv)
    directory = args.dir.absolute()
    if args.cmd == "start":
        return start(directory, args.listen, args.port)
    if args.cmd == "password":
        return password(directory)
    return stop(directory)


if __name__ == "__main__":
    sys.exit(main())
