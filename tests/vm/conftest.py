"""Fixtures for the VM tests: the OVA (built once per run), the control plane, booted guests.

`make test` builds the OVA and passes it as APPLIANCE_OVA; without it the session builds one
into build/test-image/ (about 3-5 minutes). Guests boot under TCG unless APPLIANCE_ACCEL
says otherwise (tools/image/accel.sh probes KVM once per machine).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from vmharness import (  # type: ignore[import-not-found]
    OVA_BUILD_TIMEOUT,
    REPO,
    ControlPlane,
    Guest,
)

from tools.image.vm import extract_disk


def _version() -> str:
    ns: dict[str, str] = {}
    exec((REPO / "appliance" / "version.py").read_text(), ns)
    return ns["__version__"]


@pytest.fixture(scope="session")
def appliance_ova() -> Path:
    given = os.environ.get("APPLIANCE_OVA")
    if given:
        path = Path(given)
        if not path.is_absolute():
            path = REPO / path
        assert path.is_file(), f"APPLIANCE_OVA={given} does not exist"
        return path
    out = REPO / "build" / "test-image" / f"backup-gateway-{_version()}.ova"
    subprocess.run([str(REPO / "tools/image/build-ova.sh"), _version(), str(out)],
                   cwd=REPO, check=True, timeout=OVA_BUILD_TIMEOUT)
    return out


@pytest.fixture(scope="session")
def accel() -> str:
    return subprocess.run([str(REPO / "tools/image/accel.sh")], capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.fixture(scope="session")
def vm_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vm")


@pytest.fixture(scope="session")
def appliance_disk(appliance_ova: Path, vm_workdir: Path) -> Path:
    return extract_disk(appliance_ova, vm_workdir / "disk")


@pytest.fixture(scope="session")
def vm_control_plane(vm_workdir: Path) -> Iterator[ControlPlane]:
    state = vm_workdir / "controlplane"
    state.mkdir()
    cp = ControlPlane(state)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="module")
def bios_guest(appliance_disk: Path, vm_workdir: Path, vm_control_plane: ControlPlane,
               accel: str) -> Iterator[Guest]:
    """The BIOS-booted guest (powered on, maybe not up yet), shared by the checks of one
    module: a boot costs 40-130 s under TCG. Tests wait for what they need through the
    fixtures of their module, never through the order the tests run in."""
    guest = Guest("bios", appliance_disk, vm_workdir, vm_control_plane.port, "bios", accel)
    try:
        yield guest
    finally:
        guest.stop()


FIGURES: list[str] = []


@pytest.fixture(name="figure")
def figure_fixture() -> Callable[[str], None]:
    """Record a measured figure; `make test` prints them all at the end, where CI shows them."""
    return FIGURES.append


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The figures, then the host's load: boot seconds under TCG from a busy host are not
    comparable with a quiet one's (the same-run ratio to the bare-Debian boot still is)."""
    if FIGURES:
        terminalreporter.section("measured figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
        one, five, _ = os.getloadavg()
        terminalreporter.write_line(
            f"host load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} CPUs"
            " at the end: absolute boot seconds are only comparable on a quiet host")
