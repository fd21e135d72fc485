"""The bandwidth state on the console: the header line and menu 7, after a schedule put with
the real AWS CLI, against the real daemon and control plane, in an 80x24 pseudo-terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from appliance.console.bandwidth import header_line, summary, when
from tests.conftest import activate

pytestmark = pytest.mark.slow

RATE = 100_000_000
CLEAR = "\x1b[H\x1b[2J"
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")



def schedule_until_day_after_tomorrow() -> tuple[list[dict], datetime]:
    """A limit in force now (even across midnight) that ends at a known instant."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    free = today + timedelta(days=2)
    free_day = (free.weekday() + 1) % 7  # the API's 0 = Sunday
    days = [d for d in range(7) if d != free_day]
    return [{
        "AverageUploadRateLimitInBitsPerSec": RATE,
        "StartHourOfDay": 0, "StartMinuteOfHour": 0, "EndHourOfDay": 23, "EndMinuteOfHour": 59,
        "DaysOfWeek": days,
    }], free


def redraw(con) -> str:
    """Make the main menu redraw (a wrong choice does) and return the fresh screen."""
    con.send("z")
    con.seen("is not a choice")
    return con.seen("Enter command:")


def screen_lines(text: str) -> list[str]:
    """The lines of the last full redraw, without escape sequences."""
    last = text.rsplit(CLEAR, 1)[-1]
    return [ESCAPES.sub("", line) for line in last.split("\n")]


def test_header_and_menu_7_show_the_limit_put_with_the_aws_cli(
    control_plane, appliance, console_factory, wait_until, tmp_path
) -> None:
    cp, app = control_plane, appliance
    arn = activate(cp, app, "bw")
    con = console_factory(app.socket_path)
    con.login()
    header = redraw(con)
    assert "Bandwidth: no limit" in header and "7: View bandwidth schedule" in header
    assert "6: Command prompt" in header and "0: Get activation key" in header

    intervals, free = schedule_until_day_after_tomorrow()
    cp.aws("put-bandwidth-rate-limit-schedule", "--gateway-arn", arn,
           "--bandwidth-rate-limit-intervals", json.dumps(intervals))
    wait_until(lambda: app.api("GET", "/v1/shaping")[1]["limitBitsPerSec"] == RATE,
               what="schedule applied")
    header = redraw(con)
    assert f"Bandwidth: 100.0 Mbit/s until {free:%a} 00:00 UTC" in header

    # An upload running: the header says how fast.
    data = tmp_path / "console-upload.bin"
    data.write_bytes(os.urandom(16 * 1024 * 1024))
    upload = subprocess.Popen(
        [sys.executable, "-m", "appliance", "upload", str(data), "--socket",
         str(app.socket_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: app.api("GET", "/v1/shaping")[1]["achievedBitsPerSec"] > 0,
                   what="upload metered")
        header = redraw(con)
        assert re.search(r"until \w{3} 00:00 UTC \(uploading [0-9.]+ [kMG]?bit/s\)", header)
    finally:
        _, err = upload.communicate(timeout=120)
    assert upload.returncode == 0, err

    con.send("7")
    screen = con.seen("Press Return to continue")
    assert "Current limit:   100.0 Mbit/s" in screen
    assert f"Next change:     {free:%a} 00:00 UTC" in screen and "to no limit" in screen
    assert "In force:" in screen and "00:00-23:59 100.0 Mbit/s" in screen
    assert f"{free:%a}" in screen and "no limit" in screen  # the week preview
    lines = screen_lines(screen)
    assert len(lines) <= 23 and max(len(line) for line in lines) <= 80, lines
    con.send("")
    con.seen("Enter command:")


def test_header_line_and_summary_formats() -> None:
    assert header_line({"limitBitsPerSec": None, "nextChange": None,
                        "achievedBitsPerSec": 0.0}) == "Bandwidth: no limit"
    line = header_line({"limitBitsPerSec": 100_000_000, "nextChange": "2024-01-01T18:00:00Z",
                        "achievedBitsPerSec": 12_345_678.9})
    assert line == "Bandwidth: 100.0 Mbit/s until Mon 18:00 UTC (uploading 12.3 Mbit/s)"
    assert header_line(None) == "Bandwidth: unknown"
    assert when("not a time") is None
    now = datetime(2024, 1, 1, 14, 0, tzinfo=UTC)  # a Monday
    item = {"AverageUploadRateLimitInBitsPerSec": 51_200, "StartHourOfDay": 8,
            "StartMinuteOfHour": 0, "EndHourOfDay": 17, "EndMinuteOfHour": 59,
            "DaysOfWeek": [1]}
    lines = summary({"intervals": [item]},
                    {"limitBitsPerSec": 51_200, "inForce": item,
                     "nextChange": "2024-01-01T18:00:00Z", "achievedBitsPerSec": 0}, now)
    text = "\n".join(lines)
    assert "Mon 08:00-17:59 51.2 kbit/s" in text
    assert "Next change:     Mon 18:00 UTC (in 4 h 0 min) to no limit" in text
    assert "Uploading now:   idle" in text
