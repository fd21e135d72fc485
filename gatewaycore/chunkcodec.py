"""Chunk encodings on the wire and at rest: the one place that encodes and decodes them.

The gateway encodes each chunk it sends (`encode`); the control plane decodes every body it
receives to check its SHA-256 before storing it (controlplane/vaults.py), and the gateway
decodes what a restore fetches (appliance/restorejob.py). Keeping both sides here means an
encoding is added, bounded and tested once.

Encodings (the `X-Gateway-Chunk-Encoding` header, docs/backups.md):

- `zstd`: one Zstandard frame, level 1, with its content size in the frame header. The
  default: about 20 times cheaper in CPU than zlib level 1 for the same ratio on disk data,
  and it skips incompressible blocks almost for free, so a chunk mixing text, holes and
  random data no longer costs a full deflate pass.
- `zlib`: one zlib stream (level 1). What gateways sent before zstd; still decoded (vaults
  hold such chunks) and still encodable on request.
- `identity`: the plain bytes, when compressing would not shrink the chunk by 3 %.

Decoding is bounded whatever the body claims: never more than `limit` (a chunk's 4 MiB)
bytes are produced, so a small body that inflates to gigabytes (a "bomb") is refused after
4 MiB of work. A body must be exactly one complete frame or stream: trailing bytes are
refused, so the bytes a vault keeps are exactly what decodes.
"""

from __future__ import annotations

import threading
import zlib
from typing import Any

from gatewaycore.manifest import CHUNK_SIZE

ZSTD, ZLIB, IDENTITY = "zstd", "zlib", "identity"
ENCODINGS = (ZSTD, ZLIB, IDENTITY)
DEFAULT = ZSTD
ZSTD_LEVEL = 1
ZLIB_LEVEL = 1
MIN_SHRINK = 0.97             # compressed only when it saves at least 3 %
# The probe: PROBE_PIECES pieces of PROBE_PIECE bytes spread evenly over the chunk. Data on
# a disk comes in runs (a file's text, a hole, an encrypted or compressed file), so pieces
# from several places see a mixed chunk's compressible parts where one or three large
# slices could miss them, for a sample of 32 KiB (under 1 % of a 4 MiB chunk).
PROBE_PIECE = 4 * 1024
PROBE_PIECES = 8

_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_MAX_BLOCKS = 4096       # a 4 MiB chunk is ~32 blocks of 128 KiB; more is not ours
_local = threading.local()    # zstandard's (de)compressor objects are not thread-safe


class CodecError(ValueError):
    """A body that cannot be decoded as its encoding says (the message says why)."""


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:
        raise CodecError("the zstd encoding needs the zstandard module (Debian: "
                         "python3-zstandard)") from None
    return zstandard


def _compressor() -> Any:
    cctx = getattr(_local, "cctx", None)
    if cctx is None:
        cctx = _local.cctx = _zstd().ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return cctx


def _decompressor() -> Any:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = _zstd().ZstdDecompressor()
    return dctx


def compress(encoding: str, data: bytes) -> bytes:
    """`data` in `encoding` (no size decision: see `encode`)."""
    if encoding == ZSTD:
        return bytes(_compressor().compress(data))
    if encoding == ZLIB:
        return zlib.compress(data, ZLIB_LEVEL)
    if encoding == IDENTITY:
        return data
    raise CodecError(f"unknown encoding {encoding[:40]!r} ({', '.join(ENCODINGS)})")


def probe(data: bytes, encoding: str = DEFAULT) -> bool:
    """Whether pieces spread over `data` shrink by 3 % in `encoding`: False says "send it
    as is" without compressing the whole chunk (random or already compressed data)."""
    n = len(data)
    if n <= PROBE_PIECE * PROBE_PIECES:
        return True  # small: compressing it whole is as cheap as probing
    step = (n - PROBE_PIECE) // (PROBE_PIECES - 1)
    sample = b"".join(data[i * step:i * step + PROBE_PIECE] for i in range(PROBE_PIECES))
    return len(compress(encoding, sample)) <= MIN_SHRINK * len(sample)


def encode(data: bytes, encoding: str = DEFAULT) -> tuple[str, bytes]:
    """(encoding, body) of a chunk on the wire: `encoding` when the probe says it will
    shrink and the whole result saves 3 %, else identity."""
    if encoding != IDENTITY and probe(data, encoding):
        packed = compress(encoding, data)
        if len(packed) <= MIN_SHRINK * len(data):
            return encoding, packed
    return IDENTITY, data


def decode(encoding: str, body: bytes | memoryview, limit: int = CHUNK_SIZE
           ) -> bytes | memoryview:
    """The plain bytes of `body`; CodecError when it is not one complete frame or stream
    of `encoding`, or would decode to more than `limit` bytes (checked before, or while,
    inflating: never more than `limit` + 1 bytes are produced)."""
    size = body.nbytes if isinstance(body, memoryview) else len(body)
    if encoding == IDENTITY:
        if size > limit:
            raise CodecError(f"the body has more than {limit} bytes")
        return body
    if encoding == ZLIB:
        return _inflate(body, limit)
    if encoding == ZSTD:
        return _unzstd(body, size, limit)
    raise CodecError(f"unknown encoding {encoding[:40]!r} ({', '.join(ENCODINGS)})")


def _inflate(body: bytes | memoryview, limit: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise CodecError(f"the body is not zlib data ({exc})") from None
    if len(plain) > limit:
        raise CodecError(f"the body inflates to more than {limit} bytes")
    if not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
        raise CodecError("the body is not one complete zlib stream")
    return plain


def _unzstd(body: bytes | memoryview, size: int, limit: int) -> bytes:
    content, end = zstd_frame(body)
    if content > limit:
        raise CodecError(f"the body inflates to more than {limit} bytes (its frame says "
                         f"{content})")
    if end != size:
        raise CodecError("the body is not one complete zstd frame (it has "
                         f"{size - end} bytes after the frame)")
    zstandard = _zstd()
    try:
        # The frame's content size (checked above) sizes the output buffer; zstd refuses a
        # frame that decodes to another size, so nothing beyond `limit` is ever written.
        plain = _decompressor().decompress(body, max_output_size=limit)
    except zstandard.ZstdError as exc:
        raise CodecError(f"the body is not zstd data ({exc})") from None
    if len(plain) != content:
        raise CodecError(f"the body decodes to {len(plain)} bytes, not the {content} its "
                         "frame says")
    return bytes(plain)


def zstd_frame(body: bytes | memoryview) -> tuple[int, int]:
    """(content size, end offset) of the zstd frame at the start of `body`, read from its
    header and block headers (RFC 8878, section 3.1.1) without decoding: CodecError for a
    body that is not a frame with its content size, or is cut short.

    Why walk it here: the zstandard module accepts and ignores bytes after the first frame,
    and decodes without an output bound when the size is not in the header."""
    view = memoryview(body)
    n = view.nbytes
    if n < 6 or int.from_bytes(view[:4], "little") != _ZSTD_MAGIC:
        raise CodecError("the body is not zstd data (no zstd frame magic)")
    descriptor = view[4]
    fcs_flag, single_segment = descriptor >> 6, (descriptor >> 5) & 1
    checksum, dict_flag = (descriptor >> 2) & 1, descriptor & 3
    if descriptor & 0x08:
        raise CodecError("the body is not zstd data (a reserved header bit is set)")
    fcs_size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if fcs_size == 0:
        raise CodecError("the body is not a zstd frame with its content size in its header")
    at = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    if at + fcs_size > n:
        raise CodecError("the body is a truncated zstd frame")
    content = int.from_bytes(view[at:at + fcs_size], "little") + (256 if fcs_size == 2 else 0)
    at += fcs_size
    for _ in range(_ZSTD_MAX_BLOCKS):
        if at + 3 > n:
            raise CodecError("the body is a truncated zstd frame")
        header = int.from_bytes(view[at:at + 3], "little")
        last, kind, block = header & 1, (header >> 1) & 3, header >> 3
        if kind == 3:
            raise CodecError("the body is not zstd data (a reserved block type)")
        at += 3 + (1 if kind == 1 else block)   # an RLE block stores one byte
        if last:
            at += 4 * checksum
            if at > n:
                raise CodecError("the body is a truncated zstd frame")
            return content, at
    raise CodecError(f"the body's zstd frame has more than {_ZSTD_MAX_BLOCKS} blocks")
