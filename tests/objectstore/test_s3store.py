"""The vaults' S3 backend (controlplane/s3store.py) against a real Ceph RADOS Gateway.

The ChunkStore and VaultStores contracts run against the local directory and the bucket
alike, so the S3 store is held to exactly what the vaults assume of the local one. Then the
Vaults class end to end over S3, the failures a deployment meets (no bucket, a wrong key, an
endpoint down) as the StorageError a caller sees, retries through a real socket that
answers 503, and the multipart path.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import controlplane.vaults as vaults_module
from controlplane import s3store
from controlplane.atrest import SecretsAtRest
from controlplane.chunkstore import ChunkStore, LocalChunkStore, LocalVaultStores, VaultStores
from controlplane.s3store import (
    S3Bucket,
    S3ChunkStore,
    S3Settings,
    S3VaultStores,
    StorageBackendError,
)
from controlplane.vaults import OVERHEAD, VaultError, Vaults
from gatewaycore.manifest import CHUNK_SIZE, Disk, Extent, Manifest
from tests.objectstore.conftest import write_credentials
from tools import cephrgw

VAULT = "vault-1"
MIB = 1024 * 1024


def cid(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def plain_chunk(seed: int, size: int = 128 * 1024) -> bytes:
    head = hashlib.sha256(f"seed {seed}".encode()).digest() * 32
    return (head + f"block {seed}; ".encode() * (size // 10 + 1))[:size]


def one_disk(*chunks: tuple[str, int]) -> Manifest:
    extents = tuple(Extent(i * CHUNK_SIZE, length, chunk_id)
                    for i, (chunk_id, length) in enumerate(chunks))
    return Manifest((Disk("sda", CHUNK_SIZE * max(1, len(chunks)), extents, "root"),),
                    {"name": "web"})


def keys(admin: Any, bucket: str) -> list[str]:
    return [o["Key"] for page in admin.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]


def dead_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the ChunkStore contract on both backends ----------------------------------------------


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """A factory of empty ChunkStores of `backend`: make_store(shard) -> ChunkStore."""
    def make(shard: bool) -> ChunkStore:
        if backend == "local":
            directory = tmp_path / ("sharded" if shard else "flat")
            directory.mkdir()
            return LocalChunkStore(directory, shard=shard, durable=not shard)
        settings = request.getfixturevalue("settings")
        base = f"{settings.prefix}store-{'sharded' if shard else 'flat'}/"
        return S3ChunkStore(S3Bucket(settings), base, shard=shard)
    return make


@pytest.mark.parametrize("shard", [True, False], ids=["sharded", "flat"])
def test_chunkstore_contract(make_store: Any, shard: bool) -> None:
    store: ChunkStore = make_store(shard)
    first, other = cid(b"first"), cid(b"other")
    assert store.has(first) is False and store.size(first) is None
    with pytest.raises(KeyError):
        store.get(first)
    assert store.put_if_absent(first, b"one") is True
    assert store.put_if_absent(first, b"two, longer") is False   # written once
    assert store.get(first) == b"one" and store.has(first) and store.size(first) == 3
    assert store.put_if_absent(other, bytearray(b"\x00" * 70_000)) is True
    assert store.put_if_absent("p1.json", memoryview(b'{"a":1}')) is True
    assert store.get(other) == bytes(70_000) and store.size(other) == 70_000
    assert store.get("p1.json") == b'{"a":1}'
    assert sorted(store.names()) == sorted([first, other, "p1.json"])
    store.sync()
    if isinstance(store, S3ChunkStore):   # (the local chunk store lists its recent puts)
        assert list(store.suspects()) == []
    store.delete(first)
    store.delete(first)   # absent: nothing happens
    assert store.has(first) is False and store.size(first) is None
    with pytest.raises(KeyError):
        store.get(first)
    assert sorted(store.names()) == sorted([other, "p1.json"])
    assert store.put_if_absent(first, b"again") is True and store.get(first) == b"again"
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError):
            store.put_if_absent(bad, b"x")


def test_put_if_absent_race_has_one_winner(make_store: Any) -> None:
    """Eight threads put one new name at once, each its own bytes, several rounds: exactly one
    True per round, and what is stored is the winner's bytes, whole."""
    store: ChunkStore = make_store(True)
    for round_ in range(5):
        name = cid(f"race {round_}".encode())
        barrier = threading.Barrier(8)
        results: dict[int, bool] = {}
        bodies = {n: bytes([n]) * (256 * 1024) for n in range(8)}

        def racer(n: int, name: str = name, barrier: threading.Barrier = barrier,
                  results: dict[int, bool] = results,
                  bodies: dict[int, bytes] = bodies) -> None:
            barrier.wait(timeout=10)
            results[n] = store.put_if_absent(name, bodies[n])

        threads = [threading.Thread(target=racer, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        winners = [n for n, won in results.items() if won]
        assert len(results) == 8 and len(winners) == 1, f"round {round_}: {results}"
        assert store.get(name) == bodies[winners[0]]


def test_put_if_absent_without_the_parameter_in_botocore(settings: S3Settings,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian 12's botocore (1.29) has no IfNoneMatch parameter: the header then comes from
    an event hook, and the race still has one winner against the real gateway."""
    monkeypatch.setattr(s3store, "_model_has", lambda client, op, member: False)
    bucket = S3Bucket(settings)
    assert bucket._native == {"PutObject": False, "CompleteMultipartUpload": False}
    store = S3ChunkStore(bucket, settings.prefix + "hooked/", shard=True)
    name = cid(b"hooked")
    barrier = threading.Barrier(8)

    def racer(n: int) -> bool:
        barrier.wait(timeout=10)
        return store.put_if_absent(name, bytes([n]) * 100_000)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(racer, range(8)))
    assert results.count(True) == 1
    assert store.get(name) == bytes([results.index(True)]) * 100_000
    assert bucket.put(settings.prefix + "plain", b"1", if_absent=False)   # no header: replaces
    assert bucket.put(settings.prefix + "plain", b"2", if_absent=False)
    assert bucket.get(settings.prefix + "plain") == b"2"


# -- the VaultStores contract on both backends ---------------------------------------------


@pytest.fixture
def vault_stores(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> VaultStores:
    if backend == "local":
        return LocalVaultStores(tmp_path / "vaults")
    return S3VaultStores(request.getfixturevalue("settings"))


def test_vaultstores_contract(vault_stores: VaultStores) -> None:
    assert not vault_stores.exists(VAULT) and list(vault_stores.vaults()) == []
    vault_stores.create(VAULT)
    vault_stores.create(VAULT)        # idempotent
    vault_stores.create("vault-2")
    assert vault_stores.exists(VAULT)
    assert list(vault_stores.vaults()) == [VAULT, "vault-2"]
    chunk = cid(b"c")
    assert vault_stores.chunks(VAULT).put_if_absent(chunk, b"c")
    assert vault_stores.points(VAULT).put_if_absent("p.json", b"{}")
    meta = vault_stores.meta(VAULT)
    assert meta.put_if_absent("vault.json", b'{"v":1}') and meta.put_if_absent("key.json", b"k")
    assert vault_stores.meta(VAULT).get("vault.json") == b'{"v":1}'   # a new handle sees it
    assert sorted(vault_stores.meta(VAULT).names()) == ["key.json", "vault.json"]
    assert list(vault_stores.chunks("vault-2").names()) == []         # vaults are apart
    assert list(vault_stores.meta("vault-2").names()) == []
    vault_stores.drop(VAULT)
    vault_stores.drop(VAULT)          # absent: nothing happens
    assert not vault_stores.exists(VAULT) and list(vault_stores.vaults()) == ["vault-2"]
    vault_stores.create(VAULT)        # the same name again starts empty
    assert list(vault_stores.chunks(VAULT).names()) == []
    assert list(vault_stores.meta(VAULT).names()) == []
    vault_stores.sweep()
    assert list(vault_stores.vaults()) == [VAULT, "vault-2"]
    with pytest.raises(ValueError):
        vault_stores.create("../etc")


def test_local_meta_store_is_durable_and_made_for_older_vaults(tmp_path: Path) -> None:
    stores = LocalVaultStores(tmp_path)
    stores.create(VAULT)
    assert (tmp_path / VAULT / "meta").is_dir()
    assert stores.meta(VAULT).durable and not stores.meta(VAULT).shard
    (tmp_path / VAULT / "meta").rmdir()     # a vault created before meta stores existed
    assert stores.exists(VAULT)
    assert stores.meta(VAULT).put_if_absent("vault.json", b"{}")
    assert (tmp_path / VAULT / "meta" / "vault.json").read_bytes() == b"{}"


# -- the S3 layout, drops and start-up repair ----------------------------------------------


def test_s3_layout_and_drop_in_batches(settings: S3Settings, admin: Any) -> None:
    stores = S3VaultStores(settings)
    stores.create(VAULT)
    chunks = stores.chunks(VAULT)
    ids = [cid(str(n).encode()) for n in range(1203)]   # more than one DeleteObjects batch
    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(lambda c: chunks.put_if_absent(c, b"x"), ids))
    stores.points(VAULT).put_if_absent("p-1.json", b"{}")
    stores.meta(VAULT).put_if_absent("vault.json", b"{}")
    held = set(keys(admin, settings.bucket))
    assert f"cp1/vaults/{VAULT}/vault" in held
    assert f"cp1/vaults/{VAULT}/chunks/{ids[0][:2]}/{ids[0]}" in held
    assert {f"cp1/vaults/{VAULT}/points/p-1.json", f"cp1/vaults/{VAULT}/meta/vault.json"} <= held
    assert sorted(chunks.names()) == sorted(ids)
    admin.put_object(Bucket=settings.bucket, Key="cp1/vaults/other-data.txt", Body=b"keep")
    stores.drop(VAULT)
    assert keys(admin, settings.bucket) == ["cp1/vaults/other-data.txt"]


def test_an_interrupted_drop_is_finished_by_sweep_or_create(settings: S3Settings,
                                                            admin: Any) -> None:
    stores = S3VaultStores(settings)
    for vault in ("dropped", "recreated"):
        stores.create(vault)
        stores.chunks(vault).put_if_absent(cid(vault.encode()), b"old")
        # What drop() did before a crash: the tombstone, then the marker's deletion.
        stores.bucket.put(f"cp1/vaults/.drop~/{vault}", b"", if_absent=False)
        stores.bucket.delete(f"cp1/vaults/{vault}/vault")
    stores.create("recreated")   # finishes the drop first: the old chunk does not survive
    assert list(stores.chunks("recreated").names()) == []
    restarted = S3VaultStores(settings)
    restarted.sweep()
    assert keys(admin, settings.bucket) == ["cp1/vaults/recreated/vault"]
    assert list(restarted.vaults()) == ["recreated"]


def test_sweep_aborts_the_vaults_unfinished_uploads_only(settings: S3Settings,
                                                         admin: Any) -> None:
    stores = S3VaultStores(settings)
    stores.create(VAULT)
    ours = admin.create_multipart_upload(Bucket=settings.bucket,
                                         Key=f"cp1/vaults/{VAULT}/points/big.json")
    theirs = admin.create_multipart_upload(Bucket=settings.bucket, Key="cp1/vaults/notes.txt")
    stores.sweep()
    left = admin.list_multipart_uploads(Bucket=settings.bucket).get("Uploads", [])
    assert [u["UploadId"] for u in left] == [theirs["UploadId"]]
    assert ours["UploadId"] != theirs["UploadId"]


# -- the vaults end to end over S3 ---------------------------------------------------------


@pytest.fixture
def s3_vaults(settings: S3Settings, tmp_path: Path) -> Iterator[Vaults]:
    secrets = SecretsAtRest.load_or_create(tmp_path / "secrets.key")
    vaults = Vaults(tmp_path / "unused", secrets, stores=S3VaultStores(settings))
    vaults.reconcile()
    vaults.create(VAULT)
    yield vaults
    vaults.close()
    assert not (tmp_path / "unused").exists()   # nothing went to the local directory


def test_vaults_end_to_end_over_s3(s3_vaults: Vaults, settings: S3Settings, admin: Any,
                                   tmp_path: Path) -> None:
    plains = [plain_chunk(n) for n in range(3)]
    ids = [cid(p) for p in plains]
    assert s3_vaults.missing(VAULT, ids) == ids
    assert s3_vaults.put_chunk(VAULT, ids[0], "zlib", zlib.compress(plains[0])) is True
    assert s3_vaults.put_chunk(VAULT, ids[0], "zlib", zlib.compress(plains[0])) is False
    assert s3_vaults.put_chunk(VAULT, ids[1], "identity", plains[1]) is True
    assert s3_vaults.missing(VAULT, ids) == [ids[2]]
    stored = admin.get_object(Bucket=settings.bucket,
                              Key=f"cp1/vaults/{VAULT}/chunks/{ids[1][:2]}/{ids[1]}")["Body"]
    assert len(stored.read()) == len(plains[1]) + OVERHEAD

    manifest = one_disk((ids[0], len(plains[0])), (ids[2], len(plains[2])))
    with pytest.raises(VaultError) as err:
        s3_vaults.commit(VAULT, "rp-1", manifest)
    assert err.value.code == "MissingChunks" and err.value.fields["missing"] == [ids[2]]
    s3_vaults.put_chunk(VAULT, ids[2], "zlib", zlib.compress(plains[2]))
    point = s3_vaults.commit(VAULT, "rp-1", manifest)
    assert point.chunks == 2
    assert point.stored_bytes == len(zlib.compress(plains[0])) + len(zlib.compress(plains[2]))
    assert s3_vaults.commit(VAULT, "rp-1", manifest) == point   # a repeated commit

    # Durable in the bucket: the manifest object is there, and another control plane with
    # the same secrets key reads the point and its chunks from the bucket alone.
    body = admin.get_object(Bucket=settings.bucket,
                            Key=f"cp1/vaults/{VAULT}/points/rp-1.json")["Body"].read()
    assert json.loads(body) == manifest.to_json()
    other = Vaults(tmp_path / "unused", SecretsAtRest.load_or_create(tmp_path / "secrets.key"),
                   stores=S3VaultStores(settings))
    assert other.manifest(VAULT, "rp-1") == manifest
    assert other.get_chunk(VAULT, ids[1]) == ("identity", plains[1])
    assert zlib.decompress(other.get_chunk(VAULT, ids[2])[1]) == plains[2]

    # Reclaim: ids[1] is referenced by no point.
    assert s3_vaults.reclaim(VAULT, keep=[]) == (1, len(plains[1]))
    assert s3_vaults.missing(VAULT, ids) == [ids[1]]
    with pytest.raises(VaultError) as err:
        s3_vaults.drop(VAULT)
    assert err.value.code == "VaultNotEmpty"
    s3_vaults.delete_point(VAULT, "rp-1")
    with pytest.raises(VaultError) as err:
        s3_vaults.manifest(VAULT, "rp-1")
    assert err.value.code == "UnknownPoint"
    assert s3_vaults.reclaim(VAULT, keep=[ids[0]]) == (1, len(zlib.compress(plains[2])))
    s3_vaults.drop(VAULT)
    assert keys(admin, settings.bucket) == []
    with pytest.raises(VaultError) as err:
        s3_vaults.missing(VAULT, ids)
    assert err.value.code == "VaultMissing"


def count_calls(vaults: Vaults, *operations: str) -> dict[str, list[str]]:
    """The keys (or prefixes) of the S3 calls `vaults` makes from now on, by operation."""
    calls: dict[str, list[str]] = {op: [] for op in operations}
    client = vaults._stores.bucket.client  # type: ignore[attr-defined]
    for op in operations:
        client.meta.events.register(
            f"before-parameter-build.s3.{op}",
            lambda params, op=op, **_: calls[op].append(params.get("Key")
                                                         or params.get("Prefix", "")))
    return calls


def test_a_vault_is_listed_once_then_no_chunk_is_looked_up(s3_vaults: Vaults) -> None:
    """A backup's round trips per chunk: the vault's first look lists it (one
    ListObjectsV2 per 1,000 chunks); after that /missing and the commit look nothing up,
    and a chunk is one PUT; reclaim forgets what it deletes."""
    calls = count_calls(s3_vaults, "HeadObject", "ListObjectsV2")
    plains = [plain_chunk(10 + n) for n in range(4)]
    ids = [cid(p) for p in plains]
    assert s3_vaults.missing(VAULT, ids) == ids
    assert [k for k in calls["ListObjectsV2"] if "/chunks/" in k] != []
    for chunk_id, plain in zip(ids, plains, strict=True):
        assert s3_vaults.put_chunk(VAULT, chunk_id, "identity", plain) is True
    s3_vaults.commit(VAULT, "rp-known", one_disk(*((c, len(p)) for c, p in
                                                    zip(ids, plains, strict=True))))
    assert s3_vaults.missing(VAULT, ids) == []
    s3_vaults.delete_point(VAULT, "rp-known")
    assert s3_vaults.reclaim(VAULT, keep=[])[0] == 4
    assert s3_vaults.missing(VAULT, ids) == ids
    assert [h for h in calls["HeadObject"] if "/chunks/" in h] == []


def test_a_vault_too_big_to_list_is_looked_up_chunk_by_chunk(
        s3_vaults: Vaults, settings: S3Settings, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past KNOWN_MAX chunks the listing gives up: the chunks this process does not know
    are looked up one HEAD each (and then remembered), never guessed absent."""
    plains = [plain_chunk(20 + n) for n in range(3)]
    ids = [cid(p) for p in plains]
    for chunk_id, plain in zip(ids, plains, strict=True):
        s3_vaults.put_chunk(VAULT, chunk_id, "identity", plain)
    monkeypatch.setattr(vaults_module, "KNOWN_MAX", 2)
    other = Vaults(tmp_path / "unused2", SecretsAtRest.load_or_create(tmp_path / "secrets.key"),
                   stores=S3VaultStores(settings))
    calls = count_calls(other, "HeadObject")
    fresh = cid(plain_chunk(99))
    assert other.missing(VAULT, [*ids, fresh]) == [fresh]
    assert len([h for h in calls["HeadObject"] if "/chunks/" in h]) == 4
    assert other.missing(VAULT, ids[:2]) == []        # remembered (2 fit): no new look
    assert len([h for h in calls["HeadObject"] if "/chunks/" in h]) == 4
    other.close()


# -- failures as the caller sees them --------------------------------------------------------


def assert_clean(message: str, rgw: cephrgw.Rgw, caplog: pytest.LogCaptureFixture) -> None:
    """Neither key in the message nor in any log record (INFO and up) of the test."""
    texts = [message, *(r.getMessage() for r in caplog.records)]
    for secret in (rgw.secret_key, rgw.access_key):
        assert not any(secret in text for text in texts)


@pytest.mark.parametrize("case", ["missing bucket", "wrong secret key", "endpoint down"])
def test_failures_are_storage_errors_naming_the_backend(
        case: str, settings: S3Settings, rgw: cephrgw.Rgw, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    if case == "missing bucket":
        broken = replace(settings, bucket="no-such-bucket")
        expected = f"S3 bucket 'no-such-bucket' at {rgw.endpoint} does not exist"
    elif case == "wrong secret key":
        wrong = write_credentials(tmp_path / "wrong", rgw.access_key, "not-the-secret-key")
        broken = replace(settings, credentials_file=wrong)
        expected = f"S3 credentials refused by {rgw.endpoint}: SignatureDoesNotMatch"
    else:
        endpoint = f"http://127.0.0.1:{dead_port()}"
        broken = replace(settings, endpoint_url=endpoint, max_attempts=2)
        expected = f"S3 endpoint {endpoint} unreachable: connection refused"

    with pytest.raises(StorageBackendError) as checked:
        broken.check()
    assert str(checked.value) == expected and isinstance(checked.value, OSError)

    vaults = Vaults(tmp_path / "unused", SecretsAtRest.ephemeral(),
                    stores=S3VaultStores(broken))
    with pytest.raises(VaultError) as err:
        vaults.create(VAULT)
    assert err.value.code == "StorageError"
    assert err.value.message == f"vault {VAULT}: could not create the vault: {expected}"
    with pytest.raises(VaultError) as err:
        vaults.missing(VAULT, [cid(b"x")])
    assert err.value.code == "StorageError" and expected in err.value.message
    assert_clean(err.value.message, rgw, caplog)


def test_missing_credentials_say_where_they_were_looked_for(
        settings: S3Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(StorageBackendError, match=r"S3 credentials for http://127\.0\.0\.1:\d+ "
                                                  "missing: looked in AWS_ACCESS_KEY_ID"):
        replace(settings, credentials_file=None).check()
    with pytest.raises(StorageBackendError, match=r"credentials file /nowhere unreadable"):
        replace(settings, credentials_file=Path("/nowhere")).check()


def test_only_the_settings_are_used_not_the_environment(
        settings: S3Settings, rgw: cephrgw.Rgw, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys from AWS_* when no file is set; and no proxy, profile or config file of the
    process's environment changes where the client goes."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", rgw.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", rgw.secret_key)
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{dead_port()}")
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent-config"))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "false")
    from_env = replace(settings, credentials_file=None)
    from_env.check()
    store = S3VaultStores(from_env)
    store.create(VAULT)
    assert store.exists(VAULT)
    assert store.bucket.client.meta.config.retries["total_max_attempts"] == settings.max_attempts


# -- retries through a real socket ----------------------------------------------------------


class FlakyProxy:
    """An HTTP proxy in front of the gateway on a real socket: its first `failures` requests,
    and those for which `fail_if(method, path)` holds, get 503 SlowDown (an S3 error body);
    the others are forwarded unchanged (the Host header too, so the request's SigV4
    signature still holds)."""

    def __init__(self, upstream_port: int, failures: int,
                 fail_if: Callable[[str, str], bool] | None = None) -> None:
        self.failures = failures
        self.seen: list[tuple[str, str, int]] = []
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with lock:
                    fail = proxy.failures > 0
                    proxy.failures -= fail
                fail = fail or (fail_if is not None and fail_if(self.command, self.path))
                if fail:
                    error = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown"
                             b"</Code><Message>Please reduce your request rate.</Message>"
                             b"</Error>")
                    self._answer(503, [("Content-Type", "application/xml")], error)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True,
                                    skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() not in ("expect", "connection"):
                            conn.putheader(name, value)
                    conn.endheaders(body or None)
                    resp = conn.getresponse()
                    data = resp.read()
                    headers = [(k, v) for k, v in resp.getheaders()
                               if k.lower() not in ("connection", "transfer-encoding",
                                                    "content-length")]
                    self._answer(resp.status, headers, data, resp.getheader("Content-Length"))
                finally:
                    conn.close()

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes,
                        length: str | None = None) -> None:
                with lock:
                    proxy.seen.append((self.command, self.path, status))
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", length or str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def flaky(rgw: cephrgw.Rgw) -> Iterator[Any]:
    proxies: list[FlakyProxy] = []

    def make(failures: int, fail_if: Callable[[str, str], bool] | None = None) -> FlakyProxy:
        proxies.append(FlakyProxy(rgw.port, failures, fail_if))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


def test_503_slowdown_is_retried_with_backoff(settings: S3Settings, admin: Any,
                                              flaky: Any) -> None:
    proxy = flaky(failures=2)
    via = replace(settings, endpoint_url=f"http://127.0.0.1:{proxy.port}", max_attempts=3)
    store = S3VaultStores(via).points(VAULT)
    assert store.put_if_absent("rp-1.json", b'{"ok":1}') is True
    assert [status for _, _, status in proxy.seen] == [503, 503, 200]
    assert {method for method, _, _ in proxy.seen} == {"PUT"}
    key = f"cp1/vaults/{VAULT}/points/rp-1.json"
    assert admin.get_object(Bucket=settings.bucket, Key=key)["Body"].read() == b'{"ok":1}'


def test_503_beyond_the_attempts_is_a_clear_error(settings: S3Settings, flaky: Any) -> None:
    proxy = flaky(failures=100)
    endpoint = f"http://127.0.0.1:{proxy.port}"
    via = replace(settings, endpoint_url=endpoint, max_attempts=2)
    with pytest.raises(StorageBackendError) as err:
        S3VaultStores(via).points(VAULT).put_if_absent("rp-1.json", b"{}")
    assert str(err.value) == (f"S3 PutObject failed in bucket '{settings.bucket}' at {endpoint}:"
                              " SlowDown (HTTP 503) after 2 attempts: Please reduce your "
                              "request rate.")
    assert len(proxy.seen) == 2


# -- large objects ---------------------------------------------------------------------------


def test_large_objects_go_up_in_parts(settings: S3Settings, admin: Any) -> None:
    small = replace(settings, multipart_threshold=5 * MIB, multipart_part_size=5 * MIB,
                    multipart_concurrency=2)
    meta = S3VaultStores(small).meta(VAULT)
    data = bytearray(hashlib.sha256(b"big").digest() * (13 * MIB // 32))   # 13 MiB
    assert meta.put_if_absent("big.json", memoryview(data)) is True
    key = f"cp1/vaults/{VAULT}/meta/big.json"
    head = admin.head_object(Bucket=settings.bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-3")         # three parts: 5 + 5 + 3 MiB
    assert meta.get("big.json") == data and meta.size("big.json") == len(data)
    assert meta.put_if_absent("big.json", b"y" * (6 * MIB)) is False  # held: not replaced
    assert meta.get("big.json") == data
    assert meta.put_if_absent("small.json", b"z" * MIB) is True
    small_head = admin.head_object(Bucket=settings.bucket, Key=f"cp1/vaults/{VAULT}/meta/"
                                   "small.json")
    assert "-" not in small_head["ETag"]                    # one PutObject
    assert admin.list_multipart_uploads(Bucket=settings.bucket).get("Uploads", []) == []


def test_a_failed_multipart_upload_is_aborted(settings: S3Settings, admin: Any,
                                              flaky: Any) -> None:
    proxy = flaky(failures=0, fail_if=lambda method, path: "partNumber=2" in path)
    via = replace(settings, endpoint_url=f"http://127.0.0.1:{proxy.port}", max_attempts=2,
                  multipart_threshold=5 * MIB, multipart_part_size=5 * MIB)
    store = S3VaultStores(via).meta(VAULT)
    with pytest.raises(StorageBackendError,
                       match=r"S3 UploadPart failed in .*: SlowDown \(HTTP 503\)"):
        store.put_if_absent("big.json", bytes(11 * MIB))
    assert admin.list_multipart_uploads(Bucket=settings.bucket).get("Uploads", []) == []
    assert store.size("big.json") is None


# -- the command a person trying the README runs --------------------------------------------


def test_cephrgw_command_starts_and_stops_a_cluster(tmp_path: Path) -> None:
    """`python -m tools.cephrgw start` leaves the daemons running after it exits and prints
    working keys; `stop` ends exactly those PIDs and removes the directory."""
    base = tmp_path / "ceph"
    port = dead_port()
    started = subprocess.run([sys.executable, "-m", "tools.cephrgw", "start", "--dir", str(base),
                              "--port", str(port)], capture_output=True, text=True, timeout=60,
                             cwd=Path(__file__).resolve().parents[2])
    assert started.returncode == 0, started.stderr
    exports = dict(re.findall(r"^export (AWS_\w+)=(\S+)$", started.stdout, re.M))
    state = json.loads((base / "cephrgw.json").read_text())
    pids = list(state["pids"].values())
    try:
        assert (base / "cephrgw.json").stat().st_mode & 0o077 == 0   # it holds the secret
        assert exports["AWS_ACCESS_KEY_ID"] == state["access_key"]
        creds = write_credentials(tmp_path / "creds", exports["AWS_ACCESS_KEY_ID"],
                                  exports["AWS_SECRET_ACCESS_KEY"])
        settings = S3Settings(endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1",
                              bucket="readme-bucket", credentials_file=creds)
        client = settings.client()
        client.create_bucket(Bucket="readme-bucket")
        settings.check()
        assert all(os.path.exists(f"/proc/{pid}") for pid in pids)
    finally:
        stopped = subprocess.run([sys.executable, "-m", "tools.cephrgw", "stop", "--dir",
                                  str(base)], capture_output=True, text=True, timeout=60,
                                 cwd=Path(__file__).resolve().parents[2])
    assert stopped.returncode == 0, stopped.stderr
    assert not base.exists()
    for pid in pids:   # gone, or a zombie until our test process's init reaps it
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
