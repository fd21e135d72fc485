"""`make bench`'s fleet benchmark runs (tools/fleetbench.py) on a tiny fleet: its simulated
gateways are the appliance's own link client and link loop, so a change to either that the
bench does not follow shows here, not first in a 10,000-gateway run. The figures of so small
a run are not checked (the bench's own goals are for its real sizes), only that it ran
clean: every gateway activated and polled, every call answered, every Put reached."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.timeout(240)]


def test_a_tiny_fleet_runs_clean() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tools.fleetbench", "--gateways", "20", "--idle-seconds", "2",
         "--steady-seconds", "5", "--rate", "6", "--list-rate", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=200, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "activated 20/20" in out, out[-3000:]
    polls = re.search(r"polls answered \(all phases\)\s+(\d+)", out)
    assert polls and int(polls.group(1)) >= 20, out[-3000:]
    errors = re.search(r"errors\s+(\d+)", out)
    assert errors and errors.group(1) == "0", out[-3000:]
    # The control plane's own share of the calls is measured inside it and printed too.
    inside = out.split("the same calls inside the control plane", 1)
    assert len(inside) == 2, out[-3000:]
    for label in ("GetGateway", r"Put\*", "a durable commit's WAL fsync"):
        row = re.search(label + r" p99\s+[\d.]+ m?s\s+\(n=(\d+)\)", inside[1])
        assert row and int(row.group(1)) > 0, (label, inside[1])
    # ... and split at the client (the HTTP exchange alone) and by the loop's lateness.
    exchange = out.split("the same calls' HTTP exchange at the client", 1)
    assert len(exchange) == 2, out[-3000:]
    row = re.search(r"GetGateway p99\s+[\d.]+ m?s\s+\(n=(\d+)\)", exchange[1])
    assert row and int(row.group(1)) > 0, exchange[1]
    late = re.search(r"running a due callback late by, p99\s+[\d.]+ m?s\s+\(n=(\d+)", out)
    assert late and int(late.group(1)) > 0, out[-3000:]
