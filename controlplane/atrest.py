"""Secrets at rest: the hypervisor passwords in the database, encrypted under a key file.

Why: the SQLite file is copied around (backups, support bundles, a `cp -r` of the state
directory); a password in it must not be readable from the copy alone. Each password is
AES-256-GCM-encrypted under a 32-byte key kept in its own file (`secrets.key`, mode 0600,
made at the first start), with the hypervisor's ARN as associated data: a ciphertext moved
to another row (another hypervisor) fails to decrypt instead of handing that hypervisor's
gateways someone else's password.

The blob is `b"v1" + nonce (12 bytes) + ciphertext-and-tag`, so a later key rotation can add
a version without guessing. The password leaves the control plane only sealed to a gateway's
X25519 key (gatewaycore.sealed); this module never sees the network.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gatewaycore.atomicfile import create_exclusive

log = logging.getLogger("controlplane.secrets")

KEY_FILE = "secrets.key"
KEY_BYTES = 32
_VERSION = b"v1"
_NONCE_BYTES = 12


class SecretKeyError(OSError):
    """The key file cannot be used; the message names the file and the fix.

    An OSError so that the CLI's start-up handler (which reports OSError as one line and
    exit status 2) covers it like an unreadable credentials file.
    """


class SecretDecryptError(ValueError):
    """A stored secret does not decrypt: another key file, another row, or altered."""


class SecretsAtRest:
    """Encrypts and decrypts small secrets bound to a name (the owner's ARN)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"the key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(key)
        self._key = key  # for derive_key only; never logged, never leaves this object

    @classmethod
    def ephemeral(cls) -> SecretsAtRest:
        """A key that lives in memory only: for an API object built without a state dir."""
        return cls(AESGCM.generate_key(bit_length=256))

    @classmethod
    def load_or_create(cls, path: Path) -> SecretsAtRest:
        """The key in `path`, made (0600, exclusively, fsynced) if the file does not exist.

        Creation writes a temporary file and hard-links it into place, so two processes
        starting at once agree on one key (the loser reads the winner's) and a crash never
        leaves a short key file.
        """
        try:
            return cls(_read_key(path))
        except FileNotFoundError:
            pass
        create_exclusive(path, AESGCM.generate_key(bit_length=256), mode=0o600)
        log.info("event=secrets_key_ready path=%s", path)
        return cls(_read_key(path))

    def encrypt(self, plaintext: str, owner: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext.encode(), owner.encode())

    def decrypt(self, blob: bytes, owner: str) -> str:
        if not blob.startswith(_VERSION) or len(blob) < len(_VERSION) + _NONCE_BYTES + 16:
            raise SecretDecryptError("not a stored secret of this version")
        nonce = blob[len(_VERSION):len(_VERSION) + _NONCE_BYTES]
        try:
            plain = self._aead.decrypt(nonce, blob[len(_VERSION) + _NONCE_BYTES:],
                                       owner.encode())
        except InvalidTag:
            raise SecretDecryptError(
                "does not decrypt with this key file for this owner (the key file was "
                "replaced, or the row was moved or altered)"
            ) from None
        return plain.decode()

    def derive_key(self, purpose: str) -> bytes:
        """32 bytes of key material for another use of the key file, one value per `purpose`
        (1-64 ASCII characters), from which neither the key nor another purpose's material
        can be computed: HKDF-SHA256 of the key with the purpose as its info. The vaults
        derive each vault's chunk key from it."""
        label = purpose.encode("ascii")
        if not 1 <= len(label) <= 64:
            raise ValueError("a key purpose is 1 to 64 ASCII characters")
        return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                    info=b"backup-gateway secrets.key\0" + label).derive(self._key)


def _read_key(path: Path) -> bytes:
    info = path.stat()  # FileNotFoundError: the caller creates it
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise SecretKeyError(
            f"secrets key file {path} is readable by others (mode {mode:04o}); run: "
            f"chmod 600 {path}"
        )
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise SecretKeyError(
            f"secrets key file {path} holds {len(key)} bytes, not {KEY_BYTES}: it is damaged; "
            "restore it from a backup (the stored hypervisor passwords need it)"
        )
    return key
