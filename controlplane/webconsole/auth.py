"""The console's own sign-in: one operator password, sessions, CSRF tokens, a bound on
failed sign-ins.

- The password is set by the operator (`python -m controlplane console-password`); there is
  no default, so a fresh control plane's console cannot be entered until someone with the
  state directory chooses one. Only an scrypt hash is kept, in STATE_DIR/console-password
  (0600, written to a temporary file and renamed, so a reader never sees half a file). It is
  read at each sign-in, so setting or changing it needs no restart.
- A session is a random token in an HttpOnly, SameSite=Strict cookie scoped to the console's
  path; sessions live in memory (a restart signs everyone out), expire after an idle period
  and an absolute lifetime, and carry their own CSRF token that every POST must echo.
- Failed sign-ins are counted per source address (an IPv6 address per /64) in a window; past
  the bound the address is refused until the window has passed, so a password cannot be
  guessed at the speed of the network. Memory is bounded: the oldest addresses are dropped.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gatewaycore.atomicfile import write_atomic

PASSWORD_FILE = "console-password"
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024
# scrypt at n=2**14, r=8 takes about 50 ms and 16 MiB: slow for a guesser, quick to sign in.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SCRYPT_MAXMEM = 64 * 1024 * 1024

SESSION_IDLE_SECONDS = 2 * 3600
SESSION_MAX_SECONDS = 12 * 3600
MAX_SESSIONS = 1000

MAX_FAILURES = 5
FAILURE_WINDOW_SECONDS = 15 * 60
MAX_TRACKED_ADDRESSES = 10_000


class PasswordError(ValueError):
    """A password the console will not accept as the new one (the message says why)."""


def check_new_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise PasswordError(f"the password must be at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise PasswordError(f"the password must be at most {MAX_PASSWORD_LENGTH} characters")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, salt: bytes | None = None) -> str:
    """`scrypt$N$R$P$SALT$HASH` (base64): self-describing, so the cost can change later."""
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            maxmem=SCRYPT_MAXMEM, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` matches the stored hash; False for a malformed one."""
    try:
        scheme, n, r, p, salt, digest = stored.strip().split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest, validate=True)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt, validate=True),
                             n=int(n), r=int(r), p=int(p), maxmem=SCRYPT_MAXMEM,
                             dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def write_password_file(path: Path, password: str) -> None:
    """Store the hash of `password` at `path` atomically, mode 0600 from the start."""
    check_new_password(password)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, (hash_password(password) + "\n").encode("ascii"), mode=0o600)


def read_password_file(path: Path) -> str | None:
    """The stored hash, or None when no password has been set."""
    try:
        text = path.read_text("ascii").strip()
    except FileNotFoundError:
        return None
    return text or None


@dataclass
class Session:
    token: str
    csrf: str
    region: str
    created: float
    last_used: float
    flash: list[str] = field(default_factory=list)


class Sessions:
    """The signed-in browsers, in memory; bounded, the least recently used dropped first."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._by_token: OrderedDict[str, Session] = OrderedDict()

    def create(self, region: str) -> Session:
        now = self._clock()
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), region, now, now)
        self._by_token[session.token] = session
        while len(self._by_token) > MAX_SESSIONS:
            self._by_token.popitem(last=False)
        return session

    def get(self, token: str | None) -> Session | None:
        """The live session of `token` (its idle clock restarted), or None."""
        if not token:
            return None
        session = self._by_token.get(token)
        if session is None:
            return None
        now = self._clock()
        if (now - session.last_used > SESSION_IDLE_SECONDS
                or now - session.created > SESSION_MAX_SECONDS):
            del self._by_token[token]
            return None
        session.last_used = now
        self._by_token.move_to_end(token)
        return session

    def drop(self, token: str | None) -> None:
        if token:
            self._by_token.pop(token, None)

    def __len__(self) -> int:
        return len(self._by_token)


def csrf_ok(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), str(given).encode())


def address_key(remote: str | None) -> str:
    """The unit failures are counted in: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(remote or "")
    except ValueError:
        return remote or "-"
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class SignInThrottle:
    """At most MAX_FAILURES failed sign-ins per address in FAILURE_WINDOW_SECONDS."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 max_failures: int = MAX_FAILURES,
                 window: float = FAILURE_WINDOW_SECONDS) -> None:
        self._clock = clock
        self.max_failures = max_failures
        self.window = window
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def _recent(self, key: str) -> list[float]:
        cutoff = self._clock() - self.window
        times = [t for t in self._failures.get(key, []) if t > cutoff]
        if times:
            self._failures[key] = times
        else:
            self._failures.pop(key, None)
        return times

    def wait(self, remote: str | None) -> float | None:
        """Seconds until `remote` may try again, or None when it may try now."""
        times = self._recent(address_key(remote))
        if len(times) < self.max_failures:
            return None
        return max(1.0, times[-self.max_failures] + self.window - self._clock())

    def failed(self, remote: str | None) -> int:
        """Record a failure; the number left before the address is refused."""
        key = address_key(remote)
        times = self._recent(key)
        times.append(self._clock())
        self._failures[key] = times
        self._failures.move_to_end(key)
        while len(self._failures) > MAX_TRACKED_ADDRESSES:
            self._failures.popitem(last=False)
        return max(0, self.max_failures - len(times))

    def succeeded(self, remote: str | None) -> None:
        self._failures.pop(address_key(remote), None)
