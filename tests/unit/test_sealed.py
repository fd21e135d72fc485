"""Sealed secrets: only the recipient opens them; altered or misdirected boxes are refused."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gatewaycore import sealed


def test_round_trip_and_only_the_recipient_opens() -> None:
    alice, bob = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    box = sealed.seal(sealed.public_raw(alice), b"hunter2")
    assert "hunter2" not in str(box)
    assert sealed.unseal(alice, box) == b"hunter2"
    with pytest.raises(sealed.SealError, match="does not open"):
        sealed.unseal(bob, box)


def test_each_seal_is_fresh_and_tampering_is_caught() -> None:
    key = X25519PrivateKey.generate()
    a = sealed.seal(sealed.public_raw(key), b"x")
    b = sealed.seal(sealed.public_raw(key), b"x")
    assert a["ct"] != b["ct"] and a["epk"] != b["epk"]
    flipped = dict(a, ct=sealed.encode_key(bytes([sealed.decode_public(a["epk"])[0] ^ 1]) * 17))
    with pytest.raises(sealed.SealError):
        sealed.unseal(key, flipped)
    for bad in ({}, {"alg": "other"}, dict(a, epk="!!"), dict(a, nonce=sealed.encode_key(b"1"))):
        with pytest.raises(sealed.SealError):
            sealed.unseal(key, bad)


def test_keys_round_trip() -> None:
    key = X25519PrivateKey.generate()
    again = sealed.load_private(sealed.private_bytes(key))
    assert sealed.public_raw(again) == sealed.public_raw(key)
    assert sealed.decode_public(sealed.encode_key(sealed.public_raw(key))) == sealed.public_raw(key)
    with pytest.raises(sealed.SealError):
        sealed.decode_public("abc")
