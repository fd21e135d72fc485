"""The fleet benchmark's command line refuses a bad `--fleet-nice` in one line that names the
option and the accepted values, before it starts anything (tools/fleetbench.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("value", ["20", "-1", "high", ""])
def test_bad_fleet_nice_is_refused_with_the_accepted_values(value: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tools.fleetbench", "--gateways", "1", "--fleet-nice", value],
        cwd=REPO, capture_output=True, text=True, timeout=50, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--fleet-nice" in done.stderr
    assert "accepted values are 'idle' or 0 to 19" in done.stderr
    assert "Traceback" not in done.stderr
