"""Where a vault's objects (encrypted chunks, manifests) live: a small put-if-absent store.

`ChunkStore` is all that controlplane.vaults may assume of storage, so that an S3-compatible
bucket can replace the local directory (issue 12): put-if-absent, get, has, size, delete,
list, `sync` (every put so far durable) and `suspects` (what a crash may have torn).
`VaultStores` makes, finds and drops the stores of each vault.

The local store and its durability decision (why chunk puts are not fsynced one by one):

- A put writes a temporary file in the object's directory and hard-links it to the final
  name; EEXIST means another thread or process stored the same object first, so the put
  returns False. The name never shows a partial file while the machine stays up.
- Chunk stores (`durable=False`) do not fsync a put: fsyncing every 4 MiB chunk serialises
  an upload on the disk's flush latency. Instead `sync()`, which commit() calls before it
  writes a manifest, flushes the whole file system with one syncfs(2): the data and the
  directory entries of every chunk put so far. A recovery point therefore never names a
  chunk that is not durable.
- After a power cut, a chunk put after the last sync may be torn (a name whose data never
  reached the disk). So each sync ends by writing, atomically, a marker holding a time
  before which every put was complete when the flush began; `suspects()` lists the objects
  whose files are newer than it (less a margin for the kernel's coarse file clock), and the
  vaults decrypt those at start-up and delete the ones that fail. Older files need no check,
  which keeps start-up short however big the vault. Known limit: a wall clock stepped back
  by more than MTIME_MARGIN between a sync and a crash hides files from this check.
- Manifest stores (`durable=True`) fsync the temporary file before the link and the
  directory after it (and after a delete): few, small objects whose writing must be durable
  when the call returns.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

from gatewaycore.atomicfile import fsync_dir, write_atomic

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,199}")
# AWS Backup's vault name rule (2-50 of A-Z a-z 0-9 - _ .); ".." matches it but is refused.
VAULT_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{2,50}")
MARKER = ".synced"
TMP_SUFFIX = ".tmp"
DROP_PREFIX = ".drop~"     # "~" is in no vault name, so a vault can never be called this
# File times come from the kernel's coarse clock (a tick behind time.time()), and a thread
# may be paused between noting a put's start and writing it: files this close to the marker
# are checked too. Checking a few more seconds of chunks costs milliseconds.
MTIME_MARGIN = 5.0


class ChunkStore(Protocol):
    """Objects named by NAME_RE, written once. Every method blocks and is thread-safe."""

    def put_if_absent(self, name: str, data: bytes | bytearray | memoryview) -> bool:
        """Store `data` under `name` unless it exists: True when stored by this call."""
        ...

    def get(self, name: str) -> bytes:
        """The object's bytes; KeyError when absent."""
        ...

    def has(self, name: str) -> bool: ...

    def size(self, name: str) -> int | None:
        """The object's size in bytes, None when absent (a cheap look, no read)."""
        ...

    def sizes(self, names: Iterable[str]) -> dict[str, int | None]:
        """`size` of each name: one look each, made at once where a look is a round trip
        (a backup's commit checks every chunk of its manifest)."""
        ...

    def delete(self, name: str) -> None:
        """Remove `name` (nothing happens when it is absent)."""
        ...

    def names(self) -> Iterator[str]: ...

    def listing(self, limit: int) -> dict[str, int] | None:
        """Every object's size by name when there are at most `limit`, else None (a vault
        that small is known whole after one listing: no look per chunk after it)."""
        ...

    def sync(self) -> None:
        """Make every put that returned before this call durable."""
        ...

    def suspects(self) -> Iterator[str]:
        """At start-up, before any put: the objects a crash may have torn (put after the
        last sync), for the caller to verify; leftover partial writes are removed here."""
        ...


class VaultStores(Protocol):
    """The stores of every vault: its chunks, its recovery points' manifests, and its meta
    objects."""

    def exists(self, vault: str) -> bool: ...

    def create(self, vault: str) -> None: ...

    def drop(self, vault: str) -> None: ...

    def vaults(self) -> Iterator[str]: ...

    def sweep(self) -> None:
        """At start-up: finish what a crash interrupted (a drop half done)."""
        ...

    def chunks(self, vault: str) -> ChunkStore: ...

    def points(self, vault: str) -> ChunkStore: ...

    def meta(self, vault: str) -> ChunkStore:
        """Small objects that describe the vault itself (e.g. "vault.json", "key.json"): what
        the disaster-recovery path needs to rebuild a control plane's view of the vault from
        its storage alone. Every put and delete is durable when it returns."""
        ...


def check_vault_name(vault: str) -> str:
    """`vault` when it is a vault name that is safe as one path component, else ValueError."""
    if not VAULT_NAME_RE.fullmatch(vault) or vault == "..":
        raise ValueError(f"{vault!r} is not a vault name (2-50 of A-Z a-z 0-9 - _ .)")
    return vault


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        func = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int]
    func.restype = ctypes.c_int
    return func


_SYNCFS = _load_syncfs()


def syncfs(directory: Path) -> None:
    """Flush the file system holding `directory`: data, inodes and directory entries.

    syncfs(2) (through ctypes: the os module lacks it; ctypes releases the GIL for the call)
    reports write-back errors since Linux 5.8. Without it, sync(2) flushes every file system.
    """
    if _SYNCFS is None:
        os.sync()
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(directory))
    finally:
        os.close(fd)


class LocalChunkStore:
    """A directory of objects: `<directory>/<name[:2]>/<name>` when `shard` (64-hex chunk
    ids: 256 directories keep each one small), else `<directory>/<name>`.

    `durable`: every put and delete is durable when it returns (manifests); otherwise puts
    are made durable by `sync()` (chunks; see the module's docstring).
    """

    def __init__(self, directory: Path, *, shard: bool = True, durable: bool = False) -> None:
        self.directory = directory
        self.shard = shard
        self.durable = durable
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._tokens = itertools.count()
        self._pending: dict[int, float] = {}   # puts in progress: their start times
        # Unknown at start (a crashed process may have left data in the page cache only),
        # so the first sync always flushes.
        self._dirty = True

    # -- naming ---------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not an object name")
        return self.directory / name[:2] / name if self.shard else self.directory / name

    # -- the ChunkStore interface ---------------------------------------------------------

    def put_if_absent(self, name: str, data: bytes | bytearray | memoryview) -> bool:
        path = self._path(name)
        with self._lock:
            token = next(self._tokens)
            # Noted before the first byte is written: sync() must not mark as durable a time
            # at which this put had begun writing but had not finished.
            self._pending[token] = time.time()
        try:
            return self._put(path, data)
        finally:
            with self._lock:
                del self._pending[token]
                self._dirty = True  # after the link, so a sync that began earlier repeats

    def _put(self, path: Path, data: bytes | bytearray | memoryview) -> bool:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}{TMP_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileNotFoundError:
            if not self.shard:
                raise
            path.parent.mkdir(mode=0o700, exist_ok=True)  # a new shard: sync() covers it
            fd = os.open(tmp, flags, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
                created = True
            except FileExistsError:
                created = False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if self.durable:
            fsync_dir(path.parent)
        return created

    def get(self, name: str) -> bytes:
        try:
            # Unbuffered readall sizes one buffer from fstat: a single read, no copy.
            with open(self._path(name), "rb", buffering=0) as f:
                return f.read()
        except FileNotFoundError:
            raise KeyError(name) from None

    def has(self, name: str) -> bool:
        return self.size(name) is not None

    def size(self, name: str) -> int | None:
        try:
            return os.stat(self._path(name)).st_size
        except FileNotFoundError:
            return None

    def sizes(self, names: Iterable[str]) -> dict[str, int | None]:
        return {name: self.size(name) for name in names}

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        if self.durable:
            fsync_dir(path.parent)

    def names(self) -> Iterator[str]:
        for _, entry in self._entries():
            if NAME_RE.fullmatch(entry.name):
                yield entry.name

    def listing(self, limit: int) -> dict[str, int] | None:
        found: dict[str, int] = {}
        for _, entry in self._entries():
            if not NAME_RE.fullmatch(entry.name):
                continue
            if len(found) >= limit:
                return None
            try:
                found[entry.name] = entry.stat().st_size
            except FileNotFoundError:
                continue  # deleted since listed
        return found

    def sync(self) -> None:
        if self.durable:
            return  # every put and delete was durable when it returned
        with self._sync_lock:
            with self._lock:
                # A put still running may have linked its name already (a second put of
                # the same chunk then says "held"): it must be flushed too.
                if not self._dirty and not self._pending:
                    return
                since = min([time.time(), *self._pending.values()])
                self._dirty = False
            try:
                syncfs(self.directory)
                self._write_marker(since)
            except BaseException:
                with self._lock:
                    self._dirty = True
                raise

    def suspects(self) -> Iterator[str]:
        since = -1.0 if self.durable else self._read_marker() - MTIME_MARGIN
        found = []
        leftovers = list(self._entries())
        if self.shard:  # the marker's own temporary file, cut off by a crash
            with os.scandir(self.directory) as top:
                leftovers += [(self.directory, e) for e in top if e.is_file()]
        for parent, entry in leftovers:
            if entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(parent / entry.name)
            elif (NAME_RE.fullmatch(entry.name) and not self.durable
                  and entry.stat().st_mtime >= since):
                found.append(entry.name)
        yield from found

    # -- helpers --------------------------------------------------------------------------

    def _entries(self) -> Iterator[tuple[Path, os.DirEntry[str]]]:
        """(directory, entry) of every file an object or a partial write may be."""
        if not self.shard:
            with os.scandir(self.directory) as it:
                yield from ((self.directory, e) for e in it if e.is_file())
            return
        with os.scandir(self.directory) as top:
            shards = sorted(e.name for e in top if e.is_dir() and not e.name.startswith("."))
        for shard in shards:
            parent = self.directory / shard
            try:
                with os.scandir(parent) as it:
                    entries = [e for e in it if e.is_file()]
            except FileNotFoundError:
                continue
            yield from ((parent, e) for e in entries)

    def _write_marker(self, since: float) -> None:
        if since > self._read_marker():
            write_atomic(self.directory / MARKER, json.dumps({"since": since}).encode())

    def _read_marker(self) -> float:
        """The time before which every put is durable; 0 when unknown (all are suspects)."""
        try:
            since = json.loads((self.directory / MARKER).read_bytes())["since"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return 0.0
        return float(since) if isinstance(since, int | float) else 0.0


class LocalVaultStores:
    """`<root>/<vault>/chunks/` (sharded, synced by commit), `<root>/<vault>/points/` and
    `<root>/<vault>/meta/` (durable puts) for each vault."""

    def __init__(self, root: Path) -> None:
        self.root = root
        if not root.is_dir():
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            fsync_dir(root.parent)

    def exists(self, vault: str) -> bool:
        base = self.root / check_vault_name(vault)
        return (base / "chunks").is_dir() and (base / "points").is_dir()

    def create(self, vault: str) -> None:
        """Idempotent; a crash half-way leaves a directory `exists` denies and a retry fills."""
        base = self.root / check_vault_name(vault)
        base.mkdir(mode=0o700, exist_ok=True)
        (base / "chunks").mkdir(mode=0o700, exist_ok=True)
        (base / "points").mkdir(mode=0o700, exist_ok=True)
        (base / "meta").mkdir(mode=0o700, exist_ok=True)
        fsync_dir(base)
        fsync_dir(self.root)

    def drop(self, vault: str) -> None:
        """One rename takes the vault away (durably), then its files are removed; a crash
        in between leaves a `.drop~` directory that `sweep` removes."""
        base = self.root / check_vault_name(vault)
        trash = self.root / f"{DROP_PREFIX}{secrets.token_hex(8)}"
        try:
            os.rename(base, trash)
        except FileNotFoundError:
            return
        fsync_dir(self.root)
        shutil.rmtree(trash)

    def sweep(self) -> None:
        """At start-up: finish the drops a crash interrupted."""
        for entry in self.root.iterdir():
            if entry.name.startswith(DROP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)

    def vaults(self) -> Iterator[str]:
        for entry in sorted(self.root.iterdir()):
            if VAULT_NAME_RE.fullmatch(entry.name) and entry.name != ".." and entry.is_dir():
                yield entry.name

    def chunks(self, vault: str) -> LocalChunkStore:
        return LocalChunkStore(self.root / check_vault_name(vault) / "chunks")

    def points(self, vault: str) -> LocalChunkStore:
        return LocalChunkStore(self.root / check_vault_name(vault) / "points", shard=False,
                               durable=True)

    def meta(self, vault: str) -> LocalChunkStore:
        """`<vault>/meta/`, made here when the vault predates it (created before meta stores
        existed): `exists` does not ask for it, so such a vault stays readable."""
        base = self.root / check_vault_name(vault)
        directory = base / "meta"
        if not directory.is_dir() and base.is_dir():
            directory.mkdir(mode=0o700, exist_ok=True)
            fsync_dir(base)
        return LocalChunkStore(directory, shard=False, durable=True)
