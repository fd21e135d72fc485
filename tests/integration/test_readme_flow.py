"""The README's commands, read from README.md and run as printed, against real processes.

The ```sh blocks of "Two commands" and "Without a VM" are parsed from the README itself, so
an edit that breaks a command breaks this test. Only these are replaced:

- the placeholder the README asks the reader to fill in: `KEY` (the key curl printed);
- where the README's fixed setup lives on this machine: 127.0.0.1:8443 and 127.0.0.1:8080
  become free ports (the tests run beside other processes), `build/controlplane` and
  `/tmp/gw` temporary directories, `.venv/bin/` the virtualenv running the tests;
- the demo hypervisor: `tools.demohypervisor CMD` gets `--dir` a temporary directory (and
  `start` a free `--port`), and its address, 127.0.0.1:16509 (10.0.2.101:16509 as the VM of
  `make run` sees it; here the appliance runs on this machine), becomes that port.

The shell variables (`ARN`, `HV`, `VM`, `JOB`, `RP`, `RESTORE`) are not replaced: the
README's own `NAME=$(...)` lines set them; a `describe-*-job` is run again until its job is
COMPLETED, as the README tells the reader to. Each command runs in bash from the repository
root; `eval`s are replayed before the commands after them and an assignment's value is kept,
as in the reader's shell (the command that made it is not run again). `make run`/`make
test` (a VM boot, the whole suite) are only checked to be targets the Makefile has. Every
command must be one the test knows how to check: a new command in these blocks fails it
until the test learns it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pexpect
import pytest

from gatewaycore import bundle
from tests.conftest import REPO, Proc, child_env, free_port

pytestmark = pytest.mark.slow

KEY_RE = re.compile(r"^[A-Z0-9]{5}(-[A-Z0-9]{5}){4}$")
README = REPO / "README.md"
VENV_BIN = Path(sys.executable).parent


def section_blocks(title: str) -> list[str]:
    """The ```sh blocks between the heading `title` and the next heading of any level."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip("#").strip() == title
                 and line.startswith("#"))
    blocks: list[str] = []
    current: list[str] | None = None
    for line in lines[start + 1:]:
        if current is None and line.startswith("#"):
            break
        if current is None and line.strip() == "```sh":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    assert blocks, f"no ```sh block under {title!r} in README.md"
    return blocks


def commands(block: str) -> list[str]:
    """One string per command: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", "", block)
    lines = (re.sub(r"(^|\s+)#.*$", "", line).strip() for line in joined.splitlines())
    return [line for line in lines if line]


class Shell:
    """Runs README commands in bash with the test's values substituted for the README's."""

    def __init__(self, values: dict[str, str], env: dict[str, str]) -> None:
        self.values = values
        self.env = env
        self.state: list[str] = []  # eval and assignment lines, replayed before each command
        self.used: set[str] = set()

    def substitute(self, command: str) -> str:
        for readme_value, ours in self.values.items():
            if readme_value in command:
                self.used.add(readme_value)
                command = command.replace(readme_value, ours)
        return command

    def run(self, command: str) -> str:
        """Run one command (after the replayed state); its stdout. Fails on a non-zero exit."""
        script = "\n".join(["set -euo pipefail", *self.state, self.substitute(command)])
        done = subprocess.run(["bash", "-c", script], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, f"README command failed: {command}\n{done.stderr}"
        return done.stdout

    def keep(self, command: str) -> str:
        """An `eval` or an assignment: run it now (it must work); from now on an eval is
        replayed and a variable set to the value it got. Returns that value ("" for eval)."""
        assignment = re.match(r"([A-Za-z_][A-Za-z_0-9]*)=", command)
        if assignment is None:
            self.run(command)
            self.state.append(self.substitute(command))
            return ""
        name = assignment.group(1)
        value = self.run(f'{command}\nprintf %s "${name}"')
        self.state.append(f"{name}={shlex.quote(value)}")
        return value


def aws_env() -> dict[str, str]:
    """No credentials but what the README's `eval` line exports; no user config."""
    env = child_env(AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_CONFIG_FILE=os.devnull,
                    AWS_EC2_METADATA_DISABLED="true", AWS_PAGER="")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        env.pop(key, None)
    return env


def key_from(out: str) -> str:
    key = out.splitlines()[0].strip()
    assert KEY_RE.match(key), out
    return key


DEMO_DOMAINS = {"demo-web", "demo-db"}


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the README's demo hypervisor needs root (libvirtd in a mount namespace)")


def demo_hypervisor_values(readme_address: str, demo_dir: Path) -> dict[str, str]:
    """Where the demo hypervisor lives in this test: a free port, its own state directory."""
    port = free_port()
    tool = f"tools.demohypervisor --dir {demo_dir}"
    return {readme_address: f"127.0.0.1:{port}",
            "tools.demohypervisor start": f"{tool} start --port {port}",
            "tools.demohypervisor password": f"{tool} password",
            "tools.demohypervisor stop": f"{tool} stop"}


def run_hypervisor_command(shell: Shell, command: str, arn: str | None,
                           wait_until: Callable[..., Any]) -> bool:
    """Run and check one of the README's hypervisor commands; False if it is not one."""
    if "tools.demohypervisor start" in command:
        out = shell.run(command)
        assert all(name in out for name in DEMO_DOMAINS) and "password:" in out, out
    elif re.match(r"HV=", command) and "import-hypervisor-configuration" in command:
        hv = shell.keep(command)
        assert re.fullmatch(r"arn:aws:backup-gateway:us-west-2:\d+:hypervisor/hype-\w+", hv), hv
    elif "associate-gateway-to-server" in command:
        assert arn is not None and '"$ARN"' in command, command
        assert json.loads(shell.run(command))["GatewayArn"] == arn
    elif "test-hypervisor-configuration" in command:
        shell.run(command)  # exit 0: the gateway logged in to the hypervisor
    elif "start-virtual-machines-metadata-sync" in command:
        assert json.loads(shell.run(command))["HypervisorArn"].startswith("arn:aws:")
    elif "list-virtual-machines" in command:
        # "a sync takes a few seconds to show": 60 s, for a loaded machine
        def listed() -> bool:
            vms = json.loads(shell.run(command)).get("VirtualMachines", [])
            return {vm["Name"] for vm in vms} == DEMO_DOMAINS
        wait_until(listed, 60.0, "the demo domains in list-virtual-machines", interval=1.0)
    elif "tools.demohypervisor stop" in command:
        assert "stopped" in shell.run(command)
    else:
        return False
    return True


def raw_sha(image: Path) -> str:
    """SHA-256 of a disk image's contents as raw bytes (qemu-img convert -U)."""
    import hashlib
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "disk.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(out)],
                       check=True, timeout=60)
        return hashlib.sha256(out.read_bytes()).hexdigest()


def run_backup_command(shell: Shell, command: str, wait_until: Callable[..., Any],
                       demo_dir: Path) -> bool:
    """Run and check one of the README's backup and restore commands; False if it is not."""
    def until_done(field: str) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            doc = json.loads(shell.run(command))
            assert doc[field] not in ("FAILED", "ABORTED", "EXPIRED"), doc
            return doc if doc[field] == "COMPLETED" else None
        return dict(wait_until(done, 120.0, f"{field} COMPLETED", interval=1.0))

    if command.startswith("VM=") and "list-virtual-machines" in command:
        vm = shell.keep(command)
        assert re.fullmatch(r"arn:aws:backup-gateway:us-west-2:\d+:vm/vm-\w+", vm), vm
    elif "create-backup-vault" in command:
        assert json.loads(shell.run(command))["BackupVaultName"] == "demo-vault"
    elif command.startswith("JOB=") and "start-backup-job" in command:
        assert re.fullmatch(r"[0-9A-Fa-f-]{36}", shell.keep(command))
    elif "describe-backup-job" in command:
        job = until_done("State")
        assert job["PercentDone"] == "100.0" and job["BackupSizeInBytes"] > 0, job
    elif command.startswith("RP=") and "list-recovery-points-by-resource" in command:
        assert ":recovery-point:" in shell.keep(command)
    elif "get-recovery-point-restore-metadata" in command:
        meta = json.loads(shell.run(command))["RestoreMetadata"]
        assert meta["vmName"] == "demo-web", meta
    elif command.startswith("RESTORE=") and "start-restore-job" in command:
        assert re.fullmatch(r"[0-9A-Fa-f-]{36}", shell.keep(command))
    elif "describe-restore-job" in command:
        job = until_done("Status")
        assert ":vm/vm-" in job["CreatedResourceArn"], job
        # "byte-identical to demo-web's at backup time" (the demo domains never run)
        [source] = demo_dir.rglob("demo-web.qcow2")
        [restored] = demo_dir.rglob("demo-web-restored*.qcow2")
        assert raw_sha(restored) == raw_sha(source)
    else:
        return False
    return True


@pytest.fixture
def demo_dir() -> Iterator[Path]:
    """The demo hypervisor's state directory; whatever the test left running is stopped."""
    path = Path(f"/tmp/demo-hv-test-{os.getpid()}")
    try:
        yield path
    finally:
        if path.exists():
            subprocess.run([sys.executable, "-m", "tools.demohypervisor", "--dir", str(path),
                            "stop"], cwd=REPO, capture_output=True, timeout=60, check=False)
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.long
def test_two_commands_section_as_printed(
    control_plane: Any, appliance: Any, wait_until: Callable[..., Any], demo_dir: Path
) -> None:
    """What `make run` would start is stood in for by the fixtures: the control plane (its
    state in place of build/controlplane) and the daemon (its port 80 in place of 8080,
    the demo hypervisor reached directly in place of the VM's relay)."""
    need_root()
    cp, app = control_plane, appliance
    first, flow, schedule, hypervisor, backup, update = section_blocks("Two commands")
    # `make run` has built the OVA, which made the release key the bundle is signed with
    subprocess.run([sys.executable, "-m", "tools.release", "keygen"], cwd=REPO, check=True,
                   capture_output=True, timeout=60)
    for command in commands(first):
        target = re.fullmatch(r"make (\S+)", command)
        assert target, command
        dry = subprocess.run(["make", "-n", target.group(1)], cwd=REPO, capture_output=True,
                             text=True, timeout=60, check=False)
        assert dry.returncode == 0, f"`{command}`: {dry.stderr}"

    shell = Shell({"127.0.0.1:8443": f"127.0.0.1:{cp.port}",
                   "127.0.0.1:8080": f"127.0.0.1:{app.port}",
                   "build/controlplane": str(cp.state_dir),
                   ".venv/bin/": f"{VENV_BIN}/",
                   **demo_hypervisor_values("10.0.2.101:16509", demo_dir)}, aws_env())
    key = arn = rate = None
    hypervisor_commands = commands(hypervisor) + commands(backup)
    update_commands = commands(update)
    for command in commands(flow) + commands(schedule) + hypervisor_commands + update_commands:
        if command in hypervisor_commands and (
                run_backup_command(shell, command, wait_until, demo_dir)
                or run_hypervisor_command(shell, command, arn, wait_until)):
            continue
        if command in update_commands:
            run_update_command(shell, command, app, wait_until)
            continue
        if re.match(r"eval |[A-Za-z_]+=", command):
            shell.keep(command)
        elif command.startswith("curl "):
            key = key_from(shell.run(command))
        elif "create-gateway" in command:
            assert key is not None and re.search(r"\bKEY\b", command), command
            out = json.loads(shell.run(re.sub(r"\bKEY\b", key, command)))
            arn = out["GatewayArn"]
            doc = wait_until(lambda: (s := app.status())["activated"] and s, what="activation")
            assert doc["gatewayArn"] == arn and doc["controlPlane"]["reachable"] is True
            name = re.search(r"--gateway-display-name (\S+)", command)
            assert name and doc["gatewayName"] == name.group(1)
        elif "list-gateways" in command:
            gateways = json.loads(shell.run(command))["Gateways"]
            assert [g["GatewayArn"] for g in gateways] == [arn]
        elif "put-bandwidth-rate-limit-schedule" in command:
            found = re.search(r"AverageUploadRateLimitInBitsPerSec=(\d+)", command)
            assert found, command
            rate = int(found.group(1))
            shell.run(command)
            # "Within a second the appliance enforces it": 5 s, for a loaded machine.
            wait_until(lambda r=rate: app.api("GET", "/v1/shaping")[1]["limitBitsPerSec"] == r,
                       5.0, f"the daemon to enforce {rate} bit/s")
        elif "get-bandwidth-rate-limit-schedule" in command:
            out = json.loads(shell.run(command))
            assert out["GatewayArn"] == arn
            [interval] = out["BandwidthRateLimitIntervals"]
            assert interval["AverageUploadRateLimitInBitsPerSec"] == rate
        else:
            raise AssertionError(f"a README command this test does not check: {command}")
    assert arn is not None and rate is not None, "the README lost its activation or schedule"
    assert shell.used == set(shell.values), shell.used


def run_update_command(shell: Shell, command: str, app: Any,
                       wait_until: Callable[..., Any]) -> None:
    """The update block: sign, publish, set a window, ask for the update now, look. Here
    the daemon downloads and checks the bundle and leaves it as its request; the root
    installer that takes it from there runs in the image (tests/vm/test_updates_vm.py)."""
    out = shell.run(command)
    if "tools.release bundle" in command:
        assert "version 0.1.1" in out, out
    elif "publish-update" in command:
        assert re.match(r"(already )?published: version 0\.1\.1,", out), out
    elif "update-gateway-software-now" in command:
        request = Path(app.state_dir) / "updates" / "request.bundle"
        wait_until(request.exists, 30, "the daemon's install request")
        public = (REPO / "build" / "release" / "release-key.pub").read_bytes()
        assert bundle.verify(request, public).version == "0.1.1"
    elif "get-gateway" in command:
        gateway = json.loads(out)["Gateway"]
        assert gateway["SoftwareVersion"] == "0-1-0"  # the installer runs in the VM only
        assert gateway["MaintenanceStartTime"] == {"HourOfDay": 3, "MinuteOfHour": 30,
                                                   "DayOfWeek": 0}
        shown = gateway["NextUpdateAvailabilityTime"]  # the CLI prints ISO 8601 or epoch
        when = (datetime.fromtimestamp(shown, UTC) if isinstance(shown, int | float)
                else datetime.fromisoformat(shown).astimezone(UTC))
        assert (when.weekday(), when.hour, when.minute) == (6, 3, 30), when  # a Sunday
    elif "put-maintenance-start-time" not in command:
        raise AssertionError(f"a README update command this test does not check: {command}")


@pytest.fixture
def gw_dir() -> Iterator[Path]:
    """In place of the README's /tmp/gw: short, since it holds the local API's socket."""
    path = Path(f"/tmp/gw-test-{os.getpid()}")
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_without_a_vm_section_as_printed(tmp_path: Path, gw_dir: Path, demo_dir: Path,
                                        wait_until: Callable[..., Any]) -> None:
    need_root()
    cp_port, app_port = free_port(), free_port()
    shell = Shell({"127.0.0.1:8443": f"127.0.0.1:{cp_port}",
                   "127.0.0.1:8080": f"127.0.0.1:{app_port}",
                   "build/controlplane": str(tmp_path / "controlplane"),
                   "/tmp/gw": str(gw_dir),
                   ".venv/bin/": f"{VENV_BIN}/",
                   **demo_hypervisor_values("127.0.0.1:16509", demo_dir)}, aws_env())
    block, hypervisor = section_blocks("Without a VM")
    key = arn = None
    background: list[Proc] = []
    console: pexpect.spawn | None = None
    readme = README.read_text()
    login = re.search(r"log in as `(\w+)` with the password `([^`]+)`", readme)
    assert login, "the README no longer says how to log in to the console"
    try:
        for command in commands(block) + commands(hypervisor):
            if run_hypervisor_command(shell, command, arn, wait_until):
                continue
            if command.startswith("eval "):
                shell.keep(command)
            elif command.startswith("ARN=") and "create-gateway" in command:
                assert key is not None and re.search(r"\bKEY\b", command), command
                arn = shell.keep(re.sub(r"\bKEY\b", key, command))
                assert arn.startswith("arn:aws:backup-gateway:us-west-2:"), arn
            elif command.startswith("make ") and command.endswith("&"):
                # What make runs for the target (its venv steps are printed, not run).
                target = command.split()[1]
                dry = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True,
                                     text=True, timeout=60, check=True).stdout
                [serve] = [line for line in dry.splitlines() if " serve " in line]
                proc = Proc(shlex.split(shell.substitute(serve)), env=child_env())
                background.append(proc)
                proc.wait_for_line(r"event=ready")
            elif command.endswith("&"):
                proc = Proc(shlex.split(shell.substitute(command[:-1])), env=child_env())
                background.append(proc)
                line = proc.wait_for_line(r"event=ready")
                assert f"control_plane=http://127.0.0.1:{cp_port}" in line, line
            elif command.startswith("curl "):
                key = key_from(shell.run(command))
            elif " -m appliance status" in command:
                out = shell.run(command)
                assert re.search(rf"Control plane\s+http://127\.0\.0\.1:{cp_port}\b", out), out
                assert re.search(r"reachable\s+yes", out), out
            elif " -m appliance console" in command:
                console = pexpect.spawn(
                    "bash", ["-c", shell.substitute(command)], cwd=str(REPO),
                    env={**child_env(), "TERM": "vt100", "HOME": str(tmp_path)},
                    dimensions=(24, 80), timeout=30, encoding="utf-8", codec_errors="replace",
                )
                user, password = login.groups()
                console.expect("login:")
                console.sendline(user)
                console.expect("Password:")
                console.sendline(password)
                # "you must choose a new one at once"
                console.expect("New password:")
                console.sendline("readme-Passw0rd")
                console.expect("Retype new password:")
                console.sendline("readme-Passw0rd")
                console.expect("Enter command:")
                console.sendline("x")  # "x logs out"
                console.expect("login:")
            else:
                raise AssertionError(f"a README command this test does not check: {command}")
        assert len(background) == 2 and console is not None, "the README lost a step"
        assert arn is not None, "the README lost the laptop's activation"
        assert shell.used == set(shell.values), shell.used
    finally:
        if console is not None:
            console.terminate(force=True)
        for proc in reversed(background):
            with contextlib.suppress(Exception):
                proc.stop()


def test_s3_vaults_section_as_printed(tmp_path: Path, wait_until: Callable[..., Any]) -> None:
    """"Vaults in an S3 bucket": a real one-node Ceph RGW started and stopped by the
    README's commands, a control plane on its bucket, a vault whose objects show in it."""
    ceph_port, cp_port = free_port(), free_port()
    ceph_dir = tmp_path / "ceph"
    shell = Shell({"tools.cephrgw start --dir build/ceph":
                   f"tools.cephrgw start --dir {ceph_dir} --port {ceph_port}",
                   "build/ceph": str(ceph_dir),
                   "127.0.0.1:7480": f"127.0.0.1:{ceph_port}",
                   "127.0.0.1:8444": f"127.0.0.1:{cp_port}",
                   "build/vault-store.toml": str(tmp_path / "vault-store.toml"),
                   "build/controlplane-s3": str(tmp_path / "controlplane-s3"),
                   ".venv/bin/": f"{VENV_BIN}/"}, aws_env())
    [block] = section_blocks("Vaults in an S3 bucket")
    plane: Proc | None = None
    stopped = False
    try:
        for command in commands(block):
            if "tools.cephrgw start" in command:
                assert "vault store settings in" in shell.run(command)
                assert "bucket = \"backup-vaults\"" in (tmp_path / "vault-store.toml").read_text()
            elif command.endswith("&"):
                plane = Proc(shlex.split(shell.substitute(command[:-1])), env=child_env())
                line = plane.wait_for_line(r"event=ready .*vaults=")
                assert f'vaults="s3 endpoint=http://127.0.0.1:{ceph_port} ' in line, line
            elif command.startswith("eval "):
                shell.keep(command)
            elif "create-backup-vault" in command:
                assert json.loads(shell.run(command))["BackupVaultName"] == "s3-vault"
            elif " s3 ls " in command:
                keys = shell.run(command)
                # the vault's marker, its wrapped data key and its record: all in the bucket
                assert re.search(r"v-\w+/meta/key\.json", keys), keys
                assert re.search(r"v-\w+/meta/vault\.json", keys), keys
            elif command == "kill %1":
                assert plane is not None
                plane.stop()
            elif "tools.cephrgw stop" in command:
                assert "stopped the cluster" in shell.run(command)
                stopped = True
            else:
                raise AssertionError(f"a README command this test does not check: {command}")
        assert plane is not None and stopped, "the README lost a step"
        assert not ceph_dir.exists()
        assert shell.used == set(shell.values), shell.used
    finally:
        if plane is not None:
            with contextlib.suppress(Exception):
                plane.stop()
        if not stopped:
            subprocess.run([sys.executable, "-m", "tools.cephrgw", "stop", "--dir",
                            str(ceph_dir)], cwd=REPO, capture_output=True, timeout=60,
                           check=False)
