"""Backup vaults' bytes: encrypted chunks and durable manifests (docs/backups.md).

INTERFACE SKELETON set by the lead; the vault helper implements it. Callers (backupops,
the job link) rely on exactly these signatures. Every method blocks (file I/O, hashing,
encryption): callers on the event loop run them with asyncio.to_thread.

A vault's chunks sit behind chunkstore.ChunkStore (put-if-absent, get, has, delete), the
local directory by default and an S3-compatible bucket next (issue 12), so nothing here may
assume a file system beyond that interface except the local store itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gatewaycore.manifest import Manifest

ENCODINGS = ("zlib", "identity")
MAX_ENCODED_CHUNK = 4 * 1024 * 1024 + 1024


class VaultError(Exception):
    """A refusal the job link turns into its JSON error: `code` (ChecksumMismatch,
    MissingChunks, UnknownChunk, VaultMissing, StorageError), `message`, extra `fields`."""

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


class Vaults:
    """All vaults of one control plane, under `root` (the state dir's `vaults/`)."""

    def create(self, vault: str) -> None:
        """Make room for a new vault (idempotent)."""
        raise NotImplementedError

    def drop(self, vault: str) -> None:
        """Remove an empty vault's storage (the API refuses a vault with points first)."""
        raise NotImplementedError

    def missing(self, vault: str, chunk_ids: Iterable[str]) -> list[str]:
        """The ids (in the order given) the vault does not hold."""
        raise NotImplementedError

    def put_chunk(self, vault: str, chunk_id: str, encoding: str, body: bytes) -> bool:
        """Decode `body`, check its length (<= CHUNK_SIZE) and that SHA-256(plain) ==
        chunk_id (VaultError ChecksumMismatch otherwise), encrypt and store it unless the
        vault has it. True when stored now, False when it was there. Safe when two callers
        put the same chunk at once."""
        raise NotImplementedError

    def get_chunk(self, vault: str, chunk_id: str) -> tuple[str, bytes]:
        """(encoding, encoded bytes) of a stored chunk, decrypted and authenticated;
        VaultError UnknownChunk when absent, StorageError when it fails authentication."""
        raise NotImplementedError

    def commit(self, vault: str, point_id: str, manifest: Manifest) -> StoredPoint:
        """Make the recovery point durable: every chunk `manifest` names must be held
        (VaultError MissingChunks with `missing=[...]` otherwise) and durable, then the
        manifest is written atomically and durably. Only after this returns may the point
        be COMPLETED."""
        raise NotImplementedError

    def manifest(self, vault: str, point_id: str) -> Manifest:
        """A committed point's manifest; VaultError UnknownPoint when there is none."""
        raise NotImplementedError

    def delete_point(self, vault: str, point_id: str) -> None:
        """Remove a point's manifest (its chunks stay until reclaim)."""
        raise NotImplementedError

    def reclaim(self, vault: str, keep: Iterable[str]) -> tuple[int, int]:
        """Delete chunks that no committed manifest references and that are not in `keep`
        (the chunks of backups still running, which may not be committed yet); returns
        (chunks deleted, bytes freed). Safe against a backup running at the same time as
        long as the caller passes its chunks (or holds new puts for the duration)."""
        raise NotImplementedError

    def reconcile(self) -> None:
        """At start-up: repair what a crash left (partial files; chunks written after the
        last durable point that fail authentication are removed)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError
