"""The vaults' storage: encrypted chunks, durable manifests, reclaim and crash repair.

Real files and real crypto in a temporary directory; races are run with real threads and
real processes, started together on a barrier.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.atrest import SecretsAtRest
from controlplane.chunkstore import MARKER, MTIME_MARGIN, LocalChunkStore, LocalVaultStores
from controlplane.vaults import OVERHEAD, StoredPoint, VaultError, Vaults
from gatewaycore.manifest import CHUNK_SIZE, Disk, Extent, Manifest

VAULT = "vault-1"


def plain_chunk(seed: int, size: int = 256 * 1024) -> bytes:
    """Bytes that compress (text) but differ per seed (a random head)."""
    head = hashlib.sha256(f"seed {seed}".encode()).digest() * 64
    body = f"block {seed} of a disk; ".encode() * (size // 20 + 1)
    return (head + body)[:size]


def cid(plain: bytes) -> str:
    return hashlib.sha256(plain).hexdigest()


def chunk_path(root: Path, vault: str, chunk_id: str) -> Path:
    return root / vault / "chunks" / chunk_id[:2] / chunk_id


def one_disk(*chunks: tuple[str, int]) -> Manifest:
    """A one-disk manifest: each (chunk id, length) at the next 4 MiB boundary."""
    extents = tuple(Extent(i * CHUNK_SIZE, length, chunk_id)
                    for i, (chunk_id, length) in enumerate(chunks))
    return Manifest((Disk("sda", CHUNK_SIZE * max(1, len(chunks)), extents, "root"),),
                    {"name": "web"})


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return tmp_path / "secrets.key"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "vaults"


@pytest.fixture
def vaults(root: Path, key_file: Path) -> Iterator[Vaults]:
    v = Vaults(root, SecretsAtRest.load_or_create(key_file))
    v.create(VAULT)
    yield v
    v.close()


def put(vaults: Vaults, plain: bytes, encoding: str = "zlib", vault: str = VAULT) -> str:
    body = zlib.compress(plain, 1) if encoding == "zlib" else plain
    assert vaults.put_chunk(vault, cid(plain), encoding, body) is True
    return cid(plain)


# -- put and get ----------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["zlib", "identity"])
def test_put_get_round_trip(vaults: Vaults, root: Path, encoding: str) -> None:
    plain = plain_chunk(1)
    body = zlib.compress(plain, 1) if encoding == "zlib" else plain
    chunk_id = cid(plain)
    assert vaults.missing(VAULT, [chunk_id]) == [chunk_id]
    assert vaults.put_chunk(VAULT, chunk_id, encoding, body) is True
    assert vaults.put_chunk(VAULT, chunk_id, encoding, body) is False
    assert vaults.get_chunk(VAULT, chunk_id) == (encoding, body)
    assert vaults.missing(VAULT, [chunk_id]) == []
    stored = chunk_path(root, VAULT, chunk_id).read_bytes()
    assert len(stored) == len(body) + OVERHEAD
    assert body[-4096:] not in stored and plain[:4096] not in stored  # encrypted at rest


def test_missing_keeps_the_order_given(vaults: Vaults) -> None:
    held = put(vaults, plain_chunk(1))
    absent = [cid(plain_chunk(n)) for n in (5, 3, 4)]
    asked = [absent[0], held, absent[1], "not-an-id", absent[2]]
    assert vaults.missing(VAULT, asked) == [absent[0], absent[1], "not-an-id", absent[2]]


def test_checksum_mismatch_is_refused_and_nothing_stored(vaults: Vaults, root: Path) -> None:
    plain = plain_chunk(1)
    wrong = cid(plain_chunk(2))
    for encoding, body in (("identity", plain), ("zlib", zlib.compress(plain))):
        with pytest.raises(VaultError) as err:
            vaults.put_chunk(VAULT, wrong, encoding, body)
        assert err.value.code == "ChecksumMismatch"
        assert cid(plain) in err.value.message  # says what the body does hash to
    assert vaults.missing(VAULT, [wrong, cid(plain)]) == [wrong, cid(plain)]
    assert [p for p in (root / VAULT / "chunks").rglob("*") if p.is_file()] == []


def test_zlib_bomb_is_refused_at_the_bound(vaults: Vaults) -> None:
    bomb_plain = bytes(256 * 1024 * 1024)          # 256 MiB of zeros ...
    bomb = zlib.compress(bomb_plain, 9)             # ... in about 250 KiB
    assert len(bomb) < 1024 * 1024
    started = time.perf_counter()
    with pytest.raises(VaultError) as err:
        vaults.put_chunk(VAULT, cid(bomb_plain), "zlib", bomb)
    elapsed = time.perf_counter() - started
    assert err.value.code == "ChecksumMismatch"
    assert "more than" in err.value.message
    assert elapsed < 2.0, f"inflating stopped late ({elapsed:.2f} s)"


@pytest.mark.parametrize(("encoding", "body", "why"), [
    ("identity", bytes(CHUNK_SIZE + 1), "more than"),
    ("zlib", os.urandom(4 * 1024 * 1024 + 1025), "more than"),
    ("zlib", zlib.compress(b"x" * 1000)[:-6], "not one complete zlib stream"),
    ("zlib", zlib.compress(b"x" * 1000) + b"trailing", "not one complete zlib stream"),
    ("zlib", b"not zlib at all", "not zlib data"),
    ("br", b"x", "unknown encoding"),
])
def test_bodies_that_cannot_be_a_chunk(vaults: Vaults, encoding: str, body: bytes,
                                       why: str) -> None:
    with pytest.raises(VaultError) as err:
        vaults.put_chunk(VAULT, cid(b"x" * 1000), encoding, body)
    assert err.value.code == "ChecksumMismatch"
    assert why in err.value.message


def test_chunk_of_exactly_chunk_size_is_accepted(vaults: Vaults) -> None:
    plain = plain_chunk(7, CHUNK_SIZE)
    chunk_id = put(vaults, plain, "zlib")
    encoding, body = vaults.get_chunk(VAULT, chunk_id)
    assert encoding == "zlib" and zlib.decompress(body) == plain


# -- races ----------------------------------------------------------------------------------


def test_two_threads_putting_the_same_chunk(vaults: Vaults, root: Path) -> None:
    for seed in range(20):
        plain = plain_chunk(seed, 512 * 1024)
        body = zlib.compress(plain, 1)
        barrier = threading.Barrier(2)
        results: list[bool] = []

        def racer(plain: bytes = plain, body: bytes = body,
                  barrier: threading.Barrier = barrier, results: list[bool] = results) -> None:
            barrier.wait(timeout=10)
            results.append(vaults.put_chunk(VAULT, cid(plain), "zlib", body))

        threads = [threading.Thread(target=racer) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert sorted(results) == [False, True], f"round {seed}"
        assert vaults.get_chunk(VAULT, cid(plain)) == ("zlib", body)
        shard = chunk_path(root, VAULT, cid(plain)).parent
        assert not [p.name for p in shard.iterdir() if p.name.startswith(".")]


def test_store_put_if_absent_race_has_one_winner(tmp_path: Path) -> None:
    """The link itself, without the vault's look-before: every round both threads write."""
    store = LocalChunkStore(tmp_path)
    for round_ in range(50):
        name = cid(str(round_).encode())
        barrier = threading.Barrier(2)
        results: list[bool] = []

        def racer(data: bytes, name: str = name, barrier: threading.Barrier = barrier,
                  results: list[bool] = results) -> None:
            barrier.wait(timeout=10)
            results.append(store.put_if_absent(name, data))

        threads = [threading.Thread(target=racer, args=(bytes([n]) * 65536,)) for n in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert sorted(results) == [False, True], f"round {round_}"
        assert store.get(name) in (b"\x01" * 65536, b"\x02" * 65536)  # one whole write
    assert sorted(store.names()) == sorted(cid(str(n).encode()) for n in range(50))


def _process_racer(root: str, key_file: str, bodies: list[bytes], barrier: object,
                   out: object) -> None:
    vaults = Vaults(Path(root), SecretsAtRest.load_or_create(Path(key_file)))
    results = []
    for body in bodies:
        barrier.wait(timeout=30)  # type: ignore[attr-defined]
        results.append(vaults.put_chunk(VAULT, cid(body), "identity", body))
    out.put(results)  # type: ignore[attr-defined]


@pytest.mark.slow
def test_two_processes_putting_the_same_chunks(vaults: Vaults, root: Path,
                                               key_file: Path) -> None:
    bodies = [plain_chunk(seed, 1024 * 1024) for seed in range(12)]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    out = ctx.Queue()
    procs = [ctx.Process(target=_process_racer, args=(str(root), str(key_file), bodies,
                                                      barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for i, body in enumerate(bodies):
        assert sorted([results[0][i], results[1][i]]) == [False, True], f"chunk {i}"
        assert vaults.get_chunk(VAULT, cid(body)) == ("identity", body)
        assert chunk_path(root, VAULT, cid(body)).stat().st_size == len(body) + OVERHEAD


# -- commit, manifests ----------------------------------------------------------------------


def test_commit_refuses_missing_chunks_and_lists_them(vaults: Vaults) -> None:
    held = put(vaults, plain_chunk(1))
    absent = sorted(cid(plain_chunk(n)) for n in (2, 3))
    manifest = one_disk((absent[1], 100), (held, 200), (absent[0], 300))
    with pytest.raises(VaultError) as err:
        vaults.commit(VAULT, "point-1", manifest)
    assert err.value.code == "MissingChunks"
    assert err.value.fields["missing"] == absent
    with pytest.raises(VaultError) as unknown:
        vaults.manifest(VAULT, "point-1")
    assert unknown.value.code == "UnknownPoint"


def test_missing_chunks_are_listed_at_most_a_thousand(vaults: Vaults) -> None:
    ids = [cid(str(n).encode()) for n in range(1200)]
    extents = tuple(Extent(i * 65536, 65536, c) for i, c in enumerate(ids))
    manifest = Manifest((Disk("sda", 1200 * 65536, extents),))
    with pytest.raises(VaultError) as err:
        vaults.commit(VAULT, "point-1", manifest)
    missing = err.value.fields["missing"]
    assert isinstance(missing, list)
    assert missing == sorted(ids)[:1000]
    assert "1200" in err.value.message


def test_commit_then_manifest_round_trips(vaults: Vaults, root: Path) -> None:
    a, b = plain_chunk(1), plain_chunk(2, 64 * 1024)
    ida, idb = put(vaults, a, "zlib"), put(vaults, b, "identity")
    manifest = Manifest((
        Disk("sda", 3 * CHUNK_SIZE, (Extent(0, len(a), ida),
                                     Extent(CHUNK_SIZE, 4096, ida, 8192),
                                     Extent(2 * CHUNK_SIZE, len(b), idb)), "Hard disk 1"),
        Disk("sdb", CHUNK_SIZE, (Extent(65536, 1000, idb, 5),)),
    ), {"name": "db", "cpus": 2})
    point = vaults.commit(VAULT, "point-1", manifest)
    encoded = len(zlib.compress(a, 1)) + len(b)
    assert point == StoredPoint(data_bytes=len(a) + 4096 + len(b) + 1000,
                                stored_bytes=encoded, chunks=2)
    assert vaults.manifest(VAULT, "point-1") == manifest
    on_disk = json.loads((root / VAULT / "points" / "point-1.json").read_bytes())
    assert on_disk == manifest.to_json()
    # the link retrying `complete`: the same answer; another manifest replaces it
    assert vaults.commit(VAULT, "point-1", manifest) == point
    smaller = one_disk((idb, len(b)))
    assert vaults.commit(VAULT, "point-1", smaller).chunks == 1
    assert vaults.manifest(VAULT, "point-1") == smaller


def test_commit_writes_the_sync_marker(vaults: Vaults, root: Path) -> None:
    chunk_id = put(vaults, plain_chunk(1))
    before = time.time()
    vaults.commit(VAULT, "p", one_disk((chunk_id, 10)))
    since = json.loads((root / VAULT / "chunks" / MARKER).read_bytes())["since"]
    assert before <= since <= time.time()


def test_corrupt_manifest_is_a_storage_error(vaults: Vaults, root: Path) -> None:
    chunk_id = put(vaults, plain_chunk(1))
    vaults.commit(VAULT, "p", one_disk((chunk_id, 10)))
    (root / VAULT / "points" / "p.json").write_bytes(b'{"format": 1, "disks": [')
    with pytest.raises(VaultError) as err:
        vaults.manifest(VAULT, "p")
    assert err.value.code == "StorageError" and VAULT in err.value.message
    with pytest.raises(VaultError) as reclaim_err:  # nothing deleted on an unreadable point
        vaults.reclaim(VAULT, [])
    assert reclaim_err.value.code == "StorageError"
    assert vaults.missing(VAULT, [chunk_id]) == []


def test_delete_point(vaults: Vaults) -> None:
    chunk_id = put(vaults, plain_chunk(1))
    vaults.commit(VAULT, "p", one_disk((chunk_id, 10)))
    vaults.delete_point(VAULT, "p")
    vaults.delete_point(VAULT, "p")  # idempotent
    with pytest.raises(VaultError) as err:
        vaults.manifest(VAULT, "p")
    assert err.value.code == "UnknownPoint"
    assert vaults.missing(VAULT, [chunk_id]) == []  # chunks stay until reclaim


# -- reclaim --------------------------------------------------------------------------------


def test_reclaim_removes_only_unreferenced_chunks(vaults: Vaults) -> None:
    a, b, c, d, e = (plain_chunk(n) for n in range(5))
    ida, idb, idc, idd, ide = (put(vaults, p, "zlib") for p in (a, b, c, d, e))
    vaults.commit(VAULT, "p1", one_disk((ida, 10), (idb, 10)))
    vaults.commit(VAULT, "p2", one_disk((idb, 10), (idc, 10)))
    assert vaults.reclaim(VAULT, keep=[idd]) == (1, len(zlib.compress(e, 1)))
    vaults.delete_point(VAULT, "p2")
    assert vaults.reclaim(VAULT, keep=[idd]) == (1, len(zlib.compress(c, 1)))
    assert vaults.missing(VAULT, [ida, idb, idc, idd, ide]) == [idc, ide]
    with pytest.raises(VaultError) as err:
        vaults.get_chunk(VAULT, idc)
    assert err.value.code == "UnknownChunk"
    assert vaults.reclaim(VAULT, keep=[]) == (1, len(zlib.compress(d, 1)))
    assert vaults.reclaim(VAULT, keep=[]) == (0, 0)


class _HookedStores(LocalVaultStores):
    """Local stores whose chunk listing first runs `hook`: a put or commit that lands after
    reclaim read the manifests and before it deletes."""

    hook: object = None

    def chunks(self, vault: str) -> LocalChunkStore:
        stores = self

        class Hooked(LocalChunkStore):
            def names(self) -> Iterator[str]:
                if callable(stores.hook):
                    stores.hook()
                yield from super().names()

        return Hooked(self.root / vault / "chunks")


def test_reclaim_spares_chunks_put_or_committed_while_it_runs(root: Path,
                                                              key_file: Path) -> None:
    stores = _HookedStores(root)
    vaults = Vaults(root, SecretsAtRest.load_or_create(key_file), stores=stores)
    vaults.create(VAULT)
    old, late = plain_chunk(1), plain_chunk(2)
    id_old = put(vaults, old)  # unreferenced until the commit below
    id_new = cid(late)

    def during_reclaim() -> None:
        stores.hook = None
        assert vaults.put_chunk(VAULT, id_new, "identity", late) is True
        vaults.commit(VAULT, "late", one_disk((id_old, 10)))

    stores.hook = during_reclaim
    assert vaults.reclaim(VAULT, keep=[]) == (0, 0)
    assert vaults.missing(VAULT, [id_old, id_new]) == []
    assert vaults.reclaim(VAULT, keep=[]) == (1, len(late))  # no longer protected
    assert vaults.missing(VAULT, [id_old, id_new]) == [id_new]


def test_commit_after_reclaim_deleted_a_chunk_answers_missing(vaults: Vaults) -> None:
    chunk_id = put(vaults, plain_chunk(1))
    assert vaults.reclaim(VAULT, keep=[]) == (1, len(zlib.compress(plain_chunk(1), 1)))
    with pytest.raises(VaultError) as err:
        vaults.commit(VAULT, "p", one_disk((chunk_id, 10)))
    assert err.value.fields["missing"] == [chunk_id]


# -- crash repair ---------------------------------------------------------------------------


def test_reconcile_removes_torn_chunks_and_keeps_synced_ones(vaults: Vaults, root: Path,
                                                             key_file: Path) -> None:
    synced = put(vaults, plain_chunk(1))
    vaults.commit(VAULT, "p", one_disk((synced, 10)))
    # What a power cut leaves: chunks written after the last sync, one of them torn, and
    # a temporary file never linked.
    torn, whole = put(vaults, plain_chunk(2)), put(vaults, plain_chunk(3))
    torn_path = chunk_path(root, VAULT, torn)
    with torn_path.open("r+b") as f:
        f.truncate(torn_path.stat().st_size // 2)
    leftover = chunk_path(root, VAULT, whole).parent / f".{whole}.0123456789abcdef.tmp"
    leftover.write_bytes(b"partial")
    # The synced chunk predates the marker by more than the margin: not even read.
    old = time.time() - 10 * MTIME_MARGIN
    os.utime(chunk_path(root, VAULT, synced), (old, old))
    marker = json.loads((root / VAULT / "chunks" / MARKER).read_bytes())["since"]
    suspects = set(LocalChunkStore(root / VAULT / "chunks").suspects())
    assert suspects == {torn, whole}, f"marker {marker}"
    assert not leftover.exists()

    leftover.write_bytes(b"partial")
    restarted = Vaults(root, SecretsAtRest.load_or_create(key_file))
    restarted.reconcile()
    assert restarted.missing(VAULT, [synced, torn, whole]) == [torn]
    assert not leftover.exists()
    assert restarted.get_chunk(VAULT, whole)[0] == "zlib"
    assert restarted.manifest(VAULT, "p") == one_disk((synced, 10))
    after = json.loads((root / VAULT / "chunks" / MARKER).read_bytes())["since"]
    assert after > marker  # the survivors were flushed: the marker moved past them
    restarted.close()


def test_reconcile_finishes_an_interrupted_drop(vaults: Vaults, root: Path) -> None:
    half_dropped = root / ".drop~0123456789abcdef"
    (half_dropped / "chunks").mkdir(parents=True)
    vaults.reconcile()
    assert not half_dropped.exists()
    assert (root / VAULT).is_dir()


# -- authentication -------------------------------------------------------------------------


def test_tampered_ciphertext_fails_get(vaults: Vaults, root: Path) -> None:
    chunk_id = put(vaults, plain_chunk(1))
    path = chunk_path(root, VAULT, chunk_id)
    original = path.read_bytes()
    for position in (len(original) // 2, 1, len(original) - 1):
        tampered = bytearray(original)
        tampered[position] ^= 0x01
        path.write_bytes(tampered)
        with pytest.raises(VaultError) as err:
            vaults.get_chunk(VAULT, chunk_id)
        assert err.value.code == "StorageError", position
        assert VAULT in err.value.message and str(root) not in err.value.message
    path.write_bytes(original)
    assert vaults.get_chunk(VAULT, chunk_id)[0] == "zlib"


def test_a_chunk_of_one_vault_cannot_be_read_as_another(vaults: Vaults, root: Path,
                                                        tmp_path: Path) -> None:
    vaults.create("vault-2")
    plain = plain_chunk(1)
    chunk_id = put(vaults, plain)
    copy = chunk_path(root, "vault-2", chunk_id)
    copy.parent.mkdir(parents=True)
    copy.write_bytes(chunk_path(root, VAULT, chunk_id).read_bytes())
    with pytest.raises(VaultError) as err:
        vaults.get_chunk("vault-2", chunk_id)
    assert err.value.code == "StorageError"
    # nor renamed to another chunk of the same vault
    other = cid(plain_chunk(2))
    renamed = chunk_path(root, VAULT, other)
    renamed.parent.mkdir(exist_ok=True)
    renamed.write_bytes(chunk_path(root, VAULT, chunk_id).read_bytes())
    with pytest.raises(VaultError) as renamed_err:
        vaults.get_chunk(VAULT, other)
    assert renamed_err.value.code == "StorageError"
    # nor read with another control plane's key
    stranger = Vaults(root, SecretsAtRest.load_or_create(tmp_path / "other.key"))
    with pytest.raises(VaultError) as key_err:
        stranger.get_chunk(VAULT, chunk_id)
    assert key_err.value.code == "StorageError"
    assert vaults.get_chunk(VAULT, chunk_id)[1] == zlib.compress(plain, 1)


def test_derived_keys_differ_by_purpose_and_key_file(tmp_path: Path) -> None:
    one = SecretsAtRest.load_or_create(tmp_path / "one.key")
    two = SecretsAtRest.load_or_create(tmp_path / "two.key")
    assert one.derive_key("vaults") == one.derive_key("vaults")
    assert len(one.derive_key("vaults")) == 32
    assert one.derive_key("vaults") != one.derive_key("other")
    assert one.derive_key("vaults") != two.derive_key("vaults")
    assert (tmp_path / "one.key").read_bytes() != one.derive_key("vaults")


# -- vaults and errors ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["never-made", "..", "../vault-1", "a/b", "x"])
def test_unknown_or_unsafe_vault_names_are_missing(vaults: Vaults, name: str) -> None:
    with pytest.raises(VaultError) as err:
        vaults.put_chunk(name, cid(b"x"), "identity", b"x")
    assert err.value.code == "VaultMissing"


def test_create_refuses_path_tricks(vaults: Vaults, root: Path) -> None:
    for name in ("..", "../escape", "a/b", "x", "n" * 51):
        with pytest.raises(ValueError):
            vaults.create(name)
    assert not (root.parent / "escape").exists()


def test_drop(vaults: Vaults, root: Path) -> None:
    chunk_id = put(vaults, plain_chunk(1))
    vaults.commit(VAULT, "p", one_disk((chunk_id, 10)))
    with pytest.raises(VaultError) as err:
        vaults.drop(VAULT)
    assert err.value.code == "VaultNotEmpty"
    vaults.delete_point(VAULT, "p")
    vaults.drop(VAULT)
    vaults.drop(VAULT)  # idempotent
    assert not (root / VAULT).exists()
    with pytest.raises(VaultError) as missing:
        vaults.get_chunk(VAULT, chunk_id)
    assert missing.value.code == "VaultMissing"
    vaults.create(VAULT)  # a new vault of the same name starts empty
    assert vaults.missing(VAULT, [chunk_id]) == [chunk_id]


def test_io_error_is_a_storage_error_naming_the_vault(vaults: Vaults, root: Path) -> None:
    plain = plain_chunk(1)
    shard = chunk_path(root, VAULT, cid(plain)).parent
    shard.write_bytes(b"a file where a directory belongs")
    with pytest.raises(VaultError) as err:
        vaults.put_chunk(VAULT, cid(plain), "identity", plain)
    assert err.value.code == "StorageError"
    assert err.value.message.startswith(f"vault {VAULT}: could not store chunk")
    assert str(root) not in err.value.message and "Traceback" not in err.value.message


# -- throughput -----------------------------------------------------------------------------


def test_put_throughput_is_printed(vaults: Vaults, capsys: pytest.CaptureFixture[str]) -> None:
    """64 x 4 MiB chunks (half compressible); the figure is printed, the bound is loose."""
    rng = hashlib.sha256(b"throughput")
    bodies = []
    for n in range(64):
        noise = hashlib.shake_256(rng.digest() + n.to_bytes(2, "big")).digest(CHUNK_SIZE // 2)
        plain = noise + f"text of chunk {n} ".encode() * (CHUNK_SIZE // 2 // 16)
        plain = plain[:CHUNK_SIZE].ljust(CHUNK_SIZE, b"-")
        bodies.append((cid(plain), zlib.compress(plain, 1)))
    started = time.perf_counter()
    stored = [vaults.put_chunk(VAULT, chunk_id, "zlib", body) for chunk_id, body in bodies]
    put_s = time.perf_counter() - started
    manifest = one_disk(*((chunk_id, CHUNK_SIZE) for chunk_id, _ in bodies))
    started = time.perf_counter()
    point = vaults.commit(VAULT, "bench", manifest)
    commit_s = time.perf_counter() - started
    plain_mb = 64 * CHUNK_SIZE / 1e6
    with capsys.disabled():
        print(f"\nvault put_chunk: 64 x 4 MiB in {put_s:.2f} s = {plain_mb / put_s:.0f} MB/s "
              f"of disk data ({point.stored_bytes / 1e6 / put_s:.0f} MB/s encoded); "
              f"commit (sync) {commit_s * 1000:.0f} ms")
    assert all(stored) and point.chunks == 64
    assert plain_mb / put_s > 20  # an order of magnitude below the target: catches a hang


def test_a_chunk_reclaimed_while_the_vault_is_listed_stays_forgotten(vaults: Vaults) -> None:
    """The vault's first look lists it; a reclaim deleting a chunk the listing already saw
    must win: the chunk is then absent (a commit naming it answers MissingChunks)."""
    chunk_id = put(vaults, plain_chunk(7))  # referenced by no point
    v = vaults._open(VAULT)
    real = v.chunks.listing

    def listing(limit: int) -> dict[str, int] | None:
        found = real(limit)
        assert found is not None and chunk_id in found
        assert vaults.reclaim(VAULT, keep=[])[0] == 1  # deleted after it was listed
        return found

    v.chunks.listing = listing  # type: ignore[method-assign]
    assert vaults.missing(VAULT, [chunk_id]) == [chunk_id]
    with pytest.raises(VaultError) as err:
        vaults.commit(VAULT, "p", one_disk((chunk_id, 10)))
    assert err.value.fields["missing"] == [chunk_id]
