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
"""

from __future__ import annotations

import asyncio
import contextvars
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class DurableScope:
    """One request's durable commits: the sequence number of its latest (0: none).

    `open` is cleared when the request's handler returns: a task it started that commits
    later has nobody waiting for an fsync, so such commits are FULL again."""

    seq: int = 0
    open: bool = True


current_scope: contextvars.ContextVar[DurableScope | None] = contextvars.ContextVar(
    "controlplane_durable_scope", default=None)


class WalSync:
    """Counts the commits made without fsync and makes them durable in groups."""

    def __init__(self, db_path: Path) -> None:
        self.wal_path = db_path.with_name(db_path.name + "-wal")
        self.committed = 0  # sequence number of the newest commit made without fsync
        self.synced = 0  # every commit up to this one is durable
        self.fsyncs = 0  # rounds run (tests, the log)
        self._round: asyncio.Task[None] | None = None

    def deferred(self) -> bool:
        """Whether a commit made now may skip its fsync (someone will await it)."""
        scope = current_scope.get()
        return scope is not None and scope.open

    def note_commit(self) -> int:
        """A commit was just made without fsync inside the current scope."""
        self.committed += 1
        scope = current_scope.get()
        if scope is not None:
            scope.seq = self.committed
        return self.committed

    async def wait(self, seq: int | None = None) -> None:
        """Return once commit `seq` (default: every commit so far) is durable."""
        target = self.committed if seq is None else seq
        while self.synced < target:
            if self._round is None or self._round.done():
                self._round = asyncio.get_running_loop().create_task(
                    self._fsync(self.committed))
            await asyncio.shield(self._round)

    async def _fsync(self, upto: int) -> None:
        await asyncio.to_thread(_fsync_file, self.wal_path)
        self.fsyncs += 1
        self.synced = max(self.synced, upto)

    def sync_now(self) -> None:
        """The blocking form (shutdown): every commit so far made durable here."""
        if self.synced < self.committed:
            upto = self.committed
            _fsync_file(self.wal_path)
            self.synced = max(self.synced, upto)


def durable_answers(wal: WalSync
                    ) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """The aiohttp middleware that opens a DurableScope around each request and, before the
    answer leaves, waits until every durable commit made before the handler returned is on
    disk: the request's own, and any other request's whose result it may have read (a poll
    must not tell a gateway its job is COMPLETED, nor a reader show it, before that is
    durable and the `complete` that made it is answered). Only durable commits count, so a
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
            target = max(scope.seq, wal.committed)
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
