"""`POST /v1/clock-stepped` on a real daemon: it answers, and the daemon re-reads the clock.

The machine's clock is never stepped here (other tests run on it): the call is what the
console makes after it synchronises the time, and the daemon's answer and its
`event=clock_resync` log line show the shaper re-read the wall clock. The watcher's own
detection of a step is tested with injected clocks in tests/unit/test_clock_step.py.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

import pexpect
import pytest

from appliance.console.auth import PasswordStore
from appliance.localclient import ApiError, LocalApi

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SHAPING_KEYS = {"limitBitsPerSec", "inForce", "nextChange", "achievedBitsPerSec"}


def test_the_call_answers_and_the_daemon_resyncs(appliance: Any) -> None:
    api = LocalApi(str(appliance.socket_path))
    mark = len(appliance.proc.lines)
    doc = api.clock_stepped()
    assert set(doc) == SHAPING_KEYS
    assert doc["limitBitsPerSec"] is None  # no schedule: no limit, before and after
    assert doc == {**api.shaping(), "achievedBitsPerSec": doc["achievedBitsPerSec"]}
    appliance.proc.wait_for_line(r"event=clock_resync source=api", start=mark)


def test_other_methods_get_the_json_405(appliance: Any) -> None:
    code, doc = appliance.api("GET", "/v1/clock-stepped")
    assert code == 405
    assert doc == {"error": "MethodNotAllowed", "message": "GET not allowed; use POST",
                   "field": None}
    with pytest.raises(ApiError) as refused:
        LocalApi(str(appliance.socket_path))._call("PUT", "/v1/clock-stepped", {})
    assert refused.value.status == 405 and refused.value.code == "MethodNotAllowed"


def test_a_body_is_ignored(appliance: Any) -> None:
    code, doc = appliance.api("POST", "/v1/clock-stepped", {"anything": [1, 2]})
    assert code == 200 and set(doc) == SHAPING_KEYS


def closed_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_console_tells_the_daemon_after_a_time_sync(appliance: Any, tmp_path: Path) -> None:
    """Menu 5, option 1, 'Synchronize the time now': the console calls the API after it.

    `--no-apply`, and an NTP port nobody answers on: the clock is not stepped, but the call
    is made all the same (a resync that finds nothing changed costs nothing).
    """
    password = "s3cret-pass"
    PasswordStore(tmp_path / "console-password").set(password)
    conf = tmp_path / "timesyncd.conf.d" / "appliance.conf"
    conf.parent.mkdir()
    conf.write_text("[Time]\nNTP=127.0.0.1\n")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "appliance", "console", "--socket", str(appliance.socket_path),
         "--password-file", str(tmp_path / "console-password"),
         "--networkd-dir", str(tmp_path / "network"), "--timesyncd-conf", str(conf),
         "--hostname-file", str(tmp_path / "hostname"),
         "--ntp-port", str(closed_udp_port()), "--ntp-timeout", "1",
         "--no-apply", "--log-file", str(tmp_path / "console.log")],
        cwd=str(REPO),
        env={"TERM": "vt100", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
             "LANG": "C.UTF-8", "HOME": str(tmp_path)},
        dimensions=(24, 80), timeout=30, encoding="utf-8", codec_errors="replace",
    )
    try:
        for prompt, answer in (("login:", "admin"), ("Password:", password),
                               ("Enter command:", "5"), ("Enter command:", "1")):
            child.expect(re.escape(prompt))
            child.sendline(answer)
        mark = len(appliance.proc.lines)
        child.expect(re.escape("Synchronize the time now [y/n]:"))
        child.sendline("y")
        child.expect(re.escape("Press Return"))
        assert "No NTP server answered" in child.before
        assert "The daemon re-read the clock" in child.before
        appliance.proc.wait_for_line(r"event=clock_resync source=api", start=mark)
    finally:
        child.terminate(force=True)
