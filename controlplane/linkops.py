"""The gateway link's operations (docs/link-protocol.md): one method per operation, over the
store, the blob store and the poll hub. The link's counterpart of operations.py.

Nothing here knows HTTP: linkwire.py has read the headers and the body and checked the
signature; here come plain arguments (the values of a request's JSON fields as sent, so
every field is checked by its rule in gatewaycore.rules, the rule the appliance applies
too) and out go plain results (the JSON object of a 2xx answer) or a LinkError carrying
the status, code, message and fields of the refusal.

`POST /gateway/activation-key` is the one operation a stranger can use to write to the
database (any fresh Ed25519 key signs its own registration). It is rate-limited per source
(`admit_registration`) and what it writes expires (`housekeep`, run at most once a minute as
part of normal requests), so the rows a flood can leave are bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from controlplane.blobstore import BlobStore, Part
from controlplane.clock import Clock
from controlplane.pollhub import PollHub
from controlplane.store import Identity, Store, StoreError, UploadExists, UploadRecord
from controlplane.throttle import RegistrationThrottle
from gatewaycore import linkproto, rules
from gatewaycore.utctime import format_utc

log = logging.getLogger("controlplane.link")

KEY_LIFETIME_SECONDS = 30 * 60
MAX_WAIT_SECONDS = 25
PURGE_INTERVAL_SECONDS = 60.0
_KEY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


class LinkError(Exception):
    """A refused link request: HTTP status, error code, one line for the gateway's log, and
    the fields the answer carries besides (`gatewayArn`, the stored upload's `sha256`...).

    `retry_after` (seconds, 0 for none) tells the caller when to try again (a 429).
    """

    def __init__(self, status: int, code: str, message: str, retry_after: int = 0,
                 **fields: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.fields = fields


def invalid(field: str, message: str) -> LinkError:
    """400 ValidationError; the message starts with the field, as the protocol promises."""
    return LinkError(400, "ValidationError", f"{field}: {message}")


def _rule_refused(err: rules.RuleError) -> LinkError:
    return invalid(err.field, err.message)


def new_activation_key() -> str:
    """Five groups of five [A-Z0-9] joined by '-': the format the real service issues."""
    return "-".join(
        "".join(secrets.choice(_KEY_ALPHABET) for _ in range(5)) for _ in range(5)
    )


@dataclass(frozen=True)
class AdmittedUpload:
    """An upload that passed every check that can be made before its body is read."""

    identity: Identity
    gateway_id: str
    name: str
    replace: bool
    declared_sha256: str  # what the signature says the body hashes to, or UNSIGNED_PAYLOAD


class LinkOps:
    """What each link request does, once it is known to come from whom it says."""

    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        hub: PollHub,
        clock: Clock,
        wall_clock: Callable[[], float] = time.time,
        registrations: RegistrationThrottle | None = None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.hub = hub
        self.clock = clock
        # Signatures and nonces are on the wall clock: gateways sign with their real time.
        self.wall_clock = wall_clock
        # On the business clock, so a test that moves it refills the buckets as time would.
        self.registrations = registrations or RegistrationThrottle(clock=clock.now)
        self._next_purge = 0.0

    # -- housekeeping ---------------------------------------------------------------------

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

    # -- who is asking --------------------------------------------------------------------

    def identity(self, key_id: str) -> Identity:
        """The registered identity of `key_id` (already checked to be 32 hex digits)."""
        identity = self.store.identity(key_id)
        if identity is None:
            raise LinkError(
                401, "UnknownGateway",
                f"{linkproto.H_KEY_ID} '{key_id}' was never registered; request an activation "
                "key first",
            )
        return identity

    def use_nonce(self, key_id: str, nonce: str) -> None:
        """Remember a signed request's nonce (in SQLite: a restart does not forget it)."""
        if not self.store.record_nonce(key_id, nonce, self.wall_clock()):
            raise LinkError(401, "InvalidSignature", "nonce already used: a replayed request")

    # -- POST /gateway/activation-key -----------------------------------------------------

    def admit_registration(self, key_id: str, source: str) -> None:
        """Refuse (429) before any work is done when `source` registers too often.

        Only new identities count: a known one's request is checked against its stored
        public key before anything is written, and its open keys are capped per identity
        (Store.issue_key), so re-asking for a key cannot grow the database.
        """
        if linkproto.is_key_id(key_id) and self.store.identity(key_id) is not None:
            return
        wait = self.registrations.check(source)
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            raise LinkError(
                429, "Throttled",
                f"too many activation key requests from this address (at most "
                f"{self.registrations.per_minute:g} a minute); retry in {seconds} s",
                retry_after=seconds,
            )

    def issue_key(
        self,
        key_id: str,
        public_key: bytes,
        region: Any,
        endpoint_type: Any,
        ip_version: Any,
        vpc_endpoint: Any,
        software_version: Any,
    ) -> dict[str, Any]:
        """A new activation key for this identity, registering it if it is new."""
        try:
            region = rules.region_code(region)
            endpoint_type = rules.endpoint_type(endpoint_type or "STANDARD")
            if ip_version is not None:
                ip_version = rules.ip_version(ip_version)
            if vpc_endpoint is not None:
                vpc_endpoint = rules.dns_name(vpc_endpoint)
            if software_version is not None:
                software_version = rules.software_version(software_version)
        except rules.RuleError as err:
            raise _rule_refused(err) from None
        try:
            key = self.store.issue_key(
                key_id, public_key, new_activation_key(), region, endpoint_type, ip_version,
                vpc_endpoint, software_version, self.clock.now(), KEY_LIFETIME_SECONDS,
            )
        except StoreError as exc:
            status = 410 if exc.reason == "GatewayDeleted" else 409
            raise LinkError(status, exc.reason, exc.message, gatewayArn=exc.gateway_arn) from None
        log.info(
            "event=key_issued key_id=%s region=%s endpoint_type=%s ip_version=%s vpc=%s",
            key_id, region, endpoint_type, ip_version, vpc_endpoint,
        )
        return {
            "activationKey": key.key,
            "region": key.region,
            "expiresAt": format_utc(key.expires_at),
        }

    # -- POST /gateway/poll ---------------------------------------------------------------

    async def poll(
        self, identity: Identity, after: Any, wait: Any, software_version: Any
    ) -> dict[str, Any]:
        """The gateway's state once its version is past `after`, or after `wait` seconds
        (or at shutdown): the long-poll that tells a gateway of a change at once."""
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise invalid("after", f"must be an integer >= 0, got {after!r}")
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not (
            0 <= wait <= MAX_WAIT_SECONDS
        ):
            raise invalid("wait", f"must be a number of seconds from 0 to {MAX_WAIT_SECONDS}")
        if software_version is not None:
            try:
                software_version = rules.software_version(software_version)
            except rules.RuleError as err:
                raise _rule_refused(err) from None
        self.store.heartbeat(identity.key_id, software_version, self.clock.now())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(wait)
        while True:
            # Registered before the state is read: a change in between is not missed.
            changed = self.hub.waiter(identity.key_id)
            try:
                state = self.poll_state(identity.key_id)
                remaining = deadline - loop.time()
                if state["version"] > after or remaining <= 0 or self.hub.closing:
                    return state
                log.debug("event=poll_wait key_id=%s after=%d wait=%.1f",
                          identity.key_id, after, remaining)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(changed), remaining)
            finally:
                self.hub.discard(identity.key_id, changed)

    def poll_state(self, key_id: str) -> dict[str, Any]:
        """What a poll answers: the configuration the gateway must apply, and its version."""
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

    def admit_upload(
        self, identity: Identity, name: str, replace: bool, declared_sha256: str
    ) -> AdmittedUpload:
        """The checks made before the body is read, so a refusal costs the client no bytes."""
        try:
            name = rules.upload_name(name)
        except rules.RuleError as err:
            raise _rule_refused(err) from None
        if identity.deleted or not identity.gateway_id:
            raise LinkError(403, "NotActivated", "this gateway is not activated; uploads refused")
        if not replace:
            existing = self.store.upload_record(identity.gateway_id, name)
            if existing is not None:
                raise _already_exists(existing)
        return AdmittedUpload(identity, identity.gateway_id, name, replace, declared_sha256)

    async def upload(
        self, admitted: AdmittedUpload, read: Callable[[], Awaitable[bytes]]
    ) -> dict[str, Any]:
        """Receive the body (`read()` until b""), check it against the SHA-256 the signature
        covers (if it covers one) and store it under its name."""
        part = await self.blobs.receive(read)
        try:
            declared = admitted.declared_sha256
            if declared not in (linkproto.UNSIGNED_PAYLOAD, part.sha256):
                raise LinkError(
                    400, "ChecksumMismatch",
                    f"body SHA-256 is {part.sha256}, {linkproto.H_CONTENT_SHA256} said "
                    f"{declared}; nothing kept",
                )
            record = UploadRecord(admitted.gateway_id, admitted.name, part.size, part.sha256,
                                  self.clock.now(), part.name)
            self._commit(record, part, admitted.replace)
        finally:
            self.blobs.discard(part)  # gone already when committed
        log.info("event=upload_stored gateway=%s name=%s size=%d sha256=%s replace=%s",
                 record.gateway_id, record.name, part.size, part.sha256,
                 str(admitted.replace).lower())
        return {"name": record.name, "size": part.size, "sha256": part.sha256}

    def _commit(self, record: UploadRecord, part: Part, replace: bool) -> None:
        """Record, rename, complete: synchronous, so no other upload interleaves in this
        process, and each step leaves a state BlobStore.reconcile repairs after a crash.

        The name is checked again in the transaction that writes the record: of two uploads
        of one name that both passed the early check, exactly one is stored.
        """
        assert record.part is not None
        try:
            previous = self.store.begin_upload(record, replace)
        except UploadExists as exc:
            raise _already_exists(exc.existing) from None
        try:
            self.blobs.place(part, record.gateway_id, record.name)
        except BaseException:
            self.store.undo_upload(record, previous)
            raise
        self.blobs.flush(record.gateway_id)
        self.store.finish_upload(record.gateway_id, record.name, record.part)


def _already_exists(existing: UploadRecord) -> LinkError:
    """409 naming what is stored, so the caller can tell whether it is the same data."""
    stored_at = format_utc(existing.stored_at)
    return LinkError(
        409, "AlreadyExists",
        f"'{existing.name}' is already stored: {existing.size} bytes, sha256 "
        f"{existing.sha256}, stored {stored_at}; upload with replace=true to replace it",
        name=existing.name, size=existing.size, sha256=existing.sha256, storedAt=stored_at,
    )
