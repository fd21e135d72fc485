"""The gateway-facing endpoints (docs/link-protocol.md): activation keys, long-poll, uploads.

Every request is signed with the gateway's Ed25519 identity (gatewaycore.linkproto, shared with
the appliance). Nonces go to SQLite before the request takes effect, so a captured request
cannot be replayed, not even across a restart. Polls wait on an in-memory hub that
operations poke on every configuration change: the gateway learns of CreateGateway at once.

`POST /gateway/activation-key` is the one endpoint a stranger can use to write to the
database (any fresh Ed25519 key signs its own registration). It is rate-limited per source
(`RegistrationThrottle`) and what it writes expires (`Store.purge`, run at most once a
minute as part of normal requests), so the rows a flood can leave are bounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import math
import os
import re
import secrets
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from controlplane.clock import Clock
from controlplane.sigv4 import REGION_RE
from controlplane.store import Identity, Store, StoreError, UploadExists, UploadRecord
from gatewaycore import linkproto, safejson
from gatewaycore.atomicfile import fsync_dir
from gatewaycore.connguard import address_key

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
PURGE_INTERVAL_SECONDS = 60.0
# Registrations (POST /gateway/activation-key): per source, and for all sources together.
# An appliance asks for a key when its operator does: a few an hour. The total bounds what
# many sources together can write: at most ~120/min x 24.5 h of rows before they expire.
REGISTRATIONS_PER_MINUTE = 10.0
REGISTRATION_BURST = 20.0
ALL_REGISTRATIONS_PER_MINUTE = 120.0
ALL_REGISTRATION_BURST = 240.0
MAX_TRACKED_SOURCES = 10_000
_WRITERS = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="upload")


class LinkError(Exception):
    """A refused link request: HTTP status, error code and one line for the gateway's log."""

    def __init__(self, status: int, code: str, message: str, retry_after: int = 0,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.extra = extra


def _bad(field: str, message: str) -> LinkError:
    return LinkError(400, "ValidationError", f"{field}: {message}")


class _Bucket:
    """A token bucket: `rate` tokens a second up to `burst`."""

    __slots__ = ("at", "tokens")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.at = now

    def refill(self, rate: float, burst: float, now: float) -> None:
        # max(): a clock stepped back must not drain the bucket.
        self.tokens = min(burst, self.tokens + max(0.0, now - self.at) * rate)
        self.at = now

    def wait(self, rate: float) -> float:
        """Seconds until one token is there (0 if it is now)."""
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / rate


def source_of(remote: str | None) -> str:
    """The throttling key of a peer: the same unit as the listener's per-address cap."""
    return address_key(remote) if remote else "unknown"


class RegistrationThrottle:
    """Token buckets for registrations: one per source, one shared by all sources.

    Memory is bounded: at most `max_sources` buckets, the least recently seen forgotten
    first (a forgotten source starts again with a full burst, which is all it could have
    regained anyway once its bucket had been idle for burst/rate seconds).
    """

    def __init__(
        self,
        per_minute: float = REGISTRATIONS_PER_MINUTE,
        burst: float = REGISTRATION_BURST,
        all_per_minute: float = ALL_REGISTRATIONS_PER_MINUTE,
        all_burst: float = ALL_REGISTRATION_BURST,
        max_sources: int = MAX_TRACKED_SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = per_minute / 60.0
        self.burst = burst
        self.all_rate = all_per_minute / 60.0
        self.all_burst = all_burst
        self.max_sources = max_sources
        self.clock = clock
        self._sources: OrderedDict[str, _Bucket] = OrderedDict()
        self._all = _Bucket(all_burst, clock())
        self.refused = 0  # since the last `take_refused`, for one summary log line

    def __len__(self) -> int:
        return len(self._sources)

    def check(self, source: str) -> float | None:
        """Take a token for `source`: None if allowed, else the seconds to wait."""
        now = self.clock()
        bucket = self._sources.get(source)
        if bucket is None:
            bucket = self._sources[source] = _Bucket(self.burst, now)
            if len(self._sources) > self.max_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(source)
        bucket.refill(self.rate, self.burst, now)
        self._all.refill(self.all_rate, self.all_burst, now)
        wait = max(bucket.wait(self.rate), self._all.wait(self.all_rate))
        if wait > 0:
            self.refused += 1
            return wait
        bucket.tokens -= 1.0
        self._all.tokens -= 1.0
        return None

    def take_refused(self) -> int:
        refused, self.refused = self.refused, 0
        return refused


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


@dataclass(frozen=True)
class _Admitted:
    """An upload that passed every check that can be made before its body is read."""

    identity: Identity
    declared_sha256: str
    gateway_id: str
    name: str
    replace: bool


# Where the Expect handler leaves its admission for the upload handler (no second nonce).
_ADMITTED: Any = (
    web.RequestKey("gatewaylink_admitted", _Admitted)  # type: ignore[attr-defined]
    if hasattr(web, "RequestKey") else "gatewaylink_admitted"
)
Answer = tuple[int, dict[str, Any]]


class GatewayLink:
    """Handlers of `/gateway/...`."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        hub: PollHub,
        data_dir: Path,
        wall_clock: Callable[[], float] = time.time,
        registrations: RegistrationThrottle | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.hub = hub
        self.data_dir = data_dir
        self.wall_clock = wall_clock
        # On the business clock, so a test that moves it refills the buckets as time would.
        self.registrations = registrations or RegistrationThrottle(clock=clock.now)
        self._next_purge = 0.0
        self.incoming = data_dir / ".incoming"
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.incoming.mkdir(mode=0o700, exist_ok=True)
        self.reconcile()
        for stale in self.incoming.glob("*.part"):  # uploads cut off by a kill or a crash
            stale.unlink(missing_ok=True)
        self.housekeep()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/gateway/activation-key", self._wrap(self.activation_key)),
            web.post("/gateway/poll", self._wrap(self.poll)),
            web.put("/gateway/data/{name}", self._wrap(self.upload),
                    expect_handler=self._upload_expect),
        ]

    async def _answer(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse | None:
        """Run a handler; every refusal is the protocol's JSON error, never a traceback page."""
        try:
            self.housekeep()
            answer = await handler(request)
        except LinkError as err:
            log.log(
                logging.DEBUG if err.status == 429 else logging.INFO,
                "event=link_refused path=%s status=%d error=%s message=%s",
                request.path, err.status, err.code, err.message,
            )
            body = {"error": err.code, "message": err.message, **err.extra}
            headers = {"Retry-After": str(err.retry_after)} if err.retry_after else None
            return web.json_response(body, status=err.status, headers=headers)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception:
            ref = uuid.uuid4()
            log.exception("event=link_failed path=%s ref=%s", request.path, ref)
            return web.json_response(
                {"error": "InternalError", "message": f"see the server log ({ref})"},
                status=500,
            )
        if answer is None:
            return None
        status, payload = answer
        return web.json_response(payload, status=status)

    def _wrap(self, handler: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
        async def run(request: web.Request) -> web.StreamResponse:
            response = await self._answer(request, handler)
            assert response is not None
            return response

        return run

    def housekeep(self) -> None:
        """Purge what expired, at most once per PURGE_INTERVAL_SECONDS of business time.

        Part of normal work (the first request after the interval does it) rather than a
        timer task: nothing to start or stop, and an idle server has nothing to purge.
        """
        now = self.clock.now()
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_INTERVAL_SECONDS
        deleted = self.store.purge(now, self.wall_clock() - 2 * linkproto.MAX_SKEW_SECONDS)
        refused = self.registrations.take_refused()
        if refused or deleted["keys"] or deleted["identities"]:
            log.info(
                "event=link_purged keys=%d identities=%d nonces=%d registrations_throttled=%d",
                deleted["keys"], deleted["identities"], deleted["nonces"], refused,
            )

    # -- authentication -----------------------------------------------------------------

    def _check_signature(self, request: web.Request, public_raw: bytes, key_id: str) -> str:
        """Verify the signature and remember the nonce; returns the declared body hash."""
        try:
            nonce, content = linkproto.verify(
                request.headers, request.method, request.raw_path, public_raw, self.wall_clock()
            )
        except linkproto.LinkAuthError as exc:
            raise LinkError(401, "InvalidSignature", str(exc)) from None
        if not self.store.record_nonce(key_id, nonce, self.wall_clock()):
            raise LinkError(401, "InvalidSignature", "nonce already used: a replayed request")
        return content

    async def _json_body(self, request: web.Request) -> tuple[bytes, dict[str, Any]]:
        body = await request.content.read(MAX_JSON_BODY + 1)
        if len(body) > MAX_JSON_BODY:
            raise LinkError(413, "ValidationError", f"body: larger than {MAX_JSON_BODY} bytes")
        try:
            payload = safejson.loads_object(body)
        except safejson.JsonError as exc:
            raise _bad("body", str(exc)) from None
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
        if not linkproto.is_key_id(key_id):
            raise LinkError(
                401, "InvalidSignature", f"{linkproto.H_KEY_ID} must be 32 lowercase hex digits"
            )
        identity = self.store.identity(key_id)
        if identity is None:
            raise LinkError(
                401, "UnknownGateway",
                f"{linkproto.H_KEY_ID} '{key_id}' was never registered; request an activation "
                "key first",
            )
        return identity

    # -- POST /gateway/activation-key -----------------------------------------------------

    def _throttle_registration(self, request: web.Request) -> None:
        """Refuse (429) before any work is done when the source registers too often.

        Only new identities count: a known one's request is checked against its stored
        public key before anything is written, and its open keys are capped per identity
        (Store.issue_key), so re-asking for a key cannot grow the database.
        """
        key_id = request.headers.get(linkproto.H_KEY_ID, "")
        if linkproto.is_key_id(key_id) and self.store.identity(key_id) is not None:
            return
        wait = self.registrations.check(source_of(request.remote))
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            raise LinkError(
                429, "Throttled",
                f"too many activation key requests from this address (at most "
                f"{REGISTRATIONS_PER_MINUTE:g} a minute); retry in {seconds} s",
                retry_after=seconds,
            )

    async def activation_key(self, request: web.Request) -> Answer:
        self._throttle_registration(request)
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

    async def poll(self, request: web.Request) -> Answer:
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

    async def _upload_expect(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: every refusal (signature, name, not activated, the name
        already stored) is answered before the client sends a byte of its body."""

        async def admit(request: web.Request) -> None:
            request[_ADMITTED] = self._admit_upload(request)
            if request.headers.get("Expect", "").lower() != "100-continue":
                raise LinkError(417, "ExpectationFailed",
                                "only 'Expect: 100-continue' is understood")
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

        return await self._answer(request, admit)

    def _admit_upload(self, request: web.Request) -> _Admitted:
        """The checks made before the body is read (once: they use up the nonce)."""
        name = request.match_info["name"]
        identity = self._identity(request)
        declared = self._check_signature(request, identity.public_key, identity.key_id)
        if not _NAME_RE.fullmatch(name) or name in (".", ".."):
            raise _bad("name", "must be 1-200 characters of [A-Za-z0-9._-], not '.' or '..'")
        replace = _replace_param(request)
        if identity.deleted or not identity.gateway_id:
            raise LinkError(403, "NotActivated", "this gateway is not activated; uploads refused")
        if not replace:
            existing = self.store.upload_record(identity.gateway_id, name)
            if existing is not None:
                raise _already_exists(existing)
        return _Admitted(identity, declared, identity.gateway_id, name, replace)

    async def upload(self, request: web.Request) -> Answer:
        admitted = request.get(_ADMITTED) or self._admit_upload(request)
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
            declared = admitted.declared_sha256
            if declared != linkproto.UNSIGNED_PAYLOAD and declared != sha:
                raise LinkError(
                    400, "ChecksumMismatch",
                    f"body SHA-256 is {sha}, {linkproto.H_CONTENT_SHA256} said {declared}; "
                    "nothing kept",
                )
            record = UploadRecord(admitted.gateway_id, admitted.name, size, sha,
                                  self.clock.now(), tmp.name)
            self._commit(record, tmp, admitted.replace)
        finally:
            tmp.unlink(missing_ok=True)  # gone already when committed
        log.info("event=upload_stored gateway=%s name=%s size=%d sha256=%s replace=%s",
                 record.gateway_id, record.name, size, sha, str(admitted.replace).lower())
        return 201, {"name": record.name, "size": size, "sha256": sha}

    def _commit(self, record: UploadRecord, tmp: Path, replace: bool) -> None:
        """Record, rename, complete: synchronous, so no other upload interleaves in this
        process, and each step leaves a state `reconcile` repairs after a crash.

        The name is checked again in the transaction that writes the record: of two uploads
        of one name that both passed the early check, exactly one is stored.
        """
        assert record.part is not None
        try:
            previous = self.store.begin_upload(record, replace)
        except UploadExists as exc:
            raise _already_exists(exc.existing) from None
        target_dir = self.data_dir / record.gateway_id
        try:
            if not target_dir.is_dir():
                target_dir.mkdir(mode=0o700, exist_ok=True)
                fsync_dir(self.data_dir)
            os.replace(tmp, target_dir / record.name)
        except BaseException:
            self.store.undo_upload(record, previous)
            raise
        fsync_dir(target_dir)
        self.store.finish_upload(record.gateway_id, record.name, record.part)

    # -- start-up repair of uploads -------------------------------------------------------

    def reconcile(self) -> None:
        """Make the upload records and the files of the data directory agree again.

        A record whose part file is still in .incoming was recorded but not renamed: the
        part was complete and fsynced, so the rename is done now. A record without a file
        is deleted (it would promise bytes that are not there). A file without a record, or
        whose size differs from it, gets a record computed from the file: its bytes arrived
        whole (only complete, checked parts are ever renamed), only the record was lost.
        """
        records = {(r.gateway_id, r.name): r for r in self.store.upload_records()}
        for record in records.values():
            self._repair(record)
        for gateway_dir in sorted(self.data_dir.iterdir()):
            if gateway_dir.name.startswith(".") or not gateway_dir.is_dir():
                continue
            for path in sorted(gateway_dir.iterdir()):
                if (gateway_dir.name, path.name) in records or not path.is_file():
                    continue
                if not _NAME_RE.fullmatch(path.name):
                    log.warning("event=upload_ignored path=%s reason=bad_name", path)
                    continue
                self._adopt(gateway_dir.name, path, "file_without_record")

    def _repair(self, record: UploadRecord) -> None:
        """Bring one record and its file into agreement; one log line if anything changed."""
        target = self.data_dir / record.gateway_id / record.name
        renamed = False
        if record.part is not None:
            part = self.incoming / record.part
            if part.is_file():
                target.parent.mkdir(mode=0o700, exist_ok=True)
                os.replace(part, target)
                fsync_dir(target.parent)
                renamed = True
        if not target.is_file():
            self.store.delete_upload(record.gateway_id, record.name)
            action = "record_deleted reason=no_file"
        elif target.stat().st_size != record.size:
            self._adopt(record.gateway_id, target, "size_differs")
            return
        elif record.part is not None:
            self.store.finish_upload(record.gateway_id, record.name, record.part)
            action = "rename_done,record_completed" if renamed else "record_completed"
        else:
            return
        log.warning("event=upload_repaired gateway=%s name=%s action=" + action,
                    record.gateway_id, record.name)

    def _adopt(self, gateway_id: str, path: Path, reason: str) -> None:
        digest = hashlib.sha256()
        size = 0
        with path.open("rb") as f:
            while chunk := f.read(UPLOAD_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        record = UploadRecord(gateway_id, path.name, size, digest.hexdigest(),
                              path.stat().st_mtime)
        self.store.put_upload(record)
        log.warning("event=upload_repaired gateway=%s name=%s action=record_from_file "
                    "reason=%s size=%d sha256=%s", gateway_id, path.name, reason, size,
                    record.sha256)


def _replace_param(request: web.Request) -> bool:
    """The query of an upload: nothing, or `replace=true|false` once."""
    unknown = sorted(set(request.query) - {"replace"})
    if unknown:
        raise _bad("query", f"unknown parameter {unknown[0]!r}; only replace=true|false")
    values = request.query.getall("replace", [])
    if len(values) > 1 or (values and values[0] not in ("true", "false")):
        raise _bad("replace", "must be given once, as true or false")
    return bool(values) and values[0] == "true"


def _already_exists(existing: UploadRecord) -> LinkError:
    """409 naming what is stored, so the caller can tell whether it is the same data."""
    return LinkError(
        409, "AlreadyExists",
        f"'{existing.name}' is already stored: {existing.size} bytes, sha256 "
        f"{existing.sha256}, stored {iso(existing.stored_at)}; upload with replace=true to "
        "replace it",
        name=existing.name, size=existing.size, sha256=existing.sha256,
        storedAt=iso(existing.stored_at),
    )
