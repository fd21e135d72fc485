"""The local API (Unix socket) against malformed and random input: a real daemon, a real
control plane, raw bytes on the real socket. Every answer must be < 500 and, for an error,
the documented `{"error", "message", "field"}`; the daemon's log must hold no traceback.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import activate

pytestmark = pytest.mark.slow

ROUTES = [
    ("GET", "/v1/status"),
    ("POST", "/v1/activation-key"),
    ("GET", "/v1/schedule"),
    ("GET", "/v1/shaping"),
    ("POST", "/v1/connectivity-test"),
    ("PUT", "/v1/uploads/{name}"),
]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "PROPFIND"]
FIELDS = ["activationRegion", "gatewayType", "endpointType", "ipVersion", "vpcEndpoint",
          "region", "x", ""]
CASES = 1000
TIME_LIMIT = 60.0  # the run takes well under 20 s; this only stops a runaway


def call(sock_path: Path, method: str, target: str, headers: dict[str, str], body: bytes,
         timeout: float = 15.0) -> tuple[int, bytes]:
    """One request written as raw bytes (no client-side cleaning) and its final answer."""
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost", "Connection: close",
             f"Content-Length: {len(body)}"]
    head = "\r\n".join(lines).encode() + b"\r\n"
    for key, value in headers.items():
        head += key.encode() + b": " + value.encode("utf-8", "surrogateescape") + b"\r\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(sock_path))
        sock.sendall(head + b"\r\n" + body)
        resp = http.client.HTTPResponse(sock, method=method)
        resp.begin()  # skips a 100 Continue
        return resp.status, resp.read()


def check_answer(case: Any, status: int, data: bytes) -> None:
    assert status < 500, (case, status, data[:300])
    if status >= 400 and data:
        doc = json.loads(data)
        assert set(doc) >= {"error", "message", "field"}, (case, doc)
        assert isinstance(doc["error"], str) and isinstance(doc["message"], str), (case, doc)


# -- random input -------------------------------------------------------------------------


def random_text(rng: random.Random) -> str:
    alphabet = "aZ09._-/ %\"'\\{}[]:\n\t\u00e9\u2028\U0001f600\x00"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randint(0, 8 if depth < 3 else 5)
    if kind < 4:
        return [None, True, rng.randint(-2**70, 2**70), rng.random() * 1e300][kind]
    if kind == 4:
        return random_text(rng)
    if kind == 5:
        return rng.choice(["us-west-2", "STANDARD", "DUALSTACK", "ipv4", "ipv6", "BACKUP_VM", ""])
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == 7:
        return {random_text(rng): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return {rng.choice(FIELDS): random_value(rng, depth + 1)}


def random_body(rng: random.Random) -> bytes:
    doc = {rng.choice(FIELDS): random_value(rng) for _ in range(rng.randint(0, 4))}
    raw = json.dumps(doc).encode()
    mutation = rng.randint(0, 9)
    if mutation == 0 and raw:  # flip bytes
        raw = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    if mutation == 1:
        return raw[: rng.randint(0, len(raw))]
    if mutation == 2:
        return rng.choice([b"[", b"{\"a\":"]) * rng.randint(30, 5000)
    if mutation == 3:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if mutation == 4:
        return rng.choice([b"NaN", b"1e999", b"-Infinity", b"\"\\ud800\"", b"null", b"[]",
                           b'{"region": "\xff"}', b"\xef\xbb\xbf{}", b"   "])
    return raw


def random_target(rng: random.Random, path: str) -> str:
    name = rng.choice([
        "fuzz.bin", "fuzz.bin", "other.bin", "..", ".", "", "x" * 201, "a%2Fb", "%00",
        "%ff%fe", "sp%20ace", "%0Aevent=forged", "\u00e9".encode().hex(), "a.b-c_d",
    ])
    target = path.replace("{name}", name)
    roll = rng.randint(0, 9)
    if roll == 0:
        target += rng.choice(["?replace=true", "?replace=false", "?replace=maybe",
                              "?replace=true&replace=false", "?x=1", "?%ff=%fe", "?"])
    elif roll == 1:
        target += "/" + "".join(rng.choice("abc%/.") for _ in range(rng.randint(1, 8)))
    elif roll == 2:
        target = "/v1/" + "".join(rng.choice("abcdefgh%0123456789/") for _ in range(6))
    return target


def random_headers(rng: random.Random) -> dict[str, str]:
    headers: dict[str, str] = {}
    if rng.random() < 0.5:
        headers["Content-Type"] = rng.choice([
            "application/json", "application/json; charset=latin-1", "text/plain",
            "application/json; charset=bogus", "multipart/form-data; boundary=x",
            "application/x-www-form-urlencoded",
        ])
    if rng.random() < 0.2:
        headers["Expect"] = rng.choice(["100-continue", "100-Continue", "200-ok", "\u00e9"])
    if rng.random() < 0.2:
        headers["X-Junk"] = "".join(chr(rng.randrange(0x20, 0x7f)) for _ in range(40))
    if rng.random() < 0.1:
        headers["Accept"] = "text/html"
    return headers


def test_fuzz_every_route_never_5xx(control_plane: Any, appliance: Any) -> None:
    cp, app = control_plane, appliance
    activate(cp, app, "fuzz")  # so no call is answered by a key request the throttle refuses
    mark = len(app.proc.lines)
    rng = random.Random(20260511)
    started = time.monotonic()
    statuses: dict[int, int] = {}
    for n in range(CASES):
        method, path = rng.choice(ROUTES)
        if rng.random() < 0.15:
            method = rng.choice(METHODS)
        target = random_target(rng, path)
        headers = random_headers(rng)
        body = random_body(rng) if method != "GET" or rng.random() < 0.1 else b""
        case = (n, method, target, headers, body[:80])
        status, data = call(app.socket_path, method, target, headers, body)
        check_answer(case, status, data)
        statuses[status] = statuses.get(status, 0) + 1
        assert time.monotonic() - started < TIME_LIMIT, f"only {n} cases in {TIME_LIMIT} s"
    log = "\n".join(app.proc.lines[mark:])
    assert "Traceback" not in log and "local_api_error" not in log, log[-3000:]
    # The fuzz reached the handlers, not only the router: successes and refusals of each kind.
    assert statuses.get(200) and statuses.get(201) and statuses.get(400), statuses
    assert statuses.get(404) and statuses.get(405) and statuses.get(409), statuses
    assert app.status()["activated"] is True


# -- the hostile tester's cases, one by one -----------------------------------------------


@pytest.mark.parametrize("path", ["/v1/activation-key", "/v1/connectivity-test"])
@pytest.mark.parametrize("body", [b"[" * 3000, b'{"a":' * 3000, b"\xff\xfe\x00{}",
                                  b'{"region": "\xe9"}', b"[1, 2]"])
def test_bad_json_bodies_get_a_400(shared_appliance: Any, path: str, body: bytes) -> None:
    app = shared_appliance
    mark = len(app.proc.lines)
    status, data = call(app.socket_path, "POST", path, {"Content-Type": "application/json"},
                        body)
    assert status == 400, data
    doc = json.loads(data)
    assert doc["error"] == "ValidationError" and doc["field"] == "body", doc
    status, _ = call(app.socket_path, "GET", "/v1/status", {}, b"")
    assert status == 200
    assert "Traceback" not in "\n".join(app.proc.lines[mark:])


def test_unknown_expect_is_a_json_417(shared_appliance: Any) -> None:
    status, data = call(shared_appliance.socket_path, "GET", "/v1/status",
                        {"Expect": "200-ok"}, b"")
    assert status == 417 and json.loads(data)["field"] == "Expect"
