"""A small, strict CBOR codec (RFC 8949) for the Smithy RPC v2 CBOR protocol.

Why our own rather than `cbor2`: a request body comes from anyone who can reach the port,
and a general-purpose decoder accepts far more than the protocol uses (a dozen tags,
shared references, sets, arbitrary map keys) and recurses once per level of nesting. What
rpcv2Cbor needs is small: the eight major types, definite and indefinite lengths, tag 1
(epoch timestamps), float16/32/64. So this decoder takes exactly that and checks every
length against the bytes actually left before it allocates anything:

- nesting at most `max_depth` deep (the JSON path's bound, gatewaycore.safejson);
- a string, array or map cannot claim more items than the remaining bytes could hold, so
  a 5-byte "array of 2**64 items" is refused at once instead of looping or allocating;
- text is strict UTF-8 (each chunk of an indefinite string on its own, as RFC 8949 says);
- map keys are text strings and unique (Smithy structures and maps have string keys;
  anything else would also be unhashable or ambiguous in a dict);
- simple values are false/true/null/undefined (undefined reads as null, as the Smithy spec
  requires); tags other than 1 are refused (the spec's bignums are not in this model);
- one data item per body: trailing bytes are an error.

Every failure is a CborError with a one-line reason and the byte offset, never another
exception type, so the protocol layer turns it into a SerializationException.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

MAX_DEPTH = 32
_BREAK = 0xFF
_INDEFINITE = 31
_SIMPLE = {20: False, 21: True, 22: None, 23: None}
_UINT_LIMIT = 1 << 64
_TAG_EPOCH = 1


class CborError(ValueError):
    """The body is not CBOR this protocol accepts; the message says why, in one line."""


class _Break:
    """The "break" stop code of an indefinite-length item (only valid inside one)."""


_BREAK_MARK = _Break()


class _Decoder:
    def __init__(self, data: bytes, max_depth: int) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.max_depth = max_depth

    def fail(self, reason: str, at: int | None = None) -> CborError:
        return CborError(f"invalid CBOR at byte {self.pos if at is None else at}: {reason}")

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> memoryview:
        if n > self.remaining():
            raise self.fail(f"needs {n} more bytes, only {self.remaining()} left (truncated)")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def argument(self, info: int) -> int:
        """The integer argument of a head whose additional information is `info` (< 28)."""
        if info < 24:
            return info
        if info > 27:
            raise self.fail(f"reserved additional information {info}", self.pos - 1)
        return int.from_bytes(self.take(1 << (info - 24)), "big")

    def item(self, depth: int, allow_break: bool = False) -> Any:
        start = self.pos
        head = self.take(1)[0]
        major, info = head >> 5, head & 0x1F
        if head == _BREAK:
            if allow_break:
                return _BREAK_MARK
            raise self.fail("unexpected break stop code", start)
        if major <= 1:
            if info == _INDEFINITE:
                raise self.fail("an integer cannot have an indefinite length", start)
            value = self.argument(info)
            return value if major == 0 else -1 - value
        if major in (2, 3):
            return self.string(major, info, start)
        if major in (4, 5):
            if depth >= self.max_depth:
                raise self.fail(f"nested deeper than {self.max_depth} levels", start)
            return self.array(info, depth) if major == 4 else self.map(info, depth, start)
        if major == 6:
            return self.tag(info, depth, start)
        return self.simple(info, start)

    def string(self, major: int, info: int, start: int) -> str | bytes:
        if info != _INDEFINITE:
            return self.chunk(major, self.argument(info), start)
        parts: list[Any] = []
        while True:
            at = self.pos
            head = self.take(1)[0]
            if head == _BREAK:
                break
            if head >> 5 != major or head & 0x1F == _INDEFINITE:
                raise self.fail("a chunk of an indefinite string must be a definite string "
                                "of the same type", at)
            parts.append(self.chunk(major, self.argument(head & 0x1F), at))
        return "".join(parts) if major == 3 else b"".join(parts)

    def chunk(self, major: int, length: int, start: int) -> str | bytes:
        if length > self.remaining():
            raise self.fail(f"string of {length} bytes but only {self.remaining()} left", start)
        raw = bytes(self.take(length))
        if major == 2:
            return raw
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"text string is not UTF-8 (its byte {exc.start})", start) from None

    def array(self, info: int, depth: int) -> list[Any]:
        out: list[Any] = []
        if info == _INDEFINITE:
            while (value := self.item(depth + 1, allow_break=True)) is not _BREAK_MARK:
                out.append(value)
            return out
        start = self.pos - 1
        count = self.argument(info)
        if count > self.remaining():  # every item takes at least one byte
            raise self.fail(f"array of {count} items but only {self.remaining()} bytes left",
                            start)
        for _ in range(count):
            out.append(self.item(depth + 1))
        return out

    def map(self, info: int, depth: int, start: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if info == _INDEFINITE:
            while True:
                at = self.pos
                key = self.item(depth + 1, allow_break=True)
                if key is _BREAK_MARK:
                    return out
                self.pair(out, key, depth, at)
        count = self.argument(info)
        if 2 * count > self.remaining():  # every pair takes at least two bytes
            raise self.fail(f"map of {count} pairs but only {self.remaining()} bytes left",
                            start)
        for _ in range(count):
            at = self.pos
            self.pair(out, self.item(depth + 1), depth, at)
        return out

    def pair(self, out: dict[str, Any], key: Any, depth: int, at: int) -> None:
        if not isinstance(key, str):
            raise self.fail(f"map key must be a text string, not {type(key).__name__}", at)
        if key in out:
            raise self.fail(f"duplicate map key {key[:64]!r}", at)
        out[key] = self.item(depth + 1)

    def tag(self, info: int, depth: int, start: int) -> Any:
        if info == _INDEFINITE:
            raise self.fail("a tag cannot have an indefinite length", start)
        number = self.argument(info)
        if number != _TAG_EPOCH:
            raise self.fail(f"tag {number} is not supported (only tag 1, epoch time)", start)
        if self.remaining() and self.data[self.pos] >> 5 not in (0, 1, 7):
            raise self.fail("tag 1 (epoch time) must hold an integer or a float", start)
        value = self.item(depth + 1)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail("tag 1 (epoch time) must hold an integer or a float", start)
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail("tag 1 (epoch time) must be finite", start)
        return value  # epoch seconds: what the JSON protocol carries for a timestamp

    def simple(self, info: int, start: int) -> Any:
        if info in _SIMPLE:
            return _SIMPLE[info]
        if info == 25:
            return struct.unpack(">e", self.take(2))[0]
        if info == 26:
            return struct.unpack(">f", self.take(4))[0]
        if info == 27:
            return struct.unpack(">d", self.take(8))[0]
        raise self.fail(f"simple value {info} is not supported", start)


def loads(data: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Decode exactly one CBOR data item; CborError for anything malformed or unsupported.

    Tag 1 decodes to its number (epoch seconds), the value a timestamp has in AWS JSON 1.0,
    so the operations see the same input whichever protocol carried it.
    """
    decoder = _Decoder(bytes(data), max_depth)
    if not data:
        raise CborError("invalid CBOR at byte 0: empty body")
    value = decoder.item(0)
    if decoder.remaining():
        raise decoder.fail(f"{decoder.remaining()} bytes after the end of the data item")
    return value


# -- encoding ---------------------------------------------------------------------------


def _head(out: bytearray, major: int, value: int) -> None:
    """The initial byte and argument, in the shortest form (as the Smithy spec asks)."""
    if value < 24:
        out.append(major << 5 | value)
    elif value < 1 << 8:
        out += bytes((major << 5 | 24, value))
    elif value < 1 << 16:
        out.append(major << 5 | 25)
        out += value.to_bytes(2, "big")
    elif value < 1 << 32:
        out.append(major << 5 | 26)
        out += value.to_bytes(4, "big")
    else:
        out.append(major << 5 | 27)
        out += value.to_bytes(8, "big")


def _number(out: bytearray, value: int | float) -> None:
    if isinstance(value, int):
        if not -_UINT_LIMIT <= value < _UINT_LIMIT:
            raise ValueError(f"integer {value} does not fit a CBOR integer")
        if value >= 0:
            _head(out, 0, value)
        else:
            _head(out, 1, -1 - value)
        return
    # Single precision when nothing is lost; never half (the spec: support is inconsistent).
    try:
        single = struct.pack(">f", value)
    except OverflowError:  # beyond single precision's range
        single = b""
    if single and (struct.unpack(">f", single)[0] == value or math.isnan(value)):
        out.append(0xFA)
        out += single
    else:
        out.append(0xFB)
        out += struct.pack(">d", value)


def _timestamp(out: bytearray, seconds: int | float) -> None:
    out.append(0xC0 | _TAG_EPOCH)
    if isinstance(seconds, float) and seconds.is_integer():
        seconds = int(seconds)
    if isinstance(seconds, float):
        out.append(0xFB)  # a timestamp keeps its full double precision
        out += struct.pack(">d", seconds)
    else:
        _number(out, seconds)


def _encode(out: bytearray, value: Any, timestamp_keys: Collection[str]) -> None:
    if value is None:
        out.append(0xF6)
    elif value is True:
        out.append(0xF5)
    elif value is False:
        out.append(0xF4)
    elif isinstance(value, int | float):
        _number(out, value)
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        _head(out, 3, len(raw))
        out += raw
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        _head(out, 2, len(raw))
        out += raw
    elif isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        _timestamp(out, moment.timestamp())
    elif isinstance(value, list | tuple):
        _head(out, 4, len(value))
        for item in value:
            _encode(out, item, timestamp_keys)
    elif isinstance(value, dict):
        present = [(k, v) for k, v in value.items() if v is not None]
        _head(out, 5, len(present))
        for key, item in present:
            if not isinstance(key, str):
                raise ValueError(f"map key must be a string, not {type(key).__name__}")
            _encode(out, key, timestamp_keys)
            if key in timestamp_keys and isinstance(item, int | float) \
                    and not isinstance(item, bool):
                _timestamp(out, item)
            else:
                _encode(out, item, timestamp_keys)
    else:
        raise ValueError(f"cannot encode {type(value).__name__} as CBOR")


def dumps(value: Any, timestamp_keys: Collection[str] = ()) -> bytes:
    """Encode dict/list/tuple/str/bytes/int/float/bool/None/datetime with definite lengths.

    Smithy structures omit null members, so a dict entry whose value is None is left out.
    A datetime is a tag-1 timestamp; so is a number under a key in `timestamp_keys`, because
    the operations return timestamps as epoch numbers (what AWS JSON 1.0 sends) and only
    the model says which members are timestamps. ValueError for anything else.
    """
    out = bytearray()
    _encode(out, value, timestamp_keys)
    return bytes(out)
