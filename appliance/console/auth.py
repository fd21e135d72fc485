"""The console password: a salted scrypt hash in a 0600 file, forced change at first login.

Until the file exists the password is the documented default `password`, which is accepted
once and must then be replaced. Failed attempts slow the next ones down (growing delay), which
is what stands between a serial cable and a guessed password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

from gatewaycore.atomicfile import write_atomic

log = logging.getLogger(__name__)

USERNAME = "admin"
DEFAULT_PASSWORD = "password"
MIN_LENGTH = 6
MAX_LENGTH = 512
# scrypt cost: 16 MiB of memory and tens of milliseconds per guess.
_N, _R, _P = 2**14, 8, 1


class PasswordFileError(Exception):
    """The password file cannot be read or written; the message is for the user."""


def check_new_password(password: str) -> str | None:
    """Why `password` is not acceptable as a new password, or None if it is."""
    if not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        return (f"The password must be {MIN_LENGTH} to {MAX_LENGTH} characters long "
                f"(this one has {len(password)}).")
    if any(not 0x20 <= ord(c) <= 0x7E for c in password):
        return "The password may only contain printable ASCII characters (letters, digits, " \
               "punctuation, space)."
    if password == DEFAULT_PASSWORD:
        return "The password cannot be the default password."
    return None


def _hash(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=64 * 1024**2,
                          dklen=32)


@dataclass
class PasswordStore:
    path: Path

    def _record(self) -> dict | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise PasswordFileError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            record = json.loads(raw)
            if record.get("algorithm") != "scrypt":
                raise ValueError("unknown algorithm")
            return record
        except (ValueError, AttributeError):
            raise PasswordFileError(f"{self.path} is damaged; restore it or remove it to "
                                    "go back to the default password") from None

    def is_default(self) -> bool:
        """True while the documented default is in force (no password chosen yet)."""
        return self._record() is None

    def verify(self, username: str, password: str) -> bool:
        record = self._record()
        if record is None:
            ok = hmac.compare_digest(password.encode(), DEFAULT_PASSWORD.encode())
        else:
            salt = base64.b64decode(record["salt"])
            want = base64.b64decode(record["hash"])
            got = _hash(password, salt, record["n"], record["r"], record["p"])
            ok = hmac.compare_digest(got, want)
        return ok and username == USERNAME

    def set(self, password: str) -> None:
        problem = check_new_password(password)
        if problem:
            raise ValueError(problem)
        salt = secrets.token_bytes(16)
        record = {
            "algorithm": "scrypt",
            "n": _N, "r": _R, "p": _P,
            "salt": base64.b64encode(salt).decode(),
            "hash": base64.b64encode(_hash(password, salt, _N, _R, _P)).decode(),
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomic(self.path, json.dumps(record).encode() + b"\n", mode=0o600)
        except OSError as exc:
            raise PasswordFileError(f"cannot write {self.path}: {exc.strerror}") from None
        log.info("event=console_password_changed path=%s", self.path)


class Throttle:
    """Growing delay after failed logins: none after the first, then 1, 2, 4 ... 30 s."""

    def __init__(self, cap: float = 30.0) -> None:
        self.failures = 0
        self.cap = cap

    def failed(self) -> float:
        self.failures += 1
        if self.failures < 2:
            return 0.0
        return min(2.0 ** (self.failures - 2), self.cap)

    def succeeded(self) -> None:
        self.failures = 0

