"""The identity key: created once with mode 0600, reused after, bad files named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from appliance import identity
from gatewaycore import linkproto


def test_created_once_then_reused(tmp_path: Path) -> None:
    first, created = identity.load_or_create(tmp_path)
    assert created is True
    assert (tmp_path / "identity.pem").stat().st_mode & 0o777 == 0o600
    second, created = identity.load_or_create(tmp_path)
    assert created is False
    assert second.public_raw == first.public_raw
    assert len(first.key_id) == 32 and first.key_id == linkproto.key_id(first.public_raw)


def test_corrupt_key_file_named(tmp_path: Path) -> None:
    (tmp_path / "identity.pem").write_text("garbage\n")
    with pytest.raises(identity.IdentityError, match=re.escape(str(tmp_path / "identity.pem"))):
        identity.load_or_create(tmp_path)


def test_signature_verifies_with_public_key(tmp_path: Path) -> None:
    ident, _ = identity.load_or_create(tmp_path)
    body = b'{"after": 0}'
    headers = ident.sign("POST", "/gateway/poll", linkproto.body_sha256(body))
    assert headers[linkproto.H_KEY_ID] == ident.key_id
    nonce, digest = linkproto.verify(headers, "POST", "/gateway/poll", ident.public_raw)
    assert digest == linkproto.body_sha256(body) and nonce == headers[linkproto.H_NONCE]
