"""Where uploaded bytes live: `DATA_DIR/<gateway id>/<name>`, streamed first to a part file
in `DATA_DIR/.incoming/`, fsynced, and renamed into place only when complete.

Kept apart from the link's operations (linkops.py) and from the records (store.py) so that
another kind of storage (a vault) can take its place behind the same few calls:

- `receive(read)` streams a body into a new part: a complete, durable `Part` or nothing;
- `place(part, gateway_id, name)` renames it into place (done or not done) and
  `flush(gateway_id)` makes that rename durable;
- `discard(part)` drops a part that will not be placed (a no-op once placed);
- `reconcile(index)` at start-up makes the records and the files agree after a crash.

The order of the records' and the files' steps is the caller's (linkops.LinkOps.upload):
each step leaves a state `reconcile` can repair.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from controlplane.store import UploadRecord
from gatewaycore import rules
from gatewaycore.atomicfile import fsync_dir

log = logging.getLogger("controlplane.blobstore")

UPLOAD_CHUNK = 1 << 20
WRITER_THREADS = 4
INCOMING = ".incoming"


@dataclass(frozen=True)
class Part:
    """A body received whole and fsynced into `.incoming`, not yet placed under its name."""

    name: str  # the file name in .incoming: what an UploadRecord's `part` names
    size: int
    sha256: str


class UploadIndex(Protocol):
    """What `reconcile` needs of the upload records (store.Store provides it)."""

    def upload_records(self) -> list[UploadRecord]: ...

    def put_upload(self, record: UploadRecord) -> None: ...

    def finish_upload(self, gateway_id: str, name: str, part: str) -> None: ...

    def delete_upload(self, gateway_id: str, name: str) -> None: ...


class BlobStore:
    """The data directory. Owns the threads that hash and write bodies (`close` ends them)."""

    def __init__(self, data_dir: Path, writer_threads: int = WRITER_THREADS) -> None:
        self.data_dir = data_dir
        self.incoming = data_dir / INCOMING
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.incoming.mkdir(mode=0o700, exist_ok=True)
        # Threads are started on first use, so an instance that never receives costs nothing.
        self._writers = concurrent.futures.ThreadPoolExecutor(
            max_workers=writer_threads, thread_name_prefix="upload"
        )

    def close(self) -> None:
        """Wait for the writes in flight (one batch per upload at most) and end the threads."""
        self._writers.shutdown(wait=True)

    # -- receiving ------------------------------------------------------------------------

    async def receive(self, read: Callable[[], Awaitable[bytes]]) -> Part:
        """Stream what `read()` returns (b"" at the end) into a new part file, hashing it.

        Never holds the body whole. Hashing and writing run in a worker thread (both release
        the GIL) while the event loop reads the next chunks, so two cores share the work:
        this is what lets an upload run at several Gbit/s over loopback. The part is fsynced
        before this returns (a 201 promises the bytes are kept); on any failure, the client
        going away included, it is removed.
        """
        part = self.incoming / f"{uuid.uuid4().hex}.part"
        digest = hashlib.sha256()
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                size = await self._stream(read, fd, digest)
                await asyncio.get_running_loop().run_in_executor(self._writers, os.fsync, fd)
            finally:
                os.close(fd)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return Part(part.name, size, digest.hexdigest())

    async def _stream(self, read: Callable[[], Awaitable[bytes]], fd: int, digest: Any) -> int:
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
                chunk = await read()
                if chunk:
                    batch.append(chunk)
                    batched += len(chunk)
                    size += len(chunk)
                if batch and (batched >= UPLOAD_CHUNK or not chunk):
                    if pending is not None:
                        # At most one batch in flight: memory stays bounded.
                        await asyncio.wrap_future(pending)
                    pending = self._writers.submit(consume, batch)
                    batch, batched = [], 0
                if not chunk:
                    break
        finally:
            # The caller closes `fd` next: no write may still be running then, even when
            # the client went away mid-upload. Waiting here is one batch at most.
            if pending is not None:
                pending.result()
        return size

    # -- placing --------------------------------------------------------------------------

    def place(self, part: Part, gateway_id: str, name: str) -> None:
        """Rename the part to `gateway_id/name`, replacing what was there: one rename, so
        when this raises the name still holds what it held."""
        target_dir = self.data_dir / gateway_id
        if not target_dir.is_dir():
            target_dir.mkdir(mode=0o700, exist_ok=True)
            fsync_dir(self.data_dir)
        os.replace(self.incoming / part.name, target_dir / name)

    def flush(self, gateway_id: str) -> None:
        """Make the renames under `gateway_id` durable."""
        fsync_dir(self.data_dir / gateway_id)

    def discard(self, part: Part) -> None:
        """Drop a part that will not be placed; nothing happens if it already was."""
        (self.incoming / part.name).unlink(missing_ok=True)

    # -- start-up repair ------------------------------------------------------------------

    def reconcile(self, index: UploadIndex) -> None:
        """Make the upload records and the files of the data directory agree again, then
        drop the parts no record names (uploads cut off by a kill or a crash).

        A record whose part file is still in .incoming was recorded but not renamed: the
        part was complete and fsynced, so the rename is done now. A record without a file
        is deleted (it would promise bytes that are not there). A file without a record, or
        whose size differs from it, gets a record computed from the file: its bytes arrived
        whole (only complete, checked parts are ever renamed), only the record was lost.
        """
        records = {(r.gateway_id, r.name): r for r in index.upload_records()}
        for record in records.values():
            self._repair(index, record)
        for gateway_dir in sorted(self.data_dir.iterdir()):
            if gateway_dir.name.startswith(".") or not gateway_dir.is_dir():
                continue
            for path in sorted(gateway_dir.iterdir()):
                if (gateway_dir.name, path.name) in records or not path.is_file():
                    continue
                try:
                    rules.upload_name(path.name)
                except rules.RuleError:
                    log.warning("event=upload_ignored path=%s reason=bad_name", path)
                    continue
                self._adopt(index, gateway_dir.name, path, "file_without_record")
        for stale in self.incoming.glob("*.part"):
            stale.unlink(missing_ok=True)

    def _repair(self, index: UploadIndex, record: UploadRecord) -> None:
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
            index.delete_upload(record.gateway_id, record.name)
            action = "record_deleted reason=no_file"
        elif target.stat().st_size != record.size:
            self._adopt(index, record.gateway_id, target, "size_differs")
            return
        elif record.part is not None:
            index.finish_upload(record.gateway_id, record.name, record.part)
            action = "rename_done,record_completed" if renamed else "record_completed"
        else:
            return
        log.warning("event=upload_repaired gateway=%s name=%s action=" + action,
                    record.gateway_id, record.name)

    @staticmethod
    def _adopt(index: UploadIndex, gateway_id: str, path: Path, reason: str) -> None:
        """Record a file whose bytes are whole but whose record was lost or is wrong."""
        digest = hashlib.sha256()
        size = 0
        with path.open("rb") as f:
            while chunk := f.read(UPLOAD_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        record = UploadRecord(gateway_id, path.name, size, digest.hexdigest(),
                              path.stat().st_mtime)
        index.put_upload(record)
        log.warning("event=upload_repaired gateway=%s name=%s action=record_from_file "
                    "reason=%s size=%d sha256=%s", gateway_id, path.name, reason, size,
                    record.sha256)
