"""Uploads through the daemon's local API and its one shaper, and the bandwidth schedule as
the appliance applies it: the real control plane, the real daemon, the real AWS CLI.

Every upload goes `python -m appliance upload` -> the local API (Unix socket) -> the daemon's
ScheduledShaper -> the control plane's `PUT /gateway/data/{name}`; the tests check the bytes
the control plane wrote to its data directory, not just what it answered.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from appliance.localclient import UnixHTTPConnection
from tests.conftest import activate

pytestmark = pytest.mark.slow

ALL_WEEK = [0, 1, 2, 3, 4, 5, 6]
RESULT = re.compile(r"^uploaded (\S+): (\d+) bytes sha256 ([0-9a-f]{64}) in ")


def whole_week(rate: int) -> list[dict[str, Any]]:
    return [{
        "AverageUploadRateLimitInBitsPerSec": rate,
        "StartHourOfDay": 0, "StartMinuteOfHour": 0,
        "EndHourOfDay": 23, "EndMinuteOfHour": 59,
        "DaysOfWeek": ALL_WEEK,
    }]



def put_schedule(cp: Any, arn: str, intervals: list[dict[str, Any]]) -> None:
    cp.aws("put-bandwidth-rate-limit-schedule", "--gateway-arn", arn,
           "--bandwidth-rate-limit-intervals", json.dumps(intervals))


def limit(app: Any) -> Any:
    code, doc = app.api("GET", "/v1/shaping")
    assert code == 200, doc
    return doc["limitBitsPerSec"]


def cli_upload(app: Any, path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "appliance", "upload", str(path), "--socket",
         str(app.socket_path), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def run_upload(app: Any, path: Path, *extra: str) -> tuple[int, str, str]:
    proc = cli_upload(app, path, *extra)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def stored(cp: Any, name: str) -> list[Path]:
    """The files named `name` in the control plane's data directory (one per gateway)."""
    return sorted((cp.state_dir / "data").glob(f"*/{name}"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_put(app: Any, name: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """A plain PUT (no Expect header) with a Content-Length body, as curl would send it."""
    conn = UnixHTTPConnection(str(app.socket_path), timeout=60)
    try:
        conn.request("PUT", name, body=body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_upload_lands_with_the_same_sha256_and_is_metered(
    control_plane: Any, appliance: Any, wait_until: Any, tmp_path: Path
) -> None:
    cp, app = control_plane, appliance
    arn = activate(cp, app, "uploads")
    # A limit that makes the upload take a moment, so the meter is read while it runs.
    rate = 16_000_000
    put_schedule(cp, arn, whole_week(rate))
    wait_until(lambda: limit(app) == rate, what="schedule applied")

    data = tmp_path / "vm-disk.img"
    data.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    proc = cli_upload(app, data)
    def metered() -> bool:
        return app.api("GET", "/v1/shaping")[1]["achievedBitsPerSec"] > 0

    wait_until(metered, 30, "the upload to show in achievedBitsPerSec")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    match = RESULT.match(out.strip())
    assert match and out.count("\n") == 1, out
    assert match.group(1) == "vm-disk.img" and int(match.group(2)) == data.stat().st_size
    [on_disk] = stored(cp, "vm-disk.img")
    assert sha256(on_disk) == sha256(data) == match.group(3)
    assert on_disk.parent.name in arn  # stored under the gateway's id
    app.proc.wait_for_line(rf"event=upload_done name=vm-disk.img bytes={data.stat().st_size} ")

    # --name, and a plain PUT with a Content-Length body (no Expect) also work.
    code, out, err = run_upload(app, data, "--name", "second.copy")
    assert code == 0, err
    assert sha256(stored(cp, "second.copy")[0]) == sha256(data)
    body = b"small body " * 1000
    status, doc = raw_put(app, "/v1/uploads/small.bin", body)
    assert status == 201, doc
    assert doc["sha256"] == hashlib.sha256(body).hexdigest() == sha256(stored(cp, "small.bin")[0])
    assert doc["size"] == len(body)


def test_upload_refused_before_activation_and_for_bad_names(
    control_plane: Any, appliance: Any, wait_until: Any, tmp_path: Path
) -> None:
    cp, app = control_plane, appliance
    data = tmp_path / "early.bin"
    data.write_bytes(os.urandom(2 * 1024 * 1024))
    code, out, err = run_upload(app, data)
    assert code == 1 and out == ""
    assert "409 NotActivated" in err and "not activated" in err and err.count("\n") == 1
    status, doc = raw_put(app, "/v1/uploads/early.bin", b"abc")
    assert status == 409 and doc["error"] == "NotActivated"
    assert not (cp.state_dir / "data").exists() or not stored(cp, "early.bin")

    activate(cp, app, "uploads")
    for bad in ("..", "sp%20ace", "x" * 201):
        status, doc = raw_put(app, f"/v1/uploads/{bad}", b"abc")
        assert status == 400, (bad, doc)
        assert doc["error"] == "ValidationError" and doc["field"] == "name"
        assert "A-Z a-z 0-9 . _ -" in doc["message"]
    code, _, err = run_upload(app, data, "--name", "no/slash")
    assert code == 1 and "400 ValidationError" in err and "A-Z a-z 0-9 . _ -" in err
    code, _, err = run_upload(app, tmp_path / "missing.bin")
    assert code == 2 and "cannot read" in err and "Traceback" not in err
    # Once activated, the same file goes through.
    code, out, err = run_upload(app, data)
    assert code == 0, err
    assert sha256(stored(cp, "early.bin")[0]) == sha256(data)


def test_schedule_put_with_the_aws_cli_is_applied_within_5_seconds(
    control_plane: Any, appliance: Any, wait_until: Any
) -> None:
    cp, app = control_plane, appliance
    arn = activate(cp, app, "uploads")
    assert limit(app) is None
    for rate in (104_857_600, 51_200):
        put_schedule(cp, arn, whole_week(rate))
        # A deadline, not a sleep: fails if the daemon has not applied it 5 s after the put.
        wait_until(lambda r=rate: limit(app) == r, 5.0, f"limit {rate} within 5 s")
    put_schedule(cp, arn, [])
    wait_until(lambda: limit(app) is None, 5.0, "no limit within 5 s")


def test_schedule_enforced_across_a_restart_while_the_control_plane_is_down(
    control_plane: Any, appliance: Any, wait_until: Any, tmp_path: Path
) -> None:
    cp, app = control_plane, appliance
    arn = activate(cp, app, "uploads")
    first, second = 20_000_000, 300_000_000
    put_schedule(cp, arn, whole_week(first))
    wait_until(lambda: limit(app) == first, what="first schedule applied")

    # Changed while the appliance is down, then the control plane goes down too.
    app.stop()
    put_schedule(cp, arn, whole_week(second))
    cp.stop()
    app.start()
    assert limit(app) == first  # from the state on disk, without the control plane
    code, doc = app.api("GET", "/v1/schedule")
    assert doc["intervals"] == whole_week(first) and doc["preview"]
    wait_until(lambda: app.status()["controlPlane"]["reachable"] is False or None,
               what="link seen down")
    app.proc.wait_for_line(r"event=link_retry")
    assert limit(app) == first
    data = tmp_path / "during-outage.bin"
    data.write_bytes(b"x" * 100_000)
    code, _, err = run_upload(app, data)
    assert code == 1 and "504 ControlPlaneUnreachable" in err

    cp.start()
    wait_until(lambda: limit(app) == second, what="catch-up with the schedule put meanwhile")
    code, _, err = run_upload(app, data)
    assert code == 0, err
    assert sha256(stored(cp, "during-outage.bin")[0]) == sha256(data)


def test_local_client_cut_off_mid_upload_leaves_nothing(
    control_plane: Any, appliance: Any, wait_until: Any
) -> None:
    """The local client sends half its declared body and disconnects: the daemon must not
    let the control plane store a truncated file, and must stay up."""
    cp, app = control_plane, appliance
    arn = activate(cp, app, "uploads")
    put_schedule(cp, arn, whole_week(8_000_000))
    wait_until(lambda: limit(app) == 8_000_000, what="schedule applied")
    mark = len(app.proc.lines)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(app.socket_path))
    sock.sendall(b"PUT /v1/uploads/cut.bin HTTP/1.1\r\nHost: localhost\r\n"
                 b"Content-Length: 4000000\r\n\r\n" + b"y" * 1_000_000)
    app.proc.wait_for_line(r"event=upload_started name=cut.bin", start=mark)
    sock.close()
    app.proc.wait_for_line(r"event=upload_failed name=cut.bin", start=mark)
    assert not stored(cp, "cut.bin")
    incoming = cp.state_dir / "data" / ".incoming"
    wait_until(lambda: not list(incoming.glob("*")), what="the control plane to drop the part")
    assert app.status()["activated"] is True


def test_concurrent_uploads_share_the_shaper(
    control_plane: Any, appliance: Any, wait_until: Any, tmp_path: Path
) -> None:
    cp, app = control_plane, appliance
    activate(cp, app, "uploads")
    paths = []
    for i in range(3):
        p = tmp_path / f"part{i}.bin"
        p.write_bytes(os.urandom(512 * 1024 + i))
        paths.append(p)
    results: dict[str, tuple[int, str, str]] = {}
    threads = [threading.Thread(target=lambda p=p: results.__setitem__(p.name, run_upload(app, p)))
               for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for p in paths:
        code, _, err = results[p.name]
        assert code == 0, err
        assert sha256(stored(cp, p.name)[0]) == sha256(p)


def test_stop_during_a_slow_upload_cuts_it_and_keeps_nothing(
    control_plane: Any, appliance: Any, wait_until: Any, tmp_path: Path
) -> None:
    """At the API minimum a 1 MB upload takes minutes: SIGTERM must not wait for it."""
    cp, app = control_plane, appliance
    arn = activate(cp, app, "uploads")
    put_schedule(cp, arn, whole_week(51_200))
    wait_until(lambda: limit(app) == 51_200, what="schedule applied")
    data = tmp_path / "slow.bin"
    data.write_bytes(os.urandom(1_000_000))
    mark = len(app.proc.lines)
    proc = cli_upload(app, data)
    app.proc.wait_for_line(r"event=upload_started name=slow.bin", start=mark)
    app.proc.popen.terminate()
    try:
        rc = app.proc.wait_exit(20)
    except subprocess.TimeoutExpired:
        raise AssertionError("no exit 20 s after SIGTERM:\n" + app.proc.output()[-6000:]) from None
    assert rc == 0
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "Traceback" not in err
    assert "upload of slow.bin refused: 503 ShuttingDown: the daemon is stopping" in err, err
    assert not stored(cp, "slow.bin")
    incoming = cp.state_dir / "data" / ".incoming"
    wait_until(lambda: not list(incoming.glob("*")), what="the control plane to drop the part")


def test_upload_under_a_taken_name_is_refused_unless_replace(
    control_plane: Any, appliance: Any, tmp_path: Path
) -> None:
    """The control plane's 409 AlreadyExists reaches the local API and the CLI, before the
    body is sent; --replace (?replace=true) replaces the stored object."""
    cp, app = control_plane, appliance
    activate(cp, app, "uploads")
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(os.urandom(300_000))
    second.write_bytes(os.urandom(200_000))
    code, _, err = run_upload(app, first, "--name", "disk.img")
    assert code == 0, err
    [on_disk] = stored(cp, "disk.img")

    code, out, err = run_upload(app, second, "--name", "disk.img")
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert "409 AlreadyExists" in err and "use --replace" in err
    assert f"disk.img is already stored (300000 bytes, sha256 {sha256(first)}, stored " in err
    assert sha256(on_disk) == sha256(first)

    # The local API: the refusal comes instead of 100 Continue, before any byte of the body.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    with sock:
        sock.connect(str(app.socket_path))
        sock.sendall(b"PUT /v1/uploads/disk.img HTTP/1.1\r\nHost: localhost\r\n"
                     b"Expect: 100-continue\r\nContent-Length: 1000000000\r\n\r\n")
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        doc = json.loads(resp.read())
    assert resp.status == 409 and doc["error"] == "AlreadyExists" and doc["field"] == "name"
    assert doc["existing"]["sha256"] == sha256(first) and doc["existing"]["size"] == 300_000
    assert doc["existing"]["name"] == "disk.img" and doc["existing"]["storedAt"].endswith("Z")
    status, doc = raw_put(app, "/v1/uploads/disk.img?replace=maybe", b"x")
    assert status == 400 and doc["field"] == "replace"

    code, out, err = run_upload(app, second, "--name", "disk.img", "--replace")
    assert code == 0, err
    assert sha256(on_disk) == sha256(second)
    status, doc = raw_put(app, "/v1/uploads/disk.img?replace=true", b"third")
    assert status == 201 and on_disk.read_bytes() == b"third"
