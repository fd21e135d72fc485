"""Rebuilding the vaults' rows from their storage alone (local directory backend): a real
control plane in-process makes a vault and two recovery points through the job link; the
database and secrets.key are deleted (the vaults directory and the master key file kept);
the real CLI rebuilds; a control plane started again shows the same vault and points and
serves a restore's manifest and chunks. A wrong master key is refused with nothing written.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from controlplane.store import DB_FILE
from controlplane.vaultkeys import KEY_OBJECT, VaultKeyError
from controlplane.vaultsettings import VaultStoreSettings, load
from tests.controlplane.vaultharness import (
    C,
    assert_same,
    back_up,
    forget_database,
    rebuild_cli,
    restore_reads,
    snapshot,
    vault_plane,
)


@pytest.fixture
def settings_file(tmp_path: Path) -> Path:
    path = tmp_path / "vault-store.toml"
    path.write_text('[local]\nkey_file = "master.key"\n')
    return path


def rows(state_dir: Path, table: str) -> int:
    db = sqlite3.connect(state_dir / DB_FILE)
    try:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    finally:
        db.close()


def test_rebuild_from_the_vaults_directory_and_the_master_key(tmp_path: Path,
                                                              settings_file: Path) -> None:
    state = tmp_path / "state"
    settings = load(settings_file)
    with vault_plane(state, settings) as bp:
        _, before = back_up(bp)
    master = tmp_path / "master.key"
    assert len(master.read_bytes()) == 32 and (master.stat().st_mode & 0o777) == 0o600
    (storage,) = [p.name for p in (state / "vaults").iterdir()]
    meta = sorted(p.name for p in (state / "vaults" / storage / "meta").iterdir())
    assert meta[0] == KEY_OBJECT and "vault.json" in meta
    assert sum(name.startswith("rp-") for name in meta) == 2

    forget_database(state)
    done = rebuild_cli(state, settings_file)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"vault vault1 (us-west-2, storage {storage}): restored; recovery points: 2 restored,"
        " 0 already present, 0 damaged"]
    # Again: nothing new, nothing doubled.
    again = rebuild_cli(state, settings_file)
    assert again.returncode == 0, again.stderr
    assert "present; recovery points: 0 restored, 2 already present" in again.stdout
    assert rows(state, "recovery_points") == 2 and rows(state, "backup_jobs") == 0

    with vault_plane(state, settings) as bp:
        after = snapshot(bp)
        assert_same(before, after)
        newest = after.points[-1]["RecoveryPointArn"]
        by_resource = bp.backup.list_recovery_points_by_resource(
            ResourceArn=after.points[0]["ResourceArn"])["RecoveryPoints"]
        assert [p["RecoveryPointArn"] for p in by_resource] == [
            p["RecoveryPointArn"] for p in before.points]
        restore_reads(bp, newest, after.restore_metadata)


def test_a_wrong_master_key_is_refused_and_nothing_is_written(tmp_path: Path,
                                                              settings_file: Path) -> None:
    state = tmp_path / "state"
    with vault_plane(state, load(settings_file)) as bp:
        back_up(bp)
    forget_database(state)
    master = tmp_path / "master.key"
    kept = master.read_bytes()
    master.write_bytes(os.urandom(32))
    refused = rebuild_cli(state, settings_file)
    assert refused.returncode == 2
    assert "was wrapped under another key" in refused.stderr
    assert str(master) in refused.stderr and "Traceback" not in refused.stderr
    assert kept.hex() not in refused.stderr + refused.stdout
    assert not (state / DB_FILE).exists() or rows(state, "backup_vaults") == 0
    # A control plane does not start on it either: it would fail every backup.
    with pytest.raises(VaultKeyError, match="another key"), vault_plane(
            state, load(settings_file)):
        pass
    # A key file that is no key at all, and a missing one, say so.
    master.write_bytes(b"short")
    assert "holds 5 bytes, not 32" in rebuild_cli(state, settings_file).stderr
    master.unlink()
    missing = rebuild_cli(state, settings_file)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not master.exists()  # a rebuild never makes a new key
    master.write_bytes(kept)
    master.chmod(0o600)
    assert rebuild_cli(state, settings_file).returncode == 0


def test_a_point_missing_chunks_is_reported_damaged_and_not_imported(
        tmp_path: Path, settings_file: Path) -> None:
    state = tmp_path / "state"
    with vault_plane(state, load(settings_file)) as bp:
        _, before = back_up(bp)
    forget_database(state)
    (storage,) = [p.name for p in (state / "vaults").iterdir()]
    chunks = state / "vaults" / storage / "chunks"
    (chunks / C[0][:2] / C[0]).unlink()  # only the incremental point names C
    done = rebuild_cli(state, settings_file)
    assert done.returncode == 1, done.stderr
    first, second = (p["RecoveryPointArn"] for p in before.points)
    assert "1 restored, 0 already present, 1 damaged" in done.stdout
    assert f"damaged, not imported: {second}: the vault lacks 1 of the 2 chunks" in done.stdout
    with vault_plane(state, load(settings_file)) as bp:
        listed = bp.backup.list_recovery_points_by_backup_vault(BackupVaultName="vault1")
        assert [p["RecoveryPointArn"] for p in listed["RecoveryPoints"]] == [first]


def test_a_lost_key_json_is_not_replaced_by_a_guess(tmp_path: Path) -> None:
    """A vault without key.json is taken for one made before key.json existed, whose key
    was derived from secrets.key; when that derived key decrypts none of its chunks, the
    start is refused naming the vault, rather than wrapping a wrong key for good."""
    state = tmp_path / "state"
    with vault_plane(state, VaultStoreSettings()) as bp:
        back_up(bp)
    (storage,) = [p.name for p in (state / "vaults").iterdir()]
    (state / "vaults" / storage / "meta" / KEY_OBJECT).unlink()
    with pytest.raises(VaultKeyError, match=f"vault {storage} has no key.json and none of"
                       " 3 of its chunks decrypts"), vault_plane(state, VaultStoreSettings()):
        pass
    assert not (state / "vaults" / storage / "meta" / KEY_OBJECT).exists()
