"""Admission of connections whose request head has not arrived yet (the slowloris bound).

A slow client costs a server nothing but a slot: it opens a connection and sends its request
head a byte at a time. A cap that refuses newcomers hands every slot to such clients; a long
deadline lets each one hold its slot for as long. So the rule, shared by port 80 and the
control plane's listener, is:

- a connection is *pending* from accept until its whole request head has arrived, and a
  pending connection is closed when `head_deadline` passes (trickling bytes does not extend
  it);
- one address (an IPv4 address, or an IPv6 /64, the unit one host usually holds) may have at
  most `per_address` pending connections: a newcomer from a full address closes that
  address's *oldest* pending one, so a slow client only ever competes with itself;
- at most `max_pending` pending connections in all: when full, the oldest pending one goes,
  never the newcomer, so a real client whose head arrives in one segment always gets in.

Connections whose head has arrived are not counted here: serving them is quick, and what
bounds them (body sizes, write deadlines, keep-alive timeouts) belongs to each server.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("connguard")


def address_key(host: str) -> str:
    """The unit the per-address cap counts: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


@dataclass(eq=False)
class Ticket:
    """One admitted connection. `close` aborts it; the guard calls it on eviction."""

    guard: ConnectionGuard
    key: str
    close: Callable[[], None]
    timer: asyncio.TimerHandle | None = None
    pending: bool = True
    evicted: str | None = field(default=None)

    def head_received(self) -> None:
        """The request head is complete: the connection no longer counts as pending."""
        self.guard._release(self)

    def done(self) -> None:
        """The connection closed (in any state)."""
        self.guard._release(self)


class ConnectionGuard:
    def __init__(
        self,
        max_pending: int = 256,
        per_address: int = 16,
        head_deadline: float = 5.0,
        name: str = "http",
    ) -> None:
        if max_pending < 1 or per_address < 1 or head_deadline <= 0:
            raise ValueError("max_pending and per_address must be >= 1, head_deadline > 0")
        self.max_pending = max_pending
        self.per_address = per_address
        self.head_deadline = head_deadline
        self.name = name
        self._pending: OrderedDict[Ticket, None] = OrderedDict()  # oldest first
        self._by_key: dict[str, OrderedDict[Ticket, None]] = {}
        self.evictions = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def admit(self, host: str, close: Callable[[], None]) -> Ticket:
        """Register a new connection from `host`; evicts older pending ones to make room."""
        key = address_key(host)
        same = self._by_key.get(key)
        if same is not None and len(same) >= self.per_address:
            self._evict(next(iter(same)), "per_address_cap")
        if len(self._pending) >= self.max_pending:
            self._evict(next(iter(self._pending)), "pending_cap")
        ticket = Ticket(self, key, close)
        self._pending[ticket] = None
        self._by_key.setdefault(key, OrderedDict())[ticket] = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            ticket.timer = loop.call_later(self.head_deadline, self._evict, ticket, "deadline")
        return ticket

    def _release(self, ticket: Ticket) -> None:
        if not ticket.pending:
            return
        ticket.pending = False
        if ticket.timer is not None:
            ticket.timer.cancel()
        self._pending.pop(ticket, None)
        same = self._by_key.get(ticket.key)
        if same is not None:
            same.pop(ticket, None)
            if not same:
                del self._by_key[ticket.key]

    def _evict(self, ticket: Ticket, reason: str) -> None:
        if not ticket.pending:
            return
        self._release(ticket)
        ticket.evicted = reason
        self.evictions += 1
        log.debug("event=connection_evicted server=%s remote=%s reason=%s",
                 self.name, ticket.key, reason)
        try:
            ticket.close()
        except Exception:  # closing an already broken transport must not break admission
            log.debug("event=connection_close_failed server=%s", self.name, exc_info=True)


_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def quiet_resource_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log asyncio's "accept() out of system resource" as one line, not a traceback.

    Under a flood the descriptors can run out for a moment between an accept burst and the
    evictions it causes; asyncio then pauses accepting for a second on its own and logs the
    event with a traceback per refused accept. That is an expected state of a server under
    attack, not a bug, so it is one warning line; every other loop error keeps the default.
    """

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
            log.warning("event=accept_paused reason=%s", errno.errorcode.get(exc.errno, "?"))
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
