"""The signed link's replay protection: every nonce seen within the signature window.

A signed request carries a fresh nonce; one seen before is a replay (gatewaycore.linkproto).
A nonce matters only while its request's time could still be accepted: twice the allowed
clock skew. So this keeps the nonces of the last WINDOW seconds in memory, in one set per
minute (a lookup checks the ~11 live sets; expiry drops whole sets), and appends each one
to that minute's file in STATE_DIR/nonces, unsynced: a write to the page cache, so a crash
of the process keeps it (the next start reads the live files back), and only an OS crash or
a power cut can lose the last moments' nonces, as with the unsynced commits before.

Why not the database: at 10,000 gateways this is 500 nonces a second, and each was a commit
of its own on a random page of a table of 300,000 rows. Those WAL frames and their
checkpoints were what every durable write's fsync waited behind (docs/fleet.md). Here a
nonce costs a set lookup and one small write(2); memory is about 100 bytes a nonce
(30 MB at 10,000 gateways).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path

from gatewaycore import linkproto

WINDOW = 2 * linkproto.MAX_SKEW_SECONDS  # a request dated at the window's edge, both ways
SEGMENT = 60  # seconds of nonces per set and per file
_FILE = re.compile(r"(\d{1,12})\.log")
_LINE = re.compile(r"([0-9a-f]{32}) ([0-9a-f]{16,64})")


def _key(key_id: str, nonce: str) -> bytes:
    """Compact and unique: the nonce's length, then both hex strings as bytes."""
    text = key_id + nonce
    return bytes([len(nonce)]) + bytes.fromhex(text + "0" * (len(text) % 2))


class NonceLog:
    def __init__(self, directory: Path, window: float = WINDOW, segment: int = SEGMENT,
                 now: float | None = None) -> None:
        self.directory = directory
        self.window = window
        self.segment = segment
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._sets: dict[int, set[bytes]] = {}
        self._fd: int | None = None
        self._fd_start: int | None = None
        self._load(now)

    def _start_of(self, now: float) -> int:
        return int(now // self.segment) * self.segment

    def _expired(self, start: int, now: float) -> bool:
        return start + self.segment < now - self.window

    def _load(self, now: float | None) -> None:
        """The live files back into memory; expired ones removed."""
        now = time.time() if now is None else now
        for path in self.directory.iterdir():
            found = _FILE.fullmatch(path.name)
            if found is None:
                continue
            start = int(found.group(1))
            if self._expired(start, now):
                path.unlink(missing_ok=True)
                continue
            keys = self._sets.setdefault(start, set())
            with path.open("rb") as fh:
                for line in fh:  # a line cut by a crash does not match: skipped
                    parsed = _LINE.fullmatch(line.rstrip(b"\n").decode("ascii", "replace"))
                    if parsed:
                        keys.add(_key(parsed.group(1), parsed.group(2)))

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._sets.values())

    def record(self, key_id: str, nonce: str, now: float) -> bool:
        """Remember a nonce (both hex, as linkproto.verify checked); False when it was seen
        within the window: a replay."""
        key = _key(key_id, nonce)
        if any(key in keys for keys in self._sets.values()):
            return False
        start = self._start_of(now)
        self._sets.setdefault(start, set()).add(key)
        if start != self._fd_start:
            self._open(start)
        assert self._fd is not None
        os.write(self._fd, f"{key_id} {nonce}\n".encode())
        return True

    def _open(self, start: int) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.directory / f"{start}.log",
                           os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._fd_start = start

    def purge(self, now: float) -> int:
        """Forget the minutes past the window (memory and files); how many nonces went."""
        gone = 0
        for start in [s for s in self._sets if self._expired(s, now)]:
            gone += len(self._sets.pop(start))
            if start == self._fd_start and self._fd is not None:
                os.close(self._fd)
                self._fd = self._fd_start = None
            with contextlib.suppress(FileNotFoundError):
                (self.directory / f"{start}.log").unlink()
        return gone

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = self._fd_start = None
