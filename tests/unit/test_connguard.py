"""`ConnectionGuard`: who is evicted when incomplete requests pile up, and when.

The guard is plain bookkeeping plus one timer per ticket, so these tests drive it with fake
close callbacks; the port-80 tests (tests/integration/test_port80_hostile.py) drive it
through real sockets.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gatewaycore.connguard import ConnectionGuard, Ticket, address_key


class Closed:
    """A close callback that records that it ran (and wakes a waiting test)."""

    def __init__(self) -> None:
        self.calls = 0
        self.event = asyncio.Event() if _running_loop() else None

    def __call__(self) -> None:
        self.calls += 1
        if self.event is not None:
            self.event.set()


def _running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def admit(guard: ConnectionGuard, host: str) -> tuple[Ticket, Closed]:
    closed = Closed()
    return guard.admit(host, closed), closed


def test_a_full_address_evicts_its_oldest_pending_connection() -> None:
    guard = ConnectionGuard(max_pending=10, per_address=2, head_deadline=5)
    first, first_closed = admit(guard, "192.0.2.1")
    second, second_closed = admit(guard, "192.0.2.1")
    other, other_closed = admit(guard, "192.0.2.2")
    third, third_closed = admit(guard, "192.0.2.1")
    assert first.evicted == "per_address_cap" and first_closed.calls == 1
    assert not first.pending
    assert second.pending and third.pending and other.pending
    assert (second_closed.calls, third_closed.calls, other_closed.calls) == (0, 0, 0)
    assert guard.pending == 3 and guard.evictions == 1
    # The next newcomer from that address evicts the next oldest: it competes with itself.
    admit(guard, "192.0.2.1")
    assert second.evicted == "per_address_cap" and other.pending


def test_a_full_guard_evicts_the_oldest_pending_connection_never_the_newcomer() -> None:
    guard = ConnectionGuard(max_pending=3, per_address=3, head_deadline=5)
    tickets = [admit(guard, f"198.51.100.{i}") for i in range(3)]
    newcomer, newcomer_closed = admit(guard, "203.0.113.9")
    assert tickets[0][0].evicted == "pending_cap" and tickets[0][1].calls == 1
    assert newcomer.pending and newcomer_closed.calls == 0
    assert all(t.pending for t, _ in tickets[1:])
    assert guard.pending == 3


def test_head_received_releases_the_slot() -> None:
    guard = ConnectionGuard(max_pending=1, per_address=1, head_deadline=5)
    served, served_closed = admit(guard, "192.0.2.1")
    served.head_received()
    assert guard.pending == 0
    newcomer, _ = admit(guard, "192.0.2.1")
    assert served_closed.calls == 0 and served.evicted is None
    assert newcomer.pending and guard.pending == 1
    served.done()  # closing a served connection later changes nothing
    newcomer.done()
    newcomer.done()
    assert guard.pending == 0 and guard.evictions == 0


def test_done_releases_the_slot_of_an_incomplete_request() -> None:
    guard = ConnectionGuard(max_pending=1, per_address=1, head_deadline=5)
    gone, _ = admit(guard, "192.0.2.1")
    gone.done()
    _, closed = admit(guard, "192.0.2.1")
    assert gone.evicted is None and closed.calls == 0 and guard.pending == 1


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("2001:db8::1", "2001:db8::ffff:1:2:3", True),  # one /64
        ("2001:db8:0:0:1::1", "2001:db8:0:1::1", False),  # neighbouring /64s
        ("fe80::1%eth0", "fe80::2%eth1", True),  # the zone does not split an address
        ("::ffff:192.0.2.7", "192.0.2.7", True),  # IPv4-mapped is the IPv4 address
        ("192.0.2.7", "192.0.2.8", False),  # IPv4: each address on its own
        ("not-an-address", "not-an-address", True),
    ],
)
def test_address_key_groups_ipv6_by_64(a: str, b: str, same: bool) -> None:
    assert (address_key(a) == address_key(b)) is same


def test_ipv6_hosts_of_one_64_share_the_per_address_cap() -> None:
    guard = ConnectionGuard(max_pending=10, per_address=2, head_deadline=5)
    first, _ = admit(guard, "2001:db8:aa:bb::1")
    admit(guard, "2001:db8:aa:bb::2")
    neighbour, _ = admit(guard, "2001:db8:aa:bc::1")  # another /64: no eviction
    assert first.pending and neighbour.pending
    admit(guard, "2001:db8:aa:bb:ffff:ffff:ffff:ffff")
    assert first.evicted == "per_address_cap" and neighbour.pending


def test_a_failing_close_does_not_break_admission() -> None:
    guard = ConnectionGuard(max_pending=1, per_address=1, head_deadline=5)

    def broken() -> None:
        raise OSError("transport already gone")

    old = guard.admit("192.0.2.1", broken)
    new, _ = admit(guard, "192.0.2.1")
    assert old.evicted == "per_address_cap" and new.pending and guard.pending == 1


def test_bad_limits_are_refused() -> None:
    for kwargs in ({"max_pending": 0}, {"per_address": 0}, {"head_deadline": 0}):
        with pytest.raises(ValueError):
            ConnectionGuard(**kwargs)  # type: ignore[arg-type]


async def test_the_deadline_evicts_from_admission_in_a_running_loop() -> None:
    guard = ConnectionGuard(max_pending=10, per_address=10, head_deadline=0.2)
    started = time.monotonic()
    slow, slow_closed = admit(guard, "192.0.2.1")
    quick, quick_closed = admit(guard, "192.0.2.1")
    quick.head_received()  # its timer is cancelled with the slot
    assert slow_closed.event is not None
    await asyncio.wait_for(slow_closed.event.wait(), 5)
    elapsed = time.monotonic() - started
    assert slow.evicted == "deadline" and slow_closed.calls == 1
    assert 0.15 <= elapsed < 2, elapsed
    assert guard.pending == 0
    # Well past the quick one's deadline: still not closed by the guard.
    late, late_closed = admit(guard, "192.0.2.9")
    assert late_closed.event is not None
    await asyncio.wait_for(late_closed.event.wait(), 5)
    assert quick_closed.calls == 0 and quick.evicted is None
    assert late.evicted == "deadline"


async def test_an_evicted_ticket_is_not_evicted_again_by_its_deadline() -> None:
    guard = ConnectionGuard(max_pending=10, per_address=1, head_deadline=0.1)
    first, first_closed = admit(guard, "192.0.2.1")
    second, second_closed = admit(guard, "192.0.2.1")  # evicts `first` now
    assert second_closed.event is not None
    await asyncio.wait_for(second_closed.event.wait(), 5)  # past `first`'s deadline too
    assert first.evicted == "per_address_cap" and first_closed.calls == 1
    assert second.evicted == "deadline" and guard.evictions == 2
