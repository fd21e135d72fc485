"""The client side of the gateway link (docs/link-protocol.md).

Every request is signed with the gateway's identity (appliance/linkproto.py). The client
turns each way a call can fail into one exception type, so the activation page can map
them to its status codes (504 unreachable, 409, 410) and the poll loop can back off. It also
remembers when the control plane last answered, for the console's status screen.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from appliance.identity import Identity
from appliance.version import __version__
from gatewaycore import linkproto, utctime

KEY_REQUEST_TIMEOUT = 10.0
REPORT_TIMEOUT = 30.0  # a hypervisor test result or inventory
POLL_WAIT = 20  # seconds the control plane may hold a poll; also the heartbeat period


class LinkError(Exception):
    """Any failed call; `code` is the control plane's error code or a local one."""

    code = "LinkError"


class Unreachable(LinkError):
    """No answer, a connection error, a timeout or a 5xx: the service cannot be reached."""

    code = "ControlPlaneUnreachable"


class Refused(LinkError):
    """The control plane answered with a 4xx error body."""

    def __init__(self, status: int, code: str, message: str, gateway_arn: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.gateway_arn = gateway_arn


@dataclass(frozen=True)
class IssuedKey:
    key: str
    region: str
    expires_at: str | None


def _sealed_or_none(value: Any) -> dict[str, Any] | None:
    """A sealed box (kept unopened) or null; TypeError for anything else."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise TypeError
    return dict(value)


def _text(value: Any, optional: bool = False) -> Any:
    if (value is None and optional) or (isinstance(value, str) and value):
        return value
    raise TypeError


@dataclass(frozen=True)
class HypervisorOrder:
    """The poll answer's `hypervisor`: the hypervisor this gateway is associated with.

    `password` is the sealed box as received: it is opened only in memory, right before a
    connection (appliance/hypervisoragent.py).
    """

    hypervisor_arn: str
    host: str
    username: str | None
    password: dict[str, Any] | None = field(repr=False)
    password_pending: bool
    sync_request: int

    @classmethod
    def from_json(cls, doc: Any) -> HypervisorOrder:
        if not isinstance(doc, dict):
            raise TypeError
        sync = doc.get("syncRequest") or 0
        if type(sync) is not int or sync < 0:
            raise TypeError
        return cls(
            _text(doc.get("hypervisorArn")), _text(doc.get("host")),
            _text(doc.get("username"), optional=True), _sealed_or_none(doc.get("password")),
            doc.get("passwordPending") is True, sync,
        )


@dataclass(frozen=True)
class TestRequest:
    """One TestHypervisorConfiguration waiting for this gateway (the poll answer's `tests`)."""

    __test__ = False  # not a pytest test class, whatever its name

    test_id: str
    host: str
    username: str | None
    password: dict[str, Any] | None = field(repr=False)
    password_pending: bool = False

    @classmethod
    def from_json(cls, doc: Any) -> TestRequest:
        if not isinstance(doc, dict):
            raise TypeError
        return cls(
            _text(doc.get("testId")), _text(doc.get("host")),
            _text(doc.get("username"), optional=True), _sealed_or_none(doc.get("password")),
            doc.get("passwordPending") is True,
        )


@dataclass(frozen=True)
class PollAnswer:
    version: int
    state: str
    gateway_arn: str | None
    gateway_name: str | None
    region: str | None
    intervals: list[dict[str, Any]]
    software_update_request: int
    hypervisor: HypervisorOrder | None = None
    tests: tuple[TestRequest, ...] = ()

    @classmethod
    def from_json(cls, doc: Any) -> PollAnswer:
        """Check the shape; a control plane speaking another protocol is a LinkError."""
        try:
            version, state = doc["version"], doc["state"]
            if type(version) is not int or state not in ("pending", "activated", "deleted"):
                raise TypeError
            intervals = doc.get("bandwidthRateLimitIntervals")
            intervals = [] if intervals is None else intervals
            if not isinstance(intervals, list) or not all(isinstance(i, dict) for i in intervals):
                raise TypeError
            update = doc.get("softwareUpdateRequest") or 0
            if not isinstance(update, int) or isinstance(update, bool):
                raise TypeError
            texts = [doc.get(k) for k in ("gatewayArn", "gatewayName", "region")]
            if not all(t is None or isinstance(t, str) for t in texts):
                raise TypeError
            hv = doc.get("hypervisor")
            hypervisor = None if hv is None else HypervisorOrder.from_json(hv)
            tests = doc.get("tests")
            tests = [] if tests is None else tests
            if not isinstance(tests, list):
                raise TypeError
            requests = tuple(TestRequest.from_json(t) for t in tests)
        except (KeyError, TypeError):
            raise LinkError("poll answer does not follow docs/link-protocol.md") from None
        return cls(version, state, texts[0], texts[1], texts[2], intervals, update,
                   hypervisor, requests)


class LinkClient:
    def __init__(self, base_url: str, identity: Identity, seal_key: str | None = None) -> None:
        """`seal_key`: the gateway's X25519 public key (base64), sent in every poll."""
        self.base_url = base_url.rstrip("/")
        self.identity = identity
        self.seal_key = seal_key
        self._session: aiohttp.ClientSession | None = None
        self.reachable = False
        self.last_contact: str | None = None
        self.last_error: str | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No cookie jar, no env proxies: the link goes straight to the configured URL.
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
            )
        return self._session

    async def _post(self, path: str, payload: dict[str, Any], timeout: float) -> Any:
        body = json.dumps(payload).encode()
        headers = self.identity.sign("POST", path, linkproto.body_sha256(body))
        headers["Content-Type"] = "application/json"
        url = self.base_url + path
        try:
            async with self._get_session().post(
                url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error.strerror:
                reason = exc.os_error.strerror.lower()
            elif isinstance(exc, TimeoutError):
                reason = f"no answer within {timeout:.0f}s"
            self._failed(f"control plane {self.base_url} unreachable: {reason}")
            raise Unreachable(self.last_error) from None
        if status >= 500:
            self._failed(f"control plane {self.base_url} answered HTTP {status}")
            raise Unreachable(self.last_error)
        self.reachable = True
        self.last_contact = utctime.format_utc()
        self.last_error = None
        try:
            doc = json.loads(text)
        except ValueError:
            raise LinkError(f"control plane answered HTTP {status} with a non-JSON body") from None
        if status != 200:
            doc = doc if isinstance(doc, dict) else {}
            raise Refused(
                status,
                str(doc.get("error", f"HTTP{status}")),
                str(doc.get("message", f"HTTP {status}"))[:300],
                doc.get("gatewayArn") if isinstance(doc.get("gatewayArn"), str) else None,
            )
        return doc

    def _failed(self, message: str) -> None:
        self.reachable = False
        self.last_error = message

    async def request_activation_key(
        self,
        region: str,
        endpoint_type: str,
        ip_version: str | None,
        vpc_endpoint: str | None,
    ) -> IssuedKey:
        doc = await self._post(
            "/gateway/activation-key",
            {
                "publicKey": self.identity.public_b64,
                "region": region,
                "endpointType": endpoint_type,
                "ipVersion": ip_version,
                "vpcEndpoint": vpc_endpoint,
                "softwareVersion": __version__,
            },
            KEY_REQUEST_TIMEOUT,
        )
        key = doc.get("activationKey") if isinstance(doc, dict) else None
        if not isinstance(key, str) or not key:
            raise LinkError("activation-key answer has no activationKey")
        expires = doc.get("expiresAt")
        return IssuedKey(key, str(doc.get("region") or region), expires if expires else None)

    async def poll(self, after: int, wait: int = POLL_WAIT) -> PollAnswer:
        body: dict[str, Any] = {"after": after, "softwareVersion": __version__, "wait": wait}
        if self.seal_key is not None:
            body["sealKey"] = self.seal_key
        doc = await self._post("/gateway/poll", body, wait + 15)
        return PollAnswer.from_json(doc)

    async def report_test(self, test_id: str, ok: bool, error_code: str | None,
                          message: str | None) -> None:
        """`POST /gateway/hypervisor/test-result`; Refused `UnknownTest` once it expired."""
        await self._post(
            "/gateway/hypervisor/test-result",
            {"testId": test_id, "ok": ok, "errorCode": error_code, "message": message},
            REPORT_TIMEOUT,
        )

    async def report_inventory(
        self, hypervisor_arn: str, sync_request: int, ok: bool, error_code: str | None,
        message: str | None, vms: list[dict[str, Any]],
    ) -> int | None:
        """`POST /gateway/hypervisor/inventory`: the VMs the control plane kept (its count)."""
        doc = await self._post(
            "/gateway/hypervisor/inventory",
            {"hypervisorArn": hypervisor_arn, "syncRequest": sync_request, "ok": ok,
             "errorCode": error_code, "message": message, "vms": vms},
            REPORT_TIMEOUT,
        )
        kept = doc.get("vms") if isinstance(doc, dict) else None
        return kept if type(kept) is int else None


class Backoff:
    """Capped exponential backoff, jittered (half to all of a step): no retrying in lockstep."""

    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


async def sleep_or_wake(event: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds` unless `event` is set first (then clear it)."""
    deadline = time.monotonic() + seconds
    try:
        await asyncio.wait_for(event.wait(), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        return
    event.clear()
