"""The chunk encodings (gatewaycore/chunkcodec.py): each one round-trips, the probe sends
identity for data that will not shrink, and decoding refuses bombs, truncated and padded
bodies without producing more than a chunk's bytes."""

from __future__ import annotations

import os
import time
import zlib

import pytest
import zstandard

from gatewaycore import chunkcodec
from gatewaycore.chunkcodec import (
    ENCODINGS,
    IDENTITY,
    PROBE_PIECE,
    PROBE_PIECES,
    ZLIB,
    ZSTD,
    CodecError,
    decode,
    encode,
)
from gatewaycore.manifest import CHUNK_SIZE

KiB = 1 << 10
MiB = 1 << 20
TEXT = (b"backup gateway chunk text; " * 200_000)[:CHUNK_SIZE]


def mixed() -> bytes:
    """A chunk as disks have them: 1 MiB of random bytes, 1 MiB of text, 2 MiB of hole."""
    return os.urandom(MiB) + TEXT[:MiB] + bytes(2 * MiB)


def test_zstd_is_the_default() -> None:
    assert chunkcodec.DEFAULT == ZSTD and ENCODINGS == (ZSTD, ZLIB, IDENTITY)
    encoding, body = encode(TEXT)
    assert encoding == ZSTD and len(body) < len(TEXT) // 100
    assert zstandard.ZstdDecompressor().decompress(body) == TEXT


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_each_encoding_round_trips(encoding: str) -> None:
    data = mixed()
    got, body = encode(data, encoding)
    assert got == encoding
    if encoding != IDENTITY:
        assert len(body) < 0.6 * len(data)
    assert bytes(decode(got, body)) == data


def test_zlib_bodies_of_older_gateways_decode() -> None:
    assert decode(ZLIB, zlib.compress(TEXT, 1)) == TEXT
    assert decode(ZLIB, zlib.compress(TEXT, 9)) == TEXT


@pytest.mark.parametrize("encoding", [ZSTD, ZLIB])
def test_random_data_goes_as_is_and_the_probe_says_so(encoding: str) -> None:
    data = os.urandom(CHUNK_SIZE)
    assert not chunkcodec.probe(data, encoding)
    got, body = encode(data, encoding)
    assert got == IDENTITY and body is data


def test_a_mixed_chunk_is_compressed() -> None:
    # the probe's pieces land in the text and the hole: the chunk is compressed whole
    assert chunkcodec.probe(mixed())
    assert encode(mixed())[0] == ZSTD


def test_the_probe_is_overruled_by_the_whole() -> None:
    # zeros exactly where the probe looks, random bytes elsewhere: the probe says
    # "compress", the whole shrinks by under 3 %, so it goes as is
    data = bytearray(os.urandom(CHUNK_SIZE))
    step = (CHUNK_SIZE - PROBE_PIECE) // (PROBE_PIECES - 1)
    for i in range(PROBE_PIECES):
        data[i * step:i * step + PROBE_PIECE] = bytes(PROBE_PIECE)
    assert chunkcodec.probe(bytes(data))
    assert encode(bytes(data))[0] == IDENTITY


def test_data_that_shrinks_by_less_than_3_percent_goes_as_is() -> None:
    raw = bytearray(os.urandom(256 * KiB))
    raw[::50] = bytes(len(raw[::50]))
    assert encode(bytes(raw))[0] == IDENTITY


def test_a_zstd_bomb_is_refused_from_its_header_at_once() -> None:
    bomb_plain = bytes(256 * MiB)
    bomb = zstandard.ZstdCompressor(level=19).compress(bomb_plain)
    assert len(bomb) < 64 * KiB
    started = time.perf_counter()
    with pytest.raises(CodecError, match="inflates to more than"):
        decode(ZSTD, bomb)
    assert time.perf_counter() - started < 0.5


def test_a_zstd_frame_that_lies_about_its_size_is_refused() -> None:
    # a frame header saying 16 bytes in front of blocks that make 4 MiB + 1: refused by zstd
    # while decoding into a 16-byte buffer, never by producing 4 MiB
    big = zstandard.ZstdCompressor(level=1).compress(bytes(CHUNK_SIZE + 1))
    small = zstandard.ZstdCompressor(level=1).compress(bytes(16))
    assert chunkcodec.zstd_frame(big)[0] == CHUNK_SIZE + 1
    # the small frame's header, then the big frame's blocks
    liar = small[:zstandard.frame_header_size(small)] + big[zstandard.frame_header_size(big):]
    assert chunkcodec.zstd_frame(liar) == (16, len(liar))
    with pytest.raises(CodecError, match=r"not zstd data|decodes to"):
        decode(ZSTD, liar)


def test_a_zstd_frame_without_its_content_size_is_refused() -> None:
    body = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(TEXT)
    with pytest.raises(CodecError, match="content size"):
        decode(ZSTD, body)


@pytest.mark.parametrize(("body", "why"), [
    (encode(TEXT)[1] + b"trailing", "not one complete zstd frame"),
    (encode(TEXT)[1] + encode(TEXT)[1], "not one complete zstd frame"),
    (encode(TEXT)[1][:-3], "truncated"),
    (b"not zstd at all", "not zstd data"),
    (b"", "not zstd data"),
])
def test_zstd_bodies_that_are_not_one_frame(body: bytes, why: str) -> None:
    with pytest.raises(CodecError, match=why):
        decode(ZSTD, body)


@pytest.mark.parametrize(("encoding", "body", "why"), [
    (ZLIB, zlib.compress(bytes(256 * MiB), 9), "inflates to more than"),
    (ZLIB, zlib.compress(b"x" * 1000)[:-6], "not one complete zlib stream"),
    (ZLIB, zlib.compress(b"x" * 1000) + b"trailing", "not one complete zlib stream"),
    (ZLIB, b"not zlib at all", "not zlib data"),
    (IDENTITY, bytes(CHUNK_SIZE + 1), "more than"),
    ("br", b"x", "unknown encoding"),
])
def test_other_bodies_that_cannot_be_a_chunk(encoding: str, body: bytes, why: str) -> None:
    with pytest.raises(CodecError, match=why):
        decode(encoding, body)


def test_decoding_is_bounded_by_the_limit_given() -> None:
    body = encode(TEXT)[1]
    assert len(decode(ZSTD, body, limit=CHUNK_SIZE)) == CHUNK_SIZE
    with pytest.raises(CodecError, match="more than 1024"):
        decode(ZSTD, body, limit=1024)
    with pytest.raises(CodecError, match="more than 1024"):
        decode(ZLIB, zlib.compress(TEXT), limit=1024)
