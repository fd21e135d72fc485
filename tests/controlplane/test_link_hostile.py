"""The gateway link against a hostile peer: floods, malformed headers and bodies, forged log
lines, name clashes, and crashes between an upload's rename and its record.

In-process servers (cpharness, fake business clock) where time must be moved; real
`python -m controlplane serve` processes where their log or a `kill -9` is what is checked.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from appliance.identity import Identity
from controlplane.linkops import KEY_LIFETIME_SECONDS
from controlplane.store import DB_FILE, MAX_OPEN_KEYS, PURGE_QUERIES, Store, UploadRecord
from controlplane.throttle import REGISTRATION_BURST, RegistrationThrottle, source_of
from gatewaycore import linkproto
from tests.conftest import PYTHON, REPO, ControlPlane, Proc, child_env, free_port, wait_until
from tests.controlplane.cpharness import REGION, LinkResponse, Server, new_identity

pytestmark = pytest.mark.slow

SOURCES = [f"127.0.0.{i}" for i in range(2, 8)]  # six source addresses, all on loopback


# -- helpers ------------------------------------------------------------------------------


def key_body(identity: Identity) -> bytes:
    return json.dumps({"publicKey": identity.public_b64, "region": REGION}).encode()


def register(host: str, port: int, source: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    """One registration with a fresh identity, sent from `source` (a 127.0.0.x address)."""
    identity = new_identity()
    body = key_body(identity)
    headers = identity.sign("POST", "/gateway/activation-key", linkproto.body_sha256(body))
    conn = http.client.HTTPConnection(host, port, timeout=10, source_address=(source, 0))
    try:
        conn.request("POST", "/gateway/activation-key", body=body,
                     headers={**headers, "Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read())
    finally:
        conn.close()


def raw(host: str, port: int, head: bytes, body: bytes = b"",
        timeout: float = 10) -> tuple[int, dict[str, Any]]:
    """Send bytes exactly as given (header values no client would encode) and read the answer."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(head + body)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        data = resp.read()
    return resp.status, json.loads(data) if data else {}


def head_of(method: str, path: str, headers: dict[str, str], extra: bytes = b"",
            length: int | None = 0) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", "Connection: close"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return "\r\n".join(lines).encode() + b"\r\n" + extra + b"\r\n"


def activate(server: Server, identity: Identity | None = None) -> tuple[Any, str]:
    link = server.link(identity)
    key = link.key()
    arn = server.ok("create-gateway", "--activation-key", key, "--gateway-display-name", "h",
                    "--gateway-type", "BACKUP_VM")["GatewayArn"]
    return link, str(arn).rsplit("/", 1)[1]


def put(link: Any, name: str, body: bytes, query: str = "",
        sign_path: str | None = None) -> LinkResponse:
    path = f"/gateway/data/{name}" + (f"?{query}" if query else "")
    headers = link.identity.sign("PUT", sign_path or path, linkproto.body_sha256(body))
    conn = http.client.HTTPConnection(link.host, link.port, timeout=30)
    try:
        conn.request("PUT", path, body=body, headers=headers)
        resp = conn.getresponse()
        return LinkResponse(resp.status, json.loads(resp.read()))
    finally:
        conn.close()


def assert_error_shape(status: int, body: dict[str, Any], code: str | None = None) -> None:
    assert 400 <= status < 500, (status, body)
    assert isinstance(body.get("error"), str) and isinstance(body.get("message"), str), body
    if code is not None:
        assert body["error"] == code, body


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The in-process server's log must hold no traceback and no 500 by the end."""
    caplog.set_level("INFO")
    yield
    for record in caplog.records:
        assert record.exc_info is None, record.getMessage()
        assert "link_failed" not in record.getMessage(), record.getMessage()


# -- 1. registration floods ---------------------------------------------------------------


def test_registration_flood_is_throttled_per_source_and_expires(server: Server) -> None:
    """Five rounds, each a day and an hour apart on the business clock, of 100 fresh-key
    registrations from each of six source addresses: 3000 in all. Each source gets its burst
    (20) a round and a clear 429 for the rest; what a round left expires before the next,
    so the stored rows and the file stay bounded by one round however long the flood."""
    rounds, per_source = 5, 100
    burst = REGISTRATION_BURST
    started = time.monotonic()
    db = server.plane.store.path
    sizes = []
    with ThreadPoolExecutor(len(SOURCES)) as pool:
        for n in range(rounds):
            def flood(source: str) -> list[tuple[int, dict[str, str], dict[str, Any]]]:
                return [register(server.host, server.port, source) for _ in range(per_source)]

            results = dict(zip(SOURCES, pool.map(flood, SOURCES), strict=True))
            for source, answers in results.items():
                ok = [a for a in answers if a[0] == 200]
                throttled = [a for a in answers if a[0] == 429]
                assert len(ok) == burst, (n, source, len(ok))  # the clock stood still
                assert len(throttled) == per_source - burst
                _, headers, body = throttled[0]
                assert body["error"] == "Throttled" and "retry in" in body["message"]
                assert int(headers["Retry-After"]) >= 1
            counts = server.plane.store.counts()
            # Never more than one round's worth: the earlier rounds have expired and gone.
            assert counts["identities"] <= len(SOURCES) * burst, (n, counts)
            assert counts["activation_keys"] <= len(SOURCES) * burst, (n, counts)
            sizes.append(db.stat().st_size)
            server.clock.advance(KEY_LIFETIME_SECONDS + 24 * 3600 + 60)
    assert time.monotonic() - started < 120
    # One more request runs the purge: nothing of the flood is left.
    assert register(server.host, server.port, SOURCES[0])[0] == 200
    assert server.plane.store.counts()["identities"] == 1
    assert server.plane.store.counts()["activation_keys"] == 1
    assert max(sizes) < 1 << 20 and sizes[-1] <= sizes[0] * 2, sizes


def test_throttle_memory_is_bounded_and_ipv6_counts_per_64() -> None:
    now = [0.0]
    throttle = RegistrationThrottle(per_minute=60, burst=2, all_per_minute=1e9,
                                    all_burst=1e9, max_sources=100, clock=lambda: now[0])
    for i in range(5000):
        throttle.check(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(throttle) == 100
    a, b = source_of("2001:db8:1:2::1"), source_of("2001:db8:1:2:ffff::9")
    assert a == b == "2001:db8:1:2::/64" and source_of("2001:db8:1:3::1") != a
    assert source_of("::ffff:192.0.2.1") == "192.0.2.1" and source_of(None) == "unknown"
    assert [throttle.check("x") for _ in range(3)] == [None, None, pytest.approx(1.0)]
    now[0] += 1.0
    assert throttle.check("x") is None


def test_global_ceiling_bounds_many_sources() -> None:
    now = [0.0]
    throttle = RegistrationThrottle(per_minute=10, burst=20, all_per_minute=120, all_burst=240,
                                    clock=lambda: now[0])
    allowed = sum(throttle.check(f"10.0.{i // 256}.{i % 256}") is None for i in range(1000))
    assert allowed == 240


def test_a_known_identity_asking_again_is_not_throttled_and_keeps_few_keys(
    server: Server,
) -> None:
    """Re-asking with the same identity (a user reloading port 80) is answered every time,
    past the per-source burst, and stores at most MAX_OPEN_KEYS keys for it."""
    link = server.link()
    asks = int(REGISTRATION_BURST) + 15
    keys = [link.key() for _ in range(asks)]
    assert len(set(keys)) == asks
    db = server.plane.store
    rows = db._db.execute(
        "SELECT count(*) FROM activation_keys WHERE key_id=?", (link.identity.key_id,)
    ).fetchone()[0]
    assert rows == MAX_OPEN_KEYS
    # the newest keys are the ones kept: the last one activates
    server.ok("create-gateway", "--activation-key", keys[-1], "--gateway-display-name", "k",
              "--gateway-type", "BACKUP_VM")


def test_housekeeping_queries_use_indexes(tmp_path: Path) -> None:
    """Every purge query is an index range search: no full-table scan, ever."""
    store = Store(tmp_path / DB_FILE)
    try:
        for kind, sql in PURGE_QUERIES.items():
            plan = " | ".join(row[3] for row in store._db.execute(f"EXPLAIN QUERY PLAN {sql}",
                                                                   (0.0,)))
            assert "SCAN" not in plan and "USING INDEX" in plan, (kind, plan)
    finally:
        store.close()


# -- 2. malformed input -------------------------------------------------------------------


def test_malformed_signature_headers_get_a_4xx(server: Server, no_tracebacks: None) -> None:
    identity = new_identity()
    body = key_body(identity)
    good = identity.sign("POST", "/gateway/activation-key", linkproto.body_sha256(body))
    cases: list[dict[str, str]] = [
        {**good, linkproto.H_TIMESTAMP: "²"},
        {**good, linkproto.H_TIMESTAMP: "١٢٣"},
        {**good, linkproto.H_TIMESTAMP: "9" * 400},
        {**good, linkproto.H_NONCE: "é" * 32},
        {**good, linkproto.H_SIGNATURE: "ü="},
        {**good, linkproto.H_CONTENT_SHA256: "ß" * 64},
        {k: v for k, v in good.items() if k != linkproto.H_NONCE},
    ]
    for headers in cases:
        status, answer = raw(server.host, server.port,
                             head_of("POST", "/gateway/activation-key", headers,
                                     length=len(body)), body)
        assert_error_shape(status, answer, "InvalidSignature")
    # Key ids that are not hex (non-ASCII, NUL-free garbage) on the authenticated calls.
    for key_id in ("é" * 32, "../../etc", "0" * 31 + "Z", "x" * 5000):
        headers = {**good, linkproto.H_KEY_ID: key_id}
        status, answer = raw(server.host, server.port,
                             head_of("POST", "/gateway/poll", headers, length=2), b"{}")
        assert_error_shape(status, answer)


def test_malformed_json_bodies_get_a_400(server: Server, no_tracebacks: None) -> None:
    link = server.link()
    assert link.request_key().status == 200
    for body in (b"[" * 3000, b'{"a":' * 3000, b"\xff\xfe{}", b'{"after": NaN}', b"[1]",
                 b'{"after": 1e999}', b'{"wait": Infinity}', "{\"a\": \"\ud800\"}".encode(
                     "utf-8", "surrogatepass")):
        resp = link.send("POST", "/gateway/poll", body)
        assert_error_shape(resp.status, resp.body, "ValidationError")
        other = new_identity()
        resp = server.link(other).send("POST", "/gateway/activation-key", body)
        assert_error_shape(resp.status, resp.body)


def test_forged_log_lines_stay_one_line(control_plane: ControlPlane) -> None:
    """A real control plane's stderr: request values with line feeds stay inside one line."""
    proc = control_plane.proc
    assert proc is not None
    mark = len(proc.lines)
    forged = "x%0A2030-01-01%2000:00:00,000%20level=ERROR%20event=forged%0D%0Aevent=forged2"
    conn = http.client.HTTPConnection("127.0.0.1", control_plane.port, timeout=10)
    try:
        conn.request("PUT", f"/gateway/data/{forged}", body=b"x")
        resp = conn.getresponse()
        answer = json.loads(resp.read())
    finally:
        conn.close()
    assert_error_shape(resp.status, answer)
    identity = new_identity()
    status, _ = raw("127.0.0.1", control_plane.port, head_of(
        "POST", "/gateway/poll",
        {linkproto.H_KEY_ID: identity.key_id + "\u2028event=forged3"}, length=2), b"{}")
    assert status == 401
    line = proc.wait_for_line(r"event=link_refused path=.*forged", start=mark)
    proc.wait_for_line(r"event=link_refused path=/gateway/poll", start=mark)
    # Only the log events after the mark: stdout (the ready line and the console's hint,
    # which name this test's temporary directory, and the credentials banner) is read by
    # another thread and may land after the mark.
    here = str(control_plane.state_dir)
    lines = [ln for ln in proc.lines[mark:]
             if "event=" in ln and "event=ready" not in ln and here not in ln]
    assert [ln for ln in lines if "forged" in ln] == [line]  # the key id is not logged raw
    assert all(ln[:4].isdigit() and " level=" in ln for ln in lines), lines
    assert "\\n" in line and "\n" not in line


# -- 4. the database's side files ---------------------------------------------------------


def test_database_side_files_have_the_database_mode(tmp_path: Path) -> None:
    path = tmp_path / DB_FILE
    store = Store(path)
    try:
        store.account_id()
        store.heartbeat("a" * 32, None, time.time())
        store.flush_heartbeats()
        for suffix in ("", "-wal", "-shm"):
            mode = stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode)
            assert mode == 0o600, (suffix, oct(mode))
    finally:
        store.close()
    # Side files an older version left 0644 are narrowed when the store opens.
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").touch()
        os.chmod(f"{path}{suffix}", 0o644)
    Store(path).close()
    for suffix in ("-wal", "-shm"):
        side = Path(f"{path}{suffix}")
        assert not side.exists() or stat.S_IMODE(side.stat().st_mode) == 0o600


# -- 4. uploads under a name that exists --------------------------------------------------


def test_second_upload_under_a_name_is_refused_unless_replace(server: Server) -> None:
    link, gateway_id = activate(server)
    first = put(link, "disk.img", b"first version")
    assert first.status == 201
    again = put(link, "disk.img", b"second version")
    assert again.status == 409 and again.body["error"] == "AlreadyExists"
    sha = hashlib.sha256(b"first version").hexdigest()
    assert again.body["name"] == "disk.img" and again.body["size"] == 13
    assert again.body["sha256"] == sha and again.body["storedAt"].endswith("Z")
    for part in ("disk.img", "13 bytes", sha, again.body["storedAt"], "replace=true"):
        assert part in again.body["message"]
    stored = server.plane.data_dir / gateway_id / "disk.img"
    assert stored.read_bytes() == b"first version"
    assert not list((server.plane.data_dir / ".incoming").iterdir())

    replaced = put(link, "disk.img", b"second version", "replace=true")
    assert replaced.status == 201, replaced.body
    assert stored.read_bytes() == b"second version"
    assert server.plane.store.upload(gateway_id, "disk.img") == (
        14, hashlib.sha256(b"second version").hexdigest())
    assert put(link, "new.img", b"n", "replace=false").status == 201
    # The query is part of what is signed, and only replace=true|false is understood.
    assert put(link, "disk.img", b"x", "replace=true", sign_path="/gateway/data/disk.img"
               ).status == 401
    for query in ("replace=yes", "replace=true&replace=true", "force=1"):
        resp = put(link, "other.img", b"x", query)
        assert resp.status == 400 and resp.body["error"] == "ValidationError", query


def test_refusal_comes_before_the_body(server: Server) -> None:
    """With Expect: 100-continue the 409 comes instead of 100 Continue; without it, the
    409 comes while the client is still sending a body the server never reads."""
    link, _ = activate(server)
    assert put(link, "big.img", b"x").status == 201
    incoming = server.plane.data_dir / ".incoming"
    headers = link.identity.sign("PUT", "/gateway/data/big.img", linkproto.UNSIGNED_PAYLOAD)
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(head_of("PUT", "/gateway/data/big.img",
                             {**headers, "Expect": "100-continue"}, length=1 << 30))
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 409 and json.loads(resp.read())["error"] == "AlreadyExists"
    headers = link.identity.sign("PUT", "/gateway/data/big.img", linkproto.UNSIGNED_PAYLOAD)
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(head_of("PUT", "/gateway/data/big.img", headers, length=1 << 30)
                     + b"y" * 65536)
        resp = http.client.HTTPResponse(sock)
        resp.begin()  # answered though 1 GiB is still to come
        assert resp.status == 409
    assert not list(incoming.iterdir())
    # With Expect and a free name: 100 Continue, then the body, then 201.
    headers = link.identity.sign("PUT", "/gateway/data/fresh.img", linkproto.UNSIGNED_PAYLOAD)
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(head_of("PUT", "/gateway/data/fresh.img",
                             {**headers, "Expect": "100-continue"}, length=5))
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b"hello")
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 201 and json.loads(resp.read())["size"] == 5


def test_racing_uploads_of_one_name_exactly_one_wins(server: Server) -> None:
    """Both pass the early check (neither is stored yet); the commit lets exactly one in."""
    link, gateway_id = activate(server)
    incoming = server.plane.data_dir / ".incoming"
    bodies = [bytes([65 + i]) * 200_000 for i in range(2)]
    socks = []
    for body in bodies:
        headers = link.identity.sign("PUT", "/gateway/data/race.img",
                                     linkproto.body_sha256(body))
        sock = socket.create_connection((server.host, server.port), timeout=20)
        sock.sendall(head_of("PUT", "/gateway/data/race.img", headers, length=len(body))
                     + body[:1000])
        socks.append(sock)
    wait_until(lambda: len(list(incoming.iterdir())) == 2, what="both uploads under way")
    statuses = []
    for sock, body in zip(socks, bodies, strict=True):
        with sock:
            sock.sendall(body[1000:])
            resp = http.client.HTTPResponse(sock)
            resp.begin()
            statuses.append((resp.status, json.loads(resp.read())))
    codes = sorted(s for s, _ in statuses)
    assert codes == [201, 409], statuses
    winner = bodies[[s for s, _ in statuses].index(201)]
    stored = server.plane.data_dir / gateway_id / "race.img"
    assert stored.read_bytes() == winner
    assert server.plane.store.upload(gateway_id, "race.img") == (
        len(winner), hashlib.sha256(winner).hexdigest())
    assert not list(incoming.iterdir())


# -- 4. crash consistency of uploads ------------------------------------------------------


def prepare_gateway(state_dir: Path) -> tuple[Identity, str]:
    """An activated gateway written straight into a new state directory."""
    state_dir.mkdir(parents=True)
    identity = new_identity()
    store = Store(state_dir / DB_FILE)
    try:
        now = time.time()
        key = store.issue_key(identity.key_id, identity.public_raw, "AAAAA-BBBBB-CCCCC-DDDDD-"
                              "EEEEE", REGION, "STANDARD", None, None, "0.1.0", now, 1800)
        gateway = store.create_gateway(key.key, REGION, "123456789012", "crash", "BACKUP_VM",
                                       [], now)
    finally:
        store.close()
    return identity, gateway.gateway_id


def records(state_dir: Path) -> dict[str, UploadRecord]:
    store = Store(state_dir / DB_FILE)
    try:
        return {r.name: r for r in store.upload_records()}
    finally:
        store.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_startup_repairs_every_crash_state(tmp_path: Path) -> None:
    """The states a crash can leave, made on disk, then a real control plane started."""
    state = tmp_path / "cp"
    _, gw = prepare_gateway(state)
    data, incoming = state / "data", state / "data" / ".incoming"
    (data / gw).mkdir(parents=True)
    incoming.mkdir()
    now = time.time()
    store = Store(state / DB_FILE)
    try:
        # Recorded, not renamed yet: the part is complete, so the rename is done at start.
        (incoming / "p1.part").write_bytes(b"rolled forward")
        store.put_upload(UploadRecord(gw, "pending.bin", 14, sha(b"rolled forward"), now,
                                      "p1.part"))
        # Renamed, record not completed yet.
        (data / gw / "renamed.bin").write_bytes(b"renamed")
        store.put_upload(UploadRecord(gw, "renamed.bin", 7, sha(b"renamed"), now, "gone.part"))
        # A replace recorded, not renamed: the old file is still in place.
        (data / gw / "replaced.bin").write_bytes(b"old")
        (incoming / "p2.part").write_bytes(b"the new one")
        store.put_upload(UploadRecord(gw, "replaced.bin", 11, sha(b"the new one"), now,
                                      "p2.part"))
        # A record whose file is gone.
        store.put_upload(UploadRecord(gw, "lost.bin", 4, sha(b"lost"), now))
        # A file without a record (an older version crashed between rename and record).
        (data / gw / "orphan.bin").write_bytes(b"orphan bytes")
        # A complete record whose file is fine: untouched.
        (data / gw / "fine.bin").write_bytes(b"fine")
        store.put_upload(UploadRecord(gw, "fine.bin", 4, sha(b"fine"), now))
    finally:
        store.close()
    (incoming / "stray.part").write_bytes(b"cut off")  # never recorded: dropped

    cp = ControlPlane(state, free_port()).start()
    try:
        assert cp.proc is not None
        log = cp.proc.output()
    finally:
        cp.stop()
    got = records(state)
    expect = {"pending.bin": b"rolled forward", "renamed.bin": b"renamed",
              "replaced.bin": b"the new one", "orphan.bin": b"orphan bytes", "fine.bin": b"fine"}
    assert set(got) == set(expect)
    for name, content in expect.items():
        assert (data / gw / name).read_bytes() == content, name
        assert (got[name].size, got[name].sha256, got[name].part) == (
            len(content), sha(content), None), name
    assert not (data / gw / "lost.bin").exists()
    assert not list(incoming.iterdir())
    assert log.count("event=upload_repaired") == 5, log
    assert "Traceback" not in log


KILLER = """
import os, signal, sys
from controlplane import cli, store
original = getattr(store.Store, sys.argv[1])
def crash(self, *args, **kwargs):
    if sys.argv[2] == "after":
        original(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(store.Store, sys.argv[1], crash)
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("method", ["begin_upload", "finish_upload"])
def test_kill_9_during_the_commit_is_repaired_at_start(tmp_path: Path, method: str) -> None:
    """A real `kill -9` of the control plane just after the pending record is written
    (before the rename) or just before it is completed (after the rename)."""
    state = tmp_path / "cp"
    identity, gw = prepare_gateway(state)
    port = free_port()
    argv = ["serve", "--listen", f"127.0.0.1:{port}", "--state-dir", str(state)]
    doomed = Proc([PYTHON, "-c", KILLER, method, "after" if method == "begin_upload"
                   else "before", *argv], env=child_env(PYTHONPATH=str(REPO)))
    try:
        doomed.wait_for_line(r"event=ready")
        body = os.urandom(300_000)
        path = "/gateway/data/killed.bin"
        headers = identity.sign("PUT", path, linkproto.body_sha256(body))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn.request("PUT", path, body=body, headers=headers)
            conn.getresponse()
        conn.close()
        assert doomed.wait_exit(20) == -9
    finally:
        doomed.kill()
    cp = ControlPlane(state, port).start()
    try:
        assert cp.proc is not None
        cp.proc.wait_for_line(r"event=upload_repaired .*name=killed.bin")
        # The name is now taken, and says by what.
        headers = identity.sign("PUT", path, linkproto.body_sha256(b"again"))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request("PUT", path, body=b"again", headers=headers)
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        conn.close()
        assert resp.status == 409 and answer["sha256"] == sha(body), answer
    finally:
        cp.stop()
    assert (state / "data" / gw / "killed.bin").read_bytes() == body
    assert records(state)["killed.bin"].part is None
    assert not list((state / "data" / ".incoming").iterdir())


def test_many_threads_hammering_one_server_never_500(server: Server,
                                                     no_tracebacks: None) -> None:
    """Registrations from one source while others poll: the throttle touches only the
    registrations, polls and uploads of an activated gateway go on."""
    link, _ = activate(server)
    stop = threading.Event()
    polls: list[int] = []

    def poller() -> None:
        while not stop.is_set():
            polls.append(link.poll().status)

    thread = threading.Thread(target=poller)
    thread.start()
    try:
        statuses = [register(server.host, server.port, SOURCES[0])[0] for _ in range(60)]
    finally:
        stop.set()
        thread.join(30)
    assert set(statuses) == {200, 429}
    assert polls and set(polls) == {200}
