"""The control plane at fleet scale (issue 15, docs/fleet.md): the properties that let one
instance hold 10,000 long-polling gateways, each checked without a fleet.

- a poll's database work does not grow with the number of gateways or the replay log, and
  makes no commit at all (its nonce goes to the replay log, its heartbeat is buffered);
- heartbeats cost no synced commit (no commit of their own at all);
- a durable change is on disk before its request answers, and before a poll tells it to
  the gateway, while the fsync runs off the event loop;
- housekeeping forgets expired nonces on its period, whole minutes at once, and replays
  are still refused within the signature window.

tools/fleetbench.py measures the same properties with real processes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from controlplane import linkops, walsync
from controlplane.noncelog import SEGMENT, WINDOW, NonceLog
from controlplane.server import ControlPlane
from controlplane.store import DB_FILE, Store
from tests.controlplane.cpharness import REGION, FakeClock, Server

pytestmark = pytest.mark.timeout(60)


class Statements:
    """What one connection executes: statements, commits by sync level, VM steps."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.sql: list[str] = []
        self.full_commits = 0
        self.unsynced_commits = 0
        self.steps = 0
        self._sync = db.execute("PRAGMA synchronous").fetchone()[0]

    def _trace(self, sql: str) -> None:
        self.sql.append(sql)
        text = sql.strip().upper()
        if text.startswith("PRAGMA SYNCHRONOUS="):
            self._sync = 2 if text.endswith("FULL") else 1
        elif text == "COMMIT":
            if self._sync >= 2:
                self.full_commits += 1
            else:
                self.unsynced_commits += 1

    def _step(self) -> int:
        self.steps += 1
        return 0

    def __enter__(self) -> Statements:
        self.db.set_trace_callback(self._trace)
        self.db.set_progress_handler(self._step, 10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.db.set_trace_callback(None)
        self.db.set_progress_handler(None, 0)


def add_fleet(store: Store, gateways: int, nonces_per_gateway: int = 0,
              nonces: NonceLog | None = None) -> None:
    """Activated gateways (written directly) and a replay log of steady size."""
    now = time.time()
    rows = []
    for _ in range(gateways):
        key_id, gateway_id = secrets.token_hex(16), "bgw-" + secrets.token_hex(6).upper()
        rows.append((key_id, gateway_id))
    db = store.connection
    with store.transaction():
        db.executemany(
            "INSERT INTO identities (key_id, public_key, registered_at, last_seen, version,"
            " gateway_id) VALUES (?, x'00', ?, ?, 1, ?)",
            [(k, now, now, g) for k, g in rows])
        db.executemany(
            "INSERT INTO gateways (gateway_id, arn, key_id, region, name, gateway_type,"
            " endpoint_type, created_at) VALUES (?, ?, ?, ?, 'g', 'BACKUP_VM', 'STANDARD', ?)",
            [(g, f"arn:aws:backup-gateway:{REGION}:1:gateway/{g}", k, REGION, now)
             for k, g in rows])
    for k, _ in rows if nonces is not None else ():
        for i in range(nonces_per_gateway):
            assert nonces.record(k, secrets.token_hex(16), now - 590 * i / nonces_per_gateway)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    """A control plane's parts, not listening: its link operations are called directly."""
    cp = ControlPlane(tmp_path / "state", clock=FakeClock())
    try:
        yield cp
    finally:
        cp.store.close()


def one_poll(plane: ControlPlane, key_id: str) -> Statements:
    """What a poll does to the database: the identity, the nonce, the heartbeat, the
    answer (gateway, jobs, the scheduler's look), measured on the store's connection."""
    ops = plane.link_ops

    async def poll() -> dict[str, Any]:
        identity = ops.identity(key_id)
        ops.use_nonce(key_id, secrets.token_hex(16))
        return await ops.poll(identity, after=0, wait=0, software_version="1.0.0")

    plane.store.flush_heartbeats()  # each measured poll starts with none buffered
    with Statements(plane.store.connection) as seen:
        answer = asyncio.run(poll())
    assert answer["state"] == "activated"
    return seen


def test_a_polls_work_does_not_grow_with_the_fleet_or_the_replay_table(
    plane: ControlPlane,
) -> None:
    store = plane.store
    add_fleet(store, 10, 30, plane.nonces)
    small_key = store.connection.execute("SELECT key_id FROM identities LIMIT 1").fetchone()[0]
    one_poll(plane, small_key)  # warm: statements prepared, first heartbeat buffered
    small = one_poll(plane, small_key)
    add_fleet(store, 3000, 30, plane.nonces)  # 300 times the gateways, 90,000 nonces
    assert len(plane.nonces) == 3010 * 30 + 2
    big = one_poll(plane, small_key)
    last_key = store.connection.execute(
        "SELECT key_id FROM identities ORDER BY rowid DESC LIMIT 1").fetchone()[0]
    one_poll(plane, last_key)
    newest = one_poll(plane, last_key)
    assert len(big.sql) == len(small.sql) == len(newest.sql), (small.sql, big.sql)
    # SQLite VM steps: the same for 10 or 3,010 gateways (a scan of either table would
    # multiply them by hundreds; B-tree depth does not show in VM steps).
    assert big.steps <= small.steps * 1.2 + 10, (small.steps, big.steps)
    assert newest.steps <= small.steps * 1.2 + 10, (small.steps, newest.steps)
    # No commit in a poll, however large the fleet: its nonce went to the replay log, its
    # heartbeat is buffered (written once a second for the whole fleet).
    assert (big.full_commits, big.unsynced_commits) == (0, 0)


def test_heartbeats_cost_no_commit_of_their_own_and_are_seen_at_once(tmp_path: Path) -> None:
    store = Store(tmp_path / DB_FILE)
    try:
        add_fleet(store, 50)
        keys = [r[0] for r in store.connection.execute("SELECT key_id FROM identities")]
        with Statements(store.connection) as seen:
            for i, key_id in enumerate(keys):
                store.heartbeat(key_id, "9.9.9", 2000.0 + i)
                # Readers see it before it is written...
                identity = store.identity(key_id)
                assert identity is not None and identity.last_seen == 2000.0 + i
        # ...50 polls, no commit: the heartbeats wait for the next flush.
        assert (seen.full_commits, seen.unsynced_commits) == (0, 0)
        assert store.pending_heartbeats() == 50
        gateway = next(g for g in store.list_gateways(REGION, 0, 100) if g.key_id == keys[-1])
        assert (gateway.last_seen, gateway.software_version) == (2049.0, "9.9.9")
        with Statements(store.connection) as seen:
            assert store.flush_heartbeats() == 50
        assert (seen.full_commits, seen.unsynced_commits) == (0, 1)
        raw = store.connection.execute(
            "SELECT COUNT(*) FROM identities WHERE last_seen >= 2000 AND"
            " software_version='9.9.9'").fetchone()[0]
        assert raw == 50
        # A durable transaction writes buffered heartbeats first, in their own unsynced
        # commit, so a reader inside it (the job scheduler) sees them.
        store.heartbeat(keys[0], None, 3000.0)
        with store.transaction() as db:
            assert db.execute("SELECT last_seen FROM identities WHERE key_id=?",
                              (keys[0],)).fetchone()[0] == 3000.0
    finally:
        store.close()


def test_durable_writes_outside_a_request_stay_synced(tmp_path: Path) -> None:
    store = Store(tmp_path / DB_FILE)
    try:
        add_fleet(store, 1)
        arn = store.list_gateways(REGION, 0, 1)[0].arn
        with Statements(store.connection) as seen:
            store.update_gateway(arn, name="renamed")
        assert (seen.full_commits, seen.unsynced_commits) == (1, 0)
        assert store.wal.committed == 0
    finally:
        store.close()


def boto(server: Server) -> Any:
    return boto3.session.Session().client(
        "backup-gateway", endpoint_url=server.url, region_name=REGION,
        aws_access_key_id=server.plane.access_key_id,
        aws_secret_access_key=server.plane.secret_access_key,
        config=Config(retries={"total_max_attempts": 1}, read_timeout=30))


def test_a_change_is_on_disk_before_its_answer_and_before_the_gateway_hears_of_it(
    server: Server, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fsync runs in a thread and is held here: the Put's answer, the woken poll's and
    a read's (which would show the new schedule) all wait for it, so nothing is told or
    shown before it is on disk; the event loop does not wait (it keeps running)."""
    client = boto(server)
    link = server.link()
    arn = client.create_gateway(ActivationKey=link.key(), GatewayDisplayName="d",
                                GatewayType="BACKUP_VM")["GatewayArn"]
    version = link.poll().body["version"]
    wal = server.plane.store.wal
    real = walsync._fsync_file
    entered, release = threading.Event(), threading.Event()
    synced_paths: list[Path] = []

    def held_fsync(path: Path) -> None:
        synced_paths.append(path)
        entered.set()
        assert release.wait(20)
        real(path)

    monkeypatch.setattr(walsync, "_fsync_file", held_fsync)
    intervals = [{"StartHourOfDay": 0, "StartMinuteOfHour": 0, "EndHourOfDay": 23,
                  "EndMinuteOfHour": 59, "DaysOfWeek": [0, 1, 2, 3, 4, 5, 6],
                  "AverageUploadRateLimitInBitsPerSec": 123_456}]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        poll = pool.submit(link.poll, version, 20)
        deadline = time.monotonic() + 10
        while server.waiting_polls(link.identity.key_id) == 0:  # parked in the server
            assert time.monotonic() < deadline
            time.sleep(0.01)
        put = pool.submit(client.put_bandwidth_rate_limit_schedule, GatewayArn=arn,
                          BandwidthRateLimitIntervals=intervals)
        assert entered.wait(10)
        # Committed (unsynced) and being fsynced: nobody is told yet.
        with pytest.raises(concurrent.futures.TimeoutError):
            put.result(0.3)
        assert not poll.done()
        # A read that would show the change is not answered before it is durable either...
        read = pool.submit(boto(server).get_bandwidth_rate_limit_schedule, GatewayArn=arn)
        with pytest.raises(concurrent.futures.TimeoutError):
            read.result(0.3)
        # ... while the loop is free: it runs this and keeps serving.
        assert server.waiting_polls(link.identity.key_id) >= 0  # run on the loop at once
        assert wal.synced < wal.committed
        release.set()
        put.result(10)
        answer = poll.result(10).body
        shown = read.result(10)["BandwidthRateLimitIntervals"]
    assert answer["bandwidthRateLimitIntervals"] == intervals
    assert shown[0]["AverageUploadRateLimitInBitsPerSec"] == 123_456
    assert wal.synced >= wal.committed >= 1
    assert synced_paths and synced_paths[0].name == f"{DB_FILE}-wal"


def test_a_read_of_one_gateway_does_not_wait_for_another_gateways_fsync(
    server: Server, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With gateway A's schedule Put held in its fsync: GetGateway of B, a ListGateways page
    without A and B's poll answer at once (they read only B: walsync.keyed_reads), while A's
    poll, GetGateway of A, a page with A and a read that does not name its gateways
    (ListHypervisors) wait for that fsync. A commit that names no gateway (CreateGateway)
    held in its fsync holds even B's read. Break `Store._gateway`'s note_read, the poll's
    keyed_reads, or the unkeyed rule, and this fails."""
    client = boto(server)
    links = [server.link(), server.link()]
    arns = [client.create_gateway(ActivationKey=link.key(), GatewayDisplayName=name,
                                  GatewayType="BACKUP_VM")["GatewayArn"]
            for link, name in zip(links, "ab", strict=True)]
    a, b = arns
    after_a = client.list_gateways(MaxResults=1)["NextToken"]  # the page after A's
    wal = server.plane.store.wal
    real = walsync._fsync_file
    entered, release = threading.Event(), threading.Event()

    def held_fsync(path: Path) -> None:
        entered.set()
        assert release.wait(20)
        real(path)

    def not_answered(call: concurrent.futures.Future[Any]) -> None:
        with pytest.raises(concurrent.futures.TimeoutError):
            call.result(0.3)

    monkeypatch.setattr(walsync, "_fsync_file", held_fsync)
    intervals = [{"StartHourOfDay": 0, "StartMinuteOfHour": 0, "EndHourOfDay": 23,
                  "EndMinuteOfHour": 59, "DaysOfWeek": [0, 1, 2, 3, 4, 5, 6],
                  "AverageUploadRateLimitInBitsPerSec": 123_456}]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        put = pool.submit(client.put_bandwidth_rate_limit_schedule, GatewayArn=a,
                          BandwidthRateLimitIntervals=intervals)
        assert entered.wait(10)
        assert wal.synced < wal.committed
        # B alone: answered while A's fsync is held.
        assert boto(server).get_gateway(GatewayArn=b)["Gateway"]["GatewayArn"] == b
        page = boto(server).list_gateways(MaxResults=1, NextToken=after_a)["Gateways"]
        assert [g["GatewayArn"] for g in page] == [b]
        assert links[1].poll(0, 0).body["gatewayArn"] == b  # B's gateway is told at once
        held = [pool.submit(links[0].poll, 0, 0),
                pool.submit(boto(server).get_gateway, GatewayArn=a),
                pool.submit(boto(server).list_gateways),
                pool.submit(boto(server).list_hypervisors)]
        for call in held:
            not_answered(call)
        assert not put.done()
        release.set()
        put.result(10)
        for call in held:
            call.result(10)
        # A commit naming no gateway: every read waits for it, B's included.
        key = server.link().key()
        entered.clear()
        release.clear()
        created = pool.submit(client.create_gateway, ActivationKey=key,
                              GatewayDisplayName="c", GatewayType="BACKUP_VM")
        assert entered.wait(10)
        read_b = pool.submit(boto(server).get_gateway, GatewayArn=b)
        not_answered(read_b)
        release.set()
        created.result(10)
        assert read_b.result(10)["Gateway"]["GatewayArn"] == b
    assert wal.synced >= wal.committed


def test_housekeeping_forgets_expired_nonces_on_its_period(
    plane: ControlPlane, monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = plane.store
    now = [time.time()]
    plane.link_ops.wall_clock = lambda: now[0]
    add_fleet(store, 1)
    key_id = store.connection.execute("SELECT key_id FROM identities").fetchone()[0]
    for i in range(500):  # nonces of 12 minutes ago: past the window, not yet forgotten
        assert plane.nonces.record(key_id, secrets.token_hex(16), now[0] - 720 - i * 1e-3)
    plane.link_ops.use_nonce(key_id, "0123456789abcdef")
    files = sorted(p.name for p in plane.nonces.directory.iterdir())
    assert len(files) >= 2  # a minute a file: the old minute's, and now's
    purged = asyncio.Event()
    real = plane.nonces.purge

    def counted(at: float) -> int:
        gone = real(at)
        if gone:
            purged.set()
        return gone

    monkeypatch.setattr(plane.nonces, "purge", counted)
    monkeypatch.setattr(linkops, "HEARTBEAT_FLUSH_SECONDS", 0.01)

    async def run() -> None:
        task = asyncio.create_task(plane.link_ops.run_housekeeping())
        try:
            await asyncio.wait_for(purged.wait(), 10)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    assert len(plane.nonces) == 1  # the recent one stays...
    assert len(list(plane.nonces.directory.iterdir())) == 1  # ...with its minute's file
    with pytest.raises(linkops.LinkError, match="replayed"):  # ...and is still refused
        plane.link_ops.use_nonce(key_id, "0123456789abcdef")
    # Through the whole window (twice the allowed skew) and one minute more, it stays.
    now[0] += WINDOW
    assert plane.link_ops.purge_nonces() == 0
    now[0] += SEGMENT + 1
    assert plane.link_ops.purge_nonces() == 1


def test_gc_policy_has_no_automatic_collection_but_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The collector's pauses (a full one 0.4-1 s, young ones 5-110 ms several times a
    second under a fleet) were the API's p99. While the server runs the collector is off;
    once the tracked objects grew by the limit the policy collects what came since the last
    collection (a new garbage cycle is taken, one from before the last freeze is not: that
    is what keeps the pause short), on its period it collects everything (that cycle too);
    when it stops the collector is back on and nothing is left frozen."""
    import gc
    import weakref

    from controlplane import gcpolicy

    class Node:
        other: Any = None

    def cycle() -> weakref.ref[Node]:
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    assert gc.isenabled() and gc.get_freeze_count() == 0

    async def run(kind: str, **policy: float) -> None:
        done = asyncio.Event()
        real = getattr(gcpolicy, kind)

        def counted() -> tuple[int, float]:
            result = real()
            done.set()
            return result

        monkeypatch.setattr(gcpolicy, kind, counted)
        old = cycle()
        gc.freeze()  # as if a collection had run while the cycle was alive
        task = asyncio.create_task(gcpolicy.run(**policy))
        await asyncio.sleep(0)  # the task has turned the collector off
        try:
            assert not gc.isenabled()
            new = cycle()
            # tracked objects: the count grows by 5,000 (less what older objects freed now
            # take off it: the limit below is a fifth of that)
            keep = [[] for _ in range(5000)]
            await asyncio.wait_for(done.wait(), 10)
            assert new() is None  # taken by either collection
            if kind == "collection_since_last":
                assert old() is not None  # frozen: left for the full collection
            else:
                assert old() is None
            del keep
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run("collection_since_last", full_every=3600, growth_limit=1000, check_every=0.01))
    assert gc.isenabled() and gc.get_freeze_count() == 0
    asyncio.run(run("full_collection", full_every=0.05, growth_limit=10**9, check_every=0.01))
    assert gc.isenabled() and gc.get_freeze_count() == 0
