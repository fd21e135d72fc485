"""The control plane's rate limits, both token buckets: API calls per access key, and
gateway registrations per source address.

Why: one runaway script must not starve the gateways' long-polls and uploads that share the
server (the AWS CLI and boto3 already back off and retry on the 429 ThrottlingException);
and `POST /gateway/activation-key`, the one link call a stranger can make, writes rows, so
how fast any address (and all of them together) may register bounds what a flood can store.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from gatewaycore.connguard import address_key

DEFAULT_RATE = 50.0  # API requests per second per access key, sustained
DEFAULT_BURST = 200.0
# Registrations (POST /gateway/activation-key): per source, and for all sources together.
# An appliance asks for a key when its operator does: a few an hour. The total bounds what
# many sources together can write: at most ~120/min x 24.5 h of rows before they expire.
REGISTRATIONS_PER_MINUTE = 10.0
REGISTRATION_BURST = 20.0
ALL_REGISTRATIONS_PER_MINUTE = 120.0
ALL_REGISTRATION_BURST = 240.0
MAX_TRACKED_SOURCES = 10_000


class TokenBucket:
    """A token bucket: `rate` tokens a second up to `burst`, starting full."""

    __slots__ = ("at", "tokens")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.at = now

    def refill(self, rate: float, burst: float, now: float) -> None:
        # max(): a clock stepped back must not drain the bucket.
        self.tokens = min(burst, self.tokens + max(0.0, now - self.at) * rate)
        self.at = now

    def wait(self, rate: float) -> float:
        """Seconds until one token is there (0 if it is now)."""
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / rate


class Throttle:
    """A token bucket per access key (the JSON API)."""

    def __init__(self, rate: float = DEFAULT_RATE, burst: float = DEFAULT_BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def allow(self, key: str) -> bool:
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.burst, now)
        bucket.refill(self.rate, self.burst, now)
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True


def source_of(remote: str | None) -> str:
    """The throttling key of a peer: the same unit as the listener's per-address cap."""
    return address_key(remote) if remote else "unknown"


class RegistrationThrottle:
    """Token buckets for registrations: one per source, one shared by all sources.

    Memory is bounded: at most `max_sources` buckets, the least recently seen forgotten
    first (a forgotten source starts again with a full burst, which is all it could have
    regained anyway once its bucket had been idle for burst/rate seconds).
    """

    def __init__(
        self,
        per_minute: float = REGISTRATIONS_PER_MINUTE,
        burst: float = REGISTRATION_BURST,
        all_per_minute: float = ALL_REGISTRATIONS_PER_MINUTE,
        all_burst: float = ALL_REGISTRATION_BURST,
        max_sources: int = MAX_TRACKED_SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.burst = burst
        self.all_rate = all_per_minute / 60.0
        self.all_burst = all_burst
        self.max_sources = max_sources
        self.clock = clock
        self._sources: OrderedDict[str, TokenBucket] = OrderedDict()
        self._all = TokenBucket(all_burst, clock())
        self.refused = 0  # since the last `take_refused`, for one summary log line

    def __len__(self) -> int:
        return len(self._sources)

    def check(self, source: str) -> float | None:
        """Take a token for `source`: None if allowed, else the seconds to wait."""
        now = self.clock()
        bucket = self._sources.get(source)
        if bucket is None:
            bucket = self._sources[source] = TokenBucket(self.burst, now)
            if len(self._sources) > self.max_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(source)
        bucket.refill(self.rate, self.burst, now)
        self._all.refill(self.all_rate, self.all_burst, now)
        wait = max(bucket.wait(self.rate), self._all.wait(self.all_rate))
        if wait > 0:
            self.refused += 1
            return wait
        bucket.tokens -= 1.0
        self._all.tokens -= 1.0
        return None

    def take_refused(self) -> int:
        """The refusals since the last call (housekeeping logs them as one line)."""
        refused, self.refused = self.refused, 0
        return refused
