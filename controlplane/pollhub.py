"""The long-poll hub: where a gateway's waiting poll learns that its configuration changed.

API operations run in the event loop's thread today, but the hub is poked through
`call_soon_threadsafe` so that a change made from any thread (a test, a future worker) wakes
the poll at once instead of after its 25 s wait. Waiters are per identity (key id): a
change to one gateway wakes only that gateway's polls.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict


class PollHub:
    """Wakes the long-polls waiting on one identity; `notify` is safe from any thread."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[None]]] = defaultdict(set)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closing = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the waiters live in (known only once the server starts)."""
        self._loop = loop

    def close(self) -> None:
        """Answer every waiting poll now (shutdown must not wait 25 s for them)."""
        self.closing = True
        for key_id in list(self._waiters):
            self._wake(key_id)

    def notify(self, key_id: str) -> None:
        """`key_id`'s configuration changed: wake its waiting polls."""
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._wake, key_id)

    def _wake(self, key_id: str) -> None:
        for fut in self._waiters.pop(key_id, set()):
            if not fut.done():
                fut.set_result(None)

    def waiter(self, key_id: str) -> asyncio.Future[None]:
        """A future completed at the next change of `key_id`.

        Register it *before* reading the state it guards, so that a change between the read
        and the wait is not missed; `discard` it when done.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[key_id].add(fut)
        return fut

    def discard(self, key_id: str, fut: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(key_id)
        if waiters is not None:
            waiters.discard(fut)
            if not waiters:
                del self._waiters[key_id]
