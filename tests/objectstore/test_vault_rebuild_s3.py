"""The control plane with its vaults in a real Ceph RADOS Gateway bucket (`--vault-store`
settings with [s3]): backups, an incremental, a restore's reads and the expiry's reclaim go
to the bucket; a control plane whose state directory is gone entirely is rebuilt from the
bucket, the settings and the master key alone; two control planes over the same vault
storage put the same chunks at once and the bucket keeps exactly one of each.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest

from controlplane.vaultsettings import load
from tests.controlplane.test_job_link import DISK, manifest_doc, one_gateway
from tests.controlplane.vaultharness import (
    FULL_EXTENTS,
    A,
    B,
    C,
    assert_same,
    back_up,
    rebuild_cli,
    restore_reads,
    snapshot,
    vault_plane,
)
from tools import cephrgw

PREFIX = "cp1/"


@pytest.fixture
def settings_file(rgw: cephrgw.Rgw, bucket: str, credentials_file: Path,
                  tmp_path: Path) -> Path:
    path = tmp_path / "vault-store.toml"
    path.write_text(cephrgw.vault_store_toml(rgw.endpoint, bucket, credentials_file,
                                             prefix=PREFIX, key_file="master.key"))
    return path


def keys(admin: Any, bucket: str) -> set[str]:
    out: set[str] = set()
    for page in admin.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out |= {o["Key"] for o in page.get("Contents", [])}
    return out


def test_backup_incremental_restore_and_expiry_reclaim_in_the_bucket(
        tmp_path: Path, settings_file: Path, admin: Any, bucket: str) -> None:
    with vault_plane(tmp_path / "state", load(settings_file)) as bp:
        _, before = back_up(bp)
        storage = bp.plane.backups.vault("us-west-2", "vault1").storage
        assert not (tmp_path / "state" / "vaults").exists()  # nothing went to the disk
        held = keys(admin, bucket)
        chunk_key = {cid: f"{PREFIX}{storage}/chunks/{cid[:2]}/{cid}" for cid, _ in (A, B, C)}
        assert set(chunk_key.values()) <= held
        first, second = (p["RecoveryPointArn"] for p in before.points)
        first_id, second_id = (arn.rsplit(":", 1)[1] for arn in (first, second))
        for point_id in (first_id, second_id):
            assert f"{PREFIX}{storage}/points/{point_id}.json" in held
            assert f"{PREFIX}{storage}/meta/rp-{point_id}.json" in held
        assert {f"{PREFIX}{storage}/meta/key.json", f"{PREFIX}{storage}/meta/vault.json"} <= held
        restore_reads(bp, second, before.restore_metadata)

        # The full point expires after 30 days: its manifest and record go, and A (which
        # only it named) is reclaimed from the bucket; B and C stay for the incremental.
        bp.clock.advance(31 * 86400)
        bp.tick()
        listed = bp.backup.list_recovery_points_by_backup_vault(BackupVaultName="vault1")
        assert [p["RecoveryPointArn"] for p in listed["RecoveryPoints"]] == [second]
        held = keys(admin, bucket)
        assert chunk_key[A[0]] not in held
        assert {chunk_key[B[0]], chunk_key[C[0]]} <= held
        assert f"{PREFIX}{storage}/points/{first_id}.json" not in held
        assert f"{PREFIX}{storage}/meta/rp-{first_id}.json" not in held


def test_rebuild_from_the_bucket_when_the_state_directory_is_gone(
        tmp_path: Path, settings_file: Path) -> None:
    state = tmp_path / "state"
    with vault_plane(state, load(settings_file)) as bp:
        _, before = back_up(bp)
    shutil.rmtree(state)

    master = tmp_path / "master.key"
    kept = master.read_bytes()
    master.write_bytes(os.urandom(32))
    refused = rebuild_cli(state, settings_file)
    assert refused.returncode == 2 and "was wrapped under another key" in refused.stderr
    master.write_bytes(kept)

    done = rebuild_cli(state, settings_file)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("vault vault1 (us-west-2, storage v-")
    assert done.stdout.rstrip().endswith("restored; recovery points: 2 restored, "
                                         "0 already present, 0 damaged")
    with vault_plane(state, load(settings_file)) as bp:
        after = snapshot(bp)
        assert_same(before, after)
        restore_reads(bp, after.points[-1]["RecoveryPointArn"], after.restore_metadata)


def test_two_control_planes_put_the_same_chunks_at_once(tmp_path: Path,
                                                        settings_file: Path) -> None:
    """The second control plane is rebuilt from the bucket while the first runs, so both
    serve the same vault storage; each chunk raced from both is stored exactly once, both
    puts succeed, and either plane reads what the other stored."""
    with vault_plane(tmp_path / "one", load(settings_file)) as one:
        back_up(one)
        done = rebuild_cli(tmp_path / "two", settings_file)
        assert done.returncode == 0, done.stderr
        with vault_plane(tmp_path / "two", load(settings_file)) as two:
            storage = one.plane.backups.vault("us-west-2", "vault1").storage
            assert two.plane.backups.vault("us-west-2", "vault1").storage == storage
            for n in range(6):
                plain = hashlib.sha256(f"raced {n}".encode()).digest() * 2048
                chunk_id = hashlib.sha256(plain).hexdigest()
                body = zlib.compress(plain, 1)
                barrier = threading.Barrier(2)
                results: dict[str, bool | BaseException] = {}

                def put(name: str, plane: Any, chunk_id: str = chunk_id,
                        body: bytes = body, barrier: threading.Barrier = barrier,
                        results: dict[str, bool | BaseException] = results) -> None:
                    barrier.wait()
                    try:
                        results[name] = plane.vaults.put_chunk(storage, chunk_id, "zlib",
                                                               body)
                    except BaseException as exc:  # reported below, not lost in a thread
                        results[name] = exc

                threads = [threading.Thread(target=put, args=(name, bp.plane))
                           for name, bp in (("one", one), ("two", two))]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(60)
                assert sorted(results.values(), key=str) == [False, True], results
                for bp in (one, two):
                    encoding, stored = bp.plane.vaults.get_chunk(storage, chunk_id)
                    assert encoding == "zlib" and zlib.decompress(stored) == plain


def test_a_bucket_gone_mid_backup_is_named_and_nothing_completes(
        tmp_path: Path, settings_file: Path, admin: Any, bucket: str, rgw: cephrgw.Rgw) -> None:
    """The vault's bucket deleted in the middle of a backup: the gateway's chunk PUT and
    `complete` get a 5xx naming the bucket and its endpoint (the gateway retries those), the
    job stays RUNNING with a StatusMessage saying what it waits for, no recovery point
    appears; once the bucket answers again a chunk goes in and the message says so."""
    with vault_plane(tmp_path / "state", load(settings_file)) as bp:
        setup = one_gateway(bp)
        link = setup.gw.link
        job_id = bp.start(setup.web)["BackupJobId"]
        assert link.job(job_id, "started", incremental=False, note="",
                        backupSizeInBytes=DISK).status == 200
        assert link.put_chunk(job_id, A[1]).status == 201
        for page in admin.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                admin.delete_object(Bucket=bucket, Key=item["Key"])
        admin.delete_bucket(Bucket=bucket)

        named = f"S3 bucket '{bucket}' at {rgw.endpoint} does not exist"
        put = link.put_chunk(job_id, B[1])
        assert put.status == 500 and named in put.json()["message"], put.body
        job = bp.backup.describe_backup_job(BackupJobId=job_id)
        assert job["State"] == "RUNNING", job
        assert job["StatusMessage"].startswith("waiting for the vault's storage"), job
        assert named in job["StatusMessage"], job
        done = link.job(job_id, "complete", incremental=False, checkpoint="bg-1",
                        manifest=manifest_doc(FULL_EXTENTS))
        assert done.status == 500 and named in done.body["message"], done.body
        assert bp.backup.describe_backup_job(BackupJobId=job_id)["State"] == "RUNNING"
        listed = bp.backup.list_recovery_points_by_backup_vault(BackupVaultName="vault1")
        assert listed["RecoveryPoints"] == []

        admin.create_bucket(Bucket=bucket)
        assert link.put_chunk(job_id, B[1]).status == 201
        job = bp.backup.describe_backup_job(BackupJobId=job_id)
        assert job["StatusMessage"].endswith("the vault's storage answers again"), job
