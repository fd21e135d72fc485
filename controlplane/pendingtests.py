"""TestHypervisorConfiguration calls waiting for their gateway's answer (in memory).

The gateway, not the control plane, reaches the hypervisor, so the API call parks here: it
opens a test, the gateway's poll lists it (`tests` in the poll answer), the gateway tries
the host and posts `/gateway/hypervisor/test-result`, which completes the test's future and
so answers the waiting API call. Nothing here is written to disk: a test lives for one API
call (at most LIFETIME_SECONDS), and the password it carries must not outlive it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

LIFETIME_SECONDS = 60.0
# Tests one gateway may have waiting at once: API callers cannot grow this without bound.
MAX_PER_GATEWAY = 16
# What the gateway may report as the cause of a failed test (docs/link-protocol.md).
ERROR_CODES = (
    "AuthenticationFailed",
    "HostUnreachable",
    "CertificateError",
    "InvalidHost",
    "HypervisorError",
)


@dataclass(frozen=True)
class TestResult:
    """What the gateway found: ok, or the cause (one of ERROR_CODES) and its message."""

    ok: bool
    error_code: str | None = None
    message: str | None = None


@dataclass
class PendingTest:
    test_id: str
    key_id: str
    gateway_arn: str
    host: str
    username: str | None
    password: str | None = field(repr=False)
    expires: float
    result: asyncio.Future[TestResult]


class TooManyTests(Exception):
    """The gateway already has MAX_PER_GATEWAY tests waiting."""


class PendingTests:
    """The registry; every method runs in the event loop's thread."""

    def __init__(self, lifetime: float = LIFETIME_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lifetime = lifetime
        self.clock = clock
        self._tests: dict[str, PendingTest] = {}

    def open(self, key_id: str, gateway_arn: str, host: str, username: str | None,
             password: str | None) -> PendingTest:
        """A new test for the gateway `key_id`; TooManyTests when it has too many waiting."""
        self._expire()
        if sum(1 for t in self._tests.values() if t.key_id == key_id) >= MAX_PER_GATEWAY:
            raise TooManyTests()
        test = PendingTest(
            test_id=secrets.token_hex(16), key_id=key_id, gateway_arn=gateway_arn, host=host,
            username=username, password=password, expires=self.clock() + self.lifetime,
            result=asyncio.get_running_loop().create_future(),
        )
        self._tests[test.test_id] = test
        return test

    def for_gateway(self, key_id: str) -> list[PendingTest]:
        """The tests this gateway must run, oldest first."""
        self._expire()
        return [t for t in self._tests.values() if t.key_id == key_id]

    def report(self, key_id: str, test_id: str, result: TestResult) -> bool:
        """Complete a test of this gateway; False when there is no such test (any more)."""
        self._expire()
        test = self._tests.get(test_id)
        if test is None or test.key_id != key_id:
            return False
        del self._tests[test_id]
        if not test.result.done():
            test.result.set_result(result)
        return True

    def close(self, test_id: str) -> None:
        """The API call stopped waiting: forget the test (and its password)."""
        test = self._tests.pop(test_id, None)
        if test is not None and not test.result.done():
            test.result.cancel()

    def _expire(self) -> None:
        now = self.clock()
        for test_id in [k for k, t in self._tests.items() if t.expires <= now]:
            self.close(test_id)
