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
part of normal requests), so the rows a flood can leave are bounded. The fleet's own
bookkeeping is kept off the request path (`run_housekeeping`, a task of the server): old
the replay log forgets a minute of nonces at a time (noncelog.py), buffered heartbeats are
written every second.

The hypervisor part (docs/link-protocol.md, "Hypervisors"): the poll answer carries the
gateway's hypervisor and the TestHypervisorConfiguration calls waiting for it, with every
password sealed to the X25519 key the gateway's polls carry (gatewaycore.sealed), and two
reports come back: a test's result and an inventory of VMs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane import walsync
from controlplane.atrest import SecretDecryptError, SecretsAtRest
from controlplane.blobstore import BlobStore, Part
from controlplane.clock import Clock
from controlplane.noncelog import NonceLog
from controlplane.pendingtests import ERROR_CODES, PendingTests, TestResult
from controlplane.pollhub import PollHub
from controlplane.store import (
    Hypervisor,
    Identity,
    ReportedVm,
    Store,
    StoreError,
    UploadExists,
    UploadRecord,
    state_of,
    vm_arn,
)
from controlplane.throttle import RegistrationThrottle
from controlplane.updates import UpdateShelf
from gatewaycore import linkproto, rules, sealed
from gatewaycore.utctime import format_utc, parse_utc

log = logging.getLogger("controlplane.link")

KEY_LIFETIME_SECONDS = 30 * 60
MAX_WAIT_SECONDS = 25
# Sealed hypervisor passwords kept for reuse (one per associated gateway in a fleet).
MAX_SEALED_BOXES = 20_000
NO_PASSWORD: dict[str, Any] = {"password": None, "passwordPending": False}
PASSWORD_PENDING: dict[str, Any] = {"password": None, "passwordPending": True}
PURGE_INTERVAL_SECONDS = 60.0
# The periodic part of housekeeping (wall clock): buffered heartbeats written every second,
# the replay log's expired minutes forgotten every 10 s.
HEARTBEAT_FLUSH_SECONDS = 1.0
NONCE_PURGE_SECONDS = 10.0
# Bounds of what a gateway reports about its hypervisor (the body itself is bounded by the
# wire: 8 MiB for an inventory).
MAX_MESSAGE = 1024
MAX_VMS = 10_000
MAX_VM_TAGS = 50
_TEST_ID = re.compile(r"[0-9a-f]{32}")
# What a gateway reports of its last software update (docs/updates.md).
UPDATE_OUTCOMES = ("installed", "rolled_back", "refused", "failed")
_VM_UUID = re.compile(r"[!-~]{1,128}")  # printable ASCII, no space: a UUID, a moref...
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
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
        nonces: NonceLog,
        blobs: BlobStore,
        hub: PollHub,
        clock: Clock,
        wall_clock: Callable[[], float] = time.time,
        registrations: RegistrationThrottle | None = None,
        secrets_at_rest: SecretsAtRest | None = None,
        tests: PendingTests | None = None,
        jobs: Callable[[str], list[dict[str, Any]]] = lambda gateway_id: [],
        on_poll: Callable[[Identity], None] = lambda identity: None,
        updates: UpdateShelf | None = None,
    ) -> None:
        """`secrets_at_rest` and `tests` are shared with the API (operations.py): the
        passwords it stored, the tests it is waiting on. `jobs(gateway_id)` is the poll's
        "jobs" (joblink.py) and `on_poll` runs after each poll's heartbeat (the job
        scheduler: a gateway just heard from may take jobs, docs/backups.md). `updates`:
        the published update bundles (updates.py), offered in the poll's `update`. `nonces`:
        the replay log of the signed requests (noncelog.py)."""
        self.nonces = nonces
        self.jobs = jobs
        self.updates = updates
        # key id -> the last software update outcome the gateway reported (every poll
        # carries it, so memory is enough: it is back after a restart at the next poll)
        self.update_reports: dict[str, dict[str, str]] = {}
        self.on_poll = on_poll
        # The web console's URL, asked at each key (server.py sets it): sent with the key,
        # so the gateway's port-80 redirect lands on this console (docs/webconsole.md).
        self.console_url: Callable[[], str | None] = lambda: None
        self.secrets = secrets_at_rest or SecretsAtRest.ephemeral()
        self.tests = tests or PendingTests()
        self.store = store
        self.blobs = blobs
        self.hub = hub
        self.clock = clock
        # Signatures and nonces are on the wall clock: gateways sign with their real time.
        self.wall_clock = wall_clock
        # On the business clock, so a test that moves it refills the buckets as time would.
        self.registrations = registrations or RegistrationThrottle(clock=clock.now)
        self._next_purge = 0.0
        # (hypervisor ARN, stored ciphertext, gateway key) -> the poll's password members
        self._boxes: OrderedDict[tuple[str, bytes, bytes], dict[str, Any]] = OrderedDict()

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
        deleted = self.store.purge(now)
        refused = self.registrations.take_refused()
        if refused or deleted["keys"] or deleted["identities"]:
            log.info(
                "event=link_purged keys=%d identities=%d registrations_throttled=%d",
                deleted["keys"], deleted["identities"], refused,
            )

    async def run_housekeeping(self) -> None:
        """Until cancelled: write buffered heartbeats and checkpoint the WAL (in a thread)
        every HEARTBEAT_FLUSH_SECONDS, forget expired nonces every NONCE_PURGE_SECONDS.

        A timer task rather than work in the request path: what a request costs does not
        depend on when the last cleanup ran. A failed round (a locked database) is logged
        and tried again at the next tick.
        """
        loop = asyncio.get_running_loop()
        next_purge = loop.time()
        self.store.start_checkpoints()
        try:
            while True:
                try:
                    self.store.flush_heartbeats()
                    if loop.time() >= next_purge:
                        next_purge = loop.time() + NONCE_PURGE_SECONDS
                        self.purge_nonces()
                    await asyncio.to_thread(self.store.checkpoint)
                except Exception as exc:  # logged; the next tick tries again
                    log.error("event=housekeeping_failed error=%s", exc)
                await asyncio.sleep(HEARTBEAT_FLUSH_SECONDS)
        finally:
            self.store.stop_checkpoints()

    def purge_nonces(self) -> int:
        """Forget the nonces older than the signature window (noncelog.WINDOW: a request
        dated at its edge is refused by its time before its nonce is forgotten): whole
        minutes at once, a set and a file each."""
        total = self.nonces.purge(self.wall_clock())
        if total:
            log.debug("event=nonces_purged count=%d", total)
        return total

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
        """Remember a signed request's nonce (noncelog.py: a restart does not forget it)."""
        if not self.nonces.record(key_id, nonce, self.wall_clock()):
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
        answer = {
            "activationKey": key.key,
            "region": key.region,
            "expiresAt": format_utc(key.expires_at),
        }
        console_url = self.console_url()
        if console_url:
            answer["consoleUrl"] = console_url
        return answer

    # -- POST /gateway/poll ---------------------------------------------------------------

    async def poll(
        self, identity: Identity, after: Any, wait: Any, software_version: Any,
        seal_key: Any = None, update_status: Any = None,
    ) -> dict[str, Any]:
        """The gateway's state once its version is past `after`, or after `wait` seconds
        (or at shutdown): the long-poll that tells a gateway of a change at once.

        A new `seal_key` is kept and bumps the version, so a password held back for want
        of a key goes out in this very answer."""
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
        if seal_key is not None:
            if not isinstance(seal_key, str):
                raise invalid("sealKey", "must be a base64 X25519 public key (a string)")
            try:
                raw = sealed.decode_public(seal_key)
            except sealed.SealError as exc:
                raise invalid("sealKey", str(exc)) from None
            # Every poll carries the key; only a new one is a write (and a version bump).
            if raw != identity.seal_key and self.store.set_seal_key(identity.key_id, raw):
                log.info("event=seal_key_recorded key_id=%s", identity.key_id)
        if update_status is not None:
            try:
                self._update_reported(identity.key_id, update_status)
            except LinkError as err:  # a report is information: it never costs the poll
                log.warning("event=update_report_ignored key_id=%s reason=%s",
                            identity.key_id, err.message)
        # Its reads: its own identity and gateway (noted by the store), the rest (its
        # hypervisor, its jobs) rows that only unkeyed commits change.
        walsync.keyed_reads()
        self.store.heartbeat(identity.key_id, software_version, self.clock.now())
        self.on_poll(identity)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(wait)
        while True:
            # Registered before the state is read: a change in between is not missed.
            changed = self.hub.waiter(identity.key_id)
            try:
                current = self.identity(identity.key_id)  # purged meanwhile: UnknownGateway
                remaining = deadline - loop.time()
                if current.version > after or remaining <= 0 or self.hub.closing:
                    # A change whose fsync is still running is not told before it is
                    # durable: no answer leaves before that (walsync.durable_answers).
                    return self.poll_state(current, software_version)
                log.debug("event=poll_wait key_id=%s after=%d wait=%.1f",
                          identity.key_id, after, remaining)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(changed), remaining)
            finally:
                self.hub.discard(identity.key_id, changed)

    def _update_reported(self, key_id: str, doc: Any) -> None:
        """Keep (and log once) the outcome of the gateway's last software update."""
        if not isinstance(doc, dict):
            raise invalid("updateStatus", "must be an object {outcome, version, message, at}")
        outcome = doc.get("outcome")
        if outcome not in UPDATE_OUTCOMES:
            raise invalid("updateStatus.outcome",
                          f"must be one of {', '.join(UPDATE_OUTCOMES)}, got {outcome!r}")
        try:
            version = rules.software_version(doc.get("version"), "updateStatus.version")
        except rules.RuleError as err:
            raise _rule_refused(err) from None
        message, at = doc.get("message") or "", doc.get("at")
        if not isinstance(message, str) or len(message) > MAX_MESSAGE:
            raise invalid("updateStatus.message", f"must be text of at most {MAX_MESSAGE} "
                          "characters")
        try:
            parse_utc(at)
        except (TypeError, ValueError):
            raise invalid("updateStatus.at", "must be a UTC time like 2026-11-27T03:00:00Z"
                          ) from None
        report = {"outcome": outcome, "version": version,
                  "message": _CONTROL.sub(" ", message), "at": at}
        if self.update_reports.get(key_id) != report:
            self.update_reports[key_id] = report
            log.info("event=gateway_update_reported key_id=%s outcome=%s version=%s at=%s "
                     "message=%s", key_id, outcome, version, at, report["message"])

    def update_bundle(self, identity: Identity, version: str) -> Path:
        """The file of a published bundle, for a gateway that is not deleted."""
        if identity.deleted:
            raise LinkError(410, "GatewayDeleted", "this gateway was deleted")
        path = self.updates.path_of(version) if self.updates else None
        if path is None:
            raise LinkError(404, "UnknownUpdate", f"version: no bundle of {version!r} is "
                            "published")
        return path

    def _update_offer(self, installed: str | None) -> dict[str, Any] | None:
        published = self.updates.offer_for(installed) if self.updates else None
        if published is None:
            return None
        release = published.release
        return {"version": release.version, "sha256": release.sha256, "size": release.size,
                "publishedAt": format_utc(published.published_at)}

    def poll_state(self, identity: Identity, software_version: str | None = None
                   ) -> dict[str, Any]:
        """What a poll answers: the configuration the gateway must apply, and its version.

        `update` is the newest published bundle above the version the gateway runs (the
        one its poll names, else the last one recorded), with its maintenance window."""
        key_id = identity.key_id
        gateway = self.store.gateway_by_id(identity.gateway_id) if identity.gateway_id else None
        state = "deleted" if identity.deleted else "activated" if gateway else "pending"
        live = gateway is not None and not identity.deleted
        hypervisor = None
        if live and gateway is not None and gateway.hypervisor_id:
            hypervisor = self.store.hypervisor_by_id(gateway.hypervisor_id)
        return {
            "version": identity.version,
            "state": state,
            "gatewayArn": gateway.arn if gateway else None,
            "gatewayName": gateway.name if gateway else None,
            "region": gateway.region if gateway else None,
            "bandwidthRateLimitIntervals": gateway.schedule if gateway else [],
            "softwareUpdateRequest": gateway.software_update_request if gateway else 0,
            "update": self._update_offer(software_version or identity.software_version)
            if live else None,
            "maintenance": gateway.maintenance if live and gateway is not None else None,
            "hypervisor": self._hypervisor_view(identity, hypervisor) if hypervisor else None,
            "tests": [
                {"testId": t.test_id, "host": t.host, "username": t.username,
                 **self._sealed_password(identity, t.password)}
                for t in self.tests.for_gateway(key_id)
            ] if live else [],
            "jobs": self.jobs(gateway.gateway_id) if live and gateway is not None else [],
        }

    def _hypervisor_view(self, identity: Identity, hypervisor: Hypervisor) -> dict[str, Any]:
        return {
            "hypervisorArn": hypervisor.arn,
            "host": hypervisor.host,
            "username": hypervisor.username,
            **self._hypervisor_password(identity, hypervisor),
            "syncRequest": hypervisor.sync_request,
        }

    def _hypervisor_password(self, identity: Identity, hypervisor: Hypervisor
                             ) -> dict[str, Any]:
        """The stored password sealed to the gateway, the same box poll after poll.

        A fresh seal differs every time (a new ephemeral key), and the gateway keeps the box
        in its state: resealing at each poll would rewrite that file and wake its sync loop
        every 25 s. So a box is made once per stored password and gateway key (both part of
        the cache key: a new password or a new key makes a new box), and the password is
        decrypted only then."""
        if hypervisor.password is None:
            return NO_PASSWORD
        if identity.seal_key is None:
            return PASSWORD_PENDING
        key = (hypervisor.arn, hypervisor.password, identity.seal_key)
        box = self._boxes.get(key)
        if box is not None:
            self._boxes.move_to_end(key)
            return box
        try:
            password = self.secrets.decrypt(hypervisor.password, hypervisor.arn)
        except SecretDecryptError as exc:
            log.error("event=secret_unreadable arn=%s error=%s", hypervisor.arn, exc)
            return NO_PASSWORD
        box = self._boxes[key] = self._sealed_password(identity, password)
        if len(self._boxes) > MAX_SEALED_BOXES:
            self._boxes.popitem(last=False)
        return box

    @staticmethod
    def _sealed_password(identity: Identity, password: str | None) -> dict[str, Any]:
        """`password` sealed to the gateway's key, or held back until it sends one."""
        if password is None:
            return NO_PASSWORD
        if identity.seal_key is None:
            return PASSWORD_PENDING
        return {"password": sealed.seal(identity.seal_key, password.encode()),
                "passwordPending": False}

    # -- POST /gateway/hypervisor/test-result ---------------------------------------------

    def test_result(self, identity: Identity, test_id: Any, ok: Any, error_code: Any,
                    message: Any) -> dict[str, Any]:
        """The gateway's answer to a test: completes the waiting API call."""
        if not isinstance(test_id, str) or not _TEST_ID.fullmatch(test_id):
            raise invalid("testId", "must be the testId of a test in the poll answer "
                                    "(32 lowercase hex digits)")
        result = _report_outcome(ok, error_code, message)
        if not self.tests.report(identity.key_id, test_id, result):
            raise LinkError(404, "UnknownTest",
                            f"no test {test_id} is waiting for this gateway (answered, "
                            "expired, or its API call stopped waiting)")
        log.info("event=hypervisor_test_reported key_id=%s test_id=%s ok=%s error=%s",
                 identity.key_id, test_id, str(result.ok).lower(), result.error_code)
        return {}

    # -- POST /gateway/hypervisor/inventory -----------------------------------------------

    def inventory(self, identity: Identity, hypervisor_arn: Any, sync_request: Any, ok: Any,
                  error_code: Any, message: Any, vms: Any) -> dict[str, Any]:
        """A sync's outcome: on success the VM list replaces the hypervisor's (stable ARNs,
        the missing ones removed); either way the sync status, time and State are set."""
        if not isinstance(hypervisor_arn, str) or not 1 <= len(hypervisor_arn) <= 500:
            raise invalid("hypervisorArn", "must be the hypervisorArn of the poll answer")
        if isinstance(sync_request, bool) or not isinstance(sync_request, int) or (
            sync_request < 0
        ):
            raise invalid("syncRequest", "must be an integer >= 0 (the poll's syncRequest)")
        outcome = _report_outcome(ok, error_code, message)
        reported = _reported_vms(vms) if outcome.ok else None
        if identity.deleted or not identity.gateway_id:
            raise LinkError(403, "NotActivated", "this gateway is not activated")
        gateway = self.store.gateway_by_id(identity.gateway_id)
        hypervisor = self.store.hypervisor(hypervisor_arn)
        if gateway is None or hypervisor is None or (
            gateway.hypervisor_id != hypervisor.hypervisor_id
        ):
            raise LinkError(403, "NotAssociated",
                            f"this gateway is not associated with hypervisor {hypervisor_arn}")
        if sync_request > hypervisor.sync_request:
            raise invalid("syncRequest", f"{sync_request} was never asked for (the latest is "
                                         f"{hypervisor.sync_request})")
        if outcome.ok:
            status, text = "SUCCEEDED", None
        else:
            status = "FAILED"
            text = f"{outcome.error_code}: {outcome.message or 'no detail given'}"
        result = self.store.record_inventory(
            hypervisor.hypervisor_id, reported, lambda uuid: vm_arn(hypervisor, uuid),
            state_of(outcome.ok, outcome.error_code), status, text, self.clock.now(),
            sync_request,
        )
        if result.stale:
            log.info("event=vm_inventory_stale hypervisor=%s gateway=%s sync_request=%d",
                     hypervisor.arn, gateway.arn, sync_request)
            return {"vms": result.kept}
        log.info(
            "event=vm_inventory hypervisor=%s gateway=%s sync_request=%d status=%s vms=%d "
            "added=%d removed=%d", hypervisor.arn, gateway.arn, sync_request, status,
            result.kept, result.added, result.removed,
        )
        return {"vms": result.kept}

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


def _report_outcome(ok: Any, error_code: Any, message: Any) -> TestResult:
    """`ok`, `errorCode`, `message` of a gateway's report, checked together."""
    if not isinstance(ok, bool):
        raise invalid("ok", "must be true or false")
    if message is not None and (not isinstance(message, str) or len(message) > MAX_MESSAGE):
        raise invalid("message", f"must be null or a string of at most {MAX_MESSAGE} "
                                 "characters")
    if ok:
        if error_code is not None:
            raise invalid("errorCode", "must be null when ok is true")
        return TestResult(True, None, message)
    if error_code not in ERROR_CODES:
        raise invalid("errorCode", f"must be one of {', '.join(ERROR_CODES)} when ok is "
                                   "false")
    return TestResult(False, error_code, message)


def _text_field(value: Any, field: str, max_len: int, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= max_len:
        raise invalid(field, f"must be a string of 1-{max_len} characters")
    if _CONTROL.search(value):
        raise invalid(field, "must not contain control characters")
    return value


def _reported_vms(vms: Any) -> list[ReportedVm]:
    """The `vms` of an inventory, every field checked (named by its index) and bounded by
    the API shapes the VMs are answered in (Name 100, Path 4096, VmwareCategory and
    VmwareTagName 80)."""
    if not isinstance(vms, list):
        raise invalid("vms", "must be a list when ok is true")
    if len(vms) > MAX_VMS:
        raise invalid("vms", f"at most {MAX_VMS} virtual machines, got {len(vms)}")
    out: list[ReportedVm] = []
    seen: set[str] = set()
    for i, vm in enumerate(vms):
        where = f"vms[{i}]"
        if not isinstance(vm, dict):
            raise invalid(where, "must be an object")
        uuid = vm.get("uuid")
        if not isinstance(uuid, str) or not _VM_UUID.fullmatch(uuid):
            raise invalid(f"{where}.uuid", "must be 1-128 printable ASCII characters")
        if uuid in seen:
            raise invalid(f"{where}.uuid", f"{uuid!r} is reported twice")
        seen.add(uuid)
        name = _text_field(vm.get("name"), f"{where}.name", 100)
        path = _text_field(vm.get("path"), f"{where}.path", 4096)
        host_name = _text_field(vm.get("hostName"), f"{where}.hostName", 100, required=False)
        tags = vm.get("tags", [])
        if not isinstance(tags, list) or len(tags) > MAX_VM_TAGS:
            raise invalid(f"{where}.tags", f"must be a list of at most {MAX_VM_TAGS} tags")
        vmware_tags = []
        for j, tag in enumerate(tags):
            at = f"{where}.tags[{j}]"
            if not isinstance(tag, dict):
                raise invalid(at, "must be an object {key, value}")
            item = {
                "VmwareCategory": _text_field(tag.get("key"), f"{at}.key", 80),
                "VmwareTagName": _text_field(tag.get("value"), f"{at}.value", 80),
            }
            description = _text_field(tag.get("description"), f"{at}.description", 1024,
                                      required=False)
            if description is not None:
                item["VmwareTagDescription"] = description
            vmware_tags.append(item)
        assert name is not None and path is not None
        out.append(ReportedVm(uuid, name, path, host_name, vmware_tags))
    return out
