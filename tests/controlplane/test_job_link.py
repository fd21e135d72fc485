"""The job link (docs/backups.md) against an in-process control plane: the gateway side is a
signed link client doing what the appliance's job runner does (poll, started, missing, PUT
chunks, progress, complete, failed, restore GETs); the user's side is boto3's `backup` and
`backup-gateway` clients over the real wire. The business clock is a FakeClock, so leases
and lifecycles move when the test says.

The harness (BackupPlane, Gw, chunk/manifest helpers) is imported by test_backup_api.py and
test_job_scheduler.py too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import socket
import threading
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from controlplane.jobscheduler import JobTimings
from controlplane.server import ControlPlane
from gatewaycore import linkproto
from gatewaycore.manifest import CHUNK_SIZE
from tests.controlplane.cpharness import (
    REGION,
    FakeClock,
    LinkClient,
    LinkResponse,
    ObservedPollHub,
    new_identity,
)

ROLE = "arn:aws:iam::123456789012:role/backup-role"
MiB = 1024 * 1024
DISK = 16 * MiB
# Long ticks: the tests call tick() themselves after moving the clock.
TIMINGS = JobTimings(seen_window=60.0, lease=60.0, takeover=900.0, tick=3600.0)


# -- data ---------------------------------------------------------------------------------


def chunk(fill: bytes, size: int = 64 * 1024) -> tuple[str, bytes]:
    """(id, plain bytes) of a chunk of `size` bytes of `fill`."""
    data = (fill * size)[:size]
    return hashlib.sha256(data).hexdigest(), data


def manifest_doc(extents: list[list[Any]], vm: dict[str, Any] | None = None,
                 capacity: int = DISK) -> dict[str, Any]:
    return {"format": 1, "vm": vm or {"storagePool": "fast"},
            "disks": [{"key": "vda", "label": "web.qcow2", "capacity": capacity,
                       "extents": extents}]}


# -- the gateway side ---------------------------------------------------------------------


@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else {}


class JobClient(LinkClient):
    """cpharness's LinkClient plus the job requests, signed as the appliance signs them."""

    def raw(self, method: str, path: str, body: bytes = b"", unsigned: bool = False,
            extra: dict[str, str] | None = None) -> Raw:
        content = linkproto.UNSIGNED_PAYLOAD if unsigned else linkproto.body_sha256(body)
        headers = {**self.identity.sign(method, path, content), **(extra or {})}
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return Raw(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            conn.close()

    def job(self, job_id: str, what: str, **fields: Any) -> LinkResponse:
        return self.post(f"/gateway/jobs/{job_id}/{what}", fields)

    def put_chunk(self, job_id: str, data: bytes, encoding: str = "zlib",
                  chunk_id: str | None = None) -> Raw:
        body = zlib.compress(data, 1) if encoding == "zlib" else data
        cid = chunk_id or hashlib.sha256(data).hexdigest()
        return self.raw("PUT", f"/gateway/jobs/{job_id}/chunks/{cid}", body, unsigned=True,
                        extra={"X-Gateway-Chunk-Encoding": encoding,
                               "Expect": "100-continue"})

    def jobs(self) -> list[dict[str, Any]]:
        resp = self.poll()
        assert resp.status == 200, resp.body
        return list(resp.body["jobs"])

    def backup(self, job_id: str, chunks: list[tuple[str, bytes]], extents: list[list[Any]],
               incremental: bool = False, checkpoint: str | None = "cp-1",
               vm: dict[str, Any] | None = None, **final: Any) -> LinkResponse:
        """A whole backup as the job runner makes it: started, missing, PUT what is
        missing, progress, complete."""
        assert self.job(job_id, "started", incremental=incremental, note="",
                        backupSizeInBytes=DISK).status == 200
        ids = [c for c, _ in chunks]
        absent = self.job(job_id, "missing", chunks=ids)
        assert absent.status == 200, absent.body
        for cid, data in chunks:
            if cid in absent.body["missing"]:
                put = self.put_chunk(job_id, data)
                assert put.status == 201, put.body
        sent = sum(len(d) for _, d in chunks)
        assert self.job(job_id, "progress", bytesTransferred=sent, backupSizeInBytes=DISK,
                        percentDone=99.0, message="sent").body == {"abort": False}
        return self.job(job_id, "complete", incremental=incremental, checkpoint=checkpoint,
                        manifest=manifest_doc(extents, vm), **final)


@dataclass
class Gw:
    link: JobClient
    arn: str

    @property
    def gateway_id(self) -> str:
        return self.arn.rsplit("/", 1)[1]


# -- the control plane --------------------------------------------------------------------


@dataclass
class BackupPlane:
    """A control plane in-process (its loop in a thread) with boto3 clients for both APIs."""

    plane: ControlPlane
    clock: FakeClock
    host: str
    port: int
    loop: asyncio.AbstractEventLoop
    backup: Any = None
    bgw: Any = None
    gateways: list[Gw] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self, service: str, validate: bool = True) -> Any:
        """boto3's client. Each request carries a signed header of its own: the server
        refuses a state-changing request whose signature it accepted before (replays), and
        two identical calls in one second (a refusal, then the same call once its cause is
        gone) sign alike, where a person's two calls would be seconds apart."""
        made = boto3.session.Session().client(
            service, endpoint_url=self.url, region_name=REGION,
            aws_access_key_id=self.plane.access_key_id,
            aws_secret_access_key=self.plane.secret_access_key,
            config=Config(retries={"max_attempts": 1}, parameter_validation=validate),
        )

        def unique(request: Any, **_: Any) -> None:
            request.headers["X-Test-Request"] = uuid.uuid4().hex

        made.meta.events.register_first("before-sign", unique)
        return made

    def call(self, fn: Callable[[], Any]) -> Any:
        """`fn()` on the server's loop (where the store may be used), its result here."""
        async def run() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def tick(self) -> None:
        self.call(self.plane.scheduler.tick)

    def gateway(self, name: str = "gw", identity: Any = None) -> Gw:
        link = JobClient(self.host, self.port, identity or new_identity())
        arn = self.bgw.create_gateway(ActivationKey=link.key(), GatewayDisplayName=name,
                                      GatewayType="BACKUP_VM")["GatewayArn"]
        gw = Gw(link, str(arn))
        self.gateways.append(gw)
        return gw

    def hypervisor(self, gateways: list[Gw], vms: list[tuple[str, str]],
                   host: str = "qemu+tcp://kvm1.lab/system", name: str = "kvm1") -> str:
        """Import a hypervisor, associate `gateways`, report its VMs (uuid, name)."""
        hv = str(self.bgw.import_hypervisor_configuration(Name=name, Host=host)["HypervisorArn"])
        for gw in gateways:
            self.bgw.associate_gateway_to_server(GatewayArn=gw.arn, ServerArn=hv)
        sync = gateways[0].link.poll().body["hypervisor"]["syncRequest"]
        report = gateways[0].link.inventory(hv, sync, [
            {"uuid": uuid, "name": vm_name, "path": f"/var/lib/libvirt/{vm_name}.xml",
             "hostName": "kvm1"} for uuid, vm_name in vms
        ])
        assert report.status == 200, report.body
        return hv

    def vm_arn(self, name: str) -> str:
        for vm in self.bgw.list_virtual_machines()["VirtualMachines"]:
            if vm["Name"] == name:
                return str(vm["ResourceArn"])
        raise AssertionError(f"no VM {name}")

    def vault(self, name: str = "vault1") -> str:
        return str(self.backup.create_backup_vault(BackupVaultName=name)["BackupVaultArn"])

    def start(self, vm_arn: str, vault: str = "vault1", **kw: Any) -> dict[str, Any]:
        out: dict[str, Any] = self.backup.start_backup_job(
            BackupVaultName=vault, ResourceArn=vm_arn, IamRoleArn=ROLE, **kw)
        return out

    def state(self, job_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self.backup.describe_backup_job(BackupJobId=job_id)
        return out


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


@contextlib.contextmanager
def backup_plane(state_dir: Path, clock: FakeClock | None = None,
                 timings: JobTimings = TIMINGS, vault_store: Any = None
                 ) -> Iterator[BackupPlane]:
    """A control plane over `state_dir` (its vaults where `vault_store` says, else the
    state dir); stopped on exit, so another one over the same directory is a restart."""
    clock = clock or FakeClock()
    plane = ControlPlane(state_dir, clock=clock, hub=ObservedPollHub(), job_timings=timings,
                         vault_store=vault_store)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=_run_loop, args=(loop,), daemon=True)
    thread.start()
    host, port = asyncio.run_coroutine_threadsafe(plane.start("127.0.0.1", 0), loop).result(10)
    bp = BackupPlane(plane, clock, host, port, loop)
    bp.backup = bp.client("backup")
    bp.bgw = bp.client("backup-gateway")
    try:
        yield bp
    finally:
        asyncio.run_coroutine_threadsafe(plane.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def bp(tmp_path: Path) -> Iterator[BackupPlane]:
    with backup_plane(tmp_path / "state") as plane:
        yield plane


@dataclass
class Setup:
    bp: BackupPlane
    gw: Gw
    hv: str
    web: str   # VM ARNs
    db: str


def one_gateway(bp: BackupPlane) -> Setup:
    """A vault, a gateway, a libvirt hypervisor with VMs web and db."""
    gw = bp.gateway()
    hv = bp.hypervisor([gw], [("uuid-web", "web"), ("uuid-db", "db")])
    bp.vault()
    return Setup(bp, gw, hv, bp.vm_arn("web"), bp.vm_arn("db"))


@pytest.fixture
def setup(bp: BackupPlane) -> Setup:
    return one_gateway(bp)


# -- backups ------------------------------------------------------------------------------


A = chunk(b"A")
B = chunk(b"B")
C = chunk(b"C")


def test_full_backup_makes_a_completed_point(setup: Setup) -> None:
    bp, gw = setup.bp, setup.gw
    started = bp.start(setup.web, Lifecycle={"DeleteAfterDays": 7})
    job_id = started["BackupJobId"]
    assert bp.state(job_id)["State"] == "RUNNING"

    jobs = gw.link.jobs()
    assert jobs == [{
        "jobId": job_id, "type": "BACKUP", "state": "RUNNING", "hypervisorArn": setup.hv,
        "vm": {"uuid": "uuid-web", "name": "web"}, "base": None,
        "recoveryPointArn": started["RecoveryPointArn"], "restore": None,
    }]
    # A chunk whose bytes are not its id is refused and not kept.
    bad = gw.link.put_chunk(job_id, b"not A", chunk_id=A[0])
    assert bad.status == 400 and bad.json()["error"] == "ChecksumMismatch"

    done = gw.link.backup(job_id, [A, B], [[0, 65536, A[0], 0], [4 * MiB, 65536, B[0], 0]])
    assert done.status == 200, done.body
    assert done.body == {"recoveryPointArn": started["RecoveryPointArn"]}

    job = bp.state(job_id)
    assert job["State"] == "COMPLETED" and job["PercentDone"] == "100.0"
    assert job["BackupSizeInBytes"] == 2 * 65536
    assert job["BackupType"] == "FULL" and job["ResourceName"] == "web"
    point = bp.backup.describe_recovery_point(BackupVaultName="vault1",
                                              RecoveryPointArn=started["RecoveryPointArn"])
    assert point["Status"] == "COMPLETED" and point["BackupSizeInBytes"] == 2 * 65536
    assert point["ResourceArn"] == setup.web and point["ResourceType"] == "VirtualMachine"
    delete_at = point["CalculatedLifecycle"]["DeleteAt"].timestamp()
    assert abs(delete_at - (point["CreationDate"].timestamp() + 7 * 86400)) < 1
    vm = bp.bgw.get_virtual_machine(ResourceArn=setup.web)["VirtualMachine"]
    assert vm["LastBackupDate"] == point["CompletionDate"]
    protected = bp.backup.describe_protected_resource(ResourceArn=setup.web)
    assert protected["LastRecoveryPointArn"] == started["RecoveryPointArn"]
    # The ended job is gone from the poll, and further reports are refused.
    assert gw.link.jobs() == []
    late = gw.link.job(job_id, "progress", bytesTransferred=1, percentDone=1.0)
    assert late.status == 409 and late.body["error"] == "JobEnded"
    with pytest.raises(bp.backup.exceptions.InvalidRequestException, match="COMPLETED"):
        bp.backup.stop_backup_job(BackupJobId=job_id)


def test_complete_carries_the_final_bytes_transferred(setup: Setup) -> None:
    """BytesTransferred at COMPLETED is the gateway's final count from `complete` (the
    last progress report can be seconds old); a gateway that omits it keeps the last
    progress figure; a bad value is refused before anything is committed."""
    bp, gw = setup.bp, setup.gw
    sent = len(A[1]) + len(B[1])     # what backup() reports in its progress
    extents = [[0, 65536, A[0], 0], [4 * MiB, 65536, B[0], 0]]

    old = bp.start(setup.web)["BackupJobId"]
    assert gw.link.backup(old, [A, B], extents).status == 200
    assert bp.state(old)["BytesTransferred"] == sent

    job_id = bp.start(setup.web)["BackupJobId"]
    bad = gw.link.backup(job_id, [A, B], extents, bytesTransferred=-1)
    assert bad.status == 400 and bad.body["message"].startswith("bytesTransferred")
    assert bp.state(job_id)["State"] == "RUNNING"
    done = gw.link.job(job_id, "complete", incremental=False, checkpoint="cp-1",
                       manifest=manifest_doc(extents, None), bytesTransferred=sent + 4321)
    assert done.status == 200, done.body
    job = bp.state(job_id)
    assert job["State"] == "COMPLETED" and job["BytesTransferred"] == sent + 4321


def test_incremental_is_composed_onto_its_base(setup: Setup) -> None:
    bp, gw = setup.bp, setup.gw
    first = bp.start(setup.web)
    assert gw.link.backup(first["BackupJobId"], [A, B],
                          [[0, 65536, A[0], 0], [4 * MiB, 65536, B[0], 0]],
                          checkpoint="bg-1").status == 200
    second = bp.start(setup.web)
    (entry,) = gw.link.jobs()
    assert entry["base"] == {"recoveryPointArn": first["RecoveryPointArn"],
                             "checkpoint": "bg-1"}
    # The change list: C over the first 64 KiB, zeros over B's range; A and B are held.
    absent = gw.link.job(second["BackupJobId"], "missing", chunks=[A[0], C[0]])
    assert absent.body == {"missing": [C[0]]}
    done = gw.link.backup(second["BackupJobId"], [C],
                          [[0, 65536, C[0], 0], [4 * MiB, 65536, None, 0],
                           [8 * MiB, 32768, A[0], 32768]],
                          incremental=True, checkpoint="bg-2")
    assert done.status == 200, done.body
    job = bp.state(second["BackupJobId"])
    assert job["BackupType"] == "INCREMENTAL" and job["BackupSizeInBytes"] == 65536 + 32768
    stored = bp.call(lambda: asyncio.to_thread(
        bp.plane.vaults.manifest, bp.plane.backups.point(second["RecoveryPointArn"]).storage,
        bp.plane.backups.point(second["RecoveryPointArn"]).point_id))
    assert [e.to_json() for e in stored.disks[0].extents] == [
        [0, 65536, C[0], 0], [8 * MiB, 32768, A[0], 32768]]
    # The newest point is the next one's base.
    third = bp.start(setup.web)
    assert gw.link.jobs()[0]["base"]["recoveryPointArn"] == second["RecoveryPointArn"]
    assert third["RecoveryPointArn"] != second["RecoveryPointArn"]


def test_complete_names_the_missing_chunks(setup: Setup) -> None:
    bp, gw = setup.bp, setup.gw
    job_id = bp.start(setup.web)["BackupJobId"]
    assert gw.link.job(job_id, "started", incremental=False, note="",
                       backupSizeInBytes=DISK).status == 200
    assert gw.link.put_chunk(job_id, A[1], encoding="identity").status == 201
    assert gw.link.put_chunk(job_id, A[1]).json() == {"stored": False}
    extents = [[0, 65536, A[0], 0], [4 * MiB, 65536, B[0], 0]]
    refused = gw.link.job(job_id, "complete", incremental=False, checkpoint=None,
                          manifest=manifest_doc(extents))
    assert refused.status == 400 and refused.body["error"] == "MissingChunks"
    assert refused.body["missing"] == [B[0]]
    assert bp.state(job_id)["State"] == "RUNNING"
    # An incremental claim without a base, and a malformed manifest, name the field.
    bad = gw.link.job(job_id, "complete", incremental=True, checkpoint=None,
                      manifest=manifest_doc(extents))
    assert bad.status == 400 and bad.body["message"].startswith("incremental:")
    bad = gw.link.job(job_id, "complete", incremental=False, checkpoint=None,
                      manifest=manifest_doc([[0, 65536, "xyz", 0]]))
    assert bad.status == 400 and "manifest.disks[0].extents[0].chunk" in bad.body["message"]
    # Sent, the complete goes through.
    assert gw.link.put_chunk(job_id, B[1]).status == 201
    assert gw.link.job(job_id, "complete", incremental=False, checkpoint=None,
                       manifest=manifest_doc(extents)).status == 200


def test_stop_backup_job_is_confirmed_by_the_gateway(setup: Setup) -> None:
    bp, gw = setup.bp, setup.gw
    job_id = bp.start(setup.web)["BackupJobId"]
    version = gw.link.poll().body["version"]
    bp.backup.stop_backup_job(BackupJobId=job_id)
    assert bp.state(job_id)["State"] == "ABORTING"
    polled = gw.link.poll(after=version, wait=5).body
    assert polled["version"] > version
    assert [(j["jobId"], j["state"]) for j in polled["jobs"]] == [(job_id, "ABORTING")]
    answer = gw.link.job(job_id, "progress", bytesTransferred=10, percentDone=5.0)
    assert answer.body == {"abort": True}
    assert gw.link.job(job_id, "failed", message="stopped as asked", aborted=True).status == 200
    job = bp.state(job_id)
    assert job["State"] == "ABORTED" and "stopped as asked" in job["StatusMessage"]
    assert gw.link.jobs() == []


def test_only_the_holder_may_report(bp: BackupPlane) -> None:
    s = one_gateway(bp)
    other = bp.gateway("other")
    job_id = bp.start(s.web)["BackupJobId"]
    unknown = other.link.job(job_id, "progress", bytesTransferred=1, percentDone=1.0)
    assert unknown.status == 404 and unknown.body["error"] == "UnknownJob"
    nonsense = s.gw.link.job("not-a-job", "progress", bytesTransferred=1, percentDone=1.0)
    assert nonsense.status == 404
    unsigned = s.gw.link.send("POST", f"/gateway/jobs/{job_id}/progress", b"{}",
                              headers={"X-Gateway-Key-Id": s.gw.link.identity.key_id})
    assert unsigned.status == 401 and unsigned.body["error"] == "InvalidSignature"
    wrong = s.gw.link.raw("GET", f"/gateway/jobs/{job_id}/manifest")
    assert wrong.status == 400 and wrong.json()["error"] == "WrongJobType"
    bad = s.gw.link.job(job_id, "progress", bytesTransferred=-1, percentDone=1.0)
    assert bad.status == 400 and bad.body["message"].startswith("bytesTransferred:")


def test_restart_mid_job_keeps_it_running(tmp_path: Path) -> None:
    clock = FakeClock()
    identity = new_identity()
    with backup_plane(tmp_path / "state", clock) as bp:
        s = one_gateway(bp)
        job_id = bp.start(s.web)["BackupJobId"]
        assert s.gw.link.job(job_id, "started", incremental=False, note="",
                             backupSizeInBytes=DISK).status == 200
        assert s.gw.link.put_chunk(job_id, A[1]).status == 201
        identity = s.gw.link.identity
    clock.advance(20)
    with backup_plane(tmp_path / "state", clock) as bp:
        link = JobClient(bp.host, bp.port, identity)
        assert bp.state(job_id)["State"] == "RUNNING"
        assert [j["jobId"] for j in link.jobs()] == [job_id]
        assert link.job(job_id, "progress", bytesTransferred=65536,
                        percentDone=50.0).body == {"abort": False}
        assert link.put_chunk(job_id, B[1]).status == 201
        done = link.job(job_id, "complete", incremental=False, checkpoint="c",
                        manifest=manifest_doc([[0, 65536, A[0], 0], [4 * MiB, 65536, B[0], 0]]))
        assert done.status == 200, done.body
        assert bp.state(job_id)["State"] == "COMPLETED"


# -- restores -----------------------------------------------------------------------------


def completed_point(s: Setup) -> str:
    started = s.bp.start(s.web)
    done = s.gw.link.backup(started["BackupJobId"], [A, B],
                            [[0, 65536, A[0], 0], [4 * MiB, 65536, B[0], 0]])
    assert done.status == 200, done.body
    return str(started["RecoveryPointArn"])


def test_restore_reads_the_manifest_and_its_chunks(setup: Setup) -> None:
    bp, gw = setup.bp, setup.gw
    point = completed_point(setup)
    meta = bp.backup.get_recovery_point_restore_metadata(
        BackupVaultName="vault1", RecoveryPointArn=point)["RestoreMetadata"]
    assert meta == {"RestoreTo": "libvirt", "hypervisorArn": setup.hv, "vmId": "uuid-web",
                    "vmName": "web", "storagePool": "fast"}
    job_id = bp.backup.start_restore_job(RecoveryPointArn=point, IamRoleArn=ROLE,
                                         Metadata={**meta, "vmName": "web-restored"})[
        "RestoreJobId"]
    (entry,) = gw.link.jobs()
    assert entry["type"] == "RESTORE" and entry["recoveryPointArn"] == point
    assert entry["restore"] == {"name": "web-restored", "options": {"storagePool": "fast"}}

    got = gw.link.raw("GET", f"/gateway/jobs/{job_id}/manifest")
    assert got.status == 200
    assert got.json()["disks"][0]["extents"] == [[0, 65536, A[0], 0],
                                                  [4 * MiB, 65536, B[0], 0]]
    data = gw.link.raw("GET", f"/gateway/jobs/{job_id}/chunks/{A[0]}")
    assert data.status == 200
    plain = (zlib.decompress(data.body) if data.headers["x-gateway-chunk-encoding"] == "zlib"
             else data.body)
    assert plain == A[1]
    refused = gw.link.raw("GET", f"/gateway/jobs/{job_id}/chunks/{C[0]}")
    assert refused.status == 404 and refused.json()["error"] == "UnknownChunk"

    assert gw.link.job(job_id, "progress", bytesTransferred=131072,
                       percentDone=100.0).status == 200
    done = gw.link.job(job_id, "complete", vm={"uuid": "uuid-new", "name": "web-restored",
                                               "path": "/var/lib/libvirt/web-restored.xml",
                                               "hostName": "kvm1"})
    assert done.status == 200, done.body
    job = bp.backup.describe_restore_job(RestoreJobId=job_id)
    assert job["Status"] == "COMPLETED" and job["PercentDone"] == "100.0"
    created = job["CreatedResourceArn"]
    assert created == bp.vm_arn("web-restored")
    assert job["SourceResourceArn"] == setup.web
    # The new name is now taken on that hypervisor.
    with pytest.raises(bp.backup.exceptions.InvalidParameterValueException):
        bp.backup.start_restore_job(RecoveryPointArn=point,
                                    Metadata={**meta, "vmName": "web-restored"})


def test_a_chunk_is_refused_before_its_body_is_sent(setup: Setup) -> None:
    """With `Expect: 100-continue` a refusal arrives instead of `100 Continue`: a chunk
    declared over the bound, or with an unknown encoding, costs the gateway no bytes."""
    job_id = setup.bp.start(setup.web)["BackupJobId"]
    path = f"/gateway/jobs/{job_id}/chunks/{A[0]}"
    for encoding, length, status, words in (
        ("identity", CHUNK_SIZE + 2048, 413, "body: larger than"),
        ("gzip", len(A[1]), 400, "zlib"),
    ):
        headers = setup.gw.link.identity.sign("PUT", path, linkproto.UNSIGNED_PAYLOAD)
        head = "".join(f"{k}: {v}\r\n" for k, v in {
            **headers, "Host": "x", "Content-Length": str(length),
            "X-Gateway-Chunk-Encoding": encoding, "Expect": "100-continue"}.items())
        with socket.create_connection((setup.bp.host, setup.bp.port), timeout=10) as sock:
            sock.sendall(f"PUT {path} HTTP/1.1\r\n{head}\r\n".encode())
            reader = sock.makefile("rb")
            status_line = reader.readline().decode()
            assert status_line.split()[1] == str(status), status_line
            length_header = 0
            while (line := reader.readline().decode().strip()):
                if line.lower().startswith("content-length:"):
                    length_header = int(line.split(":")[1])
            body = json.loads(reader.read(length_header))
        assert words in body["message"], body
    # The job still takes the chunk sent properly.
    assert setup.gw.link.put_chunk(job_id, A[1]).status == 201
