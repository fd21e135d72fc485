"""The gateway's job runner against the real control plane (docs/backups.md).

Real parts: the control plane in-process on a loopback port (its own loop thread, as
tests/controlplane/cpharness.py runs it) driven with boto3 (AWS Backup and backup-gateway
APIs); on the gateway side the real poll loop, job link, shaper and runner in a loop thread
of their own; the hypervisor is tests/integration/fileconnector.py, a BackupConnector over
sparse image files. Only the link's sealed password and the hypervisor agent are left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import boto3
import pytest
from botocore.config import Config
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.gatewaystate import GatewayState
from appliance.identity import Identity
from appliance.joblink import JobLink
from appliance.jobrunner import JobRunner
from appliance.link import HypervisorOrder, JobOrder, LinkClient, LinkError, PollAnswer
from appliance.linkloop import LinkLoop
from appliance.shaping import ScheduledShaper
from appliance.state import StateStore
from controlplane.jobscheduler import JobTimings
from controlplane.server import ControlPlane
from tests.controlplane.cpharness import FakeClock
from tests.integration.fileconnector import FileConnector, FileVm

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
REGION = "us-west-2"
ROLE = "arn:aws:iam::123456789012:role/backup"
T = TypeVar("T")


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
               interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def sparse_image(path: Path, capacity: int, writes: list[tuple[int, bytes]]) -> Path:
    with path.open("wb") as f:
        f.truncate(capacity)
    for offset, data in writes:
        write_at(path, offset, data)
    return path


# -- the control plane ------------------------------------------------------------------------


@dataclass
class Plane:
    plane: ControlPlane
    url: str
    gw: Any      # boto3 backup-gateway
    backup: Any  # boto3 backup
    loop: asyncio.AbstractEventLoop
    state_dir: Path
    slots: int

    def restart(self, down: Callable[[], None]) -> None:
        """Stop the control plane, call `down` while it is away, start it again on the
        same port over the same state (a service restart)."""
        asyncio.run_coroutine_threadsafe(self.plane.stop(), self.loop).result(30)
        down()
        self.plane = ControlPlane(self.state_dir, clock=FakeClock(),
                                  job_timings=JobTimings(slots=self.slots))
        port = int(self.url.rsplit(":", 1)[1])
        asyncio.run_coroutine_threadsafe(self.plane.start("127.0.0.1", port),
                                         self.loop).result(10)

    def job(self, job_id: str, restore: bool = False) -> dict[str, Any]:
        if restore:
            return dict(self.backup.describe_restore_job(RestoreJobId=job_id))
        return dict(self.backup.describe_backup_job(BackupJobId=job_id))

    def wait_job(self, job_id: str, state: str, restore: bool = False,
                 timeout: float = 40.0) -> dict[str, Any]:
        key = "Status" if restore else "State"
        ended = {"COMPLETED", "FAILED", "ABORTED"} - {state}

        def reached() -> dict[str, Any] | None:
            doc = self.job(job_id, restore)
            assert doc[key] not in ended, f"job {job_id} is {doc[key]}: {doc.get('StatusMessage')}"
            return doc if doc[key] == state else None

        return dict(wait_until(reached, timeout, f"job {job_id} {state}", interval=0.05))

    def start_backup(self, vm_arn: str) -> str:
        return str(self.backup.start_backup_job(
            BackupVaultName="vault", ResourceArn=vm_arn, IamRoleArn=ROLE)["BackupJobId"])

    def limit(self, gateway_arn: str, bits_per_sec: int | None) -> None:
        intervals = [] if bits_per_sec is None else [{
            "AverageUploadRateLimitInBitsPerSec": bits_per_sec, "StartHourOfDay": 0,
            "StartMinuteOfHour": 0, "EndHourOfDay": 23, "EndMinuteOfHour": 59,
            "DaysOfWeek": [0, 1, 2, 3, 4, 5, 6]}]
        self.gw.put_bandwidth_rate_limit_schedule(GatewayArn=gateway_arn,
                                                  BandwidthRateLimitIntervals=intervals)


@contextlib.contextmanager
def control_plane(state_dir: Path, slots: int = 4) -> Iterator[Plane]:
    """The real control plane on 127.0.0.1:<free port>, its loop in a thread. `slots`: the
    jobs its scheduler gives one gateway at once (4 in service)."""
    plane = ControlPlane(state_dir, clock=FakeClock(), job_timings=JobTimings(slots=slots))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    host, port = asyncio.run_coroutine_threadsafe(plane.start("127.0.0.1", 0), loop).result(10)
    url = f"http://{host}:{port}"
    kw = {"endpoint_url": url, "region_name": REGION,
          "aws_access_key_id": plane.access_key_id,
          "aws_secret_access_key": plane.secret_access_key,
          "config": Config(retries={"max_attempts": 1})}
    cp = Plane(plane, url, boto3.client("backup-gateway", **kw), boto3.client("backup", **kw),
               loop, state_dir, slots)
    try:
        yield cp
    finally:
        asyncio.run_coroutine_threadsafe(cp.plane.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# -- the gateway's job path ----------------------------------------------------------------


class RecordingShaper(ScheduledShaper):
    """The real shaper, noting when each piece was let through (its own accounting, kept)."""

    def __init__(self) -> None:
        super().__init__()
        self.released: list[tuple[float, int]] = []

    async def acquire(self, nbytes: int) -> None:
        await super().acquire(nbytes)
        self.released.append((time.monotonic(), nbytes))


class Gateway:
    """The appliance's parts on the job path, in an event loop of their own: state, shaper,
    poll loop, job link and runner. Stopping it is a daemon stop; a new Gateway over the
    same identity and state directory is the daemon started again."""

    def __init__(self, url: str, state_dir: Path, identity: Identity,
                 connector: FileConnector, link_class: type[JobLink] = JobLink,
                 jobs_seen: Callable[[Sequence[JobOrder]], Sequence[JobOrder]] = list,
                 **runner_options: Any) -> None:
        """`link_class`: the job link (a test's subclass may lie); `jobs_seen`: what of each
        poll's job list reaches the runner."""
        self.url = url
        self.identity = identity
        self.connector = connector
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.hypervisor: HypervisorOrder | None = None

        async def build() -> None:
            self.shaper = RecordingShaper()
            self.shaper.start()
            state_dir.mkdir(mode=0o700, exist_ok=True)
            store = StateStore(state_dir)
            store.load()
            self.state = GatewayState(store, self.shaper)
            if not self.state.state.activated:
                self.state.save(registered=True)
            self.link = LinkClient(url, identity)
            self.job_link = link_class(url, identity, self.shaper, retry_for=20.0)
            self.runner = JobRunner(self.job_link, self._connect, **runner_options)
            self.poller = LinkLoop(self.link, self.state, 0.5, self._hypervisor,
                                   lambda jobs: self.runner.offer(jobs_seen(jobs)))
            self._poll_task = asyncio.create_task(self.poller.run())

        self.run(build())

    def _connect(self, hypervisor_arn: str) -> FileConnector:
        assert self.hypervisor is not None and hypervisor_arn == self.hypervisor.hypervisor_arn
        return self.connector

    def _hypervisor(self, order: HypervisorOrder | None, _tests: Any) -> None:
        self.hypervisor = order

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()` on the gateway's loop (the runner is not thread-safe)."""
        done: Future[T] = Future()

        def go() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(go)
        return done.result(10)

    def running(self) -> int:
        return self.call(lambda: self.runner.running)

    def stop(self) -> None:
        async def close() -> None:
            self._poll_task.cancel()
            await asyncio.gather(self._poll_task, return_exceptions=True)
            await self.runner.close()
            await self.job_link.close()
            await self.link.close()
            self.shaper.close()

        self.run(close(), 90)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class Site:
    cp: Plane
    gateway: Gateway
    gateway_arn: str
    hypervisor_arn: str
    connector: FileConnector
    tmp: Path

    def add_vms(self, vms: list[FileVm]) -> dict[str, str]:
        """Report the connector's VMs as the hypervisor's inventory; their ARNs by name."""
        order = wait_until(lambda: self.gateway.hypervisor, what="the hypervisor in a poll")
        inventory = [{"uuid": vm.uuid, "name": vm.name, "path": f"file-host/{vm.name}",
                      "hostName": "file-host", "tags": []}
                     for vm in self.connector.vms.values()]
        self.gateway.run(self.gateway.link.report_inventory(
            self.hypervisor_arn, order.sync_request, True, None, None, inventory))
        listed = self.cp.gw.list_virtual_machines(HypervisorArn=self.hypervisor_arn)
        arns = {vm["Name"]: vm["ResourceArn"] for vm in listed["VirtualMachines"]}
        assert {vm.name for vm in vms} <= set(arns)
        return arns

    def settled(self) -> None:
        """Wait until the gateway runs no job: a job is COMPLETED on the control plane as
        soon as `complete` is answered, and lets go of its session just after."""
        wait_until(lambda: self.gateway.running() == 0, what="the gateway's jobs to end")

    def restart(self, **runner_options: Any) -> Gateway:
        """Stop the gateway's daemon and start it again (same identity and state)."""
        self.gateway.stop()
        self.gateway = Gateway(self.cp.url, self.tmp / "gateway", self.gateway.identity,
                               self.connector, **runner_options)
        return self.gateway


@contextlib.contextmanager
def site(tmp: Path, slots: int = 4, **gateway_options: Any) -> Iterator[Site]:
    """A control plane with a vault, an activated gateway and a hypervisor associated."""
    with control_plane(tmp / "cp", slots) as cp:
        identity = Identity(Ed25519PrivateKey.generate())
        connector = FileConnector(tmp / "hypervisor")
        gateway = Gateway(cp.url, tmp / "gateway", identity, connector, **gateway_options)
        s: Site | None = None
        try:
            key = gateway.run(gateway.link.request_activation_key(REGION, "STANDARD", None,
                                                                  None))
            # what the daemon's key issuer does: registered, and poll now
            gateway.call(lambda: (gateway.state.save(registered=True), gateway.poller.wake()))
            gateway_arn = cp.gw.create_gateway(ActivationKey=key.key, GatewayDisplayName="gw",
                                               GatewayType="BACKUP_VM")["GatewayArn"]
            wait_until(lambda: gateway.state.state.activated, what="activation")
            hv = cp.gw.import_hypervisor_configuration(
                Name="files", Host="qemu+tcp://127.0.0.1:1/system", Username="u",
                Password="p")["HypervisorArn"]
            cp.gw.associate_gateway_to_server(GatewayArn=gateway_arn, ServerArn=hv)
            cp.backup.create_backup_vault(BackupVaultName="vault")
            s = Site(cp, gateway, gateway_arn, hv, connector, tmp)
            yield s
        finally:
            (s.gateway if s is not None else gateway).stop()


def random_vm(connector: FileConnector, tmp: Path, name: str, size: int) -> FileVm:
    disk = sparse_image(tmp / f"{name}.img", size + 8 * MiB, [(MiB, os.urandom(size))])
    return connector.add_vm(name, {"sda": disk})


# -- the tests ---------------------------------------------------------------------------------


def test_full_then_incremental_then_restore_gives_back_the_same_bytes(tmp_path: Path) -> None:
    with site(tmp_path) as s:
        text = b"".join(b"line %08d of a log file that compresses well\n" % i
                        for i in range(50_000))[:2 * MiB]
        scattered = [(32 * MiB + i * 700 * 1024, os.urandom(64 * 1024)) for i in range(40)]
        sda = sparse_image(tmp_path / "web-sda.img", 64 * MiB, [
            (0, os.urandom(MiB)), (5 * MiB, os.urandom(64 * 1024)),
            (8 * MiB, os.urandom(3 * MiB)), (20 * MiB, text), *scattered])
        sdb = sparse_image(tmp_path / "web-sdb.img", 8 * MiB, [(0, os.urandom(MiB))])
        vm = s.connector.add_vm("web", {"sda": sda, "sdb": sdb})
        arn = s.add_vms([vm])["web"]

        full = s.cp.start_backup(arn)
        first = s.cp.wait_job(full, "COMPLETED")
        s.settled()
        at_full = {"sda": sha256(sda), "sdb": sha256(sdb)}
        assert s.connector.sessions[full].incremental is False
        assert (full, True) in s.connector.finished
        sent_full = s.gateway.job_link.bytes_sent
        data = MiB + 64 * 1024 + 3 * MiB + 40 * 64 * 1024 + MiB
        assert data < sent_full < data + 2 * MiB  # the text compressed, the holes not sent

        write_at(sda, 8 * MiB + 128 * 1024, os.urandom(64 * 1024))   # changed
        write_at(sda, 5 * MiB, bytes(64 * 1024))                     # zeroed: must override
        write_at(sda, 40 * MiB + 3 * MiB // 2, os.urandom(64 * 1024))  # new, in a hole
        at_incremental = {"sda": sha256(sda), "sdb": sha256(sdb)}

        incremental = s.cp.start_backup(arn)
        second = s.cp.wait_job(incremental, "COMPLETED")
        s.settled()
        assert s.connector.sessions[incremental].incremental is True
        sent_incremental = s.gateway.job_link.bytes_sent - sent_full
        assert sent_incremental <= 3 * 64 * 1024 + 8 * 1024, sent_incremental
        assert (incremental, True) in s.connector.finished

        jobs = {}
        for point, name in ((first["RecoveryPointArn"], "web-full"),
                            (second["RecoveryPointArn"], "web-incremental")):
            jobs[name] = s.cp.backup.start_restore_job(
                RecoveryPointArn=point, IamRoleArn=ROLE,
                Metadata={"vmName": name})["RestoreJobId"]
        for name, expected in (("web-full", at_full), ("web-incremental", at_incremental)):
            done = s.cp.wait_job(jobs[name], "COMPLETED", restore=True)
            assert done.get("CreatedResourceArn", "").startswith("arn:")
            restored = s.connector.restores[name]
            assert restored.committed is not None and not restored.aborted
            got = {d.key: sha256(d.path) for d in restored.disks}
            assert got == expected, name


def test_six_jobs_at_most_four_run_on_the_gateway(tmp_path: Path) -> None:
    # The control plane is told to give this gateway 6 at once: the runner must hold to 4.
    with site(tmp_path, slots=6) as s:
        gate = threading.Event()
        begin = s.connector.begin_backup

        def held(*args: Any) -> Any:
            gate.wait(30)
            return begin(*args)

        s.connector.begin_backup = held  # type: ignore[method-assign]
        vms = [random_vm(s.connector, tmp_path, f"vm{i}", MiB) for i in range(6)]
        arns = s.add_vms(vms)
        jobs = [s.cp.start_backup(arns[vm.name]) for vm in vms]

        def listed() -> bool:
            view = s.gateway.call(s.gateway.runner.view)
            return view["running"] == 4 and view["waiting"] == 2
        wait_until(listed, what="4 running and 2 waiting on the gateway")
        view = s.gateway.call(s.gateway.runner.view)
        assert sorted(j["state"] for j in view["jobs"]) == ["RUNNING"] * 4 + ["WAITING"] * 2
        assert {j["jobId"] for j in view["jobs"]} == set(jobs)
        gate.set()
        for job in jobs:
            s.cp.wait_job(job, "COMPLETED")
        s.settled()
        assert s.gateway.call(lambda: s.gateway.runner.peak_running) == 4
        assert sorted(j for j, ok in s.connector.finished if ok) == sorted(jobs)


def test_stop_backup_job_mid_job_aborts_and_ends_the_session(tmp_path: Path) -> None:
    with site(tmp_path) as s:
        s.cp.limit(s.gateway_arn, 4_000_000)  # 0.5 MB/s: 24 MiB would take 50 s
        wait_until(lambda: s.gateway.shaper.limit_bps == 4_000_000, what="the limit")
        vm = random_vm(s.connector, tmp_path, "big", 24 * MiB)
        job = s.cp.start_backup(s.add_vms([vm])["big"])
        wait_until(lambda: s.gateway.shaper.released, what="the first bytes sent")
        s.cp.backup.stop_backup_job(BackupJobId=job)
        stopped = time.monotonic()
        done = s.cp.wait_job(job, "ABORTED", timeout=20)
        assert time.monotonic() - stopped < 10
        assert "StopBackupJob" in done.get("StatusMessage", "")
        assert s.connector.finished == [(job, False)]
        assert not (s.connector.root / "jobs" / job).exists()        # the freeze let go
        assert not (s.connector.root / "checkpoints").exists()       # no checkpoint kept
        wait_until(lambda: s.gateway.running() == 0, what="the runner to let the job go")
        assert s.gateway.job_link.bytes_sent < 24 * MiB


def test_four_jobs_share_one_limit(tmp_path: Path) -> None:
    limit = 24_000_000  # 3 MB/s for the four together
    with site(tmp_path) as s:
        s.cp.limit(s.gateway_arn, limit)
        wait_until(lambda: s.gateway.shaper.limit_bps == limit, what="the limit")
        gate = threading.Event()
        begin = s.connector.begin_backup

        def held(*args: Any) -> Any:
            gate.wait(30)
            return begin(*args)

        s.connector.begin_backup = held  # type: ignore[method-assign]
        vms = [random_vm(s.connector, tmp_path, f"vm{i}", 6 * MiB) for i in range(4)]
        arns = s.add_vms(vms)
        jobs = [s.cp.start_backup(arns[vm.name]) for vm in vms]
        wait_until(lambda: s.gateway.running() == 4, what="the four jobs running")
        gate.set()
        ends: dict[str, float] = {}

        def all_ended() -> bool:
            running = set(s.gateway.call(lambda: list(s.gateway.runner._running)))
            now = time.monotonic()
            for job in jobs:
                if job not in running:
                    ends.setdefault(job, now)
            return len(ends) == 4
        wait_until(all_ended, timeout=40, what="the four jobs done")
        for job in jobs:
            s.cp.wait_job(job, "COMPLETED")
        released = s.gateway.call(lambda: list(s.gateway.shaper.released))
        start = released[0][0]
        # the window where all four sent: from 1 s after the first byte to the first end
        lo, hi = start + 1.0, min(ends.values()) - 0.5
        assert hi - lo > 3.0, (hi - lo)
        sent = sum(n for t, n in released if lo < t <= hi)
        rate = sent * 8 / (hi - lo)
        assert 0.95 * limit <= rate <= 1.03 * limit, rate / limit
        # shared fairly: four equal jobs end together (an unfair share ends one early)
        spread = max(ends.values()) - min(ends.values())
        assert spread < 0.2 * (max(ends.values()) - start), (spread, ends)


def test_a_restarted_gateway_resumes_the_job_without_sending_again(tmp_path: Path) -> None:
    with site(tmp_path) as s:
        s.cp.limit(s.gateway_arn, 16_000_000)  # 2 MB/s
        wait_until(lambda: s.gateway.shaper.limit_bps == 16_000_000, what="the limit")
        vm = random_vm(s.connector, tmp_path, "db", 16 * MiB)  # 4 chunks of 4 MiB
        job = s.cp.start_backup(s.add_vms([vm])["db"])
        wait_until(lambda: s.gateway.job_link.bytes_sent >= 8 * MiB, timeout=20,
                   what="two chunks sent")
        s.cp.limit(s.gateway_arn, None)
        gateway = s.restart()
        assert s.connector.finished == [(job, False)]   # the stop let go of the freeze
        assert s.cp.job(job)["State"] == "RUNNING"      # the control plane still counts on us
        s.cp.wait_job(job, "COMPLETED")
        s.settled()
        assert s.connector.finished == [(job, False), (job, True)]
        assert gateway.job_link.bytes_sent <= 8 * MiB  # the two chunks in the vault skipped


@pytest.mark.long
def test_a_control_plane_restart_mid_job_is_ridden_out(tmp_path: Path) -> None:
    with site(tmp_path) as s:
        # 8 MB/s: 16 MiB take 2 s, and the chunks in flight at the stop end soon (the
        # control plane's stop lets requests in progress finish first)
        s.cp.limit(s.gateway_arn, 64_000_000)
        wait_until(lambda: s.gateway.shaper.limit_bps == 64_000_000, what="the limit")
        vm = random_vm(s.connector, tmp_path, "app", 16 * MiB)
        job = s.cp.start_backup(s.add_vms([vm])["app"])
        wait_until(lambda: s.gateway.job_link.bytes_sent >= 4 * MiB, timeout=20,
                   what="a chunk sent")
        refused: list[bool] = []

        def down() -> None:  # a job call now meets a closed port, and retries
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", int(s.cp.url.rsplit(":", 1)[1])), timeout=1):
                refused.append(False)
            refused.append(True)
            time.sleep(0.5)  # the control plane stays away this long

        s.cp.restart(down)
        assert refused == [True]
        s.cp.wait_job(job, "COMPLETED")
        s.settled()
        assert s.connector.finished == [(job, True)]  # the same run went on: no restart


def test_the_progress_answer_alone_stops_the_job(tmp_path: Path) -> None:
    def hide_aborting(jobs: Sequence[JobOrder]) -> list[JobOrder]:
        return [replace(o, state="RUNNING") for o in jobs]

    with site(tmp_path, jobs_seen=hide_aborting, progress_period=0.3) as s:
        s.cp.limit(s.gateway_arn, 4_000_000)
        wait_until(lambda: s.gateway.shaper.limit_bps == 4_000_000, what="the limit")
        vm = random_vm(s.connector, tmp_path, "big", 24 * MiB)
        job = s.cp.start_backup(s.add_vms([vm])["big"])
        wait_until(lambda: s.gateway.shaper.released, what="the first bytes sent")
        s.cp.backup.stop_backup_job(BackupJobId=job)
        s.cp.wait_job(job, "ABORTED", timeout=10)
        s.settled()
        assert s.connector.finished == [(job, False)]


class ForgetfulLink(JobLink):
    """A job link whose first /missing answer says the vault has everything: the chunks
    are not sent, so only `complete`'s MissingChunks can bring them."""

    lied = False

    async def missing(self, job_id: str, chunk_ids: list[str]) -> list[str]:
        real = await super().missing(job_id, chunk_ids)
        if not ForgetfulLink.lied and real:
            ForgetfulLink.lied = True
            return []
        return real


def test_chunks_the_vault_lacks_at_complete_are_sent_then(tmp_path: Path) -> None:
    with site(tmp_path, link_class=ForgetfulLink) as s:
        vm = random_vm(s.connector, tmp_path, "web", 10 * MiB)
        job = s.cp.start_backup(s.add_vms([vm])["web"])
        point = s.cp.wait_job(job, "COMPLETED")["RecoveryPointArn"]
        s.settled()
        assert ForgetfulLink.lied
        restore = s.cp.backup.start_restore_job(RecoveryPointArn=point, IamRoleArn=ROLE,
                                                Metadata={"vmName": "web2"})["RestoreJobId"]
        s.cp.wait_job(restore, "COMPLETED", restore=True)
        [disk] = s.connector.restores["web2"].disks
        assert sha256(disk.path) == sha256(vm.disks["sda"])


# -- the poll answer's job list (appliance/link.py) ------------------------------------------


def poll_with(jobs: Any) -> PollAnswer:
    return PollAnswer.from_json({"version": 3, "state": "activated", "jobs": jobs})


def test_job_orders_are_read_field_by_field() -> None:
    backup = {"jobId": "0A1B-2C", "type": "BACKUP", "state": "RUNNING",
              "hypervisorArn": "arn:aws:backup-gateway:us-west-2:1:hypervisor/hype-1",
              "vm": {"uuid": "4c4c4544-0042", "name": "web"},
              "base": {"recoveryPointArn": "arn:rp/1", "checkpoint": "bg-1"},
              "recoveryPointArn": "arn:rp/2", "restore": None}
    restore = {**backup, "jobId": "R-1", "type": "RESTORE", "state": "ABORTING", "base": None,
               "restore": {"name": "web-copy", "options": {"storagePool": "default"}}}
    answer = poll_with([backup, restore])
    b, r = answer.jobs
    assert (b.job_id, b.vm_uuid, b.vm_name, b.base_checkpoint, b.invalid) == (
        "0A1B-2C", "4c4c4544-0042", "web", "bg-1", None)
    assert (r.type, r.state, r.restore_name, r.restore_options, r.invalid) == (
        "RESTORE", "ABORTING", "web-copy", {"storagePool": "default"}, None)
    # a bad field: kept, marked, so the runner fails the job saying why
    bad = poll_with([{**backup, "vm": {"uuid": "has space", "name": "web"}}]).jobs[0]
    assert bad.invalid is not None and "vm.uuid" in bad.invalid
    assert "restore.options" in (poll_with([{**restore, "restore": {
        "name": "x", "options": {"k": 1}}}]).jobs[0].invalid or "")
    # no usable id: dropped and counted; a repeated id: dropped
    dropped = poll_with([{**backup, "jobId": "../x"}, backup, backup, "junk"])
    assert [o.job_id for o in dropped.jobs] == ["0A1B-2C"] and dropped.jobs_dropped == 3
    assert poll_with(None).jobs == ()
    with pytest.raises(LinkError):
        poll_with({"not": "a list"})
