"""Time as the control plane sees it, injectable so tests can expire activation keys.

Business time (key issue and expiry, LastSeenTime, creation dates) comes from a Clock.
Authentication windows (SigV4's 15 minutes, the link's 300 s) stay on the wall clock: the
clients sign with their real time, and a test that moves the business clock 31 minutes
forward must still be able to make signed calls.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()


class FakeClock:
    """A clock that moves only when told; thread-safe so a test thread can advance it."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
