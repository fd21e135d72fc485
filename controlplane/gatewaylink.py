"""The gateway-facing endpoints (docs/link-protocol.md): activation keys, long-poll, uploads.

Every request is signed with the gateway's Ed25519 identity (appliance.linkproto, shared with
the appliance). Nonces go to SQLite before the request takes effect, so a captured request
cannot be replayed, not even across a restart. Polls wait on an in-memory hub that
operations poke on every configuration change: the gateway learns of CreateGateway at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from appliance import linkproto
from appliance.atomicfile import fsync_dir
from controlplane.clock import Clock
from controlplane.sigv4 import REGION_RE
from controlplane.store import Identity, Store, StoreError

log = logging.getLogger("controlplane.link")

KEY_LIFETIME_SECONDS = 30 * 60
MAX_WAIT_SECONDS = 25
MAX_JSON_BODY = 64 * 1024
ENDPOINT_TYPES = ("STANDARD", "DUALSTACK")
IP_VERSIONS = ("ipv4", "ipv6")
_KEY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,200}")
_DNS_RE = re.compile(r"(?=.{1,255}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                     r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")
_VERSION_RE = re.compile(r"[A-Za-z0-9.+_-]{1,100}")
UPLOAD_CHUNK = 1 << 20
_WRITERS = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="upload")


class LinkError(Exception):
    """A refused link request: HTTP status, error code and one line for the gateway's log."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


def _bad(field: str, message: str) -> LinkError:
    return LinkError(400, "ValidationError", f"{field}: {message}")


def new_activation_key() -> str:
    """Five groups of five [A-Z0-9] joined by '-': the format the real service issues."""
    return "-".join(
        "".join(secrets.choice(_KEY_ALPHABET) for _ in range(5)) for _ in range(5)
    )


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PollHub:
    """Wakes the long-polls waiting on one identity; safe to poke from any thread."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[None]]] = defaultdict(set)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closing = False

    def close(self) -> None:
        """Answer every waiting poll now (shutdown must not wait 25 s for them)."""
        self.closing = True
        for key_id in list(self._waiters):
            self._wake(key_id)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def notify(self, key_id: str) -> None:
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._wake, key_id)

    def _wake(self, key_id: str) -> None:
        for fut in self._waiters.pop(key_id, set()):
            if not fut.done():
                fut.set_result(None)

    def waiting(self, key_id: str) -> int:
        """How many polls of this identity are waiting now (tests await this)."""
        return sum(1 for f in self._waiters.get(key_id, ()) if not f.done())

    def waiter(self, key_id: str) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[key_id].add(fut)
        return fut

    def discard(self, key_id: str, fut: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(key_id)
        if waiters is not None:
            waiters.discard(fut)
            if not waiters:
                del self._waiters[key_id]


class GatewayLink:
    """Handlers of `/gateway/...`."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        hub: PollHub,
        data_dir: Path,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.clock = clock
        self.hub = hub
        self.data_dir = data_dir
        self.wall_clock = wall_clock
        self.incoming = data_dir / ".incoming"
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.incoming.mkdir(mode=0o700, exist_ok=True)
        for stale in self.incoming.glob("*.part"):  # uploads cut off by a kill or a crash
            stale.unlink(missing_ok=True)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/gateway/activation-key", self._wrap(self.activation_key)),
            web.post("/gateway/poll", self._wrap(self.poll)),
            web.put("/gateway/data/{name}", self._wrap(self.upload)),
        ]

    def _wrap(self, handler: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
        async def run(request: web.Request) -> web.StreamResponse:
            try:
                status, payload = await handler(request)
            except LinkError as err:
                log.info(
                    "event=link_refused path=%s status=%d error=%s message=%s",
                    request.path, err.status, err.code, err.message,
                )
                body = {"error": err.code, "message": err.message, **err.extra}
                return web.json_response(body, status=err.status)
            except (ConnectionResetError, asyncio.CancelledError):
                raise
            except Exception:
                ref = uuid.uuid4()
                log.exception("event=link_failed path=%s ref=%s", request.path, ref)
                return web.json_response(
                    {"error": "InternalError", "message": f"see the server log ({ref})"},
                    status=500,
                )
            return web.json_response(payload, status=status)

        return run

    # -- authentication -----------------------------------------------------------------

    def _check_signature(self, request: web.Request, public_raw: bytes, key_id: str) -> str:
        """Verify the signature and remember the nonce; returns the declared body hash."""
        try:
            nonce, content = linkproto.verify(
                request.headers, request.method, request.raw_path, public_raw, self.wall_clock()
            )
        except linkproto.LinkAuthError as exc:
            raise LinkError(401, "InvalidSignature", str(exc)) from None
        keep = 2 * linkproto.MAX_SKEW_SECONDS
        if not self.store.record_nonce(key_id, nonce, self.wall_clock(), keep):
            raise LinkError(401, "InvalidSignature", "nonce already used: a replayed request")
        return content

    async def _json_body(self, request: web.Request) -> tuple[bytes, dict[str, Any]]:
        body = await request.content.read(MAX_JSON_BODY + 1)
        if len(body) > MAX_JSON_BODY:
            raise LinkError(413, "ValidationError", f"body: larger than {MAX_JSON_BODY} bytes")
        try:
            payload = json.loads(body) if body.strip() else {}
        except (ValueError, UnicodeDecodeError):
            raise LinkError(400, "ValidationError", "body: not valid JSON") from None
        if not isinstance(payload, dict):
            raise LinkError(400, "ValidationError", "body: must be a JSON object")
        return body, payload

    @staticmethod
    def _check_body_hash(declared: str, body: bytes) -> None:
        if declared != linkproto.body_sha256(body):
            raise LinkError(
                401, "InvalidSignature",
                f"{linkproto.H_CONTENT_SHA256} does not match the body received",
            )

    def _identity(self, request: web.Request) -> Identity:
        key_id = request.headers.get(linkproto.H_KEY_ID, "")
        identity = self.store.identity(key_id) if key_id else None
        if identity is None:
            raise LinkError(
                401, "UnknownGateway",
                f"{linkproto.H_KEY_ID} '{key_id}' was never registered; request an activation "
                "key first",
            )
        return identity

    # -- POST /gateway/activation-key -----------------------------------------------------

    async def activation_key(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        body, payload = await self._json_body(request)
        try:
            public_raw = linkproto.decode_public_key(str(payload.get("publicKey", "")))
        except ValueError as exc:
            raise _bad("publicKey", str(exc)) from None
        key_id = linkproto.key_id(public_raw)
        if request.headers.get(linkproto.H_KEY_ID) != key_id:
            raise LinkError(
                401, "InvalidSignature", f"{linkproto.H_KEY_ID} does not match publicKey"
            )
        declared = self._check_signature(request, public_raw, key_id)
        self._check_body_hash(declared, body)
        region = payload.get("region")
        if not isinstance(region, str) or not REGION_RE.fullmatch(region):
            raise _bad("region", f"must be an AWS region code such as us-west-2, got {region!r}")
        endpoint_type = payload.get("endpointType") or "STANDARD"
        if endpoint_type not in ENDPOINT_TYPES:
            raise _bad("endpointType", f"must be one of {', '.join(ENDPOINT_TYPES)}, "
                       f"got {endpoint_type!r}")
        ip_version = payload.get("ipVersion")
        if ip_version is not None and ip_version not in IP_VERSIONS:
            raise _bad("ipVersion", f"must be ipv4, ipv6 or null, got {ip_version!r}")
        vpc = payload.get("vpcEndpoint")
        if vpc is not None and (not isinstance(vpc, str) or not _DNS_RE.fullmatch(vpc)):
            raise _bad("vpcEndpoint", f"must be a DNS name of 1-255 characters, got {vpc!r}")
        version = payload.get("softwareVersion")
        if version is not None and (
            not isinstance(version, str) or not _VERSION_RE.fullmatch(version)
        ):
            raise _bad("softwareVersion", "must be 1-100 characters of [A-Za-z0-9.+_-] or null")
        now = self.clock.now()
        try:
            key = self.store.issue_key(
                key_id, public_raw, new_activation_key(), region, endpoint_type, ip_version,
                vpc, version, now, KEY_LIFETIME_SECONDS,
            )
        except StoreError as exc:
            status = 410 if exc.reason == "GatewayDeleted" else 409
            raise LinkError(status, exc.reason, exc.message, gatewayArn=exc.gateway_arn) from None
        log.info(
            "event=key_issued key_id=%s region=%s endpoint_type=%s ip_version=%s vpc=%s",
            key_id, region, endpoint_type, ip_version, vpc,
        )
        return 200, {
            "activationKey": key.key,
            "region": key.region,
            "expiresAt": iso(key.expires_at),
        }

    # -- POST /gateway/poll -------------------------------------------------------------

    async def poll(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        identity = self._identity(request)
        body, payload = await self._json_body(request)
        declared = self._check_signature(request, identity.public_key, identity.key_id)
        self._check_body_hash(declared, body)
        after = payload.get("after", 0)
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise _bad("after", f"must be an integer >= 0, got {after!r}")
        wait = payload.get("wait", MAX_WAIT_SECONDS)
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not (
            0 <= wait <= MAX_WAIT_SECONDS
        ):
            raise _bad("wait", f"must be a number of seconds from 0 to {MAX_WAIT_SECONDS}")
        version = payload.get("softwareVersion")
        if version is not None and (
            not isinstance(version, str) or not _VERSION_RE.fullmatch(version)
        ):
            raise _bad("softwareVersion", "must be 1-100 characters of [A-Za-z0-9.+_-] or null")
        self.store.heartbeat(identity.key_id, version, self.clock.now())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(wait)
        while True:
            fut = self.hub.waiter(identity.key_id)
            try:
                state = self.poll_state(identity.key_id)
                remaining = deadline - loop.time()
                if state["version"] > after or remaining <= 0 or self.hub.closing:
                    return 200, state
                log.debug("event=poll_wait key_id=%s after=%d wait=%.1f",
                          identity.key_id, after, remaining)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fut), remaining)
            finally:
                self.hub.discard(identity.key_id, fut)

    @staticmethod
    async def _receive(request: web.Request, fd: int, digest: Any) -> int:
        """Stream the body to `fd`, hashing it; returns its size. Never holds it whole.

        Hashing and writing run in a worker thread (both release the GIL) while the event
        loop reads the next chunks, so the two cores share the work: this is what lets an
        upload run at several Gbit/s over loopback.
        """
        pending: concurrent.futures.Future[None] | None = None
        batch: list[bytes] = []
        batched = size = 0

        def consume(chunks: list[bytes]) -> None:
            for chunk in chunks:
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]

        try:
            while True:
                chunk = await request.content.readany()
                if chunk:
                    batch.append(chunk)
                    batched += len(chunk)
                    size += len(chunk)
                if batch and (batched >= UPLOAD_CHUNK or not chunk):
                    if pending is not None:
                        # At most one batch in flight: memory stays bounded.
                        await asyncio.wrap_future(pending)
                    pending = _WRITERS.submit(consume, batch)
                    batch, batched = [], 0
                if not chunk:
                    break
        finally:
            # The caller closes `fd` next: no write may still be running then, even when
            # the client went away mid-upload. Waiting here is one batch at most.
            if pending is not None:
                pending.result()
        return size

    def poll_state(self, key_id: str) -> dict[str, Any]:
        identity = self.store.identity(key_id)
        assert identity is not None
        gateway = self.store.gateway_by_id(identity.gateway_id) if identity.gateway_id else None
        state = "deleted" if identity.deleted else "activated" if gateway else "pending"
        return {
            "version": identity.version,
            "state": state,
            "gatewayArn": gateway.arn if gateway else None,
            "gatewayName": gateway.name if gateway else None,
            "region": gateway.region if gateway else None,
            "bandwidthRateLimitIntervals": gateway.schedule if gateway else [],
            "softwareUpdateRequest": gateway.software_update_request if gateway else 0,
        }

    # -- PUT /gateway/data/{name} ---------------------------------------------------------

    async def upload(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        name = request.match_info["name"]
        identity = self._identity(request)
        declared = self._check_signature(request, identity.public_key, identity.key_id)
        if not _NAME_RE.fullmatch(name) or name in (".", ".."):
            raise _bad("name", "must be 1-200 characters of [A-Za-z0-9._-], not '.' or '..'")
        if identity.deleted or not identity.gateway_id:
            raise LinkError(403, "NotActivated", "this gateway is not activated; uploads refused")
        gateway_id = identity.gateway_id
        tmp = self.incoming / f"{uuid.uuid4().hex}.part"
        digest = hashlib.sha256()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                size = await self._receive(request, fd, digest)
                # A 201 promises the bytes are kept: make them durable before the rename.
                await asyncio.get_running_loop().run_in_executor(_WRITERS, os.fsync, fd)
            finally:
                os.close(fd)
            sha = digest.hexdigest()
            if declared != linkproto.UNSIGNED_PAYLOAD and declared != sha:
                raise LinkError(
                    400, "ChecksumMismatch",
                    f"body SHA-256 is {sha}, {linkproto.H_CONTENT_SHA256} said {declared}; "
                    "nothing kept",
                )
            target_dir = self.data_dir / gateway_id
            target_dir.mkdir(exist_ok=True)
            os.replace(tmp, target_dir / name)
            fsync_dir(target_dir)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.store.record_upload(gateway_id, name, size, sha, self.clock.now())
        log.info("event=upload_stored gateway=%s name=%s size=%d sha256=%s",
                 gateway_id, name, size, sha)
        return 201, {"name": name, "size": size, "sha256": sha}
