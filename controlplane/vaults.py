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

    version (1 byte, 1) | encoding (1 byte: 0 identity, 1 zlib) | nonce (12) | ciphertext+tag

The vault's key is HKDF-SHA256 over key material drawn from the control plane's secrets key
(atrest.SecretsAtRest.derive_key) with the vault's name in `info`; the associated data binds
the header, the vault, the chunk id and the encoding. So a file copied into another vault,
renamed to another chunk, or relabelled with another encoding fails authentication instead
of restoring the wrong bytes, and a copy of the vault directory alone reveals nothing.

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
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from controlplane.atrest import SecretsAtRest
from controlplane.chunkstore import ChunkStore, LocalVaultStores, VaultStores, check_vault_name
from gatewaycore import manifest as manifests
from gatewaycore.manifest import CHUNK_ID_RE, CHUNK_SIZE, Manifest

log = logging.getLogger("controlplane.vaults")

ENCODINGS = ("zlib", "identity")
MAX_ENCODED_CHUNK = 4 * 1024 * 1024 + 1024
MAX_LISTED_MISSING = 1000
POINT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

_VERSION = 1
_ENCODING_CODES = {"identity": 0, "zlib": 1}
_ENCODING_NAMES = {code: name for name, code in _ENCODING_CODES.items()}
_HEADER = 2
_NONCE = 12
_TAG = 16
OVERHEAD = _HEADER + _NONCE + _TAG
_KEY_PURPOSE = "vaults"
_HKDF_SALT = b"backup-gateway vault chunk key"
_HKDF_INFO = b"vault chunks v1\x00"


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
    aead: AESGCM
    lock: threading.Lock = field(default_factory=threading.Lock)
    reclaim_lock: threading.Lock = field(default_factory=threading.Lock)
    reclaiming: bool = False
    touched: set[str] = field(default_factory=set)
    committing: dict[int, frozenset[str]] = field(default_factory=dict)


@contextlib.contextmanager
def _storage(vault: str, doing: str) -> Iterator[None]:
    """An OSError becomes StorageError naming the vault (the log line has the detail)."""
    try:
        yield
    except OSError as exc:
        log.warning("event=vault_storage_error vault=%s doing=%s error=%s", vault, doing, exc)
        reason = exc.strerror or type(exc).__name__
        raise VaultError("StorageError", f"vault {vault}: could not {doing}: {reason}") from None


class Vaults:
    """All vaults of one control plane, under `root` (the state dir's `vaults/`)."""

    def __init__(self, root: Path, secrets: SecretsAtRest, *,
                 stores: VaultStores | None = None) -> None:
        """`stores`: where the vaults' objects live; the local directory `root` by default."""
        self.root = root
        self._stores: VaultStores = stores if stores is not None else LocalVaultStores(root)
        self._key_material = secrets.derive_key(_KEY_PURPOSE)
        self._lock = threading.Lock()
        self._open_vaults: dict[str, _Vault] = {}
        self._tokens = itertools.count()

    # -- vaults ---------------------------------------------------------------------------

    def create(self, vault: str) -> None:
        """Make room for a new vault (idempotent)."""
        check_vault_name(vault)
        with _storage(vault, "create the vault"):
            self._stores.create(vault)

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
            self._stores.drop(vault)

    def _open(self, vault: str) -> _Vault:
        try:
            check_vault_name(vault)
        except ValueError:
            raise VaultError("VaultMissing", f"there is no vault {vault!r}") from None
        with _storage(vault, "open the vault"):
            exists = self._stores.exists(vault)
        with self._lock:
            if not exists:
                self._open_vaults.pop(vault, None)
                raise VaultError("VaultMissing", f"vault {vault} has no storage (never "
                                 "created, or dropped)")
            opened = self._open_vaults.get(vault)
            if opened is None:
                opened = _Vault(vault, self._stores.chunks(vault), self._stores.points(vault),
                                AESGCM(self._vault_key(vault)))
                self._open_vaults[vault] = opened
            return opened

    def _vault_key(self, vault: str) -> bytes:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT,
                    info=_HKDF_INFO + vault.encode())
        return hkdf.derive(self._key_material)

    # -- chunks ---------------------------------------------------------------------------

    def missing(self, vault: str, chunk_ids: Iterable[str]) -> list[str]:
        """The ids (in the order given) the vault does not hold."""
        v = self._open(vault)
        with _storage(vault, "look up chunks"):
            return [c for c in chunk_ids if not (CHUNK_ID_RE.fullmatch(c) and v.chunks.has(c))]

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
            if v.chunks.has(chunk_id):
                return False  # the usual case of a repeated backup: no encryption needed
            return v.chunks.put_if_absent(chunk_id, self._seal(v, chunk_id, encoding, view))

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

    def commit(self, vault: str, point_id: str, manifest: Manifest) -> StoredPoint:
        """Make the recovery point durable: every chunk `manifest` names must be held
        (VaultError MissingChunks with `missing=[...]` otherwise) and durable, then the
        manifest is written atomically and durably. Only after this returns may the point
        be COMPLETED."""
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
                sizes = {c: v.chunks.size(c) for c in ids}
                missing = sorted(c for c, size in sizes.items() if size is None)
                if missing:
                    raise VaultError(
                        "MissingChunks",
                        f"vault {vault} lacks {len(missing)} of the {len(ids)} chunks the "
                        f"manifest of {point_id} names; send them and complete again",
                        missing=missing[:MAX_LISTED_MISSING])
                v.chunks.sync()
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
        """Remove a point's manifest (its chunks stay until reclaim)."""
        v = self._open(vault)
        if not POINT_ID_RE.fullmatch(point_id):
            return
        with _storage(vault, f"delete recovery point {point_id}"):
            v.points.delete(_point_object(point_id))

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
                            size = v.chunks.size(chunk_id)
                            if size is None:
                                continue
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
                v = self._open(vault)
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
    inflated, whatever the body claims (a zlib bomb stops there)."""
    def refuse(why: str) -> VaultError:
        return VaultError("ChecksumMismatch", f"chunk {chunk_id}: {why}")

    if not CHUNK_ID_RE.fullmatch(chunk_id):
        raise refuse("a chunk id is 64 lowercase hex digits, the SHA-256 of its bytes")
    if encoding not in ENCODINGS:
        raise refuse(f"unknown encoding {encoding!r} (zlib or identity)")
    if body.nbytes > MAX_ENCODED_CHUNK:
        raise refuse(f"the body has {body.nbytes} bytes, more than {MAX_ENCODED_CHUNK}")
    plain: bytes | memoryview = body
    if encoding == "zlib":
        inflater = zlib.decompressobj()
        try:
            plain = inflater.decompress(body, CHUNK_SIZE + 1)
        except zlib.error as exc:
            raise refuse(f"the body is not zlib data ({exc})") from None
        if len(plain) > CHUNK_SIZE:
            raise refuse(f"the body inflates to more than {CHUNK_SIZE} bytes")
        if not inflater.eof or inflater.unused_data:
            raise refuse("the body is not one complete zlib stream")
    elif body.nbytes > CHUNK_SIZE:
        raise refuse(f"the body has more than {CHUNK_SIZE} bytes")
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
