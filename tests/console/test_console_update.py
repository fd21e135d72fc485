"""The console's software update lines (docs/updates.md) in a real pseudo-terminal, against
the real daemon and control plane: the installed version, a published update and when it
installs (the maintenance window set with the AWS CLI), and a failed update with why."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.console.app import update_lines
from gatewaycore import bundle
from tests.conftest import PYTHON, activate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_update_line_shapes() -> None:
    assert update_lines(None) == []
    assert update_lines({"available": None, "maintenanceWindow": None}) == []
    assert update_lines({"maintenanceWindow": "Sundays 03:30 UTC"}) == [
        "Maintenance window: Sundays 03:30 UTC"]
    assert update_lines({"available": {"version": "0.2.0"}}) == [
        "Software update 0.2.0 available",
        "  installs on UpdateGatewaySoftwareNow (no maintenance window)"]
    failed = {"outcome": "rolled_back", "version": "0.2.0", "message": "why",
              "at": "2026-11-27T03:00:00Z"}
    assert update_lines({"phase": "downloading 0.2.0", "lastResult": failed}) == [
        "Software update: downloading 0.2.0",
        "Last update 0.2.0 rolled back at 2026-11-27T03:00:00Z:", "  why"]
    assert update_lines({"lastResult": {**failed, "outcome": "installed"}}) == []


def test_header_shows_the_version_an_update_and_its_window(
    control_plane: Any, appliance: Any, console_factory: Any, tmp_path: Path,
    wait_until: Callable[..., Any],
) -> None:
    arn = activate(control_plane, appliance)
    private, _ = bundle.new_key()
    source = tmp_path / "u.bundle"
    source.write_bytes(bundle.build([("appliance/version.py", b'__version__ = "x"\n')],
                                    "99.0.0", private, "t"))
    subprocess.run([PYTHON, "-m", "controlplane", "publish-update", "--state-dir",
                    str(control_plane.state_dir), str(source)], check=True, timeout=60,
                   capture_output=True)
    control_plane.aws("put-maintenance-start-time", "--gateway-arn", arn, "--hour-of-day",
                      "3", "--minute-of-hour", "30", "--day-of-week", "0")
    wait_until(lambda: appliance.status()["softwareUpdate"]["available"], 30,
               what="the offer in the daemon's status")
    con = console_factory(appliance.socket_path)
    con.login()
    con.send("\x0c")  # Ctrl-L: a fresh header
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", con.seen("Enter command:"))
    lines = [line.rstrip("\r") for line in shown.split("\n")]
    assert "Software version 0.1.0" in lines
    at = lines.index("Software update 99.0.0 available")
    assert re.fullmatch(r"  installs 20\d\d-\d\d-\d\dT03:30:00Z \(window: Sundays 03:30 UTC\)",
                        lines[at + 1]), lines[at + 1]
    assert all(len(line) < 80 for line in lines)
