"""The credentials file: generated once with mode 0600, never overwritten, re-read on edit."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest

from controlplane.credentials import CredentialFile, CredentialsError, ensure, parse


def test_generated_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "credentials"
    keys, created = ensure(path)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    (key, secret), = keys.items()
    assert key.startswith("AKIA") and len(key) == 20 and len(secret) == 40
    again, created = ensure(path)
    assert again == keys and not created


def test_racing_first_starts_agree(tmp_path: Path) -> None:
    path = tmp_path / "credentials"
    results: list[dict[str, str]] = []
    barrier = threading.Barrier(4)

    def go() -> None:
        barrier.wait()
        results.append(ensure(path)[0])

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 4 and all(r == results[0] for r in results)


def test_rotation_by_editing_the_file(tmp_path: Path) -> None:
    path = tmp_path / "credentials"
    keys, _ = ensure(path)
    live = CredentialFile(path)
    old = next(iter(keys))
    assert live.secret(old) == keys[old]
    path.write_text("[new]\naws_access_key_id = AKIANEW\naws_secret_access_key = s3cret\n")
    assert live.secret("AKIANEW") == "s3cret" and live.secret(old) is None
    path.write_text("not an ini file")  # a bad edit keeps the last good keys
    assert live.secret("AKIANEW") == "s3cret"


def test_refuses_files_others_can_read(tmp_path: Path) -> None:
    path = tmp_path / "credentials"
    path.write_text("[default]\naws_access_key_id = A\naws_secret_access_key = B\n")
    path.chmod(0o640)
    with pytest.raises(CredentialsError, match="chmod 600"):
        parse(path)
