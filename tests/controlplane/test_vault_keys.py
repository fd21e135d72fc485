"""Vault data keys (controlplane/vaultkeys.py and their use in vaults.py): wrapped under the
key ring, bound to their vault, refused by name under the wrong key; vaults made before
key.json migrated with their old derived key; the index's records sealed to their name.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

import pytest

from controlplane.atrest import SecretsAtRest
from controlplane.chunkstore import LocalVaultStores
from controlplane.vaultkeys import KEY_OBJECT, KeyRing, RecordError, RecordSeal, VaultKeyError
from controlplane.vaults import VaultError, Vaults
from gatewaycore.manifest import CHUNK_SIZE, Disk, Extent, Manifest

VAULT = "v-0123456789abcdef"


def chunk(seed: int) -> tuple[str, bytes]:
    plain = hashlib.sha256(b"%d" % seed).digest() * 1024
    return hashlib.sha256(plain).hexdigest(), zlib.compress(plain, 1)


def test_wrap_unwrap_binds_the_vault_and_names_the_wrong_key(tmp_path: Path) -> None:
    ring = KeyRing.from_key_file(tmp_path / "master.key", create=True)
    assert (tmp_path / "master.key").stat().st_mode & 0o777 == 0o600
    data_key = os.urandom(32)
    wrapped = ring.wrap(VAULT, data_key)
    assert data_key.hex() not in wrapped.decode() and data_key.hex() not in repr(ring)
    assert ring.unwrap(VAULT, wrapped) == data_key
    with pytest.raises(VaultKeyError, match="does not unwrap"):
        ring.unwrap("v-other", wrapped)  # moved to another vault
    other = KeyRing(os.urandom(32), "key file /elsewhere")
    with pytest.raises(VaultKeyError, match=f"another key \\(key id {ring.key_id}\\) than "
                       "key file /elsewhere"):
        other.unwrap(VAULT, wrapped)
    doc = json.loads(wrapped)
    doc["wrappedKey"] = doc["wrappedKey"][::-1]
    with pytest.raises(VaultKeyError, match=f"vault {VAULT}: key.json"):
        ring.unwrap(VAULT, json.dumps(doc).encode())
    with pytest.raises(VaultKeyError, match="damaged"):
        ring.unwrap(VAULT, b"not json")
    assert KeyRing.from_key_file(tmp_path / "master.key", create=True).key_id == ring.key_id
    (tmp_path / "master.key").chmod(0o644)
    with pytest.raises(VaultKeyError, match="readable by others"):
        KeyRing.from_key_file(tmp_path / "master.key", create=False)


def test_records_open_only_under_their_name_and_vault() -> None:
    seal = RecordSeal(VAULT, os.urandom(32))
    blob = seal.seal("vault.json", {"BackupVaultName": "v"})
    assert seal.open("vault.json", blob) == {"BackupVaultName": "v"}
    assert b"BackupVaultName" not in blob
    with pytest.raises(RecordError, match="fails authentication"):
        seal.open("rp-x.json", blob)
    with pytest.raises(RecordError):
        RecordSeal("v-other", os.urandom(32)).open("vault.json", blob)


def test_a_vault_made_before_key_json_is_migrated_with_its_derived_key(tmp_path: Path
                                                                       ) -> None:
    """The old layout (no meta/, chunks under the key derived from secrets.key) opens: the
    derived key is checked on its chunks and wrapped into key.json, under the key file."""
    root = tmp_path / "vaults"
    secrets = SecretsAtRest.load_or_create(tmp_path / "secrets.key")
    LocalVaultStores(root).create(VAULT)
    old = Vaults(root, secrets)  # an empty vault without key.json: its derived key is taken
    chunk_id, body = chunk(1)
    old.put_chunk(VAULT, chunk_id, "zlib", body)
    manifest = Manifest((Disk("sda", CHUNK_SIZE, (Extent(0, 10, chunk_id),), "root"),), {})
    old.commit(VAULT, "p1", manifest)
    old.close()
    (root / VAULT / "meta" / KEY_OBJECT).unlink()
    (root / VAULT / "meta").rmdir()  # as the code before meta/ left it

    ring = KeyRing.from_key_file(tmp_path / "master.key", create=True)
    migrated = Vaults(root, secrets, keyring=ring)
    migrated.reconcile()
    assert migrated.get_chunk(VAULT, chunk_id) == ("zlib", body)
    assert migrated.manifest(VAULT, "p1") == manifest
    assert json.loads((root / VAULT / "meta" / KEY_OBJECT).read_bytes())["kekId"] == ring.key_id
    migrated.close()
    # From now on secrets.key is not needed: the key file alone opens it.
    alone = Vaults(root, None, keyring=ring)
    assert alone.get_chunk(VAULT, chunk_id) == ("zlib", body)


def test_a_vault_without_key_json_and_no_secrets_is_a_storage_error(tmp_path: Path) -> None:
    root = tmp_path / "vaults"
    LocalVaultStores(root).create(VAULT)
    vaults = Vaults(root, None, keyring=KeyRing(os.urandom(32), "key file k"))
    with pytest.raises(VaultError) as err:
        vaults.missing(VAULT, [chunk(1)[0]])
    assert err.value.code == "StorageError" and "no key.json" in err.value.message
    with pytest.raises(VaultKeyError):
        vaults.check_key(VAULT)
    with pytest.raises(ValueError, match="key ring"):
        Vaults(root, None)
