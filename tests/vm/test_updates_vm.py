"""Software updates in the booted image (docs/updates.md), with the image's own systemd:
`appliance-update.path` starts the root installer when the daemon asks, the installer
restarts `appliance.service` and health-checks it.

One fresh BIOS guest at version N (the OVA's) is activated, then three bundles are
published to the control plane and each installed with the real AWS CLI's
update-gateway-software-now: N+1 signed with a stranger's key (refused), N+2 whose daemon
cannot start (installed, unhealthy, rolled back to N, reported), N+3 (installed; GetGateway
shows it; it survives a reboot). Bundles are signed with build/release/release-key.pem,
the key whose public half `make ova` put into this image.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from vmharness import (  # type: ignore[import-not-found]
    REPO,
    ControlPlane,
    Guest,
    poll,
    vm_timeout,
)

from gatewaycore import bundle
from tools import release

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def status_or_none(guest: Guest) -> dict[str, Any] | None:
    try:
        return guest.status()
    except (AssertionError, OSError, ValueError):  # the daemon restarting, or the agent
        return None


def last_result(guest: Guest, outcome: str, version: str) -> dict[str, Any] | None:
    status = status_or_none(guest)
    last = (status or {}).get("softwareUpdate", {}).get("lastResult") or {}
    return status if (last.get("outcome"), last.get("version")) == (outcome, version) else None


def versions_after(installed: str) -> list[str]:
    major, minor, patch = bundle.parse_version(installed)[:3]
    return [f"{major}.{minor}.{patch + n}" for n in (1, 2, 3)]


@vm_timeout(300 + 120 + 240 + 3 * 360 + 240 + 180)
def test_update_refused_rolled_back_installed_and_kept_after_a_reboot(
    appliance_disk: Path, vm_workdir: Path, vm_control_plane: ControlPlane, accel: str,
    tmp_path: Path, figure: Any,
) -> None:
    key = REPO / "build" / "release" / release.PRIVATE
    guest = Guest("update", appliance_disk, vm_workdir, vm_control_plane.port, "bios", accel)
    try:
        _, activation_key = guest.wait_for_key()
        guest.qga.sync(timeout=120)
        image_key = guest.qga.sh("cat /usr/share/appliance/release-key.pub")
        assert image_key == (key.parent / release.PUBLIC).read_text(), (
            "this OVA trusts another release key than build/release/: build it with this "
            "checkout (make ova)")
        arn = vm_control_plane.aws("create-gateway", "--activation-key", activation_key,
                                   "--gateway-display-name", "update-test",
                                   "--gateway-type", "BACKUP_VM")["GatewayArn"]
        installed = poll(lambda: (status_or_none(guest) or {}).get("activated")
                         and guest.status()["softwareVersion"], 120, "the activation")
        bad, broken, good = versions_after(installed)

        def publish(version: str, signer: Path, change: dict[str, bytes] | None = None
                    ) -> None:
            files = dict(release.source_files())
            files.update(change or {})
            path = tmp_path / f"{version}.bundle"
            path.write_bytes(bundle.build(files.items(), version, signer.read_bytes(), "t"))
            subprocess.run([sys.executable, "-m", "controlplane", "publish-update",
                            "--state-dir", str(vm_control_plane.state_dir), str(path)],
                           cwd=REPO, check=True, capture_output=True, timeout=60)
            vm_control_plane.aws("update-gateway-software-now", "--gateway-arn", arn)

        def get_gateway() -> dict[str, Any]:
            return vm_control_plane.aws("get-gateway", "--gateway-arn", arn)["Gateway"]

        # N+1, a stranger's signature: refused by the installer in the guest
        stranger, _ = release.keygen(tmp_path / "stranger")
        publish(bad, stranger)
        refused = poll(lambda: last_result(guest, "refused", bad), 360, "the refusal",
                       interval=2)
        assert "not signed by this appliance's release key" in \
            refused["softwareUpdate"]["lastResult"]["message"]
        assert refused["softwareVersion"] == installed
        assert "NextUpdateAvailabilityTime" in get_gateway()

        # N+2, a daemon that cannot start: health check fails, rolled back to N, reported
        publish(broken, key, {"appliance/__main__.py": b"raise SystemExit('broken')\n"})
        rolled = poll(lambda: last_result(guest, "rolled_back", broken), 360,
                      "the rollback", interval=2)
        assert rolled["softwareVersion"] == installed
        assert "failed its health check" in rolled["softwareUpdate"]["lastResult"]["message"]
        assert guest.qga.sh("readlink /opt/appliance/current").strip() == installed
        assert guest.qga.exec(["test", "-e", f"/opt/appliance/{broken}"])[0] != 0

        # N+3: installed, running, reported to the control plane
        publish(good, key)
        done = poll(lambda: last_result(guest, "installed", good), 360, "the install",
                    interval=2)
        assert done["softwareVersion"] == good
        model_version = good.replace(".", "-")
        poll(lambda: get_gateway().get("SoftwareVersion") == model_version, 120,
             "GetGateway's SoftwareVersion", interval=2)
        assert "NextUpdateAvailabilityTime" not in get_gateway()
        unit = guest.qga.sh("systemctl show -p ActiveState,Result appliance-update.service")
        assert "Result=success" in unit, unit

        # ... and still after a reboot
        guest.reboot(240)
        after = poll(lambda: status_or_none(guest), 180, "the daemon after the reboot")
        assert after["softwareVersion"] == good
        assert guest.qga.sh("readlink /opt/appliance/current").strip() == good
        figure(f"software update in the VM: {installed} -> {good}, refused and rolled-back "
               "bundles reported")
    finally:
        guest.stop()
