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
import re
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from appliance.identity import Identity
from appliance.version import __version__
from gatewaycore import bundle, linkproto, maintenance, rules, utctime

KEY_REQUEST_TIMEOUT = 10.0
REPORT_TIMEOUT = 30.0  # a hypervisor test result or inventory
UPDATE_FETCH_TIMEOUT = 600.0  # a bundle is about 200 KB; a slow link may take a while
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
    # Where the port-80 redirect sends the browser: the control plane's web console
    # (docs/webconsole.md); None keeps the AWS console of the key's region.
    console_url: str | None = None


def console_url_of(value: Any) -> str | None:
    """The `consoleUrl` of a key answer when `rules.console_url` accepts it (it goes into a
    Location header), else None: the AWS console of the key's region is used."""
    if value is None:
        return None
    try:
        return rules.console_url(value)
    except rules.RuleError:
        return None


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
class UpdateOffer:
    """The poll answer's `update`: the newest published bundle above our version."""

    version: str
    sha256: str
    size: int
    published_at: str

    @classmethod
    def from_json(cls, doc: Any) -> UpdateOffer | None:
        """The offer, or None when absent or unusable (a bad offer is not worth a poll)."""
        if not isinstance(doc, dict):
            return None
        version, sha, size = doc.get("version"), doc.get("sha256"), doc.get("size")
        try:
            bundle.parse_version(version)
        except bundle.BundleError:
            return None
        if not isinstance(sha, str) or not bundle.SHA256_HEX.fullmatch(sha) or (
                type(size) is not int or not 0 < size <= bundle.MAX_PAYLOAD):
            return None
        published = doc.get("publishedAt")
        return cls(version, sha, size, published if isinstance(published, str) else "")


def _window_or_none(doc: Any) -> dict[str, int] | None:
    """The poll answer's `maintenance` when it follows the API's ranges, else None."""
    if doc is None:
        return None
    try:
        maintenance.Window.from_api(doc)
    except maintenance.WindowError:
        return None
    return {k: doc[k] for k in ("HourOfDay", "MinuteOfHour", "DayOfWeek", "DayOfMonth")
            if doc.get(k) is not None}


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
    jobs: tuple[JobOrder, ...] = ()
    jobs_dropped: int = 0  # entries of `jobs` without a usable job id
    update: UpdateOffer | None = None
    maintenance: dict[str, int] | None = None  # the window, in the API's form

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
            jobs, dropped = _jobs(doc.get("jobs"))
        except (KeyError, TypeError):
            raise LinkError("poll answer does not follow docs/link-protocol.md") from None
        return cls(version, state, texts[0], texts[1], texts[2], intervals, update,
                   hypervisor, requests, jobs, dropped, UpdateOffer.from_json(doc.get("update")),
                   _window_or_none(doc.get("maintenance")))


JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")  # it goes into URL paths
JOB_TYPES = ("BACKUP", "RESTORE")
JOB_STATES = ("RUNNING", "ABORTING")
MAX_JOBS_LISTED = 64  # the control plane lists at most 4; anything far beyond is not a list
VM_UUID_RE = re.compile(r"[!-~]{1,128}")  # the inventory's rule: printable ASCII, no spaces


class JobFieldError(ValueError):
    """One field of a job in the poll answer breaks docs/backups.md; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _job_text(doc: dict[str, Any], key: str, where: str, max_len: int = 2048,
              optional: bool = False) -> Any:
    value = doc.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= max_len or not value.isprintable():
        raise JobFieldError(f"{where}{key}", f"must be 1-{max_len} printable characters")
    return value


@dataclass(frozen=True)
class JobOrder:
    """One entry of the poll answer's `jobs` (docs/backups.md): a job this gateway must run
    (RUNNING) or stop (ABORTING).

    `invalid` is set (and the job is not run) when the entry names a usable job id but
    another field breaks the protocol: the runner then fails the job with that message, so
    a job the gateway cannot read ends visibly instead of being held RUNNING by our polls.
    """

    job_id: str
    type: str
    state: str
    hypervisor_arn: str = ""
    vm_uuid: str | None = None          # BACKUP: the VM to back up
    vm_name: str | None = None
    base_recovery_point: str | None = None   # BACKUP: incremental from this point...
    base_checkpoint: str | None = None       # ...and this hypervisor checkpoint
    recovery_point_arn: str | None = None    # RESTORE: the point to restore
    restore_name: str | None = None          # RESTORE: the new VM's name
    restore_options: dict[str, str] = field(default_factory=dict)
    invalid: str | None = None

    @classmethod
    def from_json(cls, doc: Any) -> JobOrder:
        """The job, checked field by field; TypeError when not even its id is usable."""
        if not isinstance(doc, dict):
            raise TypeError
        job_id = doc.get("jobId")
        if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
            raise TypeError
        kind = doc.get("type")
        try:
            return cls._checked(job_id, doc)
        except JobFieldError as exc:
            return cls(job_id, kind if kind in JOB_TYPES else "BACKUP",
                       doc.get("state") if doc.get("state") in JOB_STATES else "RUNNING",
                       invalid=f"the gateway cannot read this job from its control plane: "
                               f"{exc}")

    @classmethod
    def _checked(cls, job_id: str, doc: dict[str, Any]) -> JobOrder:
        kind, state = doc.get("type"), doc.get("state")
        if kind not in JOB_TYPES:
            raise JobFieldError("type", f"must be one of {', '.join(JOB_TYPES)}")
        if state not in JOB_STATES:
            raise JobFieldError("state", f"must be one of {', '.join(JOB_STATES)}")
        arn = _job_text(doc, "hypervisorArn", "")
        if kind == "BACKUP":
            vm = doc.get("vm")
            if not isinstance(vm, dict):
                raise JobFieldError("vm", "must be an object {uuid, name}")
            uuid = vm.get("uuid")
            if not isinstance(uuid, str) or not VM_UUID_RE.fullmatch(uuid):
                raise JobFieldError("vm.uuid", "must be 1-128 printable ASCII characters "
                                    "without spaces")
            name = _job_text(vm, "name", "vm.", 100)
            base = doc.get("base")
            point = checkpoint = None
            if base is not None:
                if not isinstance(base, dict):
                    raise JobFieldError("base", "must be an object or null")
                point = _job_text(base, "recoveryPointArn", "base.")
                checkpoint = _job_text(base, "checkpoint", "base.", 256, optional=True)
            return cls(job_id, kind, state, arn, vm_uuid=uuid, vm_name=name,
                       base_recovery_point=point, base_checkpoint=checkpoint)
        point = _job_text(doc, "recoveryPointArn", "")
        restore = doc.get("restore")
        if not isinstance(restore, dict):
            raise JobFieldError("restore", "must be an object {name, options}")
        name = _job_text(restore, "name", "restore.", 80)
        options = restore.get("options") or {}
        if not isinstance(options, dict) or len(options) > 32 or not all(
            isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= 64 and len(v) <= 1024
            for k, v in options.items()
        ):
            raise JobFieldError("restore.options", "must be an object of at most 32 string "
                                "keys and string values")
        return cls(job_id, kind, state, arn, recovery_point_arn=point, restore_name=name,
                   restore_options=dict(options))


def _jobs(doc: Any) -> tuple[tuple[JobOrder, ...], int]:
    """The poll answer's `jobs` and how many entries were dropped: an entry without a usable
    job id (or a repeated one) cannot be run or reported, so it is dropped and counted (the
    link loop logs the count); the others are kept, malformed ones marked `invalid`."""
    if doc is None:
        return (), 0
    if not isinstance(doc, list) or len(doc) > MAX_JOBS_LISTED:
        raise TypeError
    out: list[JobOrder] = []
    seen: set[str] = set()
    for item in doc:
        try:
            order = JobOrder.from_json(item)
        except TypeError:
            continue
        if order.job_id not in seen:
            seen.add(order.job_id)
            out.append(order)
    return tuple(out), len(doc) - len(out)


def new_session(timeout: aiohttp.ClientTimeout | None = None) -> aiohttp.ClientSession:
    """A session for the link: no cookie jar, no env proxies (it goes straight to the
    configured URL). Shared by the poll client and the job link."""
    if timeout is None:
        return aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
    return aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
                                 timeout=timeout)


def signed_headers(identity: Identity, method: str, path: str, body: bytes | None,
                   content_type: str = "application/json") -> dict[str, str]:
    """The link's signature headers (docs/link-protocol.md) and the content type; `body`
    None signs UNSIGNED-PAYLOAD (chunk uploads: the chunk id names the content)."""
    digest = linkproto.UNSIGNED_PAYLOAD if body is None else linkproto.body_sha256(body)
    headers = identity.sign(method, path, digest)
    headers["Content-Type"] = content_type
    return headers


def refused(status: int, doc: Any) -> Refused:
    """A 4xx error answer (`{"error", "message"}`) as Refused."""
    doc = doc if isinstance(doc, dict) else {}
    return Refused(
        status,
        str(doc.get("error", f"HTTP{status}")),
        str(doc.get("message", f"HTTP {status}"))[:300],
        doc.get("gatewayArn") if isinstance(doc.get("gatewayArn"), str) else None,
    )


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
            self._session = new_session()
        return self._session

    async def _request(self, method: str, path: str, body: bytes, timeout: float
                       ) -> tuple[int, bytes]:
        """One signed call: (status, body) of an answer below 500; Unreachable otherwise."""
        headers = signed_headers(self.identity, method, path, body)
        url = self.base_url + path
        try:
            async with self._get_session().request(
                method, url, data=body, headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                raw = await resp.read()
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
        return status, raw

    async def _post(self, path: str, payload: dict[str, Any], timeout: float) -> Any:
        status, raw = await self._request("POST", path, json.dumps(payload).encode(), timeout)
        try:
            doc = json.loads(raw)
        except ValueError:
            raise LinkError(f"control plane answered HTTP {status} with a non-JSON body") from None
        if status != 200:
            raise refused(status, doc)
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
        return IssuedKey(key, str(doc.get("region") or region), expires if expires else None,
                         console_url_of(doc.get("consoleUrl")))

    async def poll(self, after: int, wait: int = POLL_WAIT,
                   update_status: dict[str, str] | None = None) -> PollAnswer:
        """`update_status`: the outcome of the last software update, told in every poll."""
        body: dict[str, Any] = {"after": after, "softwareVersion": __version__, "wait": wait}
        if self.seal_key is not None:
            body["sealKey"] = self.seal_key
        if update_status is not None:
            body["updateStatus"] = update_status
        doc = await self._post("/gateway/poll", body, wait + 15)
        return PollAnswer.from_json(doc)

    async def fetch_update(self, version: str) -> bytes:
        """`GET /gateway/update/VERSION`: a published bundle (not shaped: a download)."""
        status, raw = await self._request("GET", f"/gateway/update/{version}", b"",
                                          UPDATE_FETCH_TIMEOUT)
        if status != 200:
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = None
            raise refused(status, doc)
        return raw

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
