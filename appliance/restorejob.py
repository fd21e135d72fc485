"""One restore job: a recovery point's manifest written to a new VM (docs/backups.md).

The steps: GET the manifest; `begin_restore` creates the new VM's empty disks; for each disk
in order, each extent's chunk is fetched (a few ahead of the writer), decoded, checked
against its SHA-256 (a mismatch fails the job naming the chunk) and its bytes written in
increasing offsets; `commit` defines the VM; `complete` names it to the control plane. On
any failure or stop, `abort` removes what the restore made.

Memory: PREFETCH chunks being fetched ahead, plus a cache of decoded chunks that later
extents still use (a chunk is named by several extents when a backup coalesced pieces into
it, or when the same data sits at several places), dropped when its last extent is written
and bounded by CACHE_BYTES (beyond it a chunk is fetched again when next needed). About
48 MiB a job at worst.

Writes go to ONE thread of their own, in order (the DiskWriter contract); fetching and
decoding use the job's other threads, so decoding the next chunk overlaps writing this one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from appliance.hypervisors.model import BackupConnector, DiskWriter, RestoreSession
from appliance.joblink import JobFailure, JobLink, LinkedJob
from appliance.link import JobOrder
from gatewaycore import chunkcodec, manifest
from gatewaycore.manifest import CHUNK_SIZE, Extent, Manifest

log = logging.getLogger(__name__)

PREFETCH = 4
CACHE_BYTES = 32 * 1024 * 1024


def decode(chunk: str, encoding: str, body: bytes) -> bytes:
    """The plain bytes of a fetched chunk, checked: JobFailure naming the chunk when it
    does not decode (gatewaycore.chunkcodec: never more than a chunk's size) or its
    SHA-256 is not its id."""
    try:
        data = bytes(chunkcodec.decode(encoding, body, CHUNK_SIZE))
    except chunkcodec.CodecError as exc:
        raise JobFailure(f"chunk {chunk} from the vault does not decode: {exc}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != chunk:
        raise JobFailure(f"chunk {chunk} failed its SHA-256 check (the vault's bytes hash to "
                         f"{got}); the recovery point is damaged")
    return data


class RestoreJob(LinkedJob):
    """One restore of one recovery point to a new VM (docs/backups.md, "Restore")."""

    type = "RESTORE"
    threads = 2  # fetch + decode; writes have a thread of their own

    def __init__(self, order: JobOrder, link: JobLink,
                 connect: Callable[[str], BackupConnector], **kw: Any) -> None:
        super().__init__(order, link, connect, **kw)
        self.session: RestoreSession | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"write-{order.job_id[:12]}")
        self._fetches: dict[str, asyncio.Task[bytes]] = {}
        self._cache: dict[str, bytes] = {}
        self.new_vm: dict[str, Any] | None = None

    def progress_message(self) -> str:
        return f"{self.phase}: {self.bytes_done} of {self.bytes_total} bytes written"

    async def _work(self) -> None:
        order = self.order
        self.phase = "reading the manifest"
        doc = await self.link.manifest(self.job_id)
        try:
            point = manifest.parse(doc)
        except manifest.ManifestError as exc:
            raise JobFailure(f"the recovery point's manifest is invalid: {exc}") from None
        self.bytes_total = sum(d.data_bytes() for d in point.disks)
        self.phase = "connecting"
        connector = await self.in_thread(self.open_connector)
        self.phase = "creating the VM"
        session = await self.in_thread(self._begin, connector, point)
        writers = {w.key: w for w in session.disks}
        lost = [d.key for d in point.disks if d.key not in writers]
        if lost:
            raise JobFailure(f"the hypervisor made no disk {lost[0]} for the new VM")
        log.info("event=restore_started job_id=%s recovery_point=%s name=%s disks=%d "
                 "bytes=%d", self.job_id, order.recovery_point_arn, order.restore_name,
                 len(point.disks), self.bytes_total)
        self.phase = "writing"
        await self.with_progress(self._write_all(point, writers))
        self.phase = "defining the VM"
        vm = await self.in_thread(session.commit)
        self.new_vm = {"uuid": vm.uuid, "name": vm.name, "path": vm.path,
                       "hostName": vm.host_name}
        await self.completing(self.link.complete_restore(self.job_id, self.new_vm))
        self.mark_done()
        log.info("event=restore_completed job_id=%s vm=%s name=%s bytes=%d", self.job_id,
                 vm.uuid, vm.name, self.bytes_done)

    def _begin(self, connector: BackupConnector, point: Manifest) -> RestoreSession:
        order = self.order
        # kept on the job at once, so a stop during the call still aborts the session
        self.session = connector.begin_restore(
            point.vm, order.restore_name or "", dict(order.restore_options),
            [(d.key, d.label, d.capacity) for d in point.disks])
        return self.session

    def _end_on_hypervisor(self, ok: bool) -> None:
        self._writer.shutdown(wait=True, cancel_futures=True)
        if self.session is not None and not ok:
            self.session.abort()

    # -- fetch ahead, write in order ----------------------------------------------------

    async def _write_all(self, point: Manifest, writers: dict[str, DiskWriter]) -> None:
        work: list[tuple[DiskWriter, Extent]] = [
            (writers[d.key], e) for d in point.disks for e in d.extents if e.chunk is not None]
        uses = Counter(e.chunk for _, e in work)
        ahead = 0
        loop = asyncio.get_running_loop()
        try:
            for i, (writer, extent) in enumerate(work):
                chunk = extent.chunk
                assert chunk is not None
                ahead = self._prefetch(work, max(ahead, i))
                data = await self._chunk(chunk)
                piece = data[extent.chunk_offset:extent.chunk_offset + extent.length]
                if len(piece) != extent.length:
                    raise JobFailure(f"chunk {chunk} holds {len(data)} bytes, fewer than its "
                                     f"extent at disk offset {extent.offset} needs")
                await loop.run_in_executor(self._writer, writer.write, extent.offset, piece)
                self.bytes_done += extent.length
                uses[chunk] -= 1
                if uses[chunk] == 0:
                    self._cache.pop(chunk, None)
        finally:
            for task in self._fetches.values():
                task.cancel()
            await asyncio.gather(*self._fetches.values(), return_exceptions=True)
            self._fetches.clear()
            self._cache.clear()

    def _prefetch(self, work: list[tuple[DiskWriter, Extent]], ahead: int) -> int:
        """Start fetching the chunks of the extents from `ahead` on, until PREFETCH are on
        their way; the index reached."""
        while ahead < len(work) and len(self._fetches) < PREFETCH:
            chunk = work[ahead][1].chunk
            assert chunk is not None
            if chunk not in self._cache and chunk not in self._fetches:
                self._fetches[chunk] = asyncio.create_task(self._fetch(chunk))
            ahead += 1
        return ahead

    async def _chunk(self, chunk: str) -> bytes:
        """The chunk's plain bytes: cached, on its way, or fetched now."""
        if chunk in self._cache:
            return self._cache[chunk]
        task = self._fetches.get(chunk)
        if task is None:
            task = self._fetches[chunk] = asyncio.create_task(self._fetch(chunk))
        try:
            data = await task
        finally:
            self._fetches.pop(chunk, None)
        if sum(map(len, self._cache.values())) + len(data) <= CACHE_BYTES:
            self._cache[chunk] = data
        return data

    async def _fetch(self, chunk: str) -> bytes:
        encoding, body = await self.link.get_chunk(self.job_id, chunk)
        return await self.in_thread(decode, chunk, encoding, body)
