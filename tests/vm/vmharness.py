"""Booting the appliance image for tests: QEMU processes, the guest agent, the control plane.

Inside the guest the tests use only what a real appliance keeps: the activation port, the
serial console, and qemu-guest-agent over a virtio-serial socket (guest-exec). No password,
no SSH: the image has neither.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.conftest import free_port  # noqa: E402
from tests.conftest import wait_until as poll  # noqa: E402
from tools.image.guestagent import GuestAgent, GuestAgentError  # noqa: E402, F401
from tools.image.httpprobe import KEY_QUERY, KEY_RE, first_key, get, key_answer  # noqa: E402, F401
from tools.image.vm import VmConfig, make_overlay, terminate  # noqa: E402

BOOT_TIMEOUT = 300.0  # TCG on a busy 2-core machine; a boot normally takes 15-30 s
# Without APPLIANCE_OVA the session builds the OVA (tests/vm/conftest.py, at most this long)
# inside the setup of the first test that needs it, which pytest-timeout counts.
OVA_BUILD_TIMEOUT = 1500


def vm_timeout(seconds: float) -> pytest.MarkDecorator:
    """A per-test deadline (pytest-timeout: setup, call and teardown) for a test that needs
    the OVA: `seconds` for its own waits, plus the build when no built OVA was given."""
    return pytest.mark.timeout(seconds + (0 if os.environ.get("APPLIANCE_OVA")
                                          else OVA_BUILD_TIMEOUT))




class Guest:
    """One QEMU VM booted from the OVA's disk through its own fresh overlay."""

    def __init__(self, name: str, disk: Path, workdir: Path, control_plane_port: int,
                 firmware: str = "bios", accel: str = "tcg",
                 hypervisor_port: int | None = None) -> None:
        self.name = name
        workdir.mkdir(parents=True, exist_ok=True)
        overlay = make_overlay(disk, workdir / f"{name}.qcow2")
        self.http_port = free_port()
        self.serial_socket = workdir / f"{name}-serial.sock"
        self.serial_log = workdir / f"{name}-serial.log"
        self.qga = GuestAgent(workdir / f"{name}-qga.sock")
        self.cfg = VmConfig(overlay, self.http_port, control_plane_port, accel=accel,
                            firmware=firmware, serial=str(self.serial_socket),
                            serial_log=self.serial_log, qga_socket=self.qga.path,
                            hypervisor_port=hypervisor_port)
        self.qemu_log = (workdir / f"{name}-qemu.log").open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cfg.argv(), stdin=subprocess.DEVNULL,
                                     stdout=self.qemu_log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.serial_log.read_bytes()[-2000:].decode(errors="replace")
            raise AssertionError(
                f"QEMU ({self.name}) exited {self.proc.returncode}; serial:\n{tail}"
            )

    def get(self, target: str, timeout: float = 10.0) -> tuple[int, str] | None:
        """GET on the forwarded port 80, redirects NOT followed; None while nothing answers."""
        return get(self.http_port, target, timeout)

    def wait_for_key(self, timeout: float = BOOT_TIMEOUT) -> tuple[float, str]:
        """Seconds since power-on until the activation endpoint hands out a key, and the key
        (tools/image/httpprobe.py: overlapping GETs until port 80 serves, then one key
        request at a time)."""
        at, found = first_key(self.http_port, KEY_QUERY, key_answer,
                              time.monotonic() + timeout, self._alive)
        return at - self.started, found

    def status(self) -> dict[str, Any]:
        """The daemon's own report (`python3 -m appliance status --json`, run in the guest)."""
        return json.loads(self.qga.sh("python3 -m appliance status --json"))

    def reboot(self, timeout: float = 240.0) -> None:
        """Reboot from inside (systemctl) and return once the guest agent answers from the
        new boot (a new boot_id); the daemon may not be up yet."""
        first_boot = self.qga.sh("cat /proc/sys/kernel/random/boot_id").strip()
        self.qga.sh("systemd-run --on-active=1 systemctl reboot")
        self.qga.close()

        def new_boot() -> bool:
            try:
                self.qga.sync(timeout=10)
                boot_id = self.qga.sh("cat /proc/sys/kernel/random/boot_id").strip()
            except (AssertionError, OSError):
                self.qga.close()
                return False
            return boot_id != first_boot

        poll(new_boot, timeout, f"{self.name} to come back from the reboot", interval=1)

    def stop(self) -> None:
        self.qga.close()
        terminate(self.proc)
        self.qemu_log.close()
        for path in (self.serial_socket, self.qga.path):
            path.unlink(missing_ok=True)


class ControlPlane:
    """The reference control plane on a free loopback port, with its own state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.port = free_port()
        self.log = (state_dir.parent / "controlplane.log").open("wb")
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane", "serve", "--listen",
             f"127.0.0.1:{self.port}", "--state-dir", str(state_dir)],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        poll(self._listening, 30, "the control plane to listen", interval=0.1)

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the control plane exited {self.proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def aws(self, *args: str, region: str = "us-west-2", service: str = "backup-gateway"
            ) -> Any:
        """The real AWS CLI (`aws SERVICE ...`) against this control plane, with only its
        credentials."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("AWS_") and not k.lower().endswith("_proxy")}
        env.update(AWS_SHARED_CREDENTIALS_FILE=str(self.state_dir / "credentials"),
                   AWS_CONFIG_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true", AWS_PAGER="")
        argv = [str(Path(sys.executable).parent / "aws"), service, *args,
                "--endpoint-url", self.url, "--region", region, "--output", "json"]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise AssertionError(f"aws {' '.join(args)} failed: {done.stderr.strip()}")
        return json.loads(done.stdout) if done.stdout.strip() else {}

    def stop(self) -> None:
        terminate(self.proc)
        self.log.close()
