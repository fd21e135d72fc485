"""Durable commits whose fsync runs off the event loop, shared by every commit waiting.

Why: with `synchronous=FULL` every durable commit (an activation, a schedule, a deletion,
a job's state) fsyncs the WAL on the event-loop thread: 1-10 ms on this machine kind when
it is quiet, far more when the disk is shared, and every poll and API call in flight waits
that long. In WAL mode a `synchronous=NORMAL` commit is the same commit without that fsync
(the frames are written to the WAL file); an fsync of the WAL file afterwards makes it
exactly as durable as FULL would have. So a request's durable commits are made NORMAL, and
before its answer leaves, the request awaits `WalSync.synced(seq)`: one fsync in a worker
thread covers every commit made before it started (group commit), and the loop keeps
serving meanwhile. Nothing is acknowledged before it is on disk.

The scope (`DurableScope`, a context variable) is opened by the server around each request
(server.py's middleware); writes outside any scope (start-up, the CLI, timers) stay FULL.

Reads wait too: an answer must not show a change before it is durable. By default a request
waits for every durable commit made before it answered. Finer, for the calls a fleet makes
all the time (GetGateway, a ListGateways page, a gateway's poll: `keyed_reads`): they wait
only for the commits that named a gateway they read, and for every commit that named none.
The rule that makes this safe, kept in store.py: a commit names keys (`note_commit(keys)`,
today only Store.update_gateway: a schedule, window, name or update request) only when it
changed nothing but those gateways' and identities' rows, and every read of such a row
notes its key (Store._gateway, Store.identity). A gateway created or deleted, a job's state,
a hypervisor: commits naming none, waited for by everyone. So with a fleet's Puts fsyncing
all the time, a read of one gateway does not wait for another's fsync.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import os
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class DurableScope:
    """One request's durable commits: the sequence number of its latest (0: none).

    `open` is cleared when the request's handler returns: a task it started that commits
    later has nobody waiting for an fsync, so such commits are FULL again. `keyed` is set
    by a handler whose every read names its gateway (`keyed_reads`); `read` is then the
    newest commit not yet durable among the gateways it read."""

    seq: int = 0
    open: bool = True
    keyed: bool = False
    read: int = 0


current_scope: contextvars.ContextVar[DurableScope | None] = contextvars.ContextVar(
    "controlplane_durable_scope", default=None)


class WalSync:
    """Counts the commits made without fsync and makes them durable in groups."""

    def __init__(self, db_path: Path) -> None:
        self.wal_path = db_path.with_name(db_path.name + "-wal")
        self.committed = 0  # sequence number of the newest commit made without fsync
        self.synced = 0  # every commit up to this one is durable
        self.fsyncs = 0  # rounds run (tests, the log)
        self.unkeyed = 0  # the newest commit that named no gateway
        self._by_key: dict[str, int] = {}  # gateway key id -> its newest commit not synced
        # The requests waiting, each with the commit it waits for; one fsync round at a time
        # in the thread, started by the first waiter and again while any is left.
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._running = False
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None

    def deferred(self) -> bool:
        """Whether a commit made now may skip its fsync (someone will await it)."""
        scope = current_scope.get()
        return scope is not None and scope.open

    def note_commit(self, keys: Collection[str] = ()) -> int:
        """A commit was just made without fsync inside the current scope. `keys`: the key
        ids of the gateways whose rows it changed, when it changed nothing else (empty: it
        may have changed anything, so every reader waits for it)."""
        self.committed += 1
        if keys:
            for key in keys:
                self._by_key[key] = self.committed
        else:
            self.unkeyed = self.committed
        scope = current_scope.get()
        if scope is not None:
            scope.seq = self.committed
        return self.committed

    def note_read(self, key: str) -> None:
        """The current request read gateway `key`: its answer waits for that gateway's
        newest commit (counted only in a `keyed_reads` request)."""
        scope = current_scope.get()
        if scope is not None:
            scope.read = max(scope.read, self._by_key.get(key, 0))

    def target(self, scope: DurableScope) -> int:
        """The commit a request's answer must wait for (see the module doc)."""
        if scope.keyed:
            return max(scope.seq, scope.read, self.unkeyed)
        return max(scope.seq, self.committed)

    async def wait(self, seq: int | None = None) -> None:
        """Return once commit `seq` (default: every commit so far) is durable.

        Each waiter has a future of its own (a cancelled request cancels only its own), and
        the round's end resolves them straight from the thread's one callback: two trips
        through the event loop's queue between the fsync's end and the answer, which on a
        loop busy with a fleet's polls is most of a write's latency (docs/fleet.md)."""
        target = self.committed if seq is None else seq
        if self.synced >= target:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append((target, waiter))
        if not self._running:
            self._start_round(loop)
        await waiter

    def _start_round(self, loop: asyncio.AbstractEventLoop) -> None:
        """fsync in the thread every commit made so far; `_round_done` runs on the loop."""
        self._running = True
        upto = self.committed
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="walsync")

        def finished(done: concurrent.futures.Future[None]) -> None:  # in the thread
            try:
                loop.call_soon_threadsafe(self._round_done, loop, upto, done)
            except RuntimeError:  # the loop was closed meanwhile: nobody waits any more
                self._running = False
                self._waiters = []

        self._thread.submit(lambda: _fsync_file(self.wal_path)).add_done_callback(finished)

    def _round_done(self, loop: asyncio.AbstractEventLoop, upto: int,
                    done: concurrent.futures.Future[None]) -> None:
        self._running = False
        error = done.exception()
        if error is None:
            self.fsyncs += 1
            self._synced_to(upto)
        left = []
        for target, waiter in self._waiters:
            if waiter.done():  # its request was cancelled
                continue
            if target <= self.synced:
                waiter.set_result(None)
            elif error is not None:  # not durable: the request fails, not answered
                waiter.set_exception(error)
            else:
                left.append((target, waiter))
        self._waiters = left
        if left:
            self._start_round(loop)

    def close(self) -> None:
        """Every commit durable, the fsync thread gone (the store is closing)."""
        self.sync_now()
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    def sync_now(self) -> None:
        """The blocking form (shutdown): every commit so far made durable here."""
        if self.synced < self.committed:
            upto = self.committed
            _fsync_file(self.wal_path)
            self._synced_to(upto)

    def _synced_to(self, upto: int) -> None:
        self.synced = max(self.synced, upto)
        if self._by_key:  # the gateways whose commits are all durable need no entry
            self._by_key = {k: v for k, v in self._by_key.items() if v > self.synced}


def keyed_reads() -> None:
    """Declare that every read the current request makes names its gateway (Store notes
    them): its answer then waits only for those gateways' commits and the unkeyed ones.
    Only for handlers whose every read goes through a gateway read of the store."""
    scope = current_scope.get()
    if scope is not None:
        scope.keyed = True


def durable_answers(wal: WalSync
                    ) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """The aiohttp middleware that opens a DurableScope around each request and, before the
    answer leaves, waits until every durable commit made before the handler returned is on
    disk: the request's own, and any other request's whose result it may have read (a poll
    must not tell a gateway its job is COMPLETED, nor a reader show it, before that is
    durable and the `complete` that made it is answered); for a `keyed_reads` request only
    those of the gateways it read, and the unkeyed ones. Only durable commits count, so a
    request waits only while such a commit's fsync is in flight."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        scope = DurableScope()
        token = current_scope.set(scope)
        try:
            return await handler(request)
        finally:
            scope.open = False
            current_scope.reset(token)
            target = wal.target(scope)
            if wal.synced < target:
                await wal.wait(target)

    return middleware


def _fsync_file(path: Path) -> None:
    """fsync a file by name: on Linux an fsync flushes the file, whichever descriptor."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
