"""The gateway's identity: an Ed25519 key pair created on first start and reused after.

The private key never leaves the state directory (mode 0600, owned by the daemon's user);
the control plane only ever sees the public key, to which it binds activation keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from gatewaycore import linkproto
from gatewaycore.atomicfile import create_exclusive

KEY_FILE = "identity.pem"


class IdentityError(Exception):
    """The key file exists but cannot be used; the message names the file."""


@dataclass(frozen=True)
class Identity:
    private_key: Ed25519PrivateKey

    @property
    def public_raw(self) -> bytes:
        return linkproto.public_key_bytes(self.private_key.public_key())

    @property
    def key_id(self) -> str:
        return linkproto.key_id(self.public_raw)

    @property
    def public_b64(self) -> str:
        return linkproto.encode_public_key(self.public_raw)

    def sign(self, method: str, path_qs: str, content_sha256: str) -> dict[str, str]:
        return linkproto.sign(self.private_key, method, path_qs, content_sha256)


def load_or_create(state_dir: Path) -> tuple[Identity, bool]:
    """The identity kept in `state_dir`, created the first time; and whether it is new."""
    path = state_dir / KEY_FILE
    created = False
    try:
        if not path.exists():
            new = Ed25519PrivateKey.generate()
            pem = new.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
            created = create_exclusive(path, pem, mode=0o600)
        pem = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read or create identity key {path}: {exc.strerror}") from None
    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise IdentityError(f"identity key {path} is not a PEM Ed25519 private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"identity key {path} is not an Ed25519 key")
    return Identity(key), created
