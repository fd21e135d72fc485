"""Backup vaults' bytes: encrypted chunks and durable manifests (docs/backups.md).

INTERFACE SKELETON set by the lead; the vault helper implements it. Callers (backupops,
the job link) rely on exactly these signatures. Every method blocks (file I/O, hashing,
encryption): callers on the event loop run them with asyncio.to_thread.

A vault's chunks sit behind chunkstore.ChunkStore (put-if-absent, get, has, delete), the
local directory by default and an S3-compatible bucket next (issue 12), so nothing here may
assume a file system beyond that interface except the local store itself.

At rest a chunk is its *encoded* bytes (as the gateway sent them: a restore hands them back
without compressing again), AES-256-GCM-encrypted under a key of its own vault, in this
format (`OVERHEAD` bytes more than the encoded chunk, so the store's size says the encoded
size without a read):

    version (1 byte, 1) | encoding (1 byte: 0 identity, 1 zlib, 2 zstd) | nonce (12) | sealed

(`sealed`: the ciphertext and its tag.)

The vault's key is a random 32-byte data key kept in the vault's own `meta` store as
`key.json`, wrapped under the key ring's key-encryption key (controlplane/vaultkeys.py: the
vault master key file, or a key derived from secrets.key), so the vault's storage is
readable by a rebuilt control plane that has the settings and that key file only. The
associated data binds the header, the vault, the chunk id and the encoding. So a file
copied into another vault, renamed to another chunk, or relabelled with another encoding
fails authentication instead of restoring the wrong bytes, and a copy of the vault's
storage alone reveals nothing.

Vaults made before key.json existed used HKDF-SHA256 over key material drawn from
secrets.key (atrest.SecretsAtRest.derive_key) with the vault's storage key in `info`. They
are migrated when first opened (at start-up, by reconcile): that derived key, once checked
against a few of the vault's chunks, becomes the vault's data key and is wrapped into
key.json. Migrating rather than falling back on every open gives one code path and lets
such a vault survive the loss of secrets.key too, once a key file is configured.

The vault's index (controlplane/vaultindex.py) lives in `meta` too: `vault.json`, written
by create(), and each point's record, written by commit() before its manifest. Both are
sealed under a key derived from the data key.

Durability: a put is not fsynced; commit() syncs the chunk store (every chunk put so far
durable) before it writes the manifest, and reconcile() at start-up decrypts the chunks put
after the last sync and deletes those a power cut tore (chunkstore's docstring says why).

Reclaim against concurrent puts and commits: while a reclaim of a vault runs, every chunk
put or committed in that vault is recorded (`touched`, under the vault's lock, as are the
chunks of the commits already running when it began), and each deletion checks that record
under the same lock. A per-vault lock held for the whole reclaim would also be correct, but
would stall every backup into the vault while the references are read and the unreferenced
chunks listed; this way a put waits for one deletion at most. Either the put (or commit)
is recorded first and the chunk stays, or the deletion comes first and the put stores the
chunk again (commit then answers MissingChunks and the gateway re-sends). The record is in
memory: one control plane process serves a vault directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from controlplane.atrest import SecretsAtRest
from controlplane.chunkstore import ChunkStore, LocalVaultStores, VaultStores, check_vault_name
from controlplane.vaultindex import VAULT_OBJECT, is_point_object, point_object
from controlplane.vaultkeys import (
    KEY_OBJECT,
    KeyRing,
    RecordError,
    RecordSeal,
    VaultKeyError,
    new_data_key,
)
from gatewaycore import chunkcodec
from gatewaycore import manifest as manifests
from gatewaycore.manifest import CHUNK_ID_RE, CHUNK_SIZE, Manifest

log = logging.getLogger("controlplane.vaults")

ENCODINGS = chunkcodec.ENCODINGS  # the link accepts these (gatewaycore/chunkcodec.py)
MAX_ENCODED_CHUNK = 4 * 1024 * 1024 + 1024
MAX_LISTED_MISSING = 1000
# Chunks remembered per open vault as present (_Vault.known): 256 Ki ids (1 TiB of 4 MiB
# chunks) cost about 30 MiB; past that, the store is asked.
KNOWN_MAX = 256 * 1024
POINT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

_VERSION = 1
_ENCODING_CODES = {"identity": 0, "zlib": 1, "zstd": 2}
_ENCODING_NAMES = {code: name for name, code in _ENCODING_CODES.items()}
_HEADER = 2
_NONCE = 12
_TAG = 16
OVERHEAD = _HEADER + _NONCE + _TAG
_KEY_PURPOSE = "vaults"
_HKDF_SALT = b"backup-gateway vault chunk key"
_HKDF_INFO = b"vault chunks v1\x00"
_LEGACY_CHECKS = 8   # chunks a migrated key is tried on (one that decrypts proves it)


class VaultError(Exception):
    """A refusal the job link turns into its JSON error: `code` (ChecksumMismatch,
    MissingChunks, UnknownChunk, UnknownPoint, VaultMissing, VaultNotEmpty, StorageError),
    `message`, extra `fields`.

    ChecksumMismatch covers every body that cannot be the chunk it claims to be: an unknown
    encoding, a body that does not decode, decodes to more than CHUNK_SIZE bytes, or hashes
    to another id."""

    def __init__(self, code: str, message: str, **fields: object) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = fields


@dataclass(frozen=True)
class StoredPoint:
    """What commit() made durable: the composed manifest's sizes for the recovery point."""

    data_bytes: int        # bytes of disk data the point restores (BackupSizeInBytes)
    stored_bytes: int      # encoded bytes of its chunks in the vault (shared ones included)
    chunks: int


@dataclass
class _Vault:
    """One open vault: its stores, its key, and what a running reclaim must not delete."""

    name: str
    chunks: ChunkStore
    points: ChunkStore
    meta: ChunkStore
    aead: AESGCM
    records: RecordSeal
    lock: threading.Lock = field(default_factory=threading.Lock)
    reclaim_lock: threading.Lock = field(default_factory=threading.Lock)
    reclaiming: bool = False
    touched: set[str] = field(default_factory=set)
    committing: dict[int, frozenset[str]] = field(default_factory=dict)
    # Chunks this process put or saw in the store, with their stored size: a commit or a
    # /missing answer need not look at the store again for them (on a bucket, a HEAD each).
    # Only reclaim deletes chunks, under `lock`, and it forgets them here as it does.
    known: dict[str, int] = field(default_factory=dict)
    # True while `known` holds every chunk of the vault: its first look listed at most
    # KNOWN_MAX chunks, and since then puts have added and reclaim has forgotten. Then a
    # chunk not in it is absent, with no look at the store at all.
    whole: bool = False
    listed: bool = False
    list_lock: threading.Lock = field(default_factory=threading.Lock)
    dropped: set[str] | None = None  # while a listing runs: what reclaim deleted meanwhile

    def learn(self, sizes: dict[str, int | None]) -> None:
        """Remember the chunks `sizes` found (bounded: past KNOWN_MAX, nothing is added, and
        the map no longer holds the whole vault)."""
        with self.lock:
            for chunk_id, size in sizes.items():
                if size is None or chunk_id in self.known:
                    continue
                if len(self.known) >= KNOWN_MAX:
                    self.whole = False
                    continue
                self.known[chunk_id] = size

    def forget(self, chunk_id: str) -> None:
        """Reclaim deletes `chunk_id` (the caller holds `lock`): not known any more, and not
        to be added back by a listing that saw it before it went."""
        self.known.pop(chunk_id, None)
        if self.dropped is not None:
            self.dropped.add(chunk_id)

    def list_once(self) -> None:
        """At the vault's first look, list it (a bucket: one ListObjectsV2 per 1,000
        chunks): a vault of at most KNOWN_MAX chunks is then known whole. What reclaim
        deletes while the listing runs is left out of what it found."""
        if self.listed:
            return
        with self.list_lock:
            if self.listed:
                return
            with self.lock:
                self.dropped = set()
            try:
                found = self.chunks.listing(KNOWN_MAX)
            except BaseException:
                with self.lock:
                    self.dropped = None
                raise
            with self.lock:
                dropped, self.dropped = self.dropped or set(), None
                if found is not None:
                    for chunk_id, size in found.items():
                        if chunk_id not in dropped:
                            self.known.setdefault(chunk_id, size)
                    self.whole = len(self.known) <= KNOWN_MAX
                self.listed = True

    def sizes(self, ids: Iterable[str]) -> dict[str, int | None]:
        """The stored size of each chunk (None: absent), looking at the store only for the
        ones this process does not know, and not at all when it knows the whole vault."""
        self.list_once()
        with self.lock:
            found: dict[str, int | None] = {c: self.known.get(c) for c in ids}
            whole = self.whole
        unknown = [c for c, size in found.items() if size is None]
        if unknown and not whole:
            looked = self.chunks.sizes(unknown)
            self.learn(looked)
            found.update(looked)
        return found


@contextlib.contextmanager
def _storage(vault: str, doing: str, *, key_errors: bool = False) -> Iterator[None]:
    """An OSError becomes StorageError naming the vault (the log line has the detail); a key
    or a record that does not open says why (it names no file and no key). `key_errors`:
    a VaultKeyError goes through as it is."""
    try:
        yield
    except (VaultKeyError, RecordError) as exc:
        if key_errors and isinstance(exc, VaultKeyError):
            raise
        log.warning("event=vault_key_error vault=%s doing=%s error=%s", vault, doing, exc)
        raise VaultError("StorageError", str(exc)) from None
    except OSError as exc:
        log.warning("event=vault_storage_error vault=%s doing=%s error=%s", vault, doing, exc)
        reason = exc.strerror or type(exc).__name__
        raise VaultError("StorageError", f"vault {vault}: could not {doing}: {reason}") from None


class Vaults:
    """All vaults of one control plane, under `root` (the state dir's `vaults/`)."""

    def __init__(self, root: Path, secrets: SecretsAtRest | None, *,
                 stores: VaultStores | None = None, keyring: KeyRing | None = None) -> None:
        """`stores`: where the vaults' objects live; the local directory `root` by default.
        `keyring`: the key-encryption key of the vaults' data keys; by default one derived
        from `secrets`. `secrets` also gives the keys of vaults made before key.json (None:
        such vaults cannot be opened, as in a rebuild without the old secrets.key)."""
        self.root = root
        self._stores: VaultStores = stores if stores is not None else LocalVaultStores(root)
        self._key_material = secrets.derive_key(_KEY_PURPOSE) if secrets is not None else None
        if keyring is None:
            if secrets is None:
                raise ValueError("Vaults needs a key ring or the secrets key to derive one")
            keyring = KeyRing.from_secrets(secrets)
        self.keyring = keyring
        self._lock = threading.Lock()
        self._open_vaults: dict[str, _Vault] = {}
        self._tokens = itertools.count()

    # -- vaults ---------------------------------------------------------------------------

    def create(self, vault: str, record: dict[str, Any] | None = None) -> None:
        """Make room for a new vault (idempotent): its storage, its data key (key.json) and,
        given its `record` (vaultindex.vault_record), its vault.json, all durable when this
        returns."""
        check_vault_name(vault)
        with _storage(vault, "create the vault"):
            self._stores.create(vault)
            meta = self._stores.meta(vault)
            if meta.put_if_absent(KEY_OBJECT, self.keyring.wrap(vault, new_data_key())):
                log.info("event=vault_key_created vault=%s kek=%s", vault, self.keyring.key_id)
            key = self.keyring.unwrap(vault, meta.get(KEY_OBJECT))
            if record is not None:
                _write_record(RecordSeal(vault, key), meta, VAULT_OBJECT, record)

    def drop(self, vault: str) -> None:
        """Remove an empty vault's storage (the API refuses a vault with points first)."""
        check_vault_name(vault)
        with _storage(vault, "drop the vault"):
            if not self._stores.exists(vault):
                return
            if any(True for _ in self._stores.points(vault).names()):
                raise VaultError("VaultNotEmpty", f"vault {vault} still holds recovery points")
            with self._lock:
                self._open_vaults.pop(vault, None)
            # First, so that a drop cut short (a bucket's objects go one by one) leaves a
            # vault a rebuild does not bring back.
            self._stores.meta(vault).delete(VAULT_OBJECT)
            self._stores.drop(vault)

    def _open(self, vault: str, *, key_errors: bool = False) -> _Vault:
        """The open vault; its data key is read (and a vault made before key.json migrated)
        on the first open. `key_errors`: let VaultKeyError through (start-up refuses a wrong
        key file) instead of answering StorageError."""
        try:
            check_vault_name(vault)
        except ValueError:
            raise VaultError("VaultMissing", f"there is no vault {vault!r}") from None
        with self._lock:
            opened = self._open_vaults.get(vault)
        if opened is not None:
            # Open already: a drop goes through this object and forgets it, so no look at
            # the store (on a bucket, a round trip per chunk) is needed to know it is there.
            return opened
        with _storage(vault, "open the vault"):
            exists = self._stores.exists(vault)
        if not exists:
            raise VaultError("VaultMissing", f"vault {vault} has no storage (never "
                             "created, or dropped)")
        with _storage(vault, "open the vault", key_errors=key_errors):
            key = self._data_key(vault)
        made = _Vault(vault, self._stores.chunks(vault), self._stores.points(vault),
                      self._stores.meta(vault), AESGCM(key), RecordSeal(vault, key))
        with self._lock:  # the key is read outside the lock: a bucket may be slow
            return self._open_vaults.setdefault(vault, made)

    def _data_key(self, vault: str) -> bytes:
        """The vault's data key from key.json (VaultKeyError when it does not unwrap)."""
        meta = self._stores.meta(vault)
        try:
            raw = meta.get(KEY_OBJECT)
        except KeyError:
            return self._migrate_key(vault)
        return self.keyring.unwrap(vault, raw)

    def _migrate_key(self, vault: str) -> bytes:
        """A vault made before key.json: its key derived from secrets.key, checked on a few
        of its chunks (a replaced secrets.key must not be wrapped as if it were right),
        becomes its data key in key.json."""
        if self._key_material is None:
            raise VaultKeyError(f"vault {vault} has no {KEY_OBJECT} and no secrets.key is "
                                "given to derive the key of a vault made before key.json")
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT,
                   info=_HKDF_INFO + vault.encode()).derive(self._key_material)
        trial = _Vault(vault, self._stores.chunks(vault), self._stores.points(vault),
                       self._stores.meta(vault), AESGCM(key), RecordSeal(vault, key))
        tried = opened = 0
        for chunk_id in trial.chunks.names():
            if tried >= _LEGACY_CHECKS or opened:
                break
            if not CHUNK_ID_RE.fullmatch(chunk_id):
                continue
            tried += 1
            with contextlib.suppress(KeyError, VaultError):
                _unseal(trial, chunk_id, trial.chunks.get(chunk_id))
                opened += 1
        if tried and not opened:
            raise VaultKeyError(
                f"vault {vault} has no {KEY_OBJECT} and none of {tried} of its chunks "
                "decrypts with the key derived from secrets.key: it is not the secrets.key "
                "this vault was written with")
        self._stores.create(vault)  # idempotent: the meta store of a vault made before it
        if not trial.meta.put_if_absent(KEY_OBJECT, self.keyring.wrap(vault, key)):
            return self.keyring.unwrap(vault, trial.meta.get(KEY_OBJECT))  # another won
        log.info("event=vault_key_migrated vault=%s kek=%s checked_chunks=%d", vault,
                 self.keyring.key_id, tried)
        return key

    # -- chunks ---------------------------------------------------------------------------

    def missing(self, vault: str, chunk_ids: Iterable[str]) -> list[str]:
        """The ids (in the order given) the vault does not hold."""
        v = self._open(vault)
        ids = list(chunk_ids)
        with _storage(vault, "look up chunks"):
            held = v.sizes(c for c in ids if CHUNK_ID_RE.fullmatch(c))
        return [c for c in ids if held.get(c) is None]

    def put_chunk(self, vault: str, chunk_id: str, encoding: str, body: bytes) -> bool:
        """Decode `body`, check its length (<= CHUNK_SIZE) and that SHA-256(plain) ==
        chunk_id (VaultError ChecksumMismatch otherwise), encrypt and store it unless the
        vault has it. True when stored now, False when it was there. Safe when two callers
        put the same chunk at once."""
        v = self._open(vault)
        view = memoryview(body)
        _verify(chunk_id, encoding, view)
        with v.lock:
            if v.reclaiming:
                v.touched.add(chunk_id)
        with _storage(vault, f"store chunk {chunk_id}"):
            # No look first: a gateway sends only what `missing` just called absent, and on
            # an object store a look is one more round trip per chunk.
            blob = self._seal(v, chunk_id, encoding, view)
            stored = v.chunks.put_if_absent(chunk_id, blob)
            # Stored now, or found there (another control plane put it): known either way,
            # so a commit of a vault known whole counts it.
            v.learn({chunk_id: len(blob)} if stored else v.chunks.sizes([chunk_id]))
        return stored

    def get_chunk(self, vault: str, chunk_id: str) -> tuple[str, bytes]:
        """(encoding, encoded bytes) of a stored chunk, decrypted and authenticated;
        VaultError UnknownChunk when absent, StorageError when it fails authentication."""
        v = self._open(vault)
        if not CHUNK_ID_RE.fullmatch(chunk_id):
            raise VaultError("UnknownChunk", f"vault {vault} holds no chunk {chunk_id!r}")
        try:
            with _storage(vault, f"read chunk {chunk_id}"):
                blob = v.chunks.get(chunk_id)
        except KeyError:
            raise VaultError("UnknownChunk", f"vault {vault} holds no chunk {chunk_id}") from None
        return _unseal(v, chunk_id, blob)

    @staticmethod
    def _seal(v: _Vault, chunk_id: str, encoding: str, encoded: memoryview) -> bytearray:
        """The at-rest form of a checked chunk, built in one buffer (no copy of the body)."""
        header = bytes((_VERSION, _ENCODING_CODES[encoding]))
        nonce = os.urandom(_NONCE)
        blob = bytearray(OVERHEAD + encoded.nbytes)
        blob[:_HEADER] = header
        blob[_HEADER:_HEADER + _NONCE] = nonce
        v.aead.encrypt_into(nonce, encoded, _aad(header, v.name, chunk_id, encoding),
                            memoryview(blob)[_HEADER + _NONCE:])
        return blob

    # -- recovery points ------------------------------------------------------------------

    def commit(self, vault: str, point_id: str, manifest: Manifest,
               record: dict[str, Any] | None = None) -> StoredPoint:
        """Make the recovery point durable: every chunk `manifest` names must be held
        (VaultError MissingChunks with `missing=[...]` otherwise) and durable, then its
        `record` (vaultindex.point_record: what a rebuild needs), then the manifest, each
        written atomically and durably. Only after this returns may the point be
        COMPLETED."""
        v = self._open(vault)
        name = _point_object(point_id)
        ids = frozenset(manifest.chunks())
        token = next(self._tokens)
        with v.lock:
            v.committing[token] = ids  # a reclaim beginning now keeps these
            if v.reclaiming:
                v.touched |= ids
        try:
            with _storage(vault, f"commit recovery point {point_id}"):
                sizes = v.sizes(ids)
                missing = sorted(c for c, size in sizes.items() if size is None)
                if missing:
                    raise VaultError(
                        "MissingChunks",
                        f"vault {vault} lacks {len(missing)} of the {len(ids)} chunks the "
                        f"manifest of {point_id} names; send them and complete again",
                        missing=missing[:MAX_LISTED_MISSING])
                v.chunks.sync()
                if record is not None:  # before the manifest: no manifest lacks its record
                    _write_record(v.records, v.meta, point_object(point_id), record)
                data = json.dumps(manifest.to_json(), separators=(",", ":")).encode()
                self._write_point(v, name, data)
        finally:
            with v.lock:
                del v.committing[token]
        stored = sum(size - OVERHEAD for size in sizes.values() if size is not None)
        data_bytes = sum(d.data_bytes() for d in manifest.disks)
        log.info("event=vault_point_committed vault=%s point=%s chunks=%d data_bytes=%d "
                 "stored_bytes=%d", vault, point_id, len(ids), data_bytes, stored)
        return StoredPoint(data_bytes=data_bytes, stored_bytes=stored, chunks=len(ids))

    @staticmethod
    def _write_point(v: _Vault, name: str, data: bytes) -> None:
        """Write a manifest; a commit repeated (the link retried `complete`) with the same
        manifest is a no-op, with another one replaces it (the point was not COMPLETED)."""
        if v.points.put_if_absent(name, data):
            return
        with contextlib.suppress(KeyError):
            if v.points.get(name) == data:
                return
        log.warning("event=vault_point_replaced vault=%s object=%s", v.name, name)
        v.points.delete(name)
        if not v.points.put_if_absent(name, data):
            raise OSError(0, "another commit of the same point ran at the same time")

    def manifest(self, vault: str, point_id: str) -> Manifest:
        """A committed point's manifest; VaultError UnknownPoint when there is none."""
        v = self._open(vault)
        unknown = VaultError("UnknownPoint", f"vault {vault} holds no recovery point "
                             f"{point_id!r}")
        if not POINT_ID_RE.fullmatch(point_id):
            raise unknown
        try:
            with _storage(vault, f"read recovery point {point_id}"):
                raw = v.points.get(_point_object(point_id))
        except KeyError:
            raise unknown from None
        return _parse_point(vault, point_id, raw)

    def delete_point(self, vault: str, point_id: str) -> None:
        """Remove a point's manifest, then its record (its chunks stay until reclaim). A
        record left alone by a crash in between is not a point: a rebuild skips it."""
        v = self._open(vault)
        if not POINT_ID_RE.fullmatch(point_id):
            return
        with _storage(vault, f"delete recovery point {point_id}"):
            v.points.delete(_point_object(point_id))
            v.meta.delete(point_object(point_id))

    # -- the vault's index (vaultindex.py) -------------------------------------------------

    def check_key(self, vault: str) -> None:
        """Open the vault's data key now: VaultKeyError when key.json does not unwrap with
        the key ring (or is missing and cannot be migrated), VaultError when the vault has
        no storage."""
        self._open(vault, key_errors=True)

    def has_key_object(self, vault: str) -> bool:
        """Whether the vault holds key.json (vaults made before it do not, until opened)."""
        with _storage(vault, "look up key.json"):
            return self._stores.meta(check_vault_name(vault)).has(KEY_OBJECT)

    def record(self, vault: str, name: str) -> dict[str, Any] | None:
        """A sealed record of the vault's index, opened; None when absent; VaultError
        StorageError when it does not open (altered, or another vault's)."""
        v = self._open(vault)
        with _storage(vault, f"read {name}"):
            try:
                blob = v.meta.get(name)
            except KeyError:
                return None
            return v.records.open(name, blob)

    def point_record_names(self, vault: str) -> list[str]:
        """The names of the vault's point records (vaultindex.point_object)."""
        v = self._open(vault)
        with _storage(vault, "list the point records"):
            return sorted(n for n in v.meta.names() if is_point_object(n))

    def storages(self) -> list[str]:
        """The storage keys of every vault in the stores."""
        with _storage("*", "list the vaults"):
            return list(self._stores.vaults())

    def reclaim(self, vault: str, keep: Iterable[str]) -> tuple[int, int]:
        """Delete chunks that no committed manifest references and that are not in `keep`
        (the chunks of backups still running, which may not be committed yet); returns
        (chunks deleted, bytes freed). Safe against a backup running at the same time as
        long as the caller passes its chunks (or holds new puts for the duration).

        Bytes freed are encoded bytes, the unit of StoredPoint.stored_bytes. A manifest
        that cannot be read stops the reclaim (StorageError) before anything is deleted:
        its chunks would look unreferenced. Chunks put or committed while this runs stay
        (see the module's docstring)."""
        v = self._open(vault)
        keep_set = set(keep)
        with v.reclaim_lock:
            with v.lock:
                v.reclaiming = True
                v.touched = set().union(*v.committing.values())
            try:
                with _storage(vault, "reclaim chunks"):
                    referenced = self._referenced(v)
                    candidates = [c for c in v.chunks.names() if CHUNK_ID_RE.fullmatch(c)
                                  and c not in referenced and c not in keep_set]
                    count = freed = 0
                    for chunk_id in candidates:
                        with v.lock:
                            if chunk_id in v.touched:
                                continue
                            size = v.known.get(chunk_id)
                            if size is None:
                                size = v.chunks.size(chunk_id)
                            if size is None:
                                continue
                            v.forget(chunk_id)
                            v.chunks.delete(chunk_id)
                        count += 1
                        freed += size - OVERHEAD
            finally:
                with v.lock:
                    v.reclaiming = False
                    v.touched = set()
        log.info("event=vault_reclaimed vault=%s chunks=%d bytes=%d", vault, count, freed)
        return count, freed

    def _referenced(self, v: _Vault) -> set[str]:
        out: set[str] = set()
        for name in v.points.names():
            if not name.endswith(".json"):
                continue
            point_id = name.removesuffix(".json")
            try:
                raw = v.points.get(name)
            except KeyError:
                continue  # deleted since listed: its chunks are no longer referenced
            out |= _parse_point(v.name, point_id, raw).chunks()
        return out

    # -- life cycle -----------------------------------------------------------------------

    def reconcile(self) -> None:
        """At start-up: repair what a crash left (partial files; chunks written after the
        last durable point that fail authentication are removed)."""
        self._stores.sweep()
        for vault in self._stores.vaults():
            try:
                # A key that does not unwrap stops the start (the CLI says why): serving
                # would fail every backup and restore of the vault.
                v = self._open(vault, key_errors=True)
            except VaultError:
                continue  # a creation a crash cut short: create() finishes it
            with _storage(vault, "check chunks at start-up"):
                checked = removed = 0
                for chunk_id in list(v.chunks.suspects()):
                    if not CHUNK_ID_RE.fullmatch(chunk_id):
                        continue
                    checked += 1
                    try:
                        _unseal(v, chunk_id, v.chunks.get(chunk_id))
                    except KeyError:
                        continue
                    except VaultError:
                        with v.lock:
                            v.forget(chunk_id)
                        v.chunks.delete(chunk_id)
                        removed += 1
                        log.warning("event=vault_chunk_removed vault=%s chunk=%s "
                                    "reason=torn_or_altered", vault, chunk_id)
                # The survivors may sit in the page cache only (a process crash): flush them
                # and move the marker past them, so the next start-up checks fewer.
                v.chunks.sync()
                for name in v.points.suspects():
                    log.warning("event=vault_point_suspect vault=%s object=%s", vault, name)
            log.info("event=vault_reconciled vault=%s checked=%d removed=%d", vault, checked,
                     removed)

    def close(self) -> None:
        """Sync what was put since the last commit (so the next start-up has less to check)
        and forget the open vaults."""
        with self._lock:
            opened = list(self._open_vaults.values())
            self._open_vaults.clear()
        for v in opened:
            with _storage(v.name, "sync chunks"):
                v.chunks.sync()


# -- the at-rest format and the manifests ----------------------------------------------------


def _verify(chunk_id: str, encoding: str, body: memoryview) -> None:
    """Refuse (ChecksumMismatch) a body that is not the chunk `chunk_id`. Decompresses only
    to hash: the encoded bytes are what is kept, and at most CHUNK_SIZE + 1 bytes are ever
    inflated, whatever the body claims (a bomb stops there: gatewaycore.chunkcodec)."""
    def refuse(why: str) -> VaultError:
        return VaultError("ChecksumMismatch", f"chunk {chunk_id}: {why}")

    if not CHUNK_ID_RE.fullmatch(chunk_id):
        raise refuse("a chunk id is 64 lowercase hex digits, the SHA-256 of its bytes")
    if encoding not in ENCODINGS:
        raise refuse(f"unknown encoding {encoding!r} ({', '.join(ENCODINGS)})")
    if body.nbytes > MAX_ENCODED_CHUNK:
        raise refuse(f"the body has {body.nbytes} bytes, more than {MAX_ENCODED_CHUNK}")
    try:
        plain = chunkcodec.decode(encoding, body, CHUNK_SIZE)
    except chunkcodec.CodecError as exc:
        raise refuse(str(exc)) from None
    digest = hashlib.sha256(plain).hexdigest()
    if digest != chunk_id:
        raise refuse(f"the SHA-256 of its {len(plain)} decoded bytes is {digest}")


def _aad(header: bytes, vault: str, chunk_id: str, encoding: str) -> bytes:
    return b"%s%s\x00%s\x00%s" % (header, vault.encode(), chunk_id.encode(), encoding.encode())


def _unseal(v: _Vault, chunk_id: str, blob: bytes) -> tuple[str, bytes]:
    """(encoding, encoded bytes) of a stored chunk; StorageError when it is not authentic."""
    def damaged(why: str) -> VaultError:
        return VaultError("StorageError", f"vault {v.name}: chunk {chunk_id} {why}")

    if len(blob) < OVERHEAD or blob[0] != _VERSION:
        raise damaged("is damaged (too short, or not a stored chunk of this version)")
    encoding = _ENCODING_NAMES.get(blob[1])
    if encoding is None:
        raise damaged("is damaged (unknown encoding byte)")
    view = memoryview(blob)
    try:
        plain = v.aead.decrypt(view[_HEADER:_HEADER + _NONCE], view[_HEADER + _NONCE:],
                               _aad(bytes(view[:_HEADER]), v.name, chunk_id, encoding))
    except InvalidTag:
        raise damaged("fails authentication: altered, truncated, or not this vault's") from None
    return encoding, plain


def _write_record(seal: RecordSeal, meta: ChunkStore, name: str, record: dict[str, Any]
                  ) -> None:
    """Write a sealed record durably; the same record again is a no-op, another one
    replaces it (a point completed again, a create retried)."""
    if meta.put_if_absent(name, seal.seal(name, record)):
        return
    with contextlib.suppress(KeyError, RecordError):
        if seal.open(name, meta.get(name)) == json.loads(json.dumps(record)):
            return
    meta.delete(name)
    if not meta.put_if_absent(name, seal.seal(name, record)):
        raise OSError(0, f"another writer of {name} ran at the same time")


def _point_object(point_id: str) -> str:
    if not POINT_ID_RE.fullmatch(point_id):
        raise ValueError(f"{point_id!r} is not a recovery point id (1-128 of A-Z a-z 0-9 . _ -"
                         " starting with a letter or digit)")
    return f"{point_id}.json"


def _parse_point(vault: str, point_id: str, raw: bytes) -> Manifest:
    try:
        return manifests.parse(json.loads(raw))
    except (ValueError, RecursionError) as exc:  # ManifestError and JSON errors included
        raise VaultError("StorageError", f"vault {vault}: the manifest of recovery point "
                         f"{point_id} is unreadable ({exc})") from None
