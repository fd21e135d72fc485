"""One backup job: a VM's disks, cut into chunks, sent to the vault through the one shaper.

The steps (docs/backups.md): `begin_backup` freezes the disks; `started`; each disk's extents
are planned into chunks; each chunk is read, hashed (its id) and, unless all zero, offered to
`/missing`; only what the vault lacks is compressed and sent; `complete` hands over the
manifest (a full backup's data extents, or an incremental's change list with its zero
extents) and sends again whatever the vault says it still lacks; `finish` ends the backup
on the hypervisor on every path.

The pipeline, per job (memory is bounded by the chunks in flight, not by the disk):

    2 readers (threads: read + SHA-256 + zero check)  ──►  2 batchers (/missing, ≤ 512 ids
        each, two calls in flight)  ──►  2 uploaders (thread: zstd; then PUT, shaped)

A semaphore of IN_FLIGHT (8) plain chunks is taken before a read and given back when the
chunk is done (zero, already in the vault, or sent), so a job holds at most 8 chunks'
plain bytes (32 MiB) plus the encoded copies of the 2 being sent (at most 8 MiB, less as
they compress; identity shares the plain buffer): 40 MiB at worst, 160 MiB for four jobs,
plus at most MISSING_BATCH ids (64 bytes each) waiting for /missing. hashlib, zstd and
libnbd release the GIL on large buffers, so the threads use the cores. When uploads are
slow (the shaper) the readers stop at the bound.

/missing is batched by its answers (`_Batching`): while most chunks are missing, each call
asks about what is ready (the bytes are kept: they will be sent, and waiting would only add
latency); while most are present (a new full backup of an unchanged VM), readers keep only
the ids, the batch grows from 16 to 512, and a chunk that turns out missing is read again
by its uploader, so such a backup is read + hash bound with a handful of calls. Two
batchers ask at once so one round trip does not stall the chunks read meanwhile.

Chunk planning (pure, unit-tested): extents are cut at 4 MiB multiples of the disk's offsets
(gatewaycore.manifest.cut) and neighbouring pieces inside one 4 MiB window are coalesced into
one chunk when the gap between them is small, so a fragmented disk does not make thousands
of tiny chunks. The chunk holds the gap's bytes too (zeros of a hole in a full backup,
unchanged data in an incremental: either reads the same at restore), but the manifest lists
only the pieces, each at its offset within the chunk. The plan depends only on the extents,
so the same data at the same place makes the same chunks in every full backup.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.hypervisors.model import BackupConnector, BackupSession, DiskReader
from appliance.joblink import (
    JobFailure,
    JobLink,
    JobRefused,
    JobStopped,
    LinkedJob,
    run_together,
)
from appliance.link import JobOrder
from gatewaycore import chunkcodec, manifest
from gatewaycore.manifest import CHUNK_SIZE, Extent

log = logging.getLogger(__name__)

IN_FLIGHT = 8           # plain chunks a job holds at once (read, not yet done)
READERS = 2
UPLOADERS = 2           # PUTs at once: 4 did not measurably help, and under a limit every
                        # chunk in flight is a partial send that a restart loses
MISSING_BATCH = 1024    # docs/backups.md: at most 1,024 ids per /missing
ASKERS = 2              # /missing calls in flight at once
# Each batcher waits for at most this many ids, so together they never hold all of the
# MISSING_BATCH ids the readers may have outstanding (the readers could not add the one
# that completes a batch).
MAX_PRESENT_BATCH = MISSING_BATCH // ASKERS
FIRST_PRESENT_BATCH = 16  # /missing batch once answers say most chunks are present ...
MOSTLY_PRESENT = 0.9      # ... i.e. at least this share of the ids asked about
MOSTLY_MISSING_BELOW = 0.5  # below this share present: back to keeping the bytes
# Neighbouring pieces in one 4 MiB window join when the gap between them is at most this.
# A full backup's gaps are holes (zeros: free to read, compress to nothing), so a window
# becomes one chunk. An incremental's gaps are unchanged data that would be sent again, so
# only small gaps (4 dirty-bitmap blocks) are bridged: at most 13 chunks per window.
FULL_GAP = CHUNK_SIZE
INCREMENTAL_GAP = 256 * 1024
SENT_MEMORY = 65536     # ids this job sent, remembered so a repeated chunk is sent once
COMPLETE_ROUNDS = 3     # complete, send what is missing, complete again: at most this often

_ZEROS = bytes(CHUNK_SIZE)


# -- pure: the plan and the per-chunk decisions ----------------------------------------------


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """One chunk to make: bytes [start, start + length) of disk `disk` (an index), carrying
    the extents `pieces` ((offset, length) on the disk, inside the span, sorted)."""

    disk: int
    start: int
    length: int
    pieces: tuple[tuple[int, int], ...]

    @property
    def data_bytes(self) -> int:
        return sum(n for _, n in self.pieces)

    def extents(self, chunk_id: str | None) -> list[Extent]:
        """The manifest's extents for this chunk: each piece at its place in the chunk, or
        zero extents when the chunk is all zeros (`chunk_id` None)."""
        if chunk_id is None:
            return [Extent(off, n, None, 0) for off, n in self.pieces]
        return [Extent(off, n, chunk_id, off - self.start) for off, n in self.pieces]


def normalize(extents: Iterable[tuple[int, int]], capacity: int, key: str
              ) -> list[tuple[int, int]]:
    """A connector's extents sorted, clipped to the disk, overlapping or touching ones
    merged; JobFailure naming the disk for a negative or out-of-disk range."""
    ranges = sorted(extents)
    out: list[tuple[int, int]] = []
    for offset, length in ranges:
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            raise JobFailure(f"disk {key}: the hypervisor reported a bad extent "
                             f"({offset!r}, {length!r})")
        if offset >= capacity:
            raise JobFailure(f"disk {key}: the hypervisor reported an extent at {offset}, "
                             f"past the disk's {capacity} bytes")
        end = min(offset + length, capacity)
        if end <= offset:
            continue
        if out and offset <= out[-1][0] + out[-1][1]:
            last_off, last_len = out[-1]
            out[-1] = (last_off, max(last_off + last_len, end) - last_off)
        else:
            out.append((offset, end - offset))
    return out


def plan_chunks(disk: int, extents: Sequence[tuple[int, int]], max_gap: int
                ) -> list[ChunkPlan]:
    """The chunks of one disk's normalized extents: cut at 4 MiB multiples, neighbours in
    one window joined when the gap between them is at most `max_gap`."""
    plans: list[ChunkPlan] = []
    pieces: list[tuple[int, int]] = []

    def close() -> None:
        if pieces:
            start = pieces[0][0]
            end = pieces[-1][0] + pieces[-1][1]
            plans.append(ChunkPlan(disk, start, end - start, tuple(pieces)))
            pieces.clear()

    for offset, length in extents:
        for off, n in manifest.cut(offset, length):
            if pieces:
                last_off, last_n = pieces[-1]
                same_window = last_off // CHUNK_SIZE == off // CHUNK_SIZE
                if not same_window or off - (last_off + last_n) > max_gap:
                    close()
            pieces.append((off, n))
    close()
    return plans


def is_zero(data: bytes) -> bool:
    """All zero bytes: one memcmp against a zero buffer, far faster than any()."""
    n = len(data)
    if n > CHUNK_SIZE:
        return data.count(0) == n
    return data == (_ZEROS if n == CHUNK_SIZE else _ZEROS[:n])


def encode(data: bytes) -> tuple[str, bytes]:
    """(encoding, body) of a chunk on the wire: zstd unless a probe or the whole result
    says it will not shrink by 3 % (gatewaycore.chunkcodec, the one place for encodings)."""
    return chunkcodec.encode(data)


def _serialized(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def chunk_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the job -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Read:
    index: int
    chunk: str | None
    data: bytes | None


class _SentIds:
    """The ids this job sent (or is sending), the most recent SENT_MEMORY of them: a chunk
    repeated on the disk is sent once. Forgetting is safe: /missing or complete's
    MissingChunks catch anything the vault lacks."""

    def __init__(self, size: int = SENT_MEMORY) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def __contains__(self, chunk: object) -> bool:
        return chunk in self._ids

    def add(self, chunk: str) -> None:
        self._ids[chunk] = None
        self._ids.move_to_end(chunk)
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)

    def discard(self, chunk: str) -> None:
        self._ids.pop(chunk, None)


class _Batching:
    """How many read chunks the batcher asks /missing about at once, and whether readers
    keep a chunk's bytes until the answer.

    While answers say most chunks are missing (a first full backup, an incremental), the
    batcher asks about what is ready at once, the readers keep the bytes (they will be
    sent) and the memory bound holds the batch to the chunks in flight. While answers say
    most are present (a new full backup of a VM the vault mostly has), the readers keep
    only the ids and the batch doubles, from FIRST_PRESENT_BATCH up to MAX_PRESENT_BATCH, so
    a mostly unchanged disk costs a few /missing calls instead of one per chunk; the rare
    missing chunk is read again by its uploader."""

    def __init__(self) -> None:
        self.size = MISSING_BATCH
        self.expect_present = False

    def answered(self, asked: int, missing: int) -> None:
        if asked == 0:
            return
        present = (asked - missing) / asked
        if present >= MOSTLY_PRESENT:
            self.size = (min(MAX_PRESENT_BATCH, self.size * 2) if self.expect_present
                         else FIRST_PRESENT_BATCH)
            self.expect_present = True
        elif present < MOSTLY_MISSING_BELOW:
            self.size = MISSING_BATCH
            self.expect_present = False


class BackupJob(LinkedJob):
    """One backup of one VM (docs/backups.md, "Backup")."""

    type = "BACKUP"
    threads = READERS + UPLOADERS

    def __init__(self, order: JobOrder, link: JobLink,
                 connect: Callable[[str], BackupConnector], *,
                 in_flight: int = IN_FLIGHT, **kw: Any) -> None:
        super().__init__(order, link, connect, **kw)
        self._in_flight = in_flight
        self.session: BackupSession | None = None
        self._plans: list[ChunkPlan] = []
        self._results: list[str | None] = []
        self._sent = _SentIds()
        self.chunks_sent = 0
        self.chunks_present = 0
        self.chunks_zero = 0
        self.bytes_sent = 0
        self.manifest_bytes = 0
        self.bytes_on_wire = 0  # chunk body bytes handed to the socket (retries included)
        self.missing_calls = 0
        # where the pipeline's time went (seconds summed over its threads and tasks), logged
        # at the end: what to look at before changing the pipeline's shape
        self.timings: dict[str, float] = dict.fromkeys(("read", "hash", "missing", "encode",
                                                        "put"), 0.0)
        self.recovery_point_arn: str | None = None

    def progress_message(self) -> str:
        mib = self.bytes_sent / (1 << 20)
        return (f"{self.phase}: {self.chunks_sent} chunks sent ({mib:.1f} MiB), "
                f"{self.chunks_present} already in the vault, {self.chunks_zero} zero")

    def view(self) -> dict[str, Any]:
        return {**super().view(), "incremental": None if self.session is None
                else self.session.incremental, "bytesSent": self.bytes_sent}

    # -- the steps --------------------------------------------------------------------------

    async def _work(self) -> None:
        order = self.order
        self.phase = "connecting"
        connector = await self.in_thread(self.open_connector)
        self.phase = "freezing the disks"
        session = await self.in_thread(self._begin, connector)
        self.note = session.note
        disks = list(session.disks)
        if not disks:
            raise JobFailure(f"VM {order.vm_name} has no disk to back up")
        self.phase = "listing extents"
        gap = INCREMENTAL_GAP if session.incremental else FULL_GAP
        for index, disk in enumerate(disks):
            extents = await self.in_thread(disk.extents)
            self._plans += plan_chunks(index, normalize(extents, disk.capacity, disk.key), gap)
        self._results = [None] * len(self._plans)
        self.bytes_total = sum(p.data_bytes for p in self._plans)
        await self.link.started(self.job_id, session.incremental, session.note,
                                self.bytes_total)
        log.info("event=backup_started job_id=%s vm=%s incremental=%s disks=%d chunks=%d "
                 "bytes=%d note=%s", self.job_id, order.vm_uuid,
                 str(session.incremental).lower(), len(disks), len(self._plans),
                 self.bytes_total, session.note)
        self.phase = "sending"
        await self.with_progress(self._send_all(disks))
        self.phase = "completing"
        await self.with_progress(self._complete(session, disks))

    def _begin(self, connector: BackupConnector) -> BackupSession:
        base = self.order.base_checkpoint if self.order.base_recovery_point else None
        # kept on the job at once, so a stop during the call still finishes the session
        self.session = connector.begin_backup(self.order.vm_uuid or "", self.job_id, base)
        return self.session

    def _end_on_hypervisor(self, ok: bool) -> None:
        if self.session is not None:
            self.session.finish(ok)

    # -- the pipeline ---------------------------------------------------------------------

    async def _send_all(self, disks: list[DiskReader]) -> None:
        """Read, hash, ask /missing, encode and send every planned chunk (the module's
        docstring draws the pipeline and says its memory bound)."""
        slots = asyncio.Semaphore(self._in_flight)     # plain chunks held (the memory bound)
        pending = asyncio.Semaphore(MISSING_BATCH)     # ids read, not yet asked about
        ready: asyncio.Queue[_Read | None] = asyncio.Queue()
        uploads: asyncio.Queue[_Read | None] = asyncio.Queue()
        todo = iter(range(len(self._plans)))
        batching = _Batching()
        clock = time.perf_counter

        def done(index: int) -> None:
            self.bytes_done += self._plans[index].data_bytes

        async def reader() -> None:
            for index in todo:
                await pending.acquire()
                await slots.acquire()
                try:
                    got = await self.in_thread(self._read, disks, index)
                except BaseException:
                    slots.release()
                    pending.release()
                    raise
                if got.chunk is None:
                    self.chunks_zero += 1
                    slots.release()
                    pending.release()
                    done(index)
                    continue
                if batching.expect_present:
                    # Most chunks are in the vault: keep only the id, so /missing can be
                    # asked about many at once without holding their bytes; the few that
                    # are missing are read again by the uploader.
                    got.data = None
                    slots.release()
                await ready.put(got)

        async def readers() -> None:
            await run_together(*(reader() for _ in range(READERS)))
            for _ in range(ASKERS):
                await ready.put(None)  # one end mark for each batcher

        async def batcher() -> None:
            end = False
            while not end:
                batch = [await ready.get()]
                # Take what is ready; wait for more only while no chunk of the batch holds
                # its bytes (those must not wait, and the readers may be blocked on them).
                while batch[-1] is not None and len(batch) < batching.size:
                    if ready.empty() and any(r.data is not None for r in batch
                                             if r is not None):
                        break
                    batch.append(await ready.get())
                if batch[-1] is None:  # the readers' end mark is always the last item
                    end = True
                    batch.pop()
                reads = [r for r in batch if r is not None]
                fresh = list(dict.fromkeys(r.chunk for r in reads
                                           if r.chunk is not None and r.chunk not in self._sent))
                asked = clock()
                missing = set(await self.link.missing(self.job_id, fresh)) if fresh else set()
                self.timings["missing"] += clock() - asked
                self.missing_calls += 1 if fresh else 0
                batching.answered(len(fresh), len(missing))
                for got in reads:
                    assert got.chunk is not None
                    pending.release()
                    self._results[got.index] = got.chunk
                    if got.chunk in missing and got.chunk not in self._sent:
                        self._sent.add(got.chunk)
                        await uploads.put(got)
                    else:
                        self.chunks_present += 1
                        if got.data is not None:
                            got.data = None
                            slots.release()
                        done(got.index)

        async def batchers() -> None:
            # Two ask at once: while one waits for its /missing answer (a round trip on
            # which nothing else of the chunks it holds can happen), the other gathers the
            # chunks read meanwhile.
            await run_together(*(batcher() for _ in range(ASKERS)))
            for _ in range(UPLOADERS):
                await uploads.put(None)

        async def uploader() -> None:
            while (got := await uploads.get()) is not None:
                assert got.chunk is not None
                if got.data is None:  # asked about without its bytes: read it again
                    await slots.acquire()
                    try:
                        again = await self.in_thread(self._read, disks, got.index)
                    except BaseException:
                        slots.release()
                        raise
                    if again.chunk != got.chunk or again.data is None:
                        slots.release()
                        raise JobFailure(f"disk data changed under the backup: chunk at "
                                         f"offset {self._plans[got.index].start} now reads "
                                         "differently")
                    got.data = again.data
                try:
                    await self._upload(got.chunk, got.data)
                finally:
                    got.data = None
                    slots.release()
                done(got.index)

        await run_together(readers(), batchers(), *(uploader() for _ in range(UPLOADERS)))

    def _read(self, disks: list[DiskReader], index: int) -> _Read:
        """Read one planned chunk (in a worker thread): its id, or None when all zero."""
        plan = self._plans[index]
        disk = disks[plan.disk]
        started = time.perf_counter()
        try:
            data = disk.read(plan.start, plan.length)
        except Exception as exc:
            code = getattr(exc, "code", None)
            reason = f"{code}: {getattr(exc, 'message', exc)}" if code else f"{exc}"
            raise JobFailure(f"reading disk {disk.key} at offset {plan.start} "
                             f"({plan.length} bytes) failed: {reason}") from exc
        if len(data) != plan.length:
            raise JobFailure(f"reading disk {disk.key} at offset {plan.start} returned "
                             f"{len(data)} bytes instead of {plan.length}")
        data = bytes(data)
        read = time.perf_counter()
        self.timings["read"] += read - started
        if is_zero(data):
            return _Read(index, None, None)
        got = _Read(index, chunk_id(data), data)
        self.timings["hash"] += time.perf_counter() - read
        return got

    async def _upload(self, chunk: str, data: bytes) -> None:
        started = time.perf_counter()
        encoding, body = await self.in_thread(encode, data)
        encoded = time.perf_counter()
        self.timings["encode"] += encoded - started
        try:
            await self.link.put_chunk(self.job_id, chunk, encoding, body, self._on_wire)
        except BaseException:
            self._sent.discard(chunk)
            raise
        self.timings["put"] += time.perf_counter() - encoded
        self.chunks_sent += 1
        self.bytes_sent += len(body)

    # -- complete -----------------------------------------------------------------------

    def manifest_json(self, session: BackupSession, disks: list[DiskReader]
                      ) -> dict[str, Any]:
        """The manifest `complete` carries: a full backup's data extents, or an
        incremental's change list with its zero extents kept."""
        per_disk: list[list[list[Any]]] = [[] for _ in disks]
        for plan, chunk in zip(self._plans, self._results, strict=True):
            if chunk is None and not session.incremental:
                continue
            per_disk[plan.disk] += [e.to_json() for e in plan.extents(chunk)]
        return {
            "format": manifest.FORMAT,
            "vm": dict(session.vm_config),
            "disks": [{"key": d.key, "label": d.label, "capacity": d.capacity, "extents": ext}
                      for d, ext in zip(disks, per_disk, strict=True)],
        }

    def _on_wire(self, n: int) -> None:
        self.bytes_on_wire += n

    def transferred(self) -> int:
        """BytesTransferred as AWS defines it: the bytes sent to the vault so far (encoded
        chunk bodies as they go out, a retried one again, and the manifest each time
        `complete` carried it)."""
        return self.bytes_on_wire + self.manifest_bytes

    async def _complete(self, session: BackupSession, disks: list[DiskReader]) -> None:
        doc = self.manifest_json(session, disks)
        body = await self.in_thread(_serialized, doc)
        for _ in range(COMPLETE_ROUNDS):
            try:
                self.manifest_bytes += len(body)
                arn = await self.completing(self.link.complete_backup(
                    self.job_id, session.incremental, session.checkpoint, body,
                    self.transferred()))
            except JobRefused as exc:
                if exc.code != "MissingChunks":
                    raise
                missing = exc.doc.get("missing")
                if not isinstance(missing, list) or not missing:
                    raise
                log.info("event=backup_missing_chunks job_id=%s count=%d", self.job_id,
                         len(missing))
                await self._resend(disks, {str(m) for m in missing})
                continue
            except JobStopped as exc:
                if exc.code != "JobEnded" or not exc.retried:
                    raise
                # The first attempt was done but its answer lost: the job is ours, done.
                log.info("event=backup_complete_unconfirmed job_id=%s", self.job_id)
                arn = ""
            self.mark_done()
            self.recovery_point_arn = arn or None
            self.bytes_done = self.bytes_total
            log.info("event=backup_completed job_id=%s recovery_point=%s chunks_sent=%d "
                     "chunks_present=%d chunks_zero=%d bytes_sent=%d manifest_bytes=%d "
                     "missing_calls=%d seconds=%s", self.job_id, arn, self.chunks_sent,
                     self.chunks_present, self.chunks_zero, self.bytes_sent,
                     self.manifest_bytes, self.missing_calls,
                     ",".join(f"{k}:{v:.2f}" for k, v in self.timings.items()))
            return
        raise JobFailure(f"the vault still lacked chunks after {COMPLETE_ROUNDS} rounds of "
                         "sending them")

    async def _resend(self, disks: list[DiskReader], missing: set[str]) -> None:
        """Read again and send the chunks the vault lacks at `complete`."""
        wanted = {c: i for i, c in enumerate(self._results) if c in missing}
        unknown = missing - set(wanted)
        if unknown:
            raise JobFailure(f"the control plane asked for chunk {sorted(unknown)[0]}, "
                             "which this backup's manifest does not name")
        for chunk, index in wanted.items():
            got = await self.in_thread(self._read, disks, index)
            if got.chunk != chunk or got.data is None:
                raise JobFailure(f"disk data changed under the backup: chunk at offset "
                                 f"{self._plans[index].start} now reads differently")
            self._sent.discard(chunk)
            await self._upload(chunk, got.data)

