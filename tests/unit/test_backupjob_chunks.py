"""The backup job's pure decisions: how extents become chunks (cut, coalesced, deterministic),
which chunks are zero extents, and that a chunk is sent compressed when it shrinks
(docs/backups.md; the encodings themselves: test_chunkcodec.py)."""

from __future__ import annotations

import os
import random
import zlib

import pytest
import zstandard

from appliance.backupjob import (
    FULL_GAP,
    INCREMENTAL_GAP,
    ChunkPlan,
    chunk_id,
    encode,
    is_zero,
    normalize,
    plan_chunks,
)
from appliance.joblink import JobFailure
from appliance.restorejob import decode
from gatewaycore import manifest
from gatewaycore.manifest import ALIGN, CHUNK_SIZE

MiB = 1 << 20
KiB = 1 << 10


def covered(plans: list[ChunkPlan]) -> list[tuple[int, int]]:
    return [p for plan in plans for p in plan.pieces]


def test_normalize_sorts_merges_touching_and_clips_to_the_disk() -> None:
    got = normalize([(10 * MiB, MiB), (0, MiB), (MiB, MiB), (512 * KiB, 2 * MiB),
                     (15 * MiB, 4 * MiB)], 16 * MiB, "sda")
    assert got == [(0, 2560 * KiB), (10 * MiB, MiB), (15 * MiB, MiB)]


@pytest.mark.parametrize("bad", [(-1, 5), (5, -1), (16 * MiB, 1)])
def test_normalize_refuses_a_bad_extent_naming_the_disk(bad: tuple[int, int]) -> None:
    with pytest.raises(JobFailure, match="disk vdb"):
        normalize([bad], 16 * MiB, "vdb")


def test_a_long_extent_is_cut_at_4_mib_multiples_of_the_disk() -> None:
    plans = plan_chunks(0, [(3 * MiB, 6 * MiB)], FULL_GAP)
    assert [(p.start, p.length) for p in plans] == [
        (3 * MiB, MiB), (4 * MiB, 4 * MiB), (8 * MiB, MiB)]
    assert all(p.start // CHUNK_SIZE == (p.start + p.length - 1) // CHUNK_SIZE for p in plans)


def test_a_fragmented_window_becomes_one_chunk_in_a_full_backup() -> None:
    # 32 blocks of 64 KiB, every other one allocated, in each of two windows
    extents = [(w * CHUNK_SIZE + i * 2 * ALIGN, ALIGN) for w in range(2) for i in range(32)]
    plans = plan_chunks(0, extents, FULL_GAP)
    assert len(plans) == 2
    assert plans[0].start == 0 and plans[0].length == CHUNK_SIZE - ALIGN
    assert covered(plans) == extents and plans[0].data_bytes == 32 * ALIGN


def test_an_incremental_bridges_small_gaps_only() -> None:
    near = [(0, ALIGN), (ALIGN + INCREMENTAL_GAP, ALIGN)]  # gap exactly the bound: joined
    far = [(3 * MiB, ALIGN)]                                # 2.6 MiB further: its own chunk
    plans = plan_chunks(0, near + far, INCREMENTAL_GAP)
    assert [(p.start, p.length) for p in plans] == [
        (0, 2 * ALIGN + INCREMENTAL_GAP), (3 * MiB, ALIGN)]
    assert len(plan_chunks(0, [(0, ALIGN), (2 * ALIGN + INCREMENTAL_GAP, ALIGN)],
                           INCREMENTAL_GAP)) == 2


def test_pieces_never_join_across_a_window_boundary() -> None:
    plans = plan_chunks(0, [(CHUNK_SIZE - ALIGN, ALIGN), (CHUNK_SIZE, ALIGN)], FULL_GAP)
    assert [(p.start, p.length) for p in plans] == [(CHUNK_SIZE - ALIGN, ALIGN),
                                                    (CHUNK_SIZE, ALIGN)]


def test_thousands_of_small_extents_make_few_chunks_and_the_plan_is_deterministic() -> None:
    rng = random.Random(7)
    blocks = sorted(rng.sample(range(16384), 4000))  # 4,000 dirty 64 KiB blocks of 1 GiB
    extents = normalize([(b * ALIGN, ALIGN) for b in blocks], 1 << 30, "sda")
    full = plan_chunks(0, extents, FULL_GAP)
    incremental = plan_chunks(0, extents, INCREMENTAL_GAP)
    assert len(full) <= 256                 # at most one per 4 MiB window
    assert len(incremental) < len(extents) / 2
    assert plan_chunks(0, list(extents), INCREMENTAL_GAP) == incremental
    for plans in (full, incremental):
        assert covered(plans) == [p for e in extents for p in manifest.cut(*e)]
        assert all(p.length <= CHUNK_SIZE for p in plans)


def test_extents_point_into_the_chunk_and_zero_chunks_become_zero_extents() -> None:
    plan = plan_chunks(1, [(MiB, ALIGN), (MiB + 3 * ALIGN, ALIGN)], FULL_GAP)[0]
    data = os.urandom(plan.length)
    cid = chunk_id(data)
    ext = plan.extents(cid)
    assert [e.to_json() for e in ext] == [[MiB, ALIGN, cid, 0],
                                          [MiB + 3 * ALIGN, ALIGN, cid, 3 * ALIGN]]
    assert [e.to_json() for e in plan.extents(None)] == [[MiB, ALIGN, None, 0],
                                                         [MiB + 3 * ALIGN, ALIGN, None, 0]]
    # the manifest's own rules accept both, as a full manifest and as a change list
    doc = {"format": 1, "disks": [{"key": "sda", "capacity": 8 * MiB,
                                   "extents": [e.to_json() for e in ext]}]}
    assert manifest.parse(doc).disks[0].extents == tuple(ext)
    delta = {"format": 1, "disks": [{"key": "sda", "capacity": 8 * MiB,
                                     "extents": [e.to_json() for e in plan.extents(None)]}]}
    assert len(manifest.parse(delta, delta=True).disks[0].extents) == 2


def test_is_zero() -> None:
    assert is_zero(bytes(CHUNK_SIZE)) and is_zero(bytes(100)) and is_zero(b"")
    one = bytearray(CHUNK_SIZE)
    one[-1] = 1
    assert not is_zero(bytes(one))
    assert not is_zero(b"\0" * 99 + b"\1")


def test_compressible_data_is_sent_zstd_and_decodes_to_the_same_bytes() -> None:
    # the encodings themselves are tested in test_chunkcodec.py; this is the job's choice
    data = (b"backup gateway " * 300_000)[:CHUNK_SIZE]
    encoding, body = encode(data)
    assert encoding == "zstd" and len(body) < len(data) // 10
    assert decode(chunk_id(data), encoding, body) == data


def test_random_data_is_sent_as_is() -> None:
    data = os.urandom(CHUNK_SIZE)
    encoding, body = encode(data)
    assert encoding == "identity" and body is data


def test_the_same_data_makes_the_same_chunk_id() -> None:
    data = os.urandom(ALIGN)
    assert chunk_id(data) == chunk_id(bytes(bytearray(data)))
    assert chunk_id(data) != chunk_id(data[:-1] + bytes([data[-1] ^ 1]))


def test_a_restored_chunk_is_checked_against_its_id() -> None:
    data = os.urandom(ALIGN) + bytes(ALIGN)
    cid = chunk_id(data)
    encoding, body = encode(data)
    assert decode(cid, encoding, body) == data
    assert decode(cid, "identity", data) == data
    other = chunk_id(b"other")
    with pytest.raises(JobFailure, match=f"chunk {other} failed its SHA-256 check"):
        decode(other, encoding, body)
    with pytest.raises(JobFailure, match="does not decode"):
        decode(cid, "zlib", b"not zlib")
    with pytest.raises(JobFailure, match="inflates to more than"):
        decode(cid, "zlib", zlib.compress(bytes(CHUNK_SIZE + 1), 1))
    with pytest.raises(JobFailure, match="inflates to more than"):
        decode(cid, "zstd", zstandard.ZstdCompressor().compress(bytes(CHUNK_SIZE + 1)))
