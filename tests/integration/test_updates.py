"""Software updates end to end on this machine (docs/updates.md), without a VM.

Real: the control plane (publish-update, the poll's offer, the signed download,
GetGateway through the AWS CLI), the appliance daemon run from a version folder through a
`current` link, its update agent, and the root installer's code (`Installer`), which
verifies, unpacks, switches the link, restarts the daemon and health-checks it over its
local API. What stands in for the VM: a small supervisor in place of systemd (restart,
Restart=on-failure and its NRestarts count) and the test starting the installer when the
request appears, as `appliance-update.path` does. tests/vm/test_updates_vm.py runs the same
flow in the image with systemd.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance import updatefiles
from appliance.updateinstall import Installer, Paths
from gatewaycore import bundle
from tests.conftest import (
    PYTHON,
    Appliance,
    ControlPlane,
    activate,
    child_env,
    free_port,
    wait_until,
)
from tools import release

pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.timeout(300)]


class Supervisor:
    """systemd's part for appliance.service: run the daemon from `root/current`, restart
    it when asked, and restart it on failure (counted, as NRestarts)."""

    def __init__(self, root: Path, argv: list[str], workdir: Path) -> None:
        self.root = root
        self.argv = argv
        self.workdir = workdir
        self.crashes = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self.log = workdir / "daemon.log"

    def _spawn(self) -> None:
        env = child_env(PYTHONPATH=str(self.root / "current"), PYTHONDONTWRITEBYTECODE="1")
        with self.log.open("ab") as out:
            self._proc = subprocess.Popen(self.argv, cwd=self.workdir, env=env, stdout=out,
                                          stderr=subprocess.STDOUT)
        proc = self._proc
        threading.Thread(target=self._watch, args=(proc,), daemon=True).start()

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        with self._lock:
            if proc is self._proc and not self._stopping and code != 0:
                self.crashes += 1
                if self.crashes < 10:
                    self._spawn()

    def restart(self) -> None:
        with self._lock:
            self._stop_locked()
            self.crashes = 0
            self._spawn()

    def _stop_locked(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._stop_locked()


class SupervisedDaemon:
    """The installer's `Daemon` over the supervisor (the real one calls systemctl)."""

    def __init__(self, supervisor: Supervisor, app: Appliance) -> None:
        self.supervisor = supervisor
        self.app = app

    def restart(self) -> None:
        self.supervisor.restart()

    def restarts(self) -> int:
        return self.supervisor.crashes

    def version(self) -> str | None:
        try:
            return str(self.app.status()["softwareVersion"])
        except (OSError, AssertionError, ValueError):  # not up (yet)
            return None


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private, _ = release.keygen(tmp_path / "keys")
    return private, tmp_path / "keys" / release.PUBLIC


def make_bundle(tmp_path: Path, version: str, key: Path,
                change: dict[str, bytes] | None = None) -> Path:
    files = dict(release.source_files())
    files.update(change or {})
    out = tmp_path / f"{version}.bundle"
    out.write_bytes(bundle.build(files.items(), version, key.read_bytes(), "2026-11-27T00:00Z"))
    return out


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """/opt/appliance as the image has it: 0.1.0 (this checkout's code) and `current`."""
    root = tmp_path / "opt"
    root.mkdir()
    for name, data in release.source_files():
        if name == bundle.VERSION_FILE:
            data = bundle.with_version(data, "0.1.0")
        target = root / "0.1.0" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (root / "current").symlink_to("0.1.0")
    return root


@pytest.fixture
def gateway(tmp_path: Path, installed: Path, control_plane: ControlPlane
            ) -> Iterator[tuple[Appliance, Supervisor, Path]]:
    work = tmp_path / "run"
    work.mkdir()
    sock = Path(f"/tmp/appl-upd-{os.getpid()}-{id(work)}")
    app = Appliance(state_dir=tmp_path / "state", socket_path=sock / "api.sock",
                    port=free_port(), control_plane_url=control_plane.url,
                    extra_args=["--update-result-file", str(tmp_path / "root/result.json")])
    supervisor = Supervisor(installed, app.argv, work)
    supervisor.restart()
    try:
        wait_until(lambda: SupervisedDaemon(supervisor, app).version(), 30, "the daemon")
        yield app, supervisor, tmp_path / "root"
    finally:
        supervisor.stop()


def run_installer(installer: Installer, request: Path) -> int:
    """What appliance-update.path does: start the installer once the request appears."""
    wait_until(request.exists, 60, "the daemon's install request")
    return installer.run()


def test_publish_refuse_roll_back_then_install(
    tmp_path: Path, control_plane: ControlPlane, gateway: tuple[Appliance, Supervisor, Path],
    installed: Path, keys: tuple[Path, Path],
) -> None:
    app, supervisor, root_dir = gateway
    private, public = keys
    arn = activate(control_plane, app)
    request = app.state_dir / updatefiles.REQUEST
    installer = Installer(Paths(installed, request, root_dir, public),
                          SupervisedDaemon(supervisor, app), health_timeout=60)

    def publish(path: Path) -> str:
        done = subprocess.run([PYTHON, "-m", "controlplane", "publish-update", "--state-dir",
                               str(control_plane.state_dir), str(path)],
                              capture_output=True, text=True, check=True)
        return done.stdout

    def get_gateway() -> dict[str, Any]:
        return control_plane.aws("get-gateway", "--gateway-arn", arn)["Gateway"]

    def reported(outcome: str, version: str) -> bool:
        """The daemon (once up again) shows this outcome."""
        try:
            last = app.status()["softwareUpdate"]["lastResult"]
        except OSError:
            return False
        return bool(last) and (last["outcome"], last["version"]) == (outcome, version)

    assert get_gateway()["SoftwareVersion"] == "0-1-0"
    assert "NextUpdateAvailabilityTime" not in get_gateway()

    # 1. signed with another key: the control plane publishes it (it holds no key), the
    #    gateway's installer refuses it; nothing changes
    stranger = release.keygen(tmp_path / "stranger")[0]
    assert "published: version 0.1.1" in publish(make_bundle(tmp_path, "0.1.1", stranger))
    wait_until(lambda: (app.status()["softwareUpdate"]["available"] or {}).get("version")
               == "0.1.1", 30, "the offer of 0.1.1")
    assert "NextUpdateAvailabilityTime" in get_gateway()
    control_plane.aws("update-gateway-software-now", "--gateway-arn", arn)
    assert run_installer(installer, request) == 1
    wait_until(lambda: reported("refused", "0.1.1"), 30, "the refusal reported")
    assert "not signed by this appliance's release key" in \
        app.status()["softwareUpdate"]["lastResult"]["message"]
    assert os.readlink(installed / "current") == "0.1.0"
    assert not (installed / "0.1.1").exists() and not request.exists()
    control_plane.proc.wait_for_line(r"event=gateway_update_reported .*outcome=refused "
                                     r"version=0.1.1")

    # 2. a daemon that cannot start: installed, unhealthy, rolled back to 0.1.0, reported
    broken = make_bundle(tmp_path, "0.1.2", private, {
        "appliance/__main__.py": b"raise SystemExit('broken on purpose')\n"})
    publish(broken)
    control_plane.aws("update-gateway-software-now", "--gateway-arn", arn)
    assert run_installer(installer, request) == 1
    assert os.readlink(installed / "current") == "0.1.0"
    assert not (installed / "0.1.2").exists()
    wait_until(lambda: reported("rolled_back", "0.1.2"), 60, "the rollback reported")
    assert "failed its health check" in app.status()["softwareUpdate"]["lastResult"]["message"]
    assert get_gateway()["SoftwareVersion"] == "0-1-0"

    # 3. a good one: switched, healthy, reported; GetGateway shows the new version
    publish(make_bundle(tmp_path, "0.2.0", private))
    control_plane.aws("update-gateway-software-now", "--gateway-arn", arn)
    assert run_installer(installer, request) == 0
    assert os.readlink(installed / "current") == "0.2.0"
    assert SupervisedDaemon(supervisor, app).version() == "0.2.0"
    wait_until(lambda: reported("installed", "0.2.0"), 30, "the install reported")
    wait_until(lambda: get_gateway().get("SoftwareVersion") == "0-2-0", 60,
               "GetGateway's SoftwareVersion 0-2-0")
    assert "NextUpdateAvailabilityTime" not in get_gateway()
    assert (installed / "0.1.0").is_dir()  # the previous version is kept


def test_a_switch_cut_short_is_finished_at_boot(
    tmp_path: Path, gateway: tuple[Appliance, Supervisor, Path], installed: Path,
    keys: tuple[Path, Path],
) -> None:
    """A power cut after the link moved to a version whose daemon cannot start: the next
    boot's installer run (the journal) judges it and goes back."""
    app, supervisor, root_dir = gateway
    private, public = keys
    source = make_bundle(tmp_path, "0.3.0", private, {
        "appliance/__main__.py": b"raise SystemExit('broken on purpose')\n"})
    found = bundle.verify(source, public.read_bytes())
    bundle.extract(source, found, installed / "0.3.0")
    root_dir.mkdir()
    (root_dir / "switch.json").write_text('{"from": "0.1.0", "to": "0.3.0"}')
    os.replace(installed / "current", installed / "old")
    (installed / "current").symlink_to("0.3.0")
    supervisor.restart()  # "the boot": systemd starts the daemon the link names
    installer = Installer(Paths(installed, app.state_dir / updatefiles.REQUEST, root_dir,
                                public), SupervisedDaemon(supervisor, app), health_timeout=60)
    assert installer.run() == 0  # no request: the journal alone was finished
    assert os.readlink(installed / "current") == "0.1.0"
    result = updatefiles.read_result(root_dir / "result.json")
    assert result is not None and (result["outcome"], result["version"]) == (
        "rolled_back", "0.3.0")
    assert not (root_dir / "switch.json").exists()
    wait_until(lambda: SupervisedDaemon(supervisor, app).version() == "0.1.0", 30,
               "0.1.0 running again")
