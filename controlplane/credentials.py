"""The API credentials: a file the operator controls, in the AWS shared-credentials format.

There is no built-in credential: the first start generates an access key id and secret and
writes them (mode 0600). Because the format is the AWS CLI's own, an operator can also point
AWS_SHARED_CREDENTIALS_FILE at it. Every `[section]` holding both keys is a valid credential,
so keys can be added or rotated by editing the file; it is re-read when it changes.
"""

from __future__ import annotations

import configparser
import logging
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from gatewaycore.atomicfile import create_exclusive

log = logging.getLogger("controlplane.credentials")

FILE_NAME = "credentials"
_KEY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_SECRET_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


class CredentialsError(Exception):
    """The credentials file cannot be used; the message names the file and the fix."""


def generate() -> tuple[str, str]:
    key = "AKIA" + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(16))
    secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(40))
    return key, secret


def _render(key: str, secret: str) -> bytes:
    return (
        "# API credentials of the backup-gateway control plane (AWS shared-credentials format).\n"
        "# Each [section] with both keys is accepted; edit to add or rotate keys.\n"
        "[default]\n"
        f"aws_access_key_id = {key}\n"
        f"aws_secret_access_key = {secret}\n"
    ).encode()


def parse(path: Path) -> dict[str, str]:
    """Access key id -> secret, from the file at `path`."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise CredentialsError(f"credentials file {path} does not exist") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise CredentialsError(
            f"credentials file {path} is readable by others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}"
        )
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(path.read_text("utf-8"), source=str(path))
    except (configparser.Error, UnicodeDecodeError, OSError) as exc:
        raise CredentialsError(f"credentials file {path} cannot be parsed: {exc}") from None
    out: dict[str, str] = {}
    for section in parser.sections():
        key = parser.get(section, "aws_access_key_id", fallback="").strip()
        secret = parser.get(section, "aws_secret_access_key", fallback="").strip()
        if key and secret:
            out[key] = secret
    if not out:
        raise CredentialsError(
            f"credentials file {path} holds no [section] with aws_access_key_id and "
            "aws_secret_access_key"
        )
    return out


def ensure(path: Path) -> tuple[dict[str, str], bool]:
    """Load the credentials, generating the file the first time; and whether it was created.

    Creation is exclusive (link of a complete temporary file), so two processes starting at
    once never overwrite each other's secret: the loser reads the winner's file.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key, secret = generate()
        created = create_exclusive(path, _render(key, secret), mode=0o600)
        return parse(path), created
    return parse(path), False


@dataclass
class CredentialFile:
    """The live view of the file: re-parsed when its modification time changes."""

    path: Path
    _keys: dict[str, str] = field(default_factory=dict)
    _stamp: tuple[int, int] = (0, 0)

    def secret(self, access_key: str) -> str | None:
        try:
            info = self.path.stat()
            stamp = (info.st_mtime_ns, info.st_size)
            if stamp != self._stamp:
                self._keys = parse(self.path)
                self._stamp = stamp
        except (OSError, CredentialsError) as exc:
            # Keep serving the last good keys rather than locking everyone out on a bad edit.
            if self._stamp != (-1, -1):
                log.warning("event=credentials_unreadable keeping=last_good error=%s", str(exc))
                self._stamp = (-1, -1)
        return self._keys.get(access_key)
