"""The boot benchmark's split of power-on to key, from the guest agent's report: it must hold
while the boot is still finishing (the units that wait for the daemon's readiness often are,
and systemd-analyze then prints no kernel figure)."""

from __future__ import annotations

import pytest

from tools.bootbench import stages

UNFINISHED = (
    "10.50 5.10\n---\n"
    "Bootup is not yet finished (org.freedesktop.systemd1.Manager.FinishTimestampMonotonic=0).\n"
    "userspace_us=3120000\n---\n"
    "5000000\n---\n"
    "9400000\n---\n"
    "blame\n---\nchain\n"
)


def test_stages_while_the_boot_is_still_finishing() -> None:
    # agent answered at host 14.0 s after power-on, guest uptime 10.5 s: kernel at 3.5 s;
    # the key came back at 13.2 s
    got = stages(UNFINISHED, host_now=14.0, key_seconds=13.2)
    assert got == pytest.approx({
        "firmware + GRUB": 3.5,
        "kernel + initramfs": 3.12,
        "userspace until appliance.service starts": 5.0 - 3.12,
        "daemon start until event=ready": 9.4 - 5.0,
        "ready until the key is back": 13.2 - 3.5 - 9.4,
    })
    assert sum(got.values()) == pytest.approx(13.2)
