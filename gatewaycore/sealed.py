"""Secrets sealed to one gateway: the hypervisor password travels only in this form.

The control plane must hand a gateway the password of the hypervisor it connects to, but
must not be able to leak it through a log, a proxy or a copy of a poll answer. Each gateway
holds an X25519 key pair (made at its first start, beside its Ed25519 identity) and sends
the public half in its signed polls; the control plane seals each secret to it:
an ephemeral X25519 key, HKDF-SHA256 over the shared secret (salted with both public keys),
AES-256-GCM with the recipient's public key as associated data. Only that gateway's private
key opens the box, and a box for one gateway fails to open on another.

The box is a JSON object of base64 strings, so it can sit in a poll answer and, unopened, in
the gateway's state file: the password is never written in the clear on either side.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ALG = "X25519-HKDF-SHA256-AES256GCM"
_INFO = b"backup-gateway sealed secret v1"
_RAW = serialization.Encoding.Raw


class SealError(ValueError):
    """A box that is malformed, or not sealed to this key (or altered)."""


def public_raw(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def encode_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def decode_public(text: str) -> bytes:
    """A base64 X25519 public key (32 bytes); SealError otherwise."""
    try:
        raw = base64.b64decode(text, validate=True)
        X25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError):
        raise SealError("not a base64 X25519 public key of 32 bytes") from None
    return raw


def private_bytes(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(
        _RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def load_private(raw: bytes) -> X25519PrivateKey:
    try:
        return X25519PrivateKey.from_private_bytes(raw)
    except ValueError:
        raise SealError("not an X25519 private key of 32 bytes") from None


def _key(shared: bytes, epk: bytes, recipient: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=epk + recipient, info=_INFO).derive(shared)


def seal(recipient: bytes, plaintext: bytes) -> dict[str, str]:
    """Seal `plaintext` to the raw X25519 public key `recipient`."""
    ephemeral = X25519PrivateKey.generate()
    epk = public_raw(ephemeral)
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
    nonce = os.urandom(12)
    ct = AESGCM(_key(shared, epk, recipient)).encrypt(nonce, plaintext, recipient)
    return {"alg": ALG, "epk": encode_key(epk), "nonce": encode_key(nonce),
            "ct": encode_key(ct)}


def unseal(private: X25519PrivateKey, box: Mapping[str, Any]) -> bytes:
    """Open a box sealed to `private`'s public key; SealError if it is not one."""
    if not isinstance(box, Mapping) or box.get("alg") != ALG:
        raise SealError(f"not a sealed box ({ALG})")
    try:
        epk = base64.b64decode(str(box["epk"]), validate=True)
        nonce = base64.b64decode(str(box["nonce"]), validate=True)
        ct = base64.b64decode(str(box["ct"]), validate=True)
        shared = private.exchange(X25519PublicKey.from_public_bytes(epk))
    except (KeyError, ValueError, TypeError):
        raise SealError("sealed box fields epk, nonce and ct must be base64") from None
    if len(nonce) != 12:
        raise SealError("sealed box nonce must be 12 bytes")
    recipient = public_raw(private)
    try:
        return AESGCM(_key(shared, epk, recipient)).decrypt(nonce, ct, recipient)
    except InvalidTag:
        raise SealError("sealed box does not open with this key (another gateway's, or "
                        "altered)") from None
