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
from dataclasses import dataclass
from typing import Any

import aiohttp

from appliance.identity import Identity
from appliance.version import __version__
from gatewaycore import linkproto, utctime

KEY_REQUEST_TIMEOUT = 10.0
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


@dataclass(frozen=True)
class PollAnswer:
    version: int
    state: str
    gateway_arn: str | None
    gateway_name: str | None
    region: str | None
    intervals: list[dict[str, Any]]
    software_update_request: int

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
        except (KeyError, TypeError):
            raise LinkError("poll answer does not follow docs/link-protocol.md") from None
        return cls(version, state, texts[0], texts[1], texts[2], intervals, update)


def now_iso() -> str:
    """Now in the one time format of the link (gatewaycore.utctime)."""
    return utctime.format_utc()


class LinkClient:
    def __init__(self, base_url: str, identity: Identity) -> None:
        self.base_url = base_url.rstrip("/")
        self.identity = identity
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
        self.last_contact = now_iso()
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
        doc = await self._post(
            "/gateway/poll",
            {"after": after, "softwareVersion": __version__, "wait": wait},
            wait + 15,
        )
        return PollAnswer.from_json(doc)


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
