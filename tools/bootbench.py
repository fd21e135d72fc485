"""Boot benchmark: the appliance's power-on to an activation key on port 80, against a bare
Debian image's power-on to an HTTP answer on port 80, booted alternately in the same run.

`python -m tools.bootbench` (run by `make bench`). Absolute boot times under QEMU's TCG move by
20-40 % with what else the machine runs, so the target is a ratio measured in one run: the
appliance must reach a key in at most 0.8x the bare image's time to its first HTTP answer
(and in at most 25 s on a quiet 2-core machine, docs/image.md "Boot").

- The appliance: the OVA's disk (build/backup-gateway-VERSION.ova, built by
  tools/image/build-ova.sh when missing, or `--ova`), booted exactly as `make run` and the VM
  tests boot it (tools/image/vm.py), with the reference control plane beside it.
- The baseline: tools/image/baseline/ (Debian's packages, defaults and kernel, systemd-networkd
  DHCP and Python's http.server on port 80; the same disk recipe and GRUB timeout 0), built
  once into build/bootbench/ and rebuilt when its recipe changes or the file is missing.

Each boot gets a fresh qcow2 overlay. Power-on is the moment QEMU is started. For the
appliance the guest agent then gives where the time went: firmware and GRUB (until the
kernel's clock starts), kernel and initramfs, userspace until appliance.service starts, the
daemon's start until its `event=ready` log line, and the rest until the key came back; and the
serial console's lines are kept with the second they arrived at (what a user watching the
serial port sees).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.image.guestagent import GuestAgent  # noqa: E402
from tools.image.httpprobe import KEY_QUERY, first_answer, first_key, key_answer  # noqa: E402
from tools.image.vm import VmConfig, extract_disk, terminate  # noqa: E402

BASELINE_RECIPE = REPO / "tools" / "image" / "baseline"
CACHE = REPO / "build" / "bootbench"
TARGET_RATIO = 0.8
TARGET_SECONDS = 25.0
BOOT_TIMEOUT = 300.0  # TCG on a busy 2-core machine; a boot normally takes 15-30 s


def version() -> str:
    ns: dict[str, str] = {}
    exec((REPO / "appliance" / "version.py").read_text(), ns)
    return ns["__version__"]


# --- the two disks ----------------------------------------------------------------------------


def baseline_key() -> str:
    """Hash of the baseline's recipe: its folder and the disk recipe it shares."""
    h = hashlib.sha256()
    for path in [*sorted(BASELINE_RECIPE.iterdir()), REPO / "tools/image/make-base-disk.sh"]:
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def baseline_disk(cache: Path = CACHE, log: Callable[[str], None] = print) -> Path:
    """The bare-Debian disk, built (about 1-2 min, as root) when missing or out of date."""
    cache.mkdir(parents=True, exist_ok=True)
    disk = cache / f"bare-debian-{baseline_key()}.raw"
    if disk.exists():
        return disk
    for old in cache.glob("bare-debian-*.raw"):
        old.unlink()
    log(f"building the bare-Debian baseline into {disk} ...")
    t0 = time.monotonic()
    partial = disk.with_suffix(".partial")
    subprocess.run([str(BASELINE_RECIPE / "build.sh"), str(cache / "work"), str(partial)],
                   check=True, timeout=1800)
    partial.replace(disk)
    log(f"baseline built in {time.monotonic() - t0:.0f} s")
    return disk


def appliance_ova(given: Path | None, log: Callable[[str], None] = print) -> Path:
    """The OVA to measure: `given`, else make's, built when missing."""
    if given is not None:
        return given
    ova = REPO / "build" / f"backup-gateway-{version()}.ova"
    if not ova.exists():
        log(f"{ova} is missing: building it (tools/image/build-ova.sh, a few minutes)")
        subprocess.run([str(REPO / "tools/image/build-ova.sh"), version(), str(ova)],
                       check=True, timeout=1800)
    return ova


# --- one boot ---------------------------------------------------------------------------------


class SerialRecorder:
    """Reads the guest's serial port (QEMU's socket) and stamps each line with the seconds since
    power-on it arrived at. Keeps reading until closed, so QEMU never back-pressures the guest."""

    def __init__(self, path: Path, t0: float) -> None:
        self.t0 = t0
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._partial = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + 30
        while True:  # QEMU creates the socket a moment after it starts
            try:
                self._sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := self._sock.recv(65536):
                now = time.monotonic() - self.t0
                data = self._partial + chunk
                *complete, self._partial = re.split(rb"\r\n|\n|\r", data)
                with self._cond:
                    for raw in complete:
                        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "",
                                      raw.decode(errors="replace"))
                        if text.strip():
                            self.lines.append((now, text.strip()))
                    self._cond.notify_all()

    def first(self, pattern: str) -> float | None:
        """Seconds since power-on of the first line matching `pattern` (a regex)."""
        rx = re.compile(pattern)
        return next((t for t, line in list(self.lines) if rx.search(line)), None)

    def wait_for(self, pattern: str, timeout: float) -> float | None:
        """Block until a line matching `pattern` arrives (woken by each line, no polling);
        its seconds since power-on, or None after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (found := self.first(pattern)) is None:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return None
                self._cond.wait(min(left, 1.0))
        return found

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout=5)


@dataclass
class Boot:
    """The result of one boot: seconds from power-on to the awaited answer, and details."""

    image: str
    firmware: str
    seconds: float
    answer: str
    serial: list[tuple[float, str]] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)
    guest_report: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_vm(disk: Path, disk_format: str, workdir: Path, name: str, firmware: str,
               accel: str, control_plane_port: int
               ) -> Iterator[tuple[VmConfig, subprocess.Popen[bytes], float]]:
    """QEMU on a fresh overlay of `disk`, as tools/image/vm.py boots the appliance; yields its
    config, process and power-on instant (time.monotonic())."""
    workdir.mkdir(parents=True, exist_ok=True)
    overlay = workdir / f"{name}.qcow2"
    overlay.unlink(missing_ok=True)
    overlay.with_suffix(".ovmf-vars.fd").unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(disk.resolve()),
                    "-F", disk_format, str(overlay)], check=True)
    cfg = VmConfig(overlay, free_port(), control_plane_port, accel=accel, firmware=firmware,
                   serial=str(workdir / f"{name}-serial.sock"),
                   serial_log=workdir / f"{name}-serial.log",
                   qga_socket=workdir / f"{name}-qga.sock")
    log = (workdir / f"{name}-qemu.log").open("wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(cfg.argv(), stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        yield cfg, proc, t0
    finally:
        terminate(proc)
        log.close()
        overlay.unlink(missing_ok=True)


def wait_answer(proc: subprocess.Popen[bytes], t0: float, what: str, timeout: float,
                probe: Callable[[float, Callable[[], None]], tuple[float, str]]
                ) -> tuple[float, str]:
    """Seconds since power-on until the answer `probe(deadline, alive)` waits for on the
    guest's forwarded port 80 (tools/image/httpprobe.py: GETs overlap, so a boot is not
    measured in a probe's timeout steps; nothing in the guest can tell the host it is up
    sooner)."""
    def alive() -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"QEMU exited {proc.returncode} before {what}")
    try:
        at, answer = probe(t0 + timeout, alive)
    except TimeoutError:
        raise TimeoutError(f"no {what} within {timeout:.0f} s") from None
    return at - t0, answer


def boot_baseline(disk: Path, workdir: Path, firmware: str, accel: str,
                  timeout: float = BOOT_TIMEOUT) -> Boot:
    """Power-on to the bare image's first HTTP answer on port 80."""
    with running_vm(disk, "raw", workdir, f"bare-{firmware}", firmware, accel,
                    free_port()) as (cfg, proc, t0):
        serial = SerialRecorder(Path(cfg.serial), t0)
        try:
            seconds, answer = wait_answer(
                proc, t0, "HTTP answer", timeout,
                lambda deadline, alive: first_answer(
                    cfg.http_port, "/", lambda status, _body: f"HTTP {status}", deadline, alive))
        finally:
            serial.close()
    return Boot("bare Debian", firmware, seconds, answer, serial.lines)


GUEST_REPORT = r"""
systemd-analyze || true
echo "userspace_us=$(systemctl show -p UserspaceTimestampMonotonic --value)"
echo ---
systemctl show -p ExecMainStartTimestampMonotonic --value appliance.service
echo ---
journalctl -b -u appliance.service -g event=ready -o json -n 1 --no-pager \
    | sed -n 's/.*"__MONOTONIC_TIMESTAMP":"\([0-9]*\)".*/\1/p'
echo ---
systemd-analyze blame --no-pager | head -12
echo ---
systemd-analyze critical-chain appliance.service --no-pager | tail -n +3
"""


def boot_appliance(disk: Path, workdir: Path, control_plane_port: int, firmware: str,
                   accel: str, timeout: float = BOOT_TIMEOUT, breakdown: bool = True,
                   importtime: bool = False, serial_until: str | None = None) -> Boot:
    """Power-on to an activation key on port 80; then, from the guest agent, where it went.
    `serial_until`: also wait (up to 60 s more) for a serial line matching this regex, so the
    lines that follow readiness (the console's banner) are in the result."""
    with running_vm(disk, "vmdk", workdir, f"appliance-{firmware}", firmware, accel,
                    control_plane_port) as (cfg, proc, t0):
        serial = SerialRecorder(Path(cfg.serial), t0)
        try:
            seconds, answer = wait_answer(
                proc, t0, "activation key", timeout,
                lambda deadline, alive: first_key(cfg.http_port, KEY_QUERY, key_answer, deadline,
                                                  alive))
            boot = Boot("appliance", firmware, seconds, answer)
            if serial_until is not None:
                serial.wait_for(serial_until, 60)
            if breakdown:
                assert cfg.qga_socket is not None
                agent = GuestAgent(Path(cfg.qga_socket))
                agent.sync(120)
                try:
                    # the guest's uptime against the host's clock: the middle of the call
                    before = time.monotonic() - t0
                    uptime = agent.sh("cat /proc/uptime")
                    host_now = (before + time.monotonic() - t0) / 2
                    report = uptime + "---\n" + agent.sh(GUEST_REPORT)
                    if importtime:
                        report += "---\n" + agent.sh(
                            "cd /tmp && python3 -X importtime -c 'import appliance.daemon' 2>&1"
                            " | sort -t'|' -k2 -n | tail -15")
                finally:
                    agent.close()
                boot.guest_report = report
                boot.stages = stages(report, host_now, seconds)
        finally:
            serial.close()
    boot.serial = serial.lines
    return boot


def stages(report: str, host_now: float, key_seconds: float) -> dict[str, float]:
    """Power-on to key split at the kernel's start, userspace's start, appliance.service's
    start and the daemon's `event=ready` (the guest's monotonic clock starts with the kernel,
    whose start on the host's clock is the moment of the agent's answer minus the uptime)."""
    parts = report.split("---\n")
    uptime = float(parts[0].split()[0])
    kernel_at = host_now - uptime
    out = {"firmware + GRUB": kernel_at}
    # PID 1's own start, also there before the boot is over (systemd-analyze then prints
    # nothing: the units after the daemon's readiness are often still starting)
    userspace_us = re.search(r"userspace_us=(\d+)", parts[1])
    if userspace_us:
        out["kernel + initramfs"] = int(userspace_us[1]) / 1e6
    with contextlib.suppress(ValueError, IndexError):
        start = int(parts[2].strip()) / 1e6
        out["userspace until appliance.service starts"] = start - out.get(
            "kernel + initramfs", 0.0)
        ready = int(parts[3].strip().splitlines()[0]) / 1e6
        out["daemon start until event=ready"] = ready - start
        out["ready until the key is back"] = key_seconds - kernel_at - ready
    return out


# --- the benchmark --------------------------------------------------------------------------


class ControlPlane:
    """The reference control plane on a free loopback port (the appliance's link needs one)."""

    def __init__(self, state_dir: Path) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        self.log = (state_dir.parent / "controlplane.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane", "serve", "--listen",
             f"127.0.0.1:{self.port}", "--state-dir", str(state_dir)],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the control plane exited {self.proc.returncode}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            if time.monotonic() > deadline:
                raise TimeoutError("the control plane did not listen")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def accel_default() -> str:
    return subprocess.run([str(REPO / "tools/image/accel.sh")], capture_output=True, text=True,
                          check=True).stdout.strip()


def print_boot(boot: Boot, verbose: bool) -> None:
    print(f"  {boot.image:<11} {boot.firmware:<4} {boot.seconds:5.1f} s  ({boot.answer})")
    for name, secs in boot.stages.items():
        print(f"      {name:<42} {secs:5.1f} s")
    if verbose:
        for t, line in boot.serial:
            print(f"      serial {t:6.2f}  {line[:100]}")
        if boot.guest_report:
            print("      " + boot.guest_report.replace("\n", "\n      "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bootbench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--ova", type=Path, help="the OVA to measure (default: make's)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="baseline/appliance boot pairs per firmware (2)")
    parser.add_argument("--firmware", choices=["bios", "uefi", "both"], default="bios")
    parser.add_argument("--accel", default=None, help="kvm or tcg (default: accel.sh)")
    parser.add_argument("--verbose", action="store_true",
                        help="print each boot's serial lines and the guest's report")
    parser.add_argument("--importtime", action="store_true",
                        help="also the daemon's import time in the guest (python3 -X importtime)")
    parser.add_argument("--also", type=Path, metavar="OVA",
                        help="an earlier build of the appliance, booted in every round too: "
                        "a before/after under the same host load")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a target is missed (figures only by default)")
    args = parser.parse_args(argv)
    accel = args.accel or accel_default()
    ova = appliance_ova(args.ova)
    base = baseline_disk()
    firmwares = ["bios", "uefi"] if args.firmware == "both" else [args.firmware]
    load = os.getloadavg()[0]
    print(f"boot benchmark: {ova.name} vs the bare-Debian baseline ({base.name}), accel {accel}, "
          f"{args.rounds} pair(s) per firmware, host load {load:.1f} at start")
    missed = False
    with tempfile.TemporaryDirectory(prefix="bootbench-") as tmp:
        work = Path(tmp)
        disk = extract_disk(ova, work / "disk")
        also = extract_disk(args.also, work / "also") if args.also else None
        (work / "cp").mkdir()
        cp = ControlPlane(work / "cp")
        try:
            for firmware in firmwares:
                bare: list[float] = []
                appl: list[float] = []
                ratios: list[float] = []
                earlier: list[float] = []
                for i in range(args.rounds):
                    # alternate which boots first, so a drift in the host's load hits both
                    order = ["bare", "appliance"] + (["earlier"] if also else [])
                    if i % 2:
                        order.reverse()
                    pair: dict[str, Boot] = {}
                    for which in order:
                        if which == "bare":
                            pair[which] = boot_baseline(base, work, firmware, accel)
                        elif which == "earlier":
                            assert also is not None
                            pair[which] = boot_appliance(also, work, cp.port, firmware, accel)
                            pair[which].image = "earlier"
                        else:
                            pair[which] = boot_appliance(
                                disk, work, cp.port, firmware, accel,
                                importtime=args.importtime and i == 0,
                                serial_until=r"Activation key: http" if args.verbose else None)
                        print_boot(pair[which], args.verbose)
                    bare.append(pair["bare"].seconds)
                    appl.append(pair["appliance"].seconds)
                    ratios.append(pair["appliance"].seconds / pair["bare"].seconds)
                    if "earlier" in pair:
                        earlier.append(pair["earlier"].seconds / pair["bare"].seconds)
                a, b = statistics.median(appl), statistics.median(bare)
                r = statistics.median(ratios)
                ok = r <= TARGET_RATIO and a <= TARGET_SECONDS
                missed |= not ok
                print(f"boot ({firmware.upper()}, {accel}): appliance power-on to a key "
                      f"{a:.1f} s (median of {len(appl)}), bare Debian power-on to HTTP "
                      f"{b:.1f} s; ratio {r:.2f} (per pair {', '.join(f'{x:.2f}' for x in ratios)})"
                      f"; target ratio <= {TARGET_RATIO} and <= {TARGET_SECONDS:.0f} s: "
                      f"{'met' if ok else 'MISSED'}")
                if earlier:
                    print(f"boot ({firmware.upper()}, {accel}): the earlier build {args.also}: "
                          f"ratio {statistics.median(earlier):.2f} (per pair "
                          f"{', '.join(f'{x:.2f}' for x in earlier)})")
        finally:
            cp.stop()
    print(f"host load {os.getloadavg()[0]:.1f} at the end (absolute seconds are only comparable "
          "on a quiet machine; the ratio is measured within this run)")
    return 1 if (missed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
