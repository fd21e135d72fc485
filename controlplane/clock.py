"""Time as the control plane sees it, injectable so tests can expire activation keys.

Business time (key issue and expiry, LastSeenTime, creation dates) comes from a Clock.
Authentication windows (SigV4's 15 minutes, the link's 300 s) stay on the wall clock: the
clients sign with their real time, and a test that moves the business clock 31 minutes
forward must still be able to make signed calls.

The tests' clock that moves only when told is theirs (tests/controlplane/cpharness.py).
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()

