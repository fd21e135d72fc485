"""Fixtures for the control plane tests: a real server on a loopback port, in-process (so a
fake clock can be moved), driven by the real AWS CLI in subprocesses and a small signed
gateway-link client.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from appliance.identity import Identity
from controlplane.pollhub import PollHub
from controlplane.server import ControlPlane
from gatewaycore import linkproto, sealed

AWS = str(Path(sys.executable).parent / "aws")
REGION = "us-west-2"
# How long TestHypervisorConfiguration waits for a gateway here (25 s in service): no
# gateway answers the fuzzers' calls, and a test that plays the gateway raises it.
HYPERVISOR_TEST_TIMEOUT = 0.05


class FakeClock:
    """A business clock that moves only when told (expire keys, refill registration
    buckets); thread-safe so a test thread can advance it while the server's loop reads it."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


class ObservedPollHub(PollHub):
    """A PollHub that counts the polls waiting on each identity, so a test can wait until
    its poll is really parked before making the change that must wake it."""

    def __init__(self) -> None:
        super().__init__()
        self._handed_out: dict[str, set[asyncio.Future[None]]] = {}

    def waiter(self, key_id: str) -> asyncio.Future[None]:
        fut = super().waiter(key_id)
        self._handed_out.setdefault(key_id, set()).add(fut)
        return fut

    def discard(self, key_id: str, fut: asyncio.Future[None]) -> None:
        super().discard(key_id, fut)
        self._handed_out.get(key_id, set()).discard(fut)

    def waiting(self, key_id: str) -> int:
        """Polls of `key_id` waiting now; call it in the server's loop."""
        return sum(1 for f in self._handed_out.get(key_id, ()) if not f.done())


def aws_env(key: str, secret: str, home: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_RETRY_MODE": "standard",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_PAGER": "",
    }


@dataclass
class AwsResult:
    rc: int
    out: Any
    err: str


@dataclass
class Server:
    plane: ControlPlane
    clock: FakeClock
    host: str
    port: int
    home: Path
    loop: asyncio.AbstractEventLoop
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def aws(self, *args: str, region: str = REGION, env: dict[str, str] | None = None,
            ) -> AwsResult:
        """Run `aws backup-gateway ARGS` against this server; JSON output parsed."""
        proc = subprocess.run(
            [AWS, "backup-gateway", *args, "--endpoint-url", self.url, "--region", region,
             "--output", "json"],
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
        return AwsResult(proc.returncode, out, proc.stderr)

    def ok(self, *args: str, region: str = REGION) -> Any:
        res = self.aws(*args, region=region)
        assert res.rc == 0, res.err
        return res.out

    def link(self, identity: Identity | None = None) -> LinkClient:
        return LinkClient(self.host, self.port, identity or new_identity())

    def waiting_polls(self, key_id: str) -> int:
        fut = asyncio.run_coroutine_threadsafe(_count(self.plane, key_id), self.loop)
        return fut.result(5)


async def _count(plane: ControlPlane, key_id: str) -> int:
    assert isinstance(plane.hub, ObservedPollHub)
    return plane.hub.waiting(key_id)


def new_identity() -> Identity:
    return Identity(Ed25519PrivateKey.generate())


@dataclass
class LinkResponse:
    status: int
    body: dict[str, Any]  # a JSON answer's document ({} for other answers)
    raw: bytes = b""


class LinkClient:
    """The gateway side of docs/link-protocol.md, just enough to drive the server."""

    def __init__(self, host: str, port: int, identity: Identity) -> None:
        self.host = host
        self.port = port
        self.identity = identity
        self.last_headers: dict[str, str] = {}
        # The gateway's X25519 sealing key: passwords come sealed to its public half.
        self.seal_private = X25519PrivateKey.generate()

    @property
    def seal_key(self) -> str:
        return sealed.encode_key(sealed.public_raw(self.seal_private))

    def unseal(self, box: dict[str, Any]) -> str:
        """Open a password the control plane sealed to this gateway."""
        return sealed.unseal(self.seal_private, box).decode()

    def send(self, method: str, path: str, body: bytes,
             headers: dict[str, str] | None = None, timeout: float = 60) -> LinkResponse:
        if headers is None:
            headers = self.identity.sign(method, path, linkproto.body_sha256(body))
        self.last_headers = headers
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body,
                         headers={**headers, "Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        is_json = "json" in (resp.getheader("Content-Type") or "")
        return LinkResponse(resp.status, json.loads(data) if data and is_json else {}, data)

    def request_key(self, region: str = REGION, endpoint_type: str = "STANDARD",
                    ip_version: str | None = None, vpc: str | None = None) -> LinkResponse:
        body = json.dumps({
            "publicKey": self.identity.public_b64,
            "region": region,
            "endpointType": endpoint_type,
            "ipVersion": ip_version,
            "vpcEndpoint": vpc,
            "softwareVersion": "0.1.0",
        }).encode()
        return self.send("POST", "/gateway/activation-key", body)

    def key(self, region: str = REGION, **kw: Any) -> str:
        resp = self.request_key(region, **kw)
        assert resp.status == 200, resp.body
        return str(resp.body["activationKey"])

    def poll(self, after: int = 0, wait: float = 0, version: str = "0.1.0",
             seal: bool = False) -> LinkResponse:
        """A poll; with `seal` it carries the sealing key, as the appliance's do."""
        fields: dict[str, Any] = {"after": after, "softwareVersion": version, "wait": wait}
        if seal:
            fields["sealKey"] = self.seal_key
        return self.send("POST", "/gateway/poll", json.dumps(fields).encode())

    def post(self, path: str, fields: dict[str, Any]) -> LinkResponse:
        return self.send("POST", path, json.dumps(fields).encode())

    def test_result(self, test_id: str, ok: bool, error_code: str | None = None,
                    message: str | None = None) -> LinkResponse:
        """`POST /gateway/hypervisor/test-result`: what the gateway found."""
        return self.post("/gateway/hypervisor/test-result", {
            "testId": test_id, "ok": ok, "errorCode": error_code, "message": message,
        })

    def inventory(self, hypervisor_arn: str, sync_request: int, vms: list[dict[str, Any]],
                  ok: bool = True, error_code: str | None = None,
                  message: str | None = None) -> LinkResponse:
        """`POST /gateway/hypervisor/inventory`: the hypervisor's VMs as the gateway saw them."""
        return self.post("/gateway/hypervisor/inventory", {
            "hypervisorArn": hypervisor_arn, "syncRequest": sync_request, "ok": ok,
            "errorCode": error_code, "message": message, "vms": vms,
        })


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


@contextlib.contextmanager
def running_server(state_dir: Path, home: Path, clock: FakeClock | None = None,
                   hypervisor_test_timeout: float = HYPERVISOR_TEST_TIMEOUT,
                   ) -> Iterator[Server]:
    """A control plane over `state_dir` on 127.0.0.1:<free port>, its loop in a thread;
    stopped (state closed) on exit, so a second one over the same dir is a restart."""
    clock = clock or FakeClock()
    plane = ControlPlane(state_dir, clock=clock, hub=ObservedPollHub(),
                         hypervisor_test_timeout=hypervisor_test_timeout)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=_run_loop, args=(loop,), daemon=True)
    thread.start()
    host, port = asyncio.run_coroutine_threadsafe(plane.start("127.0.0.1", 0), loop).result(30)
    home.mkdir(exist_ok=True)
    srv = Server(plane, clock, host, port, home, loop)
    srv.env = aws_env(plane.access_key_id, plane.secret_access_key, home)
    try:
        yield srv
    finally:
        asyncio.run_coroutine_threadsafe(plane.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A control plane on 127.0.0.1:<free port>, its loop in a thread, with a fake clock."""
    with running_server(tmp_path / "state", tmp_path / "home") as srv:
        yield srv
