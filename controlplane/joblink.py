"""The job link (docs/backups.md, "The link: jobs"): the `/gateway/jobs/{jobId}/...`
routes a gateway uses to run the backups and restores the scheduler gave it, and the
poll's "jobs" member.

Two classes, as linkwire.py and linkops.py are for the rest of the link: `JobOps` does what
each request means (no HTTP), `JobLink` is the HTTP (signature, bodies, `Expect:
100-continue`, errors as `{"error", "message", ...}` through LinkWire's mapping).

Every request names a job the gateway must hold: 404 UnknownJob when this gateway was
never given it, 409 JobEnded when it ended, 409 NotAssigned when it went back to PENDING or
to another gateway (the gateway drops it). Each one also renews the job's lease (it records
the gateway's heartbeat, as a poll does).

Vault work (hashing, encryption, files) runs in worker threads; database work stays on the
event loop's thread, so a completion's point and job rows are written in one transaction
after the vault made the manifest durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from controlplane import vaultindex
from controlplane.backupops import hypervisor_kind
from controlplane.backupstore import ACTIVE, BACKUP, ENDED, RESTORE, BackupStore, Job, NewPoint
from controlplane.clock import Clock
from controlplane.jobscheduler import JobScheduler
from controlplane.linkops import LinkError, invalid
from controlplane.linkwire import LinkWire, read_at_most
from controlplane.store import Identity, Store, vm_arn
from controlplane.vaults import ENCODINGS, MAX_ENCODED_CHUNK, VaultError, Vaults
from gatewaycore import linkproto, manifest, restorekeys, safejson

log = logging.getLogger("controlplane.jobs")

JOB_ID_RE = re.compile(r"[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}")
H_ENCODING = "X-Gateway-Chunk-Encoding"
MAX_MISSING_QUERY = 1024
MAX_MESSAGE = 1024
MAX_CHECKPOINT = 256
# A complete's body carries the whole change list: 4 million extents at most (16 TiB of
# 4 MiB chunks) would be ~400 MiB of JSON; 256 MiB covers every disk we expect and bounds
# what one gateway can make the server hold.
MAX_COMPLETE_BODY = 256 * 1024 * 1024
MAX_SMALL_BODY = 64 * 1024
STORAGE_WAIT = "waiting for the vault's storage (the gateway retries): "
_PRINTABLE = re.compile(r"[ -~]+")
# restore jobs whose manifests' chunk sets are cached (chunk GETs check against them)
MAX_CACHED_MANIFESTS = 64
_VAULT_STATUS = {"ChecksumMismatch": 400, "MissingChunks": 400, "UnknownChunk": 404,
                 "UnknownPoint": 404, "VaultMissing": 409, "StorageError": 500}


def vault_refused(err: VaultError) -> LinkError:
    return LinkError(_VAULT_STATUS.get(err.code, 500), err.code, err.message, **err.fields)


def _int(value: Any, field: str, low: int = 0, high: int = 1 << 62) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(field, f"must be an integer from {low} to {high}")
    return value


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise invalid(field, "must be true or false")
    return value


def _text(value: Any, field: str, max_len: int, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > max_len or (not optional and not value):
        raise invalid(field, f"must be a string of {0 if optional else 1}-{max_len} "
                             "characters")
    if value and not _PRINTABLE.fullmatch(value.encode("ascii", "replace").decode()):
        raise invalid(field, "must not contain control characters")
    return value


@dataclass(frozen=True)
class AdmittedChunk:
    """A chunk PUT that passed every check made before its body is read."""

    identity: Identity
    job: Job
    chunk_id: str
    encoding: str
    declared_sha256: str


class JobOps:
    """What each job request does, once the signature is checked."""

    def __init__(self, store: Store, backups: BackupStore, vaults: Vaults,
                 scheduler: JobScheduler, clock: Clock) -> None:
        self.store = store
        self.backups = backups
        self.vaults = vaults
        self.scheduler = scheduler
        self.clock = clock
        self._manifest_chunks: OrderedDict[str, frozenset[str]] = OrderedDict()

    # -- the poll's "jobs" ----------------------------------------------------------------

    def poll_jobs(self, gateway_id: str) -> list[dict[str, Any]]:
        out = []
        for job in self.backups.jobs_of_gateway(gateway_id):
            hypervisor = self.store.hypervisor_by_id(job.hypervisor_id)
            out.append({
                "jobId": job.job_id,
                "type": job.job_type,
                "state": job.state,
                "hypervisorArn": hypervisor.arn if hypervisor else None,
                "vm": {"uuid": job.vm_uuid, "name": job.resource_name},
                "base": ({"recoveryPointArn": job.base_point_arn,
                          "checkpoint": job.base_checkpoint}
                         if job.job_type == BACKUP and job.base_point_arn else None),
                "recoveryPointArn": job.recovery_point_arn,
                "restore": ({"name": job.restore_name, "options": job.restore_options or {}}
                            if job.job_type == RESTORE else None),
            })
        return out

    # -- which job ------------------------------------------------------------------------

    def held(self, identity: Identity, job_id: str, job_type: str | None = None) -> Job:
        """The job, if this gateway holds it now; renews its lease."""
        if identity.deleted or not identity.gateway_id:
            raise LinkError(403, "NotActivated", "this gateway is not activated")
        gateway_id = identity.gateway_id
        job = self.backups.job(job_id) if JOB_ID_RE.fullmatch(job_id) else None
        if job is None or not self.backups.ran_on(job_id, gateway_id):
            raise LinkError(404, "UnknownJob", f"job {job_id[:64]!r} was never given to this "
                                               "gateway")
        if job.state in ENDED:
            raise LinkError(409, "JobEnded", f"job {job_id} has ended ({job.state}); drop it",
                            state=job.state)
        if job.state not in ACTIVE or job.gateway_id != gateway_id:
            raise LinkError(409, "NotAssigned",
                            f"job {job_id} is no longer assigned to this gateway ({job.state}"
                            f"{': ' + job.status_message if job.status_message else ''}); "
                            "drop it", state=job.state)
        if job_type is not None and job.job_type != job_type:
            raise LinkError(400, "WrongJobType", f"job {job_id} is a {job.job_type} job; this "
                                                 f"request is for {job_type} jobs")
        self.store.heartbeat(identity.key_id, None, self.clock.now())
        return job

    def _gateway_arn(self, identity: Identity) -> str:
        gateway = self.store.gateway_by_id(identity.gateway_id or "")
        return gateway.arn if gateway else str(identity.gateway_id)

    def _changed(self, job: Job, gateway_id: str, **changes: Any) -> Job:
        """Write a held job's columns; a 409 when it changed hands meanwhile."""
        updated = self.backups.update_job(job.job_id, ACTIVE, gateway_id=gateway_id, **changes)
        if updated is None:
            raise LinkError(409, "NotAssigned", f"job {job.job_id} is no longer assigned to "
                                                "this gateway; drop it")
        return updated

    def _refused(self, job: Job, err: VaultError) -> LinkError:
        """A vault refusal as the link's answer. When the vault's storage failed (a bucket
        gone, its endpoint down, credentials refused), the job's StatusMessage says so and
        names the backend while its gateway retries: DescribeBackupJob shows why it waits."""
        if err.code == "StorageError" and job.state == "RUNNING":
            log.warning("event=vault_storage_error job=%s message=%s", job.job_id, err.message)
            with contextlib.suppress(LinkError):
                self._changed(job, job.gateway_id or "", status_message=(
                    f"{STORAGE_WAIT}{err.message}")[:MAX_MESSAGE])
        return vault_refused(err)

    # -- backup ---------------------------------------------------------------------------

    def started(self, identity: Identity, job_id: str, payload: dict[str, Any]
                ) -> dict[str, Any]:
        job = self.held(identity, job_id, BACKUP)
        incremental = _bool(payload.get("incremental"), "incremental")
        note = _text(payload.get("note", ""), "note", MAX_MESSAGE) or ""
        size = _int(payload.get("backupSizeInBytes", 0), "backupSizeInBytes")
        if incremental and job.base_point_arn is None:
            raise invalid("incremental", "this job has no base (its poll entry's base is "
                                         "null): back up in full")
        kind = (f"incremental backup from {job.base_point_arn}" if incremental
                else "full backup")
        message = f"running on gateway {self._gateway_arn(identity)}: {kind}"
        if note:
            message += f" ({note})"
        self._changed(job, job.gateway_id or "", backup_type="INCREMENTAL" if incremental
                      else "FULL", backup_size=size, status_message=message)
        log.info("event=backup_started job=%s incremental=%s note=%s", job_id,
                 str(incremental).lower(), note)
        return {}

    async def missing(self, identity: Identity, job_id: str, payload: dict[str, Any]
                      ) -> dict[str, Any]:
        job = self.held(identity, job_id, BACKUP)
        chunks = payload.get("chunks")
        if not isinstance(chunks, list) or len(chunks) > MAX_MISSING_QUERY:
            raise invalid("chunks", f"must be a list of at most {MAX_MISSING_QUERY} chunk ids")
        for i, chunk in enumerate(chunks):
            if not isinstance(chunk, str) or not manifest.CHUNK_ID_RE.fullmatch(chunk):
                raise invalid(f"chunks[{i}]", "must be 64 lowercase hex digits")
        try:
            absent = await asyncio.to_thread(self.vaults.missing, job.storage, chunks)
        except VaultError as err:
            raise self._refused(job, err) from None
        return {"missing": absent}

    def admit_chunk(self, identity: Identity, job_id: str, chunk_id: str, encoding: str,
                    length: int | None, declared: str) -> AdmittedChunk:
        """The checks made before a chunk's body is read (so a refusal costs no bytes)."""
        job = self.held(identity, job_id, BACKUP)
        if not manifest.CHUNK_ID_RE.fullmatch(chunk_id):
            raise invalid("chunkId", "must be 64 lowercase hex digits (the SHA-256 of the "
                                     "chunk's plain bytes)")
        if encoding not in ENCODINGS:
            raise invalid(H_ENCODING, f"must be one of {', '.join(ENCODINGS)}")
        if length is not None and length > MAX_ENCODED_CHUNK:
            raise LinkError(413, "ValidationError",
                            f"body: larger than {MAX_ENCODED_CHUNK} bytes (a 4 MiB chunk, "
                            "encoded)")
        return AdmittedChunk(identity, job, chunk_id, encoding, declared)

    async def put_chunk(self, admitted: AdmittedChunk, body: bytes) -> tuple[int, dict[str, Any]]:
        if admitted.declared_sha256 != linkproto.UNSIGNED_PAYLOAD:
            LinkWire.check_body_hash(admitted.declared_sha256, body)
        job = admitted.job
        # Kept from reclaim before it is stored: a reclaim running meanwhile must not take it.
        self.scheduler.note_put(job.storage, job.job_id, admitted.chunk_id)
        try:
            stored = await asyncio.to_thread(self.vaults.put_chunk, job.storage,
                                             admitted.chunk_id, admitted.encoding, body)
        except VaultError as err:
            raise self._refused(job, err) from None
        # `job` was read as the chunk was admitted: no second read of it per chunk here.
        if (job.status_message or "").startswith(STORAGE_WAIT):
            with contextlib.suppress(LinkError):  # the storage is back
                self._changed(job, job.gateway_id or "", status_message=(
                    f"running on gateway {self._gateway_arn(admitted.identity)}: the vault's "
                    "storage answers again"))
        return (201, {"stored": True}) if stored else (200, {"stored": False})

    def progress(self, identity: Identity, job_id: str, payload: dict[str, Any]
                 ) -> dict[str, Any]:
        job = self.held(identity, job_id)
        changes: dict[str, Any] = {
            "bytes_transferred": _int(payload.get("bytesTransferred", job.bytes_transferred),
                                      "bytesTransferred"),
        }
        if "backupSizeInBytes" in payload and job.job_type == BACKUP:
            changes["backup_size"] = _int(payload["backupSizeInBytes"], "backupSizeInBytes")
        done = payload.get("percentDone", job.percent_done)
        if isinstance(done, bool) or not isinstance(done, int | float) or not (
                0 <= done <= 100):
            raise invalid("percentDone", "must be a number from 0 to 100")
        changes["percent_done"] = float(done)
        message = _text(payload.get("message"), "message", MAX_MESSAGE)
        if message and job.state == "RUNNING":
            changes["status_message"] = (f"running on gateway {self._gateway_arn(identity)}: "
                                         f"{message}")
        updated = self._changed(job, job.gateway_id or "", **changes)
        return {"abort": updated.state == "ABORTING"}

    async def complete_backup(self, identity: Identity, job: Job, payload: dict[str, Any]
                              ) -> dict[str, Any]:
        """Compose the change list onto the base, make every chunk and the manifest durable
        (vaults.commit), then the point and the job COMPLETED in one transaction."""
        gateway_id = job.gateway_id or ""
        incremental = _bool(payload.get("incremental"), "incremental")
        checkpoint = _text(payload.get("checkpoint"), "checkpoint", MAX_CHECKPOINT)
        # optional (older gateways): the final BytesTransferred, so the job does not keep
        # the last 2-s progress figure (0 for a short incremental)
        sent = payload.get("bytesTransferred")
        transferred = None if sent is None else _int(sent, "bytesTransferred")
        if incremental and job.base_point_arn is None:
            raise invalid("incremental", "this job has no base: back up in full")
        base_point = self.backups.point(job.base_point_arn) if incremental and (
            job.base_point_arn) else None
        if incremental and base_point is None:
            raise LinkError(409, "BaseGone", f"the base {job.base_point_arn} no longer exists; "
                                             "back up in full")

        def build() -> manifest.Manifest:
            try:
                delta = manifest.parse(payload.get("manifest"), delta=incremental)
            except manifest.ManifestError as exc:
                raise invalid(f"manifest.{exc.field}", exc.message) from None
            base = (self.vaults.manifest(job.storage, base_point.point_id)
                    if base_point is not None else None)
            return manifest.compose(base, delta)

        try:
            composed = await asyncio.to_thread(build)
        except VaultError as err:
            raise vault_refused(err) from None
        hypervisor = self.store.hypervisor_by_id(job.hypervisor_id)
        kind = hypervisor_kind(hypervisor) if hypervisor else "vsphere"
        new_point = NewPoint(
            hypervisor_arn=hypervisor.arn if hypervisor else job.hypervisor_id,
            hypervisor_kind=kind,
            backup_size=sum(d.data_bytes() for d in composed.disks),
            checkpoint=checkpoint,
            incremental=incremental,
            restore_defaults=restore_defaults(kind, composed.vm),
        )
        now = self.clock.now()  # the record in the vault and the row say the same time
        try:
            stored = await asyncio.to_thread(self.vaults.commit, job.storage, job.point_id,
                                             composed, vaultindex.point_record(
                                                 job, new_point, now))
        except VaultError as err:
            raise self._refused(job, err) from None
        if transferred is not None:  # a job changed meanwhile is left to the None below
            self.backups.update_job(job.job_id, ACTIVE, gateway_id=gateway_id,
                                    bytes_transferred=transferred)
        done = self.backups.complete_backup(job.job_id, gateway_id, new_point, now)
        if done is None:  # stopped or taken over while the vault worked
            current = self.backups.job(job.job_id)
            if current is not None and current.state in ENDED and (
                    self.backups.point(job.recovery_point_arn) is None):
                await asyncio.to_thread(self.vaults.delete_point, job.storage, job.point_id)
            self.held(identity, job.job_id)  # raises the right 409
            raise LinkError(409, "NotAssigned", f"job {job.job_id} changed; drop it")
        self.scheduler.forget(job.job_id)
        log.info("event=backup_completed job=%s point=%s incremental=%s bytes=%d chunks=%d",
                 job.job_id, job.recovery_point_arn, str(incremental).lower(),
                 stored.data_bytes, stored.chunks)
        self.scheduler.run()  # a slot is free
        return {"recoveryPointArn": job.recovery_point_arn}

    async def complete(self, identity: Identity, job_id: str, payload: dict[str, Any]
                       ) -> dict[str, Any]:
        job = self.held(identity, job_id)
        if job.job_type == BACKUP:
            return await self.complete_backup(identity, job, payload)
        return self.complete_restore(identity, job, payload)

    def failed(self, identity: Identity, job_id: str, payload: dict[str, Any]
               ) -> dict[str, Any]:
        job = self.held(identity, job_id)
        message = _text(payload.get("message"), "message", MAX_MESSAGE, optional=False)
        aborted = _bool(payload.get("aborted", False), "aborted")
        state = "ABORTED" if aborted else "FAILED"
        text = (f"stopped on gateway {self._gateway_arn(identity)}: {message}" if aborted
                else f"failed on gateway {self._gateway_arn(identity)}: {message}")
        self._changed(job, job.gateway_id or "", state=state, completed_at=self.clock.now(),
                      status_message=text)
        self.scheduler.forget(job_id)
        self._manifest_chunks.pop(job_id, None)
        log.info("event=job_%s job=%s message=%s", state.lower(), job_id, message)
        self.scheduler.run()
        return {}

    # -- restore --------------------------------------------------------------------------

    async def restore_manifest(self, identity: Identity, job_id: str) -> dict[str, Any]:
        job = self.held(identity, job_id, RESTORE)
        try:
            found = await asyncio.to_thread(self.vaults.manifest, job.storage, job.point_id)
        except VaultError as err:
            raise vault_refused(err) from None
        self._remember(job_id, frozenset(found.chunks()))
        return found.to_json()

    def _remember(self, job_id: str, chunks: frozenset[str]) -> None:
        self._manifest_chunks[job_id] = chunks
        self._manifest_chunks.move_to_end(job_id)
        while len(self._manifest_chunks) > MAX_CACHED_MANIFESTS:
            self._manifest_chunks.popitem(last=False)

    async def restore_chunk(self, identity: Identity, job_id: str, chunk_id: str
                            ) -> tuple[str, bytes]:
        """A chunk the job's manifest names (no other: a gateway reads only what it
        restores)."""
        job = self.held(identity, job_id, RESTORE)
        if not manifest.CHUNK_ID_RE.fullmatch(chunk_id):
            raise invalid("chunkId", "must be 64 lowercase hex digits")
        chunks = self._manifest_chunks.get(job_id)
        if chunks is None:
            try:
                found = await asyncio.to_thread(self.vaults.manifest, job.storage, job.point_id)
            except VaultError as err:
                raise vault_refused(err) from None
            chunks = frozenset(found.chunks())
            self._remember(job_id, chunks)
        if chunk_id not in chunks:
            raise LinkError(404, "UnknownChunk", f"chunk {chunk_id} is not named by the "
                                                 f"manifest of job {job_id}'s recovery point")
        try:
            return await asyncio.to_thread(self.vaults.get_chunk, job.storage, chunk_id)
        except VaultError as err:
            raise vault_refused(err) from None

    def complete_restore(self, identity: Identity, job: Job, payload: dict[str, Any]
                         ) -> dict[str, Any]:
        """COMPLETED, and the new VM joins its hypervisor's inventory (CreatedResourceArn is
        its VM ARN) in the same transaction."""
        vm = payload.get("vm")
        if not isinstance(vm, dict):
            raise invalid("vm", "must be an object {uuid, name, path, hostName}")
        uuid = vm.get("uuid")
        if not isinstance(uuid, str) or not re.fullmatch(r"[!-~]{1,128}", uuid):
            raise invalid("vm.uuid", "must be 1-128 printable ASCII characters")
        name = _text(vm.get("name"), "vm.name", 100, optional=False)
        path = _text(vm.get("path"), "vm.path", 4096, optional=False)
        host_name = _text(vm.get("hostName"), "vm.hostName", 100)
        hypervisor = self.store.hypervisor_by_id(job.hypervisor_id)
        if hypervisor is None:
            raise LinkError(409, "NotAssigned", f"the hypervisor of job {job.job_id} was "
                                                "deleted; drop it")
        arn = vm_arn(hypervisor, uuid)
        done = self.backups.complete_restore(
            job.job_id, job.gateway_id or "",
            {"uuid": uuid, "name": name, "path": path, "hostName": host_name}, arn,
            hypervisor.region, self.clock.now())
        if done is None:
            self.held(identity, job.job_id)
            raise LinkError(409, "NotAssigned", f"job {job.job_id} changed; drop it")
        self._manifest_chunks.pop(job.job_id, None)
        log.info("event=restore_completed job=%s vm=%s name=%s", job.job_id, arn, name)
        self.scheduler.run()
        return {}


def restore_defaults(kind: str, vm_config: Any) -> dict[str, str]:
    """The restore keys of the hypervisor's kind that the manifest's VM configuration
    carries (a storage pool, vSphere inventory paths): shown by
    GetRecoveryPointRestoreMetadata as the source's values."""
    if not isinstance(vm_config, dict):
        return {}
    keys = restorekeys.LIBVIRT if kind == "libvirt" else restorekeys.VSPHERE
    return {k: v for k in keys if isinstance(v := vm_config.get(k), str) and v}


# Where the Expect handler leaves its admission for the PUT handler (no second nonce).
_ADMITTED: Any = (
    web.RequestKey("joblink_admitted", AdmittedChunk)  # type: ignore[attr-defined]
    if hasattr(web, "RequestKey") else "joblink_admitted"
)


class JobLink:
    """The HTTP of the job link, over LinkWire's signature check and error mapping."""

    def __init__(self, wire: LinkWire, ops: JobOps) -> None:
        self.wire = wire
        self.ops = ops

    def routes(self) -> list[web.RouteDef]:
        base = "/gateway/jobs/{jobId}"
        wrap = self.wire.wrap
        return [
            web.post(f"{base}/started", wrap(self._json(self.ops.started))),
            web.post(f"{base}/missing", wrap(self._json(self.ops.missing))),
            web.post(f"{base}/progress", wrap(self._json(self.ops.progress))),
            web.post(f"{base}/complete", wrap(self.complete)),
            web.post(f"{base}/failed", wrap(self._json(self.ops.failed))),
            web.put(f"{base}/chunks/{{chunkId}}", wrap(self.put_chunk),
                    expect_handler=self._chunk_expect),
            web.get(f"{base}/chunks/{{chunkId}}", wrap(self.get_chunk)),
            web.get(f"{base}/manifest", wrap(self.get_manifest)),
        ]

    def _json(self, op: Callable[..., Any]) -> Callable[[web.Request], Any]:
        """A POST whose body is a small JSON object: signed, parsed, handed to `op`."""
        async def handle(request: web.Request) -> web.StreamResponse:
            identity, payload = await self.wire.signed_json(request, MAX_SMALL_BODY)
            answer = op(identity, request.match_info["jobId"], payload)
            if asyncio.iscoroutine(answer):
                answer = await answer
            return web.json_response(answer)
        return handle

    async def complete(self, request: web.Request) -> web.StreamResponse:
        """Like the others, but the body (a manifest) may be large: parsed off the loop."""
        identity, declared = self.wire.signed_by(request)
        if request.content_length is not None and request.content_length > MAX_COMPLETE_BODY:
            raise LinkError(413, "ValidationError", f"body: larger than {MAX_COMPLETE_BODY} "
                                                    "bytes")
        body = await read_at_most(request, MAX_COMPLETE_BODY + 1)
        if len(body) > MAX_COMPLETE_BODY:
            raise LinkError(413, "ValidationError", f"body: larger than {MAX_COMPLETE_BODY} "
                                                    "bytes")
        LinkWire.check_body_hash(declared, body)
        try:
            payload = await asyncio.to_thread(safejson.loads_object, body)
        except safejson.JsonError as exc:
            raise invalid("body", str(exc)) from None
        answer = await self.ops.complete(identity, request.match_info["jobId"], payload)
        return web.json_response(answer)

    async def _signed_get(self, request: web.Request) -> Identity:
        identity, declared = self.wire.signed_by(request)
        LinkWire.check_body_hash(declared, await read_at_most(request, MAX_SMALL_BODY))
        return identity

    async def get_manifest(self, request: web.Request) -> web.StreamResponse:
        identity = await self._signed_get(request)
        doc = await self.ops.restore_manifest(identity, request.match_info["jobId"])
        return web.json_response(doc)

    async def get_chunk(self, request: web.Request) -> web.StreamResponse:
        identity = await self._signed_get(request)
        encoding, data = await self.ops.restore_chunk(identity, request.match_info["jobId"],
                                                      request.match_info["chunkId"])
        return web.Response(body=data, content_type="application/octet-stream",
                            headers={H_ENCODING: encoding})

    # -- PUT chunks -----------------------------------------------------------------------

    def _admit(self, request: web.Request) -> AdmittedChunk:
        identity, declared = self.wire.signed_by(request)
        return self.ops.admit_chunk(identity, request.match_info["jobId"],
                                    request.match_info["chunkId"],
                                    request.headers.get(H_ENCODING, ""),
                                    request.content_length, declared)

    async def _chunk_expect(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: a refusal arrives before a byte of the chunk is sent."""

        async def admit(request: web.Request) -> None:
            request[_ADMITTED] = self._admit(request)
            if request.headers.get("Expect", "").lower() != "100-continue":
                raise LinkError(417, "ExpectationFailed",
                                "only 'Expect: 100-continue' is understood")
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return None

        return await self.wire.answer(request, admit)

    async def put_chunk(self, request: web.Request) -> web.StreamResponse:
        try:
            admitted = request.get(_ADMITTED) or self._admit(request)
            body = await read_at_most(request, MAX_ENCODED_CHUNK + 1)
            if len(body) > MAX_ENCODED_CHUNK:
                raise LinkError(413, "ValidationError", f"body: larger than "
                                f"{MAX_ENCODED_CHUNK} bytes (a 4 MiB chunk, encoded)")
        except LinkError:
            # Refused with (some of) its body unread: close the connection after the answer
            # instead of lingering to drain megabytes nobody will use.
            request.protocol.force_close()
            raise
        status, answer = await self.ops.put_chunk(admitted, body)
        return web.json_response(answer, status=status)
