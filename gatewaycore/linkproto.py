"""The signed request format of the gateway link, shared by the appliance and the control plane.

Every request a gateway makes to its control plane is signed with the gateway's Ed25519
identity key. The signature covers the method, the path with its query string, a timestamp,
a random nonce and the SHA-256 of the body, so a captured request can neither be altered
nor replayed: the control plane refuses timestamps outside `MAX_SKEW_SECONDS` and nonces it
has already seen within that window. See docs/link-protocol.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
import time
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SCHEME = "BGW1-ED25519"
H_KEY_ID = "X-Gateway-Key-Id"
H_TIMESTAMP = "X-Gateway-Timestamp"
H_NONCE = "X-Gateway-Nonce"
H_CONTENT_SHA256 = "X-Gateway-Content-SHA256"
H_SIGNATURE = "X-Gateway-Signature"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
MAX_SKEW_SECONDS = 300
# ASCII digits only: str.isdigit() is also true for superscripts such as '²', which int()
# refuses (that was a 500), and for other scripts' digits, which it reads.
_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")
_HEX_RE = re.compile(r"[0-9a-f]+")
KEY_ID_RE = re.compile(r"[0-9a-f]{32}")


class LinkAuthError(Exception):
    """A request whose signature headers are missing, malformed, stale, replayed or wrong."""


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(public_raw: bytes) -> str:
    """The short, stable name of an identity: the first 32 hex digits of SHA-256(public key)."""
    return hashlib.sha256(public_raw).hexdigest()[:32]


def is_key_id(text: str) -> bool:
    """Whether `text` has the shape of a key id (checked before it is looked up anywhere)."""
    return bool(KEY_ID_RE.fullmatch(text))


def encode_public_key(public_raw: bytes) -> str:
    return base64.b64encode(public_raw).decode("ascii")


def decode_public_key(text: str) -> bytes:
    """Parse a base64 raw Ed25519 public key; ValueError names what is wrong."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("publicKey is not valid base64") from exc
    if len(raw) != 32:
        raise ValueError("publicKey must be 32 bytes (a raw Ed25519 public key)")
    return raw


def body_sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def canonical(method: str, path_qs: str, timestamp: str, nonce: str, content_sha256: str) -> bytes:
    """The exact bytes that are signed; one field a line, so no field can bleed into another."""
    return "\n".join([SCHEME, method.upper(), path_qs, timestamp, nonce, content_sha256]).encode()


def sign(
    private_key: Ed25519PrivateKey,
    method: str,
    path_qs: str,
    content_sha256: str,
    now: float | None = None,
) -> dict[str, str]:
    """Headers that authenticate one request; `path_qs` is the path and query as sent."""
    ts = str(int(time.time() if now is None else now))
    nonce = secrets.token_hex(16)
    sig = private_key.sign(canonical(method, path_qs, ts, nonce, content_sha256))
    return {
        H_KEY_ID: key_id(public_key_bytes(private_key.public_key())),
        H_TIMESTAMP: ts,
        H_NONCE: nonce,
        H_CONTENT_SHA256: content_sha256,
        H_SIGNATURE: base64.b64encode(sig).decode("ascii"),
    }


def verify(
    headers: Mapping[str, str],
    method: str,
    path_qs: str,
    public_raw: bytes,
    now: float | None = None,
) -> tuple[str, str]:
    """Check the signature of a request made with the key `public_raw`.

    Returns (nonce, content_sha256): the caller must still refuse a nonce it has seen, and
    compare the declared body hash with the body it reads (unless UNSIGNED-PAYLOAD).
    """
    try:
        ts = headers[H_TIMESTAMP]
        nonce = headers[H_NONCE]
        content = headers[H_CONTENT_SHA256]
        sig = base64.b64decode(headers[H_SIGNATURE], validate=True)
    except KeyError as exc:
        raise LinkAuthError(f"missing header {exc.args[0]}") from None
    except (binascii.Error, ValueError):
        raise LinkAuthError(f"{H_SIGNATURE} is not valid base64") from None
    if not _TIMESTAMP_RE.fullmatch(ts):
        raise LinkAuthError(f"{H_TIMESTAMP} must be whole seconds since the epoch")
    current = time.time() if now is None else now
    if abs(current - int(ts)) > MAX_SKEW_SECONDS:
        raise LinkAuthError(f"{H_TIMESTAMP} is more than {MAX_SKEW_SECONDS}s from the server clock")
    if not (16 <= len(nonce) <= 64) or not _HEX_RE.fullmatch(nonce):
        raise LinkAuthError(f"{H_NONCE} must be 16-64 lowercase hex digits")
    if content != UNSIGNED_PAYLOAD and (
        len(content) != 64 or not _HEX_RE.fullmatch(content)
    ):
        raise LinkAuthError(f"{H_CONTENT_SHA256} must be 64 hex digits or {UNSIGNED_PAYLOAD}")
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(
            sig, canonical(method, path_qs, ts, nonce, content)
        )
    except InvalidSignature:
        raise LinkAuthError("signature does not match") from None
    return nonce, content
