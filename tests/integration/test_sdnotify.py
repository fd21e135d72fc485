"""Readiness for systemd: the real daemon says READY=1 on $NOTIFY_SOCKET once port 80 and the
local API answer, and STOPPING=1 when it stops (appliance.service is Type=notify, and the
boot's other units wait for it: docs/image.md, "Boot"). The socket is a real AF_UNIX datagram
socket, named by path and in the abstract namespace, as systemd names it."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest

from appliance.sdnotify import notify
from tests.conftest import Proc, child_env

pytestmark = pytest.mark.slow


def receiver(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:] if name.startswith("@") else name)
    sock.settimeout(60)  # the daemon's start; a missing READY=1 fails here, not by hanging
    return sock


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_after_port_80_and_api_then_stopping(
    control_plane: Any, make_appliance: Any, tmp_path: Path, abstract: bool
) -> None:
    name = f"@appliance-notify-{os.getpid()}" if abstract else str(tmp_path / "notify")
    with receiver(name) as sock:
        app = make_appliance(control_plane.url, start=False)
        app.proc = Proc(app.argv, env=child_env(NOTIFY_SOCKET=name))
        assert sock.recv(256) == b"READY=1"
        # Ready means serving: both answer at once, with no wait.
        status, _, _ = app.get("/?activationRegion=us-west-2&gatewayType=BACKUP_VM&no_redirect")
        assert status == 200
        assert app.status()["activated"] is False
        app.proc.stop()
        assert sock.recv(256) == b"STOPPING=1"
        assert app.proc.popen.returncode == 0


def test_notify_without_a_manager_does_nothing(tmp_path: Path) -> None:
    assert notify("READY=1", environ={}) is False
    assert notify("READY=1", environ={"NOTIFY_SOCKET": "relative/name"}) is False
    # A socket named but gone (systemd restarted): not the daemon's failure.
    assert notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
