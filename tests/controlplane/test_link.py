"""The gateway-facing link (docs/link-protocol.md) against an in-process server on loopback."""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatewaycore import linkproto
from tests.conftest import wait_until
from tests.controlplane.cpharness import AWS, REGION, LinkClient, LinkResponse, Server

pytestmark = pytest.mark.slow


def activate(server: Server, link: LinkClient, name: str = "gw") -> str:
    key = link.key()
    out = server.ok("create-gateway", "--activation-key", key, "--gateway-display-name", name,
                    "--gateway-type", "BACKUP_VM")
    return str(out["GatewayArn"])


def upload(link: LinkClient, name: str, chunks: Iterator[bytes] | bytes,
           content_sha: str) -> LinkResponse:
    path = f"/gateway/data/{name}"
    headers = link.identity.sign("PUT", path, content_sha)
    conn = http.client.HTTPConnection(link.host, link.port, timeout=60)
    try:
        if isinstance(chunks, bytes):
            conn.request("PUT", path, body=chunks, headers=headers)
        else:
            conn.request("PUT", path, body=chunks, headers=headers, encode_chunked=True)
        resp = conn.getresponse()
        return LinkResponse(resp.status, json.loads(resp.read()))
    finally:
        conn.close()


def test_activation_key_request_is_validated(server: Server) -> None:
    link = server.link()
    resp = link.request_key(region="mars-1")
    assert resp.status == 400 and resp.body["message"].startswith("region:")
    resp = link.request_key(endpoint_type="FIPS")
    assert resp.status == 400 and "endpointType" in resp.body["message"]
    resp = link.request_key(ip_version="ipv5")
    assert resp.status == 400 and "ipVersion" in resp.body["message"]
    resp = link.request_key(endpoint_type="DUALSTACK", ip_version="ipv6",
                            vpc="vpce-050f90485f28f2fd0-iep0e8vq.backup-gateway.us-west-2"
                            ".vpce.amazonaws.com")
    assert resp.status == 200
    assert resp.body["region"] == REGION and resp.body["expiresAt"].endswith("Z")
    # The key id header must be the one of the public key in the body.
    other = server.link()
    body = json.dumps({"publicKey": other.identity.public_b64, "region": REGION}).encode()
    resp = link.send("POST", "/gateway/activation-key", body)
    assert resp.status == 401 and resp.body["error"] == "InvalidSignature"


def test_vpc_endpoint_shows_in_get_gateway(server: Server) -> None:
    link = server.link()
    vpc = "vpce-050f90485f28f2fd0-iep0e8vq.backup-gateway.us-west-2.vpce.amazonaws.com"
    key = link.key(vpc=vpc)
    arn = server.ok("create-gateway", "--activation-key", key, "--gateway-display-name", "v",
                    "--gateway-type", "BACKUP_VM")["GatewayArn"]
    assert server.ok("get-gateway", "--gateway-arn", arn)["Gateway"]["VpcEndpoint"] == vpc


def test_replayed_and_forged_requests_are_refused(server: Server) -> None:
    link = server.link()
    assert link.request_key().status == 200
    body = json.dumps({"after": 0, "wait": 0}).encode()
    first = link.send("POST", "/gateway/poll", body)
    assert first.status == 200
    replay = link.send("POST", "/gateway/poll", body, headers=link.last_headers)
    assert replay.status == 401 and "replayed" in replay.body["message"]
    # A body that differs from the one signed.
    headers = link.identity.sign("POST", "/gateway/poll", linkproto.body_sha256(body))
    resp = link.send("POST", "/gateway/poll", b'{"after": 5}', headers=headers)
    assert resp.status == 401 and resp.body["error"] == "InvalidSignature"
    # A timestamp outside the window.
    stale = linkproto.sign(link.identity.private_key, "POST", "/gateway/poll",
                           linkproto.body_sha256(body), now=1_000_000_000)
    resp = link.send("POST", "/gateway/poll", body, headers=stale)
    assert resp.status == 401 and "clock" in resp.body["message"]
    # An identity never registered.
    stranger = server.link()
    resp = stranger.poll()
    assert resp.status == 401 and resp.body["error"] == "UnknownGateway"


def test_poll_wakes_on_create_gateway(server: Server) -> None:
    link = server.link()
    key = link.key()
    pending = link.poll()
    assert pending.status == 200 and pending.body["state"] == "pending"
    result: list[LinkResponse] = []
    poller = threading.Thread(
        target=lambda: result.append(link.poll(after=pending.body["version"], wait=25))
    )
    poller.start()
    wait_until(lambda: server.waiting_polls(link.identity.key_id) == 1, what="poll waiting")
    arn = server.ok("create-gateway", "--activation-key", key, "--gateway-display-name", "w",
                    "--gateway-type", "BACKUP_VM")["GatewayArn"]
    poller.join(30)
    assert result and result[0].body["state"] == "activated"
    assert result[0].body["gatewayArn"] == arn
    assert result[0].body["version"] > pending.body["version"]


def test_concurrent_create_with_one_key(server: Server) -> None:
    key = server.link().key()
    argv = [AWS, "backup-gateway", "create-gateway", "--activation-key", key,
            "--gateway-type", "BACKUP_VM", "--endpoint-url", server.url, "--region", REGION,
            "--output", "json"]
    procs = [
        subprocess.Popen([*argv, "--gateway-display-name", f"racer-{i}"], env=server.env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    results = [(p.wait(60), p.stdout.read(), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    winners = [r for r in results if r[0] == 0]
    assert len(winners) == 1, results
    assert all("ValidationException" in r[2] for r in results if r[0] != 0)
    assert len(server.ok("list-gateways")["Gateways"]) == 1


def test_store_create_is_one_transaction(server: Server, tmp_path: Path) -> None:
    """Two connections racing in threads: the key is used exactly once."""
    from controlplane.store import Store, StoreError

    key = server.link().key()
    stores = [Store(server.plane.store.path) for _ in range(2)]
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def race(store: Store, name: str) -> None:
        barrier.wait()
        try:
            store.create_gateway(key, REGION, "123456789012", name, "BACKUP_VM", [],
                                 server.clock.now())
            outcomes.append("ok")
        except StoreError as exc:
            outcomes.append(exc.reason)

    threads = [threading.Thread(target=race, args=(s, f"t{i}")) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for s in stores:
        s.close()
    assert sorted(outcomes) == ["KeyUsed", "ok"]


def test_uploads(server: Server) -> None:
    link = server.link()
    link.key()
    refused = upload(link, "early.bin", b"x", linkproto.body_sha256(b"x"))
    assert refused.status == 403 and refused.body["error"] == "NotActivated"
    arn = activate(server, link)
    gateway_id = arn.rsplit("/", 1)[1]

    blocks = [bytes([i]) * 65536 for i in range(64)]
    whole = b"".join(blocks)
    resp = upload(link, "chunked.bin", iter(blocks), linkproto.UNSIGNED_PAYLOAD)
    assert resp.status == 201, resp.body
    assert resp.body == {"name": "chunked.bin", "size": len(whole),
                         "sha256": hashlib.sha256(whole).hexdigest()}
    stored = server.plane.data_dir / gateway_id / "chunked.bin"
    assert stored.read_bytes() == whole
    assert server.plane.store.upload(gateway_id, "chunked.bin") == (
        len(whole), hashlib.sha256(whole).hexdigest())

    resp = upload(link, "signed.bin", b"hello", linkproto.body_sha256(b"hello"))
    assert resp.status == 201
    resp = upload(link, "wrong.bin", b"hello", linkproto.body_sha256(b"other"))
    assert resp.status == 400 and resp.body["error"] == "ChecksumMismatch"
    assert not (server.plane.data_dir / gateway_id / "wrong.bin").exists()
    resp = upload(link, "..", b"x", linkproto.UNSIGNED_PAYLOAD)
    assert resp.status in (400, 404)
    assert not list((server.plane.data_dir / ".incoming").iterdir())

    server.ok("delete-gateway", "--gateway-arn", arn)
    resp = upload(link, "late.bin", b"x", linkproto.UNSIGNED_PAYLOAD)
    assert resp.status == 403


def test_upload_cut_off_midway_keeps_nothing(server: Server) -> None:
    import socket

    link = server.link()
    arn = activate(server, link)
    path = "/gateway/data/cut.bin"
    headers = link.identity.sign("PUT", path, linkproto.UNSIGNED_PAYLOAD)
    head = (f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {8 << 20}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n")
    incoming = server.plane.data_dir / ".incoming"
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(head.encode() + b"x" * (3 << 20))
        wait_until(lambda: list(incoming.iterdir()), what="upload under way")
    wait_until(lambda: not list(incoming.iterdir()), what="partial upload removed")
    gateway_id = arn.rsplit("/", 1)[1]
    assert not (server.plane.data_dir / gateway_id / "cut.bin").exists()
    assert server.plane.store.upload(gateway_id, "cut.bin") is None
    # The server still serves.
    assert upload(link, "after.bin", b"ok", linkproto.body_sha256(b"ok")).status == 201


# -- nonces: written without an fsync, still kept across a crash of the process -------------


_RECORD_AND_CRASH = """
import os, sys, time
from pathlib import Path
from controlplane.noncelog import NonceLog
log = NonceLog(Path(sys.argv[1]))
assert log.record("a" * 32, "b" * 32, time.time())
os._exit(0)  # no close: a process crash right after the answer
"""


def test_a_nonce_survives_a_process_crash(tmp_path: Path) -> None:
    import sys
    import time

    from controlplane.noncelog import NonceLog

    folder = tmp_path / "nonces"
    subprocess.run([sys.executable, "-c", _RECORD_AND_CRASH, str(folder)], check=True,
                   timeout=60)
    log = NonceLog(folder)
    try:
        # the replay after the restart is refused; a new nonce is not
        assert not log.record("a" * 32, "b" * 32, time.time())
        assert log.record("a" * 32, "c" * 32, time.time())
    finally:
        log.close()
