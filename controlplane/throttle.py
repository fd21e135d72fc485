"""Per-access-key request rate limit, answered with ThrottlingException (429) as AWS does.

Why: one runaway script must not starve the gateways' long-polls and uploads that share the
server; the AWS CLI and boto3 already back off and retry on 429.
"""

from __future__ import annotations

import time
from collections.abc import Callable

DEFAULT_RATE = 50.0  # requests per second, sustained
DEFAULT_BURST = 200.0


class Throttle:
    """A token bucket per access key."""

    def __init__(self, rate: float = DEFAULT_RATE, burst: float = DEFAULT_BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str) -> bool:
        now = self.clock()
        tokens, then = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True
