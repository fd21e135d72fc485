"""The appliance's boot against a bare Debian image's, measured in the same run (issue 14).

One fresh BIOS boot of each, one after the other, with real QEMU and the same flags
(tools/bootbench.py, which `make bench` runs with more rounds):

- the appliance's power-on to an activation key on port 80 against the bare image's
  power-on to an HTTP answer on port 80 (a ratio, because absolute TCG seconds move with
  the host's load): the issue's goals, 0.8x and 25 s, are asserted when the bare boot shows
  a quiet host (fourth pass: 0.62-0.69x per pair, 12.7-14.9 s, docs/image.md "Boot"); on a
  busy host only that the appliance is not slower than a stock Debian;
- the serial console must show the boot's progress (GRUB's steps, one line per unit from
  systemd) and then the appliance's banner with its address and the activation URL.

Deadlines: building the bare image when build/bootbench/ has none (about 2 min, at most 30),
two boots of at most 300 s each, the agent's report (120 s) and the banner (60 s).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from vmharness import ControlPlane, vm_timeout  # type: ignore[import-not-found]

from tools import bootbench

pytestmark = [pytest.mark.vm, pytest.mark.slow]

BASELINE_BUILD = 1800
PAIR = 300 + 300 + 120 + 60
# A bare boot slower than this says the host was busy (quiet: 21-26 s BIOS under TCG): the
# goals are asserted below it. Above it, a busy host takes the two vCPUs' parallelism away and
# the appliance's boot, heavier in CPU than the bare one, loses more (the second pass measured
# 1.32x at load 4+): only "not slower than a stock Debian" is asserted then.
QUIET_BARE_SECONDS = 32.0
BUSY_RATIO = 1.0
BANNER = r"Activation key: http://10\.0\.2\.15/"


@pytest.fixture(scope="module")
def boot_pair(appliance_disk: Path, vm_workdir: Path, vm_control_plane: ControlPlane,
              accel: str) -> dict[str, bootbench.Boot]:
    """A fresh boot of the bare-Debian baseline, then one of the appliance (BIOS)."""
    bare_disk = bootbench.baseline_disk()
    work = vm_workdir / "bootbench"
    bare = bootbench.boot_baseline(bare_disk, work, "bios", accel)
    appliance = bootbench.boot_appliance(appliance_disk, work, vm_control_plane.port, "bios",
                                         accel, serial_until=BANNER)
    return {"bare": bare, "appliance": appliance}


def goals(ratio: float, seconds: float) -> str:
    """Each of the issue's two goals with its own verdict: one "met" must not cover both."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    return (f"goal ratio <= {bootbench.TARGET_RATIO}: {verdict(ratio <= bootbench.TARGET_RATIO)}; "
            f"goal <= {bootbench.TARGET_SECONDS:.0f} s: "
            f"{verdict(seconds <= bootbench.TARGET_SECONDS)}")


@vm_timeout(BASELINE_BUILD + PAIR + 60)
def test_boot_to_key_against_a_bare_debian_boot(boot_pair, figure) -> None:
    appliance, bare = boot_pair["appliance"], boot_pair["bare"]
    ratio = appliance.seconds / bare.seconds
    figure(f"boot vs bare Debian (BIOS, same run): appliance power-on to a key "
           f"{appliance.seconds:.1f} s, bare Debian power-on to HTTP {bare.seconds:.1f} s, "
           f"ratio {ratio:.2f} ({goals(ratio, appliance.seconds)})")
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in appliance.stages.items())
    figure(f"boot stages (BIOS): {stages}")
    detail = (f"the appliance took {appliance.seconds:.1f} s to a key, {ratio:.2f}x the bare "
              f"image's {bare.seconds:.1f} s to HTTP; stages: {stages}\n{appliance.guest_report}")
    if bare.seconds <= QUIET_BARE_SECONDS:
        assert ratio <= bootbench.TARGET_RATIO, detail
        assert appliance.seconds <= bootbench.TARGET_SECONDS, detail
    else:
        assert ratio <= BUSY_RATIO, detail


@vm_timeout(BASELINE_BUILD + PAIR + 60)
def test_serial_console_shows_progress_then_the_ready_banner(boot_pair) -> None:
    boot = boot_pair["appliance"]
    lines = [line for _, line in boot.serial]

    def at(pattern: str) -> float:
        found = next((t for t, line in boot.serial if re.search(pattern, line)), None)
        assert found is not None, f"no serial line matches {pattern!r}:\n" + "\n".join(lines)
        return found

    grub = at(r"Loading the kernel")
    unit = at(r"Started appliance\.service")  # systemd.status_unit_format=name
    eth0 = at(r"eth0: 10\.0\.2\.15")
    banner = at(BANNER)
    # progress first, then the banner of a daemon that serves (its console waits for it)
    assert grub < unit < banner and eth0 <= banner, (grub, unit, eth0, banner)
    # the banner's last line (the login prompt after it ends no line, so it is not recorded)
    assert at(r"^Log in to change the network") >= banner
    # systemd's progress is one short line per unit, not its descriptions
    assert not any("Backup gateway appliance daemon" in line for line in lines), lines
