"""The gateway's sealing key: an X25519 key pair, made at first start, kept beside the identity.

The control plane hands the gateway hypervisor passwords only sealed to this key
(gatewaycore/sealed.py, docs/link-protocol.md "Hypervisors"), so a password is never in the
clear in a poll answer, a log or the gateway's state file. The private half never leaves the
state directory (mode 0600, written atomically); the public half travels in every signed poll.
It is a separate file from the Ed25519 identity: one key per purpose, and an identity made
before hypervisors existed keeps working unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gatewaycore import sealed
from gatewaycore.atomicfile import create_exclusive

KEY_FILE = "seal.key"


class SealKeyError(Exception):
    """The key file exists but cannot be used; the message names the file."""


@dataclass(frozen=True)
class SealKey:
    private_key: X25519PrivateKey

    @property
    def public_b64(self) -> str:
        """What a poll sends as `sealKey`."""
        return sealed.encode_key(sealed.public_raw(self.private_key))

    def unseal_text(self, box: Mapping[str, Any]) -> str:
        """The secret in `box`, in memory only; SealError if the box is not for this key."""
        try:
            return sealed.unseal(self.private_key, box).decode("utf-8")
        except UnicodeDecodeError:
            raise sealed.SealError("sealed secret is not UTF-8 text") from None

    def __repr__(self) -> str:  # never print key material, even by accident
        return f"SealKey(public={self.public_b64})"


def load_or_create(state_dir: Path) -> tuple[SealKey, bool]:
    """The sealing key kept in `state_dir`, created the first time; and whether it is new."""
    path = state_dir / KEY_FILE
    created = False
    try:
        if not path.exists():
            new = sealed.private_bytes(X25519PrivateKey.generate())
            created = create_exclusive(path, new, mode=0o600)
        raw = path.read_bytes()
    except OSError as exc:
        raise SealKeyError(f"cannot read or create sealing key {path}: {exc.strerror}") from None
    try:
        return SealKey(sealed.load_private(raw)), created
    except sealed.SealError:
        raise SealKeyError(f"sealing key {path} is not a raw X25519 private key of 32 "
                           "bytes") from None
