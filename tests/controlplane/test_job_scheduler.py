"""Scheduling (docs/backups.md, "Scheduling"): slots, spreading, one job per VM, leases and
takeovers, deleted gateways, and DeleteAfterDays, through the real wire (boto3's `backup`
client, the signed job link) with the business clock moved by the test: no sleeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.jobscheduler import JobTimings
from tests.controlplane.cpharness import FakeClock
from tests.controlplane.test_job_link import (
    A,
    B,
    BackupPlane,
    Gw,
    MiB,
    backup_plane,
    one_gateway,
)

VMS = [(f"uuid-{i}", f"vm{i}") for i in range(6)]


@pytest.fixture
def bp(tmp_path: Path) -> Iterator[BackupPlane]:
    with backup_plane(tmp_path / "state") as plane:
        yield plane


def held(gw: Gw) -> list[str]:
    return [j["jobId"] for j in gw.link.jobs()]


def finish(gw: Gw, job_id: str) -> None:
    done = gw.link.backup(job_id, [A], [[0, 65536, A[0], 0]])
    assert done.status == 200, done.body


def test_four_jobs_per_gateway_then_fifo(bp: BackupPlane) -> None:
    gw = bp.gateway()
    hv = bp.hypervisor([gw], VMS)
    bp.vault()
    jobs = [bp.start(bp.vm_arn(name))["BackupJobId"] for _, name in VMS]
    states = [bp.state(j) for j in jobs]
    assert [s["State"] for s in states] == ["RUNNING"] * 4 + ["PENDING"] * 2
    for pending in states[4:]:
        assert pending["StatusMessage"] == (
            f"waiting for a free slot: 1 gateway(s) on hypervisor {hv} run 4 of 4 jobs")
    assert held(gw) == jobs[:4]

    finish(gw, jobs[0])  # a slot frees: the oldest waiting job takes it
    assert bp.state(jobs[4])["State"] == "RUNNING"
    assert bp.state(jobs[5])["State"] == "PENDING"
    assert held(gw) == jobs[1:5]
    assert gw.link.job(jobs[1], "failed", message="disk unreadable").status == 200
    failed = bp.state(jobs[1])
    assert failed["State"] == "FAILED" and "disk unreadable" in failed["StatusMessage"]
    assert held(gw) == [jobs[2], jobs[3], jobs[4], jobs[5]]
    listed = bp.backup.list_backup_jobs(ByState="RUNNING")["BackupJobs"]
    assert sorted(j["BackupJobId"] for j in listed) == sorted(jobs[2:])


def test_jobs_spread_over_the_gateways_of_the_hypervisor(bp: BackupPlane) -> None:
    one, two = bp.gateway("one"), bp.gateway("two")
    bp.hypervisor([one, two], VMS)
    bp.vault()
    for _, name in VMS:
        bp.start(bp.vm_arn(name))
    assert (len(held(one)), len(held(two))) == (3, 3)


def test_one_backup_of_a_vm_at_a_time(bp: BackupPlane) -> None:
    s = one_gateway(bp)
    first = bp.start(s.web)
    second = bp.start(s.web)
    waiting = bp.state(second["BackupJobId"])
    assert waiting["State"] == "PENDING"
    assert waiting["StatusMessage"] == (
        f"waiting for backup job {first['BackupJobId']} of the same VM")
    finish(s.gw, first["BackupJobId"])
    (entry,) = s.gw.link.jobs()
    assert entry["jobId"] == second["BackupJobId"]
    assert entry["base"] == {"recoveryPointArn": first["RecoveryPointArn"], "checkpoint": "cp-1"}


def test_a_gateway_not_seen_gets_jobs_when_it_polls(bp: BackupPlane) -> None:
    s = one_gateway(bp)
    bp.clock.advance(61)
    job_id = bp.start(s.web)["BackupJobId"]
    job = bp.state(job_id)
    assert job["State"] == "PENDING"
    assert job["StatusMessage"] == (
        f"no gateway associated with hypervisor {s.hv} has been seen in 60 s")
    assert held(s.gw) == [job_id]  # its poll is what makes it eligible
    assert bp.state(job_id)["State"] == "RUNNING"


def test_lease_lost_then_taken_over_by_another_gateway(tmp_path: Path) -> None:
    timings = JobTimings(seen_window=5.0, lease=5.0, takeover=30.0, tick=3600.0)
    with backup_plane(tmp_path / "state", timings=timings) as bp:
        one, two = bp.gateway("one"), bp.gateway("two")
        hv = bp.hypervisor([one, two], VMS[:1])
        bp.vault()
        job_id = bp.start(bp.vm_arn("vm0"))["BackupJobId"]
        holder, other = (one, two) if held(one) else (two, one)
        assert held(holder) == [job_id]
        assert holder.link.job(job_id, "started", incremental=False, note="",
                               backupSizeInBytes=MiB).status == 200
        bp.clock.advance(6)
        bp.tick()
        job = bp.state(job_id)
        assert job["State"] == "PENDING"
        assert job["StatusMessage"].startswith(f"gateway {holder.arn} stopped reporting at ")
        assert f"waiting for it or another gateway of {hv}, until " in job["StatusMessage"]
        assert held(other) == [job_id]  # it polled: it is seen, and takes the job
        assert bp.state(job_id)["State"] == "RUNNING"
        late = holder.link.job(job_id, "progress", bytesTransferred=1, percentDone=1.0)
        assert late.status == 409 and late.body["error"] == "NotAssigned"
        assert held(holder) == []
        finish(other, job_id)
        assert bp.state(job_id)["State"] == "COMPLETED"


def test_lease_lost_and_no_gateway_until_the_deadline_fails(bp: BackupPlane) -> None:
    s = one_gateway(bp)
    job_id = bp.start(s.web)["BackupJobId"]
    stop_id = bp.start(s.db)["BackupJobId"]
    bp.backup.stop_backup_job(BackupJobId=stop_id)
    bp.clock.advance(61)
    bp.tick()
    assert bp.state(job_id)["State"] == "PENDING"
    stopped = bp.state(stop_id)  # nothing left to stop
    assert stopped["State"] == "ABORTED" and "stopped reporting" in stopped["StatusMessage"]
    bp.clock.advance(13 * 60)  # 14 min after the gateway was last heard from
    bp.tick()
    assert bp.state(job_id)["State"] == "PENDING"
    bp.clock.advance(60)  # 15 min and 1 s
    bp.tick()
    job = bp.state(job_id)
    assert job["State"] == "FAILED"
    assert job["StatusMessage"].startswith(f"gateway {s.gw.arn} stopped reporting at ")
    assert f"no gateway of {s.hv} took the job over by " in job["StatusMessage"]


def test_a_deleted_gateways_jobs_go_back_at_once(bp: BackupPlane) -> None:
    s = one_gateway(bp)
    job_id = bp.start(s.web)["BackupJobId"]
    bp.bgw.delete_gateway(GatewayArn=s.gw.arn)
    bp.call(lambda: None)  # the kick the deletion queued on the loop has run
    job = bp.state(job_id)
    assert job["State"] == "PENDING"
    assert job["StatusMessage"].startswith(f"gateway {s.gw.arn} was deleted at ")
    replacement = bp.gateway("replacement")
    bp.bgw.associate_gateway_to_server(GatewayArn=replacement.arn, ServerArn=s.hv)
    assert held(replacement) == [job_id]


def test_delete_after_days_expires_the_point_and_reclaims_its_chunks(
        tmp_path: Path) -> None:
    clock = FakeClock()
    with backup_plane(tmp_path / "state", clock) as bp:
        s = one_gateway(bp)
        keep = bp.start(s.db)
        assert s.gw.link.backup(keep["BackupJobId"], [A], [[0, 65536, A[0], 0]]).status == 200
        short = bp.start(s.web, Lifecycle={"DeleteAfterDays": 1})
        assert s.gw.link.backup(short["BackupJobId"], [A, B],
                                [[0, 65536, A[0], 0], [4 * MiB, 65536, B[0], 0]]).status == 200
        storage = bp.plane.backups.vault("us-west-2", "vault1").storage

        def missing() -> list[str]:
            return list(bp.plane.vaults.missing(storage, [A[0], B[0]]))

        assert bp.call(missing) == []
        clock.advance(86400 - 10)
        bp.tick()
        assert bp.backup.describe_recovery_point(
            BackupVaultName="vault1", RecoveryPointArn=short["RecoveryPointArn"])
        clock.advance(20)
        bp.tick()
        with pytest.raises(bp.backup.exceptions.ResourceNotFoundException):
            bp.backup.describe_recovery_point(BackupVaultName="vault1",
                                              RecoveryPointArn=short["RecoveryPointArn"])
        assert bp.call(missing) == [B[0]]  # A is still the db point's
        vm = bp.bgw.get_virtual_machine(ResourceArn=s.web)["VirtualMachine"]
        assert "LastBackupDate" not in vm
        vault = bp.backup.describe_backup_vault(BackupVaultName="vault1")
        assert vault["NumberOfRecoveryPoints"] == 1
