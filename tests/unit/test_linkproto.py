"""Link signing: what the control plane refuses (tampering, staleness, bad headers)."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gatewaycore import linkproto
from gatewaycore.linkproto import LinkAuthError


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def pub(key: Ed25519PrivateKey) -> bytes:
    return linkproto.public_key_bytes(key.public_key())


def test_good_signature(key: Ed25519PrivateKey) -> None:
    h = linkproto.sign(key, "post", "/gateway/poll", linkproto.body_sha256(b"{}"))
    assert linkproto.verify(h, "POST", "/gateway/poll", pub(key))[1] == linkproto.body_sha256(b"{}")


@pytest.mark.parametrize(
    ("method", "path"), [("PUT", "/gateway/poll"), ("POST", "/gateway/poll?x=1")]
)
def test_other_request_refused(key: Ed25519PrivateKey, method: str, path: str) -> None:
    h = linkproto.sign(key, "POST", "/gateway/poll", linkproto.body_sha256(b"{}"))
    with pytest.raises(LinkAuthError, match="does not match"):
        linkproto.verify(h, method, path, pub(key))


def test_other_key_refused(key: Ed25519PrivateKey) -> None:
    h = linkproto.sign(key, "POST", "/p", linkproto.UNSIGNED_PAYLOAD)
    with pytest.raises(LinkAuthError):
        linkproto.verify(h, "POST", "/p", pub(Ed25519PrivateKey.generate()))


def test_stale_timestamp_refused(key: Ed25519PrivateKey) -> None:
    h = linkproto.sign(key, "POST", "/p", linkproto.UNSIGNED_PAYLOAD, now=time.time() - 301)
    with pytest.raises(LinkAuthError, match="300s"):
        linkproto.verify(h, "POST", "/p", pub(key))


@pytest.mark.parametrize(
    ("header", "value", "needle"),
    [
        (linkproto.H_SIGNATURE, "!!!", "base64"),
        (linkproto.H_TIMESTAMP, "12a", "whole seconds"),
        (linkproto.H_NONCE, "XYZ", "hex"),
        (linkproto.H_CONTENT_SHA256, "abc", "64 hex"),
    ],
)
def test_malformed_headers(key: Ed25519PrivateKey, header: str, value: str, needle: str) -> None:
    h = linkproto.sign(key, "POST", "/p", linkproto.body_sha256(b""))
    h[header] = value
    with pytest.raises(LinkAuthError, match=needle):
        linkproto.verify(h, "POST", "/p", pub(key))


def test_missing_header(key: Ed25519PrivateKey) -> None:
    h = linkproto.sign(key, "POST", "/p", linkproto.body_sha256(b""))
    del h[linkproto.H_NONCE]
    with pytest.raises(LinkAuthError, match="missing header"):
        linkproto.verify(h, "POST", "/p", pub(key))


def test_public_key_encoding() -> None:
    raw = bytes(range(32))
    assert linkproto.decode_public_key(linkproto.encode_public_key(raw)) == raw
    with pytest.raises(ValueError, match="32 bytes"):
        linkproto.decode_public_key(linkproto.encode_public_key(raw[:31]))
    with pytest.raises(ValueError, match="base64"):
        linkproto.decode_public_key("@@@")
