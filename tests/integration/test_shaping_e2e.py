"""The gateway's one shaper seen from outside: uploads take the time the schedule's limit
implies, concurrent uploads share that one limit, and a stop cuts an upload still in flight.

Real processes only: the control plane, the daemon, the schedule put with the real AWS CLI,
uploads through `python -m appliance upload` or the local API. These tests fail when the
shaper stops shaping: an `acquire` that never waits makes every upload instant; a bucket per
upload makes four concurrent uploads four times as fast as the limit.

Expected times are exact, not tuned: the bucket starts empty when a limit comes into force
and lets through at most its burst, max(BURST_SECONDS of the rate, one piece), before the
rate applies (appliance/shaping.py); every later byte waits for its share of the rate. So N
bytes cannot pass in less than (N - burst) / rate, whatever the load: the lower bounds are
tight (0.9 of that), the upper bounds generous, since a loaded 2-core machine only slows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.localclient import UnixHTTPConnection
from appliance.shaping import BURST_SECONDS, MAX_PIECE, MIN_PIECE, PIECE_SECONDS
from tests.conftest import activate

pytestmark = pytest.mark.slow

# 409,600 bit/s = 51,200 B/s: pieces of 512 B, a burst of 1,024 B (20 ms).
RATE = 409_600
RESULT = re.compile(r"^uploaded (\S+): (\d+) bytes sha256 ([0-9a-f]{64}) in ([0-9.]+) s")


def burst_bytes(rate_bps: int) -> float:
    """What an empty bucket lets through at once (ScheduledShaper._apply)."""
    rate = rate_bps / 8
    piece = max(MIN_PIECE, min(MAX_PIECE, int(rate * PIECE_SECONDS)))
    return max(rate * BURST_SECONDS, float(piece))


def least_seconds(nbytes: int, rate_bps: int) -> float:
    """The shortest time `nbytes` can take through the bucket at `rate_bps`."""
    burst = burst_bytes(rate_bps)
    # The bound is only worth checking if the burst is a small part of the upload.
    assert burst <= 0.05 * nbytes, (burst, nbytes)
    return (nbytes - burst) / (rate_bps / 8)


def whole_week(rate: int) -> list[dict[str, Any]]:
    return [{
        "AverageUploadRateLimitInBitsPerSec": rate,
        "StartHourOfDay": 0, "StartMinuteOfHour": 0,
        "EndHourOfDay": 23, "EndMinuteOfHour": 59,
        "DaysOfWeek": [0, 1, 2, 3, 4, 5, 6],
    }]


def limit_in_force(app: Any, cp: Any, arn: str, rate: int, wait_until: Callable[..., Any]) -> None:
    """Put a whole-week schedule with the AWS CLI; return once the daemon enforces it."""
    cp.aws("put-bandwidth-rate-limit-schedule", "--gateway-arn", arn,
           "--bandwidth-rate-limit-intervals", json.dumps(whole_week(rate)))

    def applied() -> bool:
        code, doc = app.api("GET", "/v1/shaping")
        assert code == 200, doc
        return bool(doc["limitBitsPerSec"] == rate)

    wait_until(applied, 15, f"the daemon to enforce {rate} bit/s")


def stored(cp: Any, name: str) -> list[Path]:
    return sorted((cp.state_dir / "data").glob(f"*/{name}"))


def cli_upload(app: Any, path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "appliance", "upload", str(path), "--socket",
         str(app.socket_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_an_upload_takes_the_time_the_limit_implies(
    control_plane: Any, appliance: Any, wait_until: Any, tmp_path: Path
) -> None:
    """200 KiB at 409,600 bit/s: 3.98 s at the least; the daemon's own timing is checked."""
    cp, app = control_plane, appliance
    arn = activate(cp, app, "timed")
    limit_in_force(app, cp, arn, RATE, wait_until)
    data = tmp_path / "timed.bin"
    data.write_bytes(os.urandom(200 * 1024))
    size = data.stat().st_size
    least = least_seconds(size, RATE)

    started = time.monotonic()
    proc = cli_upload(app, data)
    out, err = proc.communicate(timeout=3 * least + 30)
    wall = time.monotonic() - started
    assert proc.returncode == 0, err
    match = RESULT.match(out.strip())
    assert match, out
    # The daemon times the upload from its request to the control plane's answer, so the
    # start-up of the CLI process is not in it: a shaper that does not wait shows ~0 s.
    shaped = float(match.group(4))
    assert shaped >= 0.9 * least, f"{size} B in {shaped} s: faster than {RATE} bit/s allows"
    assert wall <= 3 * least + 5, f"{size} B took {wall:.1f} s at {RATE} bit/s"
    [on_disk] = stored(cp, "timed.bin")
    assert hashlib.sha256(on_disk.read_bytes()).hexdigest() == match.group(3)


def put_through_local_api(socket_path: Path, name: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """A plain PUT of the local API (Content-Length body), as curl would send it."""
    conn = UnixHTTPConnection(str(socket_path), timeout=120)
    try:
        conn.request("PUT", f"/v1/uploads/{name}", body=body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_concurrent_uploads_together_keep_to_the_one_limit(
    control_plane: Any, appliance: Any, wait_until: Any
) -> None:
    """Four uploads of 64 KiB at once: 5.1 s at the least through one bucket; a bucket per
    upload would let each through in 1.3 s, four times the limit together."""
    cp, app = control_plane, appliance
    arn = activate(cp, app, "shared")
    limit_in_force(app, cp, arn, RATE, wait_until)
    bodies = {f"part{i}.bin": os.urandom(64 * 1024) for i in range(4)}
    total = sum(len(b) for b in bodies.values())
    least = least_seconds(total, RATE)

    barrier = threading.Barrier(len(bodies))
    times: dict[str, tuple[float, float]] = {}
    answers: dict[str, tuple[int, dict[str, Any]]] = {}

    def send(name: str) -> None:
        barrier.wait(30)
        begin = time.monotonic()
        answers[name] = put_through_local_api(app.socket_path, name, bodies[name])
        times[name] = (begin, time.monotonic())

    threads = [threading.Thread(target=send, args=(name,)) for name in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3 * least + 30)
    assert not any(t.is_alive() for t in threads), "an upload did not finish"

    for name, body in bodies.items():
        status, doc = answers[name]
        assert status == 201, doc
        assert doc["sha256"] == hashlib.sha256(body).hexdigest()
        [on_disk] = stored(cp, name)
        assert on_disk.read_bytes() == body
    span = max(end for _, end in times.values()) - min(begin for begin, _ in times.values())
    achieved = total * 8 / span
    assert span >= 0.9 * least, f"{total} B in {span:.2f} s: faster than one bucket allows"
    assert achieved <= 1.15 * RATE, f"together {achieved:.0f} bit/s against {RATE}"
    assert span <= 3 * least + 5, f"{total} B took {span:.1f} s at {RATE} bit/s"
    # One FIFO bucket serves the uploads' pieces in turn: none is done long before the rest.
    for name, (begin, end) in times.items():
        assert end - begin >= 0.5 * least, (name, end - begin, least)


class CountingRelay:
    """A TCP relay between the daemon and the control plane that notes, for each connection,
    when each byte toward the control plane passed: what the control plane had received, and
    at what instant, read from outside both processes."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.streams: list[bytearray] = []  # what each connection sent upstream, in order
        self.marks: list[list[tuple[float, int]]] = []  # (monotonic, bytes so far) per recv
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            upstream.settimeout(None)
            with self._lock:
                index = len(self.streams)
                self.streams.append(bytearray())
                self.marks.append([])
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, index),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, index: int | None) -> None:
        try:
            while chunk := src.recv(65536):
                if index is not None:
                    with self._lock:
                        self.streams[index] += chunk
                        self.marks[index].append((time.monotonic(), len(self.streams[index])))
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def body_progress(self, request_line: bytes) -> list[tuple[float, int]]:
        """(instant, body bytes so far, chunk framing included) of the one connection that
        sent `request_line`; empty until its headers have passed."""
        with self._lock:
            for stream, marks in zip(self.streams, self.marks, strict=True):
                at = stream.find(request_line)
                if at < 0:
                    continue
                head_end = stream.find(b"\r\n\r\n", at)
                if head_end < 0:
                    return []
                body_start = head_end + 4
                return [(t, n - body_start) for t, n in marks if n > body_start]
        return []

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()


@pytest.fixture
def relay(control_plane: Any) -> Any:
    r = CountingRelay(control_plane.port)
    try:
        yield r
    finally:
        r.close()


def test_stop_cuts_an_upload_the_shaper_still_holds_back(
    control_plane: Any, relay: CountingRelay, make_appliance: Any, wait_until: Any,
    tmp_path: Path,
) -> None:
    """At the API minimum (6,400 B/s) 1 MB takes minutes. The control plane must have had
    12 KB over more than a second (shaped: an unshaped upload is whole in milliseconds) and
    far less than the whole when SIGTERM is sent; the daemon then stops at once and the
    control plane keeps nothing."""
    cp = control_plane
    app = make_appliance(relay.url)  # the daemon reaches the control plane through the relay
    arn = activate(cp, app, "stopped")
    rate = 51_200
    limit_in_force(app, cp, arn, rate, wait_until)
    data = tmp_path / "slow.bin"
    data.write_bytes(os.urandom(1_000_000))
    size = data.stat().st_size
    request_line = b"PUT /gateway/data/slow.bin "

    proc = cli_upload(app, data)
    threshold = 12_000
    progress = wait_until(
        lambda: (p := relay.body_progress(request_line)) and p[-1][1] >= threshold and p,
        60, f"{threshold} B of slow.bin to reach the control plane",
    )
    first_at = progress[0][0]
    crossed_at = next(t for t, n in progress if n >= threshold)
    # Chunked framing adds at most 6 B to each 64-B piece: 12,000 B on the wire are at
    # least 10,970 B of data, of which at most one burst passed without waiting: 1.69 s.
    # The first bytes may reach the relay late on a loaded machine: 0.75 of it (an unshaped
    # upload is whole in milliseconds).
    least = (threshold * 64 / 70 - burst_bytes(rate)) / (rate / 8)
    assert crossed_at - first_at >= 0.75 * least, (
        f"{threshold} B reached the control plane in {crossed_at - first_at:.3f} s: "
        f"not shaped to {rate} bit/s"
    )
    assert proc.poll() is None, "the upload is over already"
    at_stop = relay.body_progress(request_line)[-1][1]
    app.proc.popen.terminate()
    assert at_stop < size, f"{at_stop} of {size} B received when the stop was sent"

    assert app.proc.wait_exit(20) == 0
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "slow.bin" in err and "Traceback" not in err
    assert not stored(cp, "slow.bin")
    incoming = cp.state_dir / "data" / ".incoming"
    wait_until(lambda: not list(incoming.glob("*")), what="the control plane to drop the part")
