"""The control plane's AWS API and listener against a hostile client.

Each test reproduces a finding of a hostile tester against a real socket (an in-process
server, or a real `python -m controlplane` process where file descriptors are the point):
signatures that leave X-Amz-Target out, replayed calls, idle partial request heads, heads
too large for aiohttp's parser, JSON nested 200,000 deep, crafted NextTokens, and a seeded
fuzz of every operation's JSON body.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import logging
import os
import random
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from controlplane import sigv4
from controlplane.apimodel import OPERATIONS, SHAPES, TARGET_PREFIX
from controlplane.errors import ApiError
from controlplane.throttle import Throttle
from tests.conftest import PYTHON, Proc, child_env, free_port, wait_until
from tests.controlplane.cpharness import REGION, Server

SERVICE = "backup-gateway"
JSON_TYPE = "application/x-amz-json-1.0"


# -- clients ------------------------------------------------------------------------------


def boto(server_url: str, key: str, secret: str, region: str = REGION, **cfg: Any) -> Any:
    return boto3.client(
        SERVICE, region_name=region, endpoint_url=server_url, aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, **cfg),
    )


def client(server: Server) -> Any:
    return boto(server.url, server.plane.access_key_id, server.plane.secret_access_key)


def signed_headers(server: Server, op: str, body: bytes) -> dict[str, str]:
    """Headers of a call signed exactly as botocore signs it."""
    req = AWSRequest(method="POST", url=server.url + "/", data=body, headers={
        "Content-Type": JSON_TYPE, "X-Amz-Target": f"{TARGET_PREFIX}.{op}",
    })
    creds = Credentials(server.plane.access_key_id, server.plane.secret_access_key)
    SigV4Auth(creds, SERVICE, REGION).add_auth(req)
    return dict(req.headers.items())


def hand_signed(server: Server, headers: dict[str, str], body: bytes,
                signed: list[str]) -> dict[str, str]:
    """Sign only the `signed` headers (what a careless or hostile client could send)."""
    amz_date = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    all_headers = {**headers, "Host": f"{server.host}:{server.port}", "X-Amz-Date": amz_date}
    lower = {k.lower(): [v] for k, v in all_headers.items()}
    creq = sigv4.canonical_request("POST", "/", "", lower, signed,
                                   hashlib.sha256(body).hexdigest())
    scope = f"{amz_date[:8]}/{REGION}/{SERVICE}/aws4_request"
    to_sign = "\n".join([sigv4.ALGORITHM, amz_date, scope,
                         hashlib.sha256(creq.encode()).hexdigest()])
    key = sigv4.signing_key(server.plane.secret_access_key, amz_date[:8], REGION, SERVICE)
    sig = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    all_headers["Authorization"] = (
        f"{sigv4.ALGORITHM} Credential={server.plane.access_key_id}/{scope}, "
        f"SignedHeaders={';'.join(signed)}, Signature={sig}"
    )
    return all_headers


def post(server: Server, headers: dict[str, str], body: bytes,
         path: str = "/") -> tuple[int, dict[str, str], dict[str, Any]]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(data)
    finally:
        conn.close()


def gateway(server: Server) -> str:
    key = server.link().key()
    out = client(server).create_gateway(ActivationKey=key, GatewayDisplayName="target",
                                        GatewayType="BACKUP_VM")
    return str(out["GatewayArn"])


def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert "Traceback" not in caplog.text
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


# -- signatures -----------------------------------------------------------------------------


def test_a_signature_must_cover_the_target(server: Server) -> None:
    arn = gateway(server)
    body = json.dumps({"GatewayArn": arn}).encode()
    headers = {"Content-Type": JSON_TYPE, "X-Amz-Target": f"{TARGET_PREFIX}.GetGateway"}
    loose = hand_signed(server, headers, body, ["host", "x-amz-date"])
    loose["X-Amz-Target"] = f"{TARGET_PREFIX}.DeleteGateway"  # the attack
    status, _, doc = post(server, loose, body)
    assert status == 403 and doc["__type"] == "InvalidSignatureException"
    assert "'x-amz-target' must be a 'SignedHeader'" in doc["message"]
    # Content-Type, when sent, must be signed too; so must X-Amz-Date.
    no_ctype = hand_signed(server, headers, body, ["host", "x-amz-date", "x-amz-target"])
    assert "'content-type'" in post(server, no_ctype, body)[2]["message"]
    no_date = hand_signed(server, headers, body, ["content-type", "host", "x-amz-target"])
    assert "'x-amz-date'" in post(server, no_date, body)[2]["message"]
    # The gateway is still there, and a full signature (as botocore makes) is accepted.
    full = hand_signed(server, headers, body,
                       ["content-type", "host", "x-amz-date", "x-amz-target"])
    status, _, doc = post(server, full, body)
    assert status == 200 and doc["Gateway"]["GatewayArn"] == arn


def test_a_replayed_change_is_refused(server: Server) -> None:
    arn = gateway(server)
    api = client(server)

    def schedule(rate: int) -> bytes:
        return json.dumps({"GatewayArn": arn, "BandwidthRateLimitIntervals": [{
            "AverageUploadRateLimitInBitsPerSec": rate, "StartHourOfDay": 0,
            "StartMinuteOfHour": 0, "EndHourOfDay": 23, "EndMinuteOfHour": 59,
            "DaysOfWeek": [0, 1, 2, 3, 4, 5, 6]}]}).encode()

    old = schedule(102400)
    captured = signed_headers(server, "PutBandwidthRateLimitSchedule", old)
    assert post(server, captured, old)[0] == 200
    assert post(server, signed_headers(server, "PutBandwidthRateLimitSchedule",
                                       schedule(204800)), schedule(204800))[0] == 200
    status, headers, doc = post(server, captured, old)  # the replay
    assert status == 403 and doc["__type"] == "InvalidSignatureException"
    assert "already used" in doc["message"]
    assert headers["content-type"] == JSON_TYPE
    got = api.get_bandwidth_rate_limit_schedule(GatewayArn=arn)["BandwidthRateLimitIntervals"]
    assert got[0]["AverageUploadRateLimitInBitsPerSec"] == 204800  # not rolled back
    # A replayed DeleteGateway is refused the same way (the first one deleted it).
    body = json.dumps({"GatewayArn": arn}).encode()
    delete = signed_headers(server, "DeleteGateway", body)
    assert post(server, delete, body)[0] == 200
    assert "already used" in post(server, delete, body)[2]["message"]


def test_a_throttled_change_keeps_its_signature(server: Server) -> None:
    """botocore may retry a 429 within the same second, with the very same signature."""
    arn = gateway(server)
    body = json.dumps({"GatewayArn": arn}).encode()
    headers = signed_headers(server, "UpdateGatewaySoftwareNow", body)
    server.plane.json_api.throttle = Throttle(rate=1e-9, burst=0.5)
    assert post(server, headers, body)[2]["__type"] == "ThrottlingException"
    server.plane.json_api.throttle = Throttle()
    assert post(server, headers, body)[0] == 200
    assert "already used" in post(server, headers, body)[2]["message"]


def test_reads_may_be_repeated_within_a_second(server: Server) -> None:
    """boto3 calling ListGateways twice in one second sends the same signature twice."""
    body = b"{}"
    headers = signed_headers(server, "ListGateways", body)
    assert post(server, headers, body)[0] == 200
    assert post(server, headers, body)[0] == 200
    api = client(server)
    assert [api.list_gateways()["Gateways"] for _ in range(3)] == [[], [], []]


def test_replay_cache_is_bounded_and_then_refuses_what_it_forgot() -> None:
    cache = sigv4.ReplayCache(max_entries=2)
    sig = [f"{i:064x}" for i in range(6)]
    now = 10_000.0
    cache.remember(sig[0], now - 30, now)
    cache.remember(sig[1], now - 10, now)
    cache.remember(sig[2], now - 20, now)  # full: the oldest date (sig 0) is forgotten
    assert len(cache) == 2 and cache.low_water == now - 30
    for again, date in ((sig[0], now - 30), (sig[3], now - 30)):
        with pytest.raises(ApiError) as err:
            cache.remember(again, date, now)
        assert err.value.code == "InvalidSignatureException"
        assert "possible replay" in err.value.message and "cache is full" in err.value.message
    with pytest.raises(ApiError) as err:
        cache.remember(sig[1], now - 10, now)
    assert "already used" in err.value.message
    cache.remember(sig[4], now - 29, now)  # newer than the mark: accepted
    # Entries older than the skew window go by themselves (the date check refuses them).
    later = now + sigv4.MAX_SKEW_SECONDS + 60
    cache.remember(sig[5], later, later)
    assert len(cache) == 1


def test_the_verifier_checks_the_cache_only_after_the_signature(server: Server) -> None:
    """A forged signature must not poison the cache for the real one."""
    body = json.dumps({"GatewayArn": "arn:aws:backup-gateway:us-west-2:1:gateway/x"}).encode()
    real = signed_headers(server, "DeleteGateway", body)
    forged = dict(real)
    forged["Authorization"] = real["Authorization"].replace(
        server.plane.access_key_id, server.plane.access_key_id[:-1] + "Z")
    assert post(server, forged, body)[2]["__type"] == "UnrecognizedClientException"
    status, _, doc = post(server, real, body)
    assert doc["__type"] == "ValidationException" or status == 404, doc


# -- malformed input --------------------------------------------------------------------


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_json_nested_200k_deep_is_a_serialization_error(
    server: Server, caplog: pytest.LogCaptureFixture, opener: bytes
) -> None:
    caplog.set_level(logging.INFO)
    body = opener * 200_000
    status, headers, doc = post(server, signed_headers(server, "ListGateways", body), body)
    assert status == 400 and doc["__type"] == "SerializationException"
    assert "nested deeper" in doc["message"]
    assert headers["content-type"] == JSON_TYPE
    no_traceback(caplog)


def _token(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize("token", [
    _token("v1|us-west-2|²"), _token("v1|us-west-2|" + "9" * 30), _token("v1|us-west-2|-1"),
    _token("v2|us-west-2|1"), "not base64 at all é", "%%%", _token("v1|us-west-2|١٢"),
])
def test_crafted_next_tokens_are_validation_errors(
    server: Server, caplog: pytest.LogCaptureFixture, token: str
) -> None:
    caplog.set_level(logging.INFO)
    with pytest.raises(ClientError) as err:
        client(server).list_gateways(NextToken=token)
    error = err.value.response["Error"]
    assert error["Code"] == "ValidationException"
    assert error["Message"].startswith("NextToken:") and "accepted form" in error["Message"]
    no_traceback(caplog)


def test_a_token_of_another_region_names_it(server: Server) -> None:
    with pytest.raises(ClientError) as err:
        client(server).list_gateways(NextToken=_token("v1|eu-west-1|5"))
    assert "eu-west-1" in err.value.response["Error"]["Message"]


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed `sock` (orderly or by a reset) before sending anything."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def raw_exchange(server: Server, request: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, read until the server closes; the whole answer."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def split_response(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, json.loads(body)


@pytest.mark.parametrize("path,shape", [("/", "api"), ("/gateway/poll", "link")])
def test_a_100kb_header_gets_a_431_in_the_api_shape(
    server: Server, caplog: pytest.LogCaptureFixture, path: str, shape: str
) -> None:
    caplog.set_level(logging.INFO)
    request = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
               f"Authorization: AWS4-HMAC-SHA256 {'A' * 100_000}\r\n\r\n{{}}").encode()
    status, headers, doc = split_response(raw_exchange(server, request))
    assert status == 431
    if shape == "api":
        assert headers["content-type"] == JSON_TYPE
        assert doc["__type"] == "RequestHeaderFieldsTooLargeException"
    else:
        assert headers["content-type"].startswith("application/json")
        assert doc["error"] == "RequestHeaderFieldsTooLarge"
    assert "65536 bytes" in doc["message"]
    # Too many lines, each small, is refused the same way.
    many = "".join(f"X-H{i}: v\r\n" for i in range(400))
    raw = raw_exchange(server, f"POST {path} HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode())
    assert split_response(raw)[0] == 431
    assert "event=request_refused reason=head_too_large" in caplog.text
    no_traceback(caplog)


def test_a_40kb_header_reaches_the_api(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    """Under our bound but over aiohttp's default 8190: the API itself answers."""
    caplog.set_level(logging.INFO)
    headers = {"Content-Type": JSON_TYPE, "X-Amz-Target": f"{TARGET_PREFIX}.ListGateways",
               "Authorization": "AWS4-HMAC-SHA256 " + "A" * 40_000}
    status, _, doc = post(server, headers, b"{}")
    assert status == 400 and doc["__type"] == "IncompleteSignatureException"
    no_traceback(caplog)


def test_a_partial_head_is_closed_at_the_deadline(server: Server) -> None:
    server.plane.guard.head_deadline = 0.5
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        assert closed_by_server(sock)
        assert time.monotonic() - started < 5
    assert server.plane.guard.pending == 0
    # A client that sends its head in one go is not affected.
    assert client(server).list_gateways()["Gateways"] == []


# -- fuzz -------------------------------------------------------------------------------

FUZZ_SEED = 20240611
FUZZ_CASES = 1500
FUZZ_SECONDS = 20.0
_WILD_STRINGS = ["", "x" * 5000, "\ud800", "\udfff tail", "ok\udbff", "\x00", "é☃𝄞", "a" * 257,
                 "arn:aws:backup-gateway:us-west-2:000000000000:gateway/bgw-0", "%s%n",
                 "../../etc/passwd", "' OR 1=1 --", "\u202e", "1e400"]


def wild(rng: random.Random, depth: int = 0) -> Any:
    """A value of any JSON type, often absurd."""
    pick = rng.randrange(12)
    if pick == 0:
        return None
    if pick == 1:
        return rng.choice([True, False])
    if pick == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30, 10**300])
    if pick == 3:
        return rng.choice([0.5, -1e308, 1e308, float("nan"), float("inf"), 1e-320])
    if pick in (4, 5, 6):
        return rng.choice(_WILD_STRINGS)
    if pick == 7:
        return "".join(chr(rng.randrange(1, 0x2FFFF)) for _ in range(rng.randrange(0, 40)))
    if depth > 3:
        return []
    if pick in (8, 9):
        return [wild(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {rng.choice(["GatewayArn", "Key", "x", ""]): wild(rng, depth + 1)
            for _ in range(rng.randrange(0, 4))}


_SAMPLES = {"ActivationKey": "ABCDE-FGHIJ-KLMNO-PQRST-UVWXY", "Name": "gw-1",
            "TagKey": "env", "TagValue": "prod", "NextToken": _token("v1|us-west-2|0"),
            "Host": "esx1.example.com", "Username": "root", "Password": "pw-1 secret",
            "VmwareCategory": "Tier", "VmwareTagName": "Gold"}


def valid(rng: random.Random, shape_name: str, arn: str) -> Any:
    """A value that satisfies the model's constraints, so the call gets past validation."""
    shape = SHAPES[shape_name]
    kind = shape["type"]
    if kind == "string":
        if "enum" in shape:
            return rng.choice(shape["enum"])
        return arn if "Arn" in shape_name else _SAMPLES[shape_name]
    if kind in ("integer", "long"):
        return rng.randint(shape.get("min", 1), shape.get("max", 1000))
    if kind == "list":
        if shape["member"] == "DayOfWeek":
            return sorted(rng.sample(range(7), rng.randint(1, 7)))
        return [valid(rng, shape["member"], arn) for _ in range(rng.randint(0, 2))]
    if shape_name == "BandwidthRateLimitInterval":
        return {"AverageUploadRateLimitInBitsPerSec": 102400, "StartHourOfDay": 0,
                "StartMinuteOfHour": 0, "EndHourOfDay": 23, "EndMinuteOfHour": 59,
                "DaysOfWeek": valid(rng, "DaysOfWeek", arn)}
    members: dict[str, str] = shape.get("members", {})
    return {name: valid(rng, sub, arn) for name, sub in members.items()
            if name in shape.get("required", []) or rng.random() < 0.7}


def slots(doc: Any) -> tuple[list[tuple[Any, Any]], list[tuple[Any, Any]]]:
    """(container, key or index) inside `doc`: of its scalars, and of everything else
    (containers, a new member of each object, an appended item of each list)."""
    leaves: list[tuple[Any, Any]] = []
    other: list[tuple[Any, Any]] = []
    if isinstance(doc, dict | list):
        keys = list(doc) if isinstance(doc, dict) else list(range(len(doc)))
        other.append((doc, "Unknown" if isinstance(doc, dict) else len(doc)))
        for key in keys:
            child = doc[key]
            (other if isinstance(child, dict | list) else leaves).append((doc, key))
            more_leaves, more_other = slots(child)
            leaves += more_leaves
            other += more_other
    return leaves, other


def generate(rng: random.Random, shape_name: str, arn: str) -> Any:
    """A valid input with one (sometimes two) values replaced, removed or added; mostly a
    scalar, since that is where a value reaches the operation and the store."""
    doc = valid(rng, shape_name, arn)
    for _ in range(1 if rng.random() < 0.75 else 2):
        leaves, other = slots(doc)
        container, key = rng.choice(leaves if leaves and rng.random() < 0.8 else other)
        if isinstance(container, list) and key == len(container):
            container.append(odd(rng))
        elif isinstance(container, dict) and rng.random() < 0.15:
            container.pop(key, None)
        else:
            container[key] = odd(rng)
    return doc


def odd(rng: random.Random) -> Any:
    """Half the time one of the strings that broke something once, else anything."""
    return rng.choice(_WILD_STRINGS) if rng.random() < 0.5 else wild(rng)


def mutate(rng: random.Random, body: bytes) -> bytes:
    """Byte-level damage: truncation, stray bytes, invalid UTF-8, deep nesting."""
    pick = rng.randrange(6)
    if pick == 0 and body:
        return body[: rng.randrange(len(body))]
    if pick == 1 and body:
        i = rng.randrange(len(body))
        return body[:i] + bytes([rng.randrange(256)]) + body[i + 1:]
    if pick == 2:
        return body + rng.choice([b"\xff", b"\xc3", b"}", b",", b" \x00"])
    if pick == 3:
        depth = rng.choice([31, 33, 5000])
        return b'{"GatewayArn":' + b"[" * depth + b"]" * depth + b"}"
    if pick == 4:
        return rng.choice([b"[]", b"null", b"1", b'"x"', b"", b"   ", b"\xef\xbb\xbf{}"])
    return body.replace(b'"', b"'", 1)


def fuzz_bodies(rng: random.Random, arn: str) -> Iterator[tuple[str, bytes]]:
    """Every operation in turn; DeleteGateway aims elsewhere so the others keep a target."""
    ops = sorted(OPERATIONS)
    for i in range(FUZZ_CASES):
        op = ops[i % len(ops)]
        target = arn[:-4] + "0000" if op == "DeleteGateway" else arn
        body = json.dumps(generate(rng, OPERATIONS[op][0], target)).encode()
        yield op, mutate(rng, body) if rng.random() < 0.2 else body


@pytest.mark.timeout(90)
def test_fuzzed_bodies_never_get_a_5xx(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server.plane.json_api.throttle = Throttle(rate=1e9, burst=1e9)
    arn = gateway(server)
    rng = random.Random(FUZZ_SEED)
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    deadline = time.monotonic() + FUZZ_SECONDS
    done = 0
    try:
        for op, body in fuzz_bodies(rng, arn):
            if time.monotonic() > deadline:
                break
            conn.request("POST", "/", body=body, headers=signed_headers(server, op, body))
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status < 500, (op, body[:300], data[:300])
            if resp.status != 200:
                assert "__type" in json.loads(data), (op, body[:300], data[:300])
            done += 1
    finally:
        conn.close()
    assert done >= 300, f"only {done} cases within {FUZZ_SECONDS}s"
    no_traceback(caplog)


# -- a real process against 600 idle partial heads ---------------------------------------

_LIMITED = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (384, 384)); "
            "os.execv(sys.executable, [sys.executable, '-m', 'controlplane', *sys.argv[1:]])")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_idle_partial_heads_do_not_lock_out_a_real_call(tmp_path: Path) -> None:
    """600 slowloris connections against a process allowed 384 descriptors."""
    port = free_port()
    state = tmp_path / "state"
    proc = Proc([PYTHON, "-c", _LIMITED, "serve", "--listen", f"127.0.0.1:{port}",
                 "--state-dir", str(state)], env=child_env())
    idle: list[socket.socket] = []
    try:
        proc.wait_for_line(r"event=ready")
        pid = proc.popen.pid
        baseline = open_fds(pid)
        for _ in range(600):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            idle.append(sock)
        creds = dict(line.split(" = ", 1) for line in
                     (state / "credentials").read_text().splitlines() if " = " in line)
        api = boto(f"http://127.0.0.1:{port}", creds["aws_access_key_id"],
                   creds["aws_secret_access_key"], connect_timeout=5, read_timeout=5)
        started = time.monotonic()
        assert api.list_gateways()["Gateways"] == []
        assert time.monotonic() - started < 5
        # The server holds at most the per-address cap of pending connections.
        wait_until(lambda: open_fds(pid) <= baseline + 64 + 8, timeout=10,
                   what=f"fds of the server back near {baseline} + 64")
        idle[0].settimeout(5)
        assert closed_by_server(idle[0])  # the oldest was closed to make room
    finally:
        for sock in idle:
            sock.close()
        proc.stop()
    out = proc.output()
    assert "Traceback" not in out and "out of system resource" not in out
