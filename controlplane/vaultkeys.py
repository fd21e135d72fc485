"""Vault keys that survive the loss of the control plane's disk.

Why: a vault's chunks are encrypted under a key of that vault. Derived from the control
plane's `secrets.key` (as they were at first), the bytes of a bucket die with the control
plane's disk even though the bucket itself survives. So each vault has a random 32-byte
*data key*, kept in the vault's own storage (its `meta` store, object `key.json`), wrapped
(AES-256-GCM, associated data = the vault's storage key) under a *key-encryption key*:

- with an S3 bucket, the operator's master key file (settings `key_file`: 32 random bytes,
  made 0600 on the first start, of which the operator keeps a copy off this machine), so a
  rebuilt control plane holding only the settings file and that key file reads the bucket;
- with the local directory, that key file when the settings name one, else a key derived
  from `secrets.key` (purpose "vault-kek") — one code path for both backends.

`key.json` says which key-encryption key wrapped it (`kekId`, a keyed hash that reveals
nothing of the key), so the wrong key file is refused by name instead of failing later on
every chunk. The vault's small records (vault.json, its recovery points' records) are
sealed under a key derived from the data key, so the bucket alone neither shows nor lets
anyone alter what a rebuild would import.

Nothing here logs or returns a key; errors name files and vaults only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from controlplane.atrest import SecretsAtRest
from gatewaycore.atomicfile import create_exclusive

log = logging.getLogger("controlplane.vaultkeys")

KEY_OBJECT = "key.json"
KEY_BYTES = 32
KEK_PURPOSE = "vault-kek"
_FORMAT = 1
_ALGORITHM = "AES-256-GCM"
_NONCE = 12
_KEK_ID_LABEL = b"backup-gateway vault kek id v1"
_RECORDS_INFO = b"backup-gateway vault records v1"
_RECORD_VERSION = b"r1"


class VaultKeyError(OSError):
    """A vault's key cannot be had: key.json does not unwrap with the configured key, is
    damaged, or the key file is unusable. An OSError so that the CLI's start-up handler
    reports it as one line with exit status 2, like an unusable secrets.key."""


class RecordError(ValueError):
    """A sealed record does not open: altered, moved from another name or vault, or
    written under another data key."""


class KeyRing:
    """The key-encryption key of this control plane's vaults and where it comes from.

    `source` names it for error messages ("key file /etc/cp/master.key"); the key itself
    never leaves this object."""

    def __init__(self, kek: bytes, source: str) -> None:
        if len(kek) != KEY_BYTES:
            raise ValueError(f"a key-encryption key is {KEY_BYTES} bytes")
        self._aead = AESGCM(kek)
        self.source = source
        self.key_id = hmac.new(kek, _KEK_ID_LABEL, hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:  # never the key
        return f"KeyRing(source={self.source!r}, key_id={self.key_id})"

    @classmethod
    def from_secrets(cls, secrets: SecretsAtRest) -> KeyRing:
        """The local backend's default: derived from the state dir's secrets.key."""
        return cls(secrets.derive_key(KEK_PURPOSE), "the state directory's secrets.key")

    @classmethod
    def from_key_file(cls, path: Path, *, create: bool) -> KeyRing:
        """The master key in `path`; made (32 random bytes, 0600, exclusively) when it does
        not exist and `create` (a control plane's start), refused otherwise (a rebuild must
        use the key the bucket was written with, not a new one)."""
        if create and not path.exists() and create_exclusive(path, os.urandom(KEY_BYTES),
                                                             mode=0o600):
            log.warning("event=vault_master_key_created path=%s note=keep_a_copy_off_this"
                            "_machine_without_it_the_vaults_cannot_be_read", path)
        return cls(read_key_file(path), f"key file {path}")

    def wrap(self, vault: str, data_key: bytes) -> bytes:
        """key.json's bytes: `data_key` wrapped for the vault whose storage key is `vault`."""
        nonce = os.urandom(_NONCE)
        doc = {"format": _FORMAT, "algorithm": _ALGORITHM, "kekId": self.key_id,
               "nonce": _b64(nonce),
               "wrappedKey": _b64(self._aead.encrypt(nonce, data_key, vault.encode()))}
        return json.dumps(doc, separators=(",", ":")).encode()

    def unwrap(self, vault: str, raw: bytes) -> bytes:
        """The data key in key.json's bytes; VaultKeyError naming the vault and the key."""
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != _FORMAT or doc.get(
                    "algorithm") != _ALGORITHM:
                raise ValueError("not a key.json of format 1 / AES-256-GCM")
            kek_id = str(doc.get("kekId", ""))
            nonce = base64.b64decode(doc["nonce"], validate=True)
            wrapped = base64.b64decode(doc["wrappedKey"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise VaultKeyError(f"vault {vault}: {KEY_OBJECT} is damaged ({exc})") from None
        if kek_id and kek_id != self.key_id:
            raise VaultKeyError(
                f"vault {vault}: {KEY_OBJECT} was wrapped under another key (key id {kek_id}) "
                f"than {self.source} (key id {self.key_id}); configure the key file this "
                "vault was written with")
        try:
            key = self._aead.decrypt(nonce, wrapped, vault.encode())
        except InvalidTag:
            raise VaultKeyError(
                f"vault {vault}: {KEY_OBJECT} does not unwrap with {self.source}: another "
                "key, or the object was altered or moved from another vault") from None
        if len(key) != KEY_BYTES:
            raise VaultKeyError(f"vault {vault}: {KEY_OBJECT} holds a key of {len(key)} "
                                f"bytes, not {KEY_BYTES}")
        return key


def read_key_file(path: Path) -> bytes:
    """A 32-byte key file readable by its owner only; VaultKeyError saying what to fix."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise VaultKeyError(f"key_file {path} does not exist: restore the copy of the vault "
                            "master key kept off this machine") from None
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise VaultKeyError(f"key_file {path} is readable by others (mode {mode:04o}); run: "
                            f"chmod 600 {path}")
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise VaultKeyError(f"key_file {path} holds {len(key)} bytes, not {KEY_BYTES}: it is "
                            "not a vault master key (or it is damaged)")
    return key


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=KEY_BYTES * 8)


class RecordSeal:
    """Seals a vault's small JSON records under a key derived from its data key, bound to
    the vault and the object's name: `r1 | nonce (12) | ciphertext+tag`."""

    def __init__(self, vault: str, data_key: bytes) -> None:
        self.vault = vault
        key = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                   info=_RECORDS_INFO).derive(data_key)
        self._aead = AESGCM(key)

    def _aad(self, name: str) -> bytes:
        return b"%s\x00%s" % (self.vault.encode(), name.encode())

    def seal(self, name: str, record: dict[str, Any]) -> bytes:
        nonce = os.urandom(_NONCE)
        plain = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
        return _RECORD_VERSION + nonce + self._aead.encrypt(nonce, plain, self._aad(name))

    def open(self, name: str, blob: bytes) -> dict[str, Any]:
        head = len(_RECORD_VERSION)
        if not blob.startswith(_RECORD_VERSION) or len(blob) < head + _NONCE + 16:
            raise RecordError(f"vault {self.vault}: {name} is not a sealed record")
        try:
            plain = self._aead.decrypt(blob[head:head + _NONCE], blob[head + _NONCE:],
                                       self._aad(name))
        except InvalidTag:
            raise RecordError(f"vault {self.vault}: {name} fails authentication (altered, "
                              "or not this vault's)") from None
        try:
            doc = json.loads(plain)
        except ValueError as exc:
            raise RecordError(f"vault {self.vault}: {name} is not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise RecordError(f"vault {self.vault}: {name} is not a JSON object")
        return doc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
