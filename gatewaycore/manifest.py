"""A recovery point's manifest: which chunk holds which bytes of which disk.

Shared by the gateway (which cuts disks into chunks and later restores from a manifest) and
the control plane (which composes an incremental backup's changes onto its base, keeps the
manifest durable, and reclaims chunks no manifest references). See docs/backups.md.

A disk image is a sorted list of non-overlapping extents; each extent says "these `length`
bytes at `offset` of the disk are bytes `chunk_offset ..` of chunk `chunk`", or, with
`chunk` None, "are zeros". Bytes no extent covers are zeros too, so a full backup lists only
data; an incremental one lists every changed range, zeros included (a range the guest
zeroed must override its base). Chunks are named by the SHA-256 of their plain bytes, so an
unchanged range of a VM backed up twice names the same chunk and is not sent again.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

FORMAT = 1
# A chunk is at most 4 MiB of one disk, cut at multiples of CHUNK_SIZE of the disk's offsets,
# so the same data at the same place makes the same chunk in every full backup. Changed
# ranges arrive at the dirty bitmap's granularity (64 KiB), so chunk edges are multiples of
# ALIGN except at the end of a disk.
CHUNK_SIZE = 4 * 1024 * 1024
ALIGN = 64 * 1024
MAX_DISKS = 64
MAX_EXTENTS = 4_000_000         # 16 TiB of disk in 4 MiB chunks
MAX_DISK_BYTES = 1 << 50        # 1 PiB: far above any VM disk, far below int64
DISK_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
CHUNK_ID_RE = re.compile(r"[0-9a-f]{64}")


class ManifestError(ValueError):
    """A manifest (or a part of one from a gateway) that breaks a rule; `field` names where."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    chunk: str | None       # hex SHA-256 of the chunk's plain bytes; None = zeros
    chunk_offset: int = 0   # where in the chunk these bytes start

    @property
    def end(self) -> int:
        return self.offset + self.length

    def to_json(self) -> list[Any]:
        return [self.offset, self.length, self.chunk, self.chunk_offset]


@dataclass(frozen=True)
class Disk:
    """One disk: `key` names it within the VM (libvirt's target dev such as "sda", vSphere's
    device key such as "2000"), `capacity` is its virtual size in bytes."""

    key: str
    capacity: int
    extents: tuple[Extent, ...]
    label: str = ""         # what a person calls it (file name, "Hard disk 1")

    def chunks(self) -> set[str]:
        return {e.chunk for e in self.extents if e.chunk is not None}

    def data_bytes(self) -> int:
        return sum(e.length for e in self.extents if e.chunk is not None)


@dataclass(frozen=True)
class Manifest:
    disks: tuple[Disk, ...]
    vm: Mapping[str, Any] = field(default_factory=dict)  # the VM's configuration at backup

    def chunks(self) -> set[str]:
        out: set[str] = set()
        for d in self.disks:
            out |= d.chunks()
        return out

    def disk(self, key: str) -> Disk | None:
        return next((d for d in self.disks if d.key == key), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "vm": dict(self.vm),
            "disks": [
                {"key": d.key, "label": d.label, "capacity": d.capacity,
                 "extents": [e.to_json() for e in d.extents]}
                for d in self.disks
            ],
        }


def _int(value: Any, where: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ManifestError(where, f"must be an integer from {low} to {high}")
    return value


def parse_extents(doc: Any, capacity: int, where: str, *, delta: bool = False
                  ) -> tuple[Extent, ...]:
    """Extents from their JSON form `[[offset, length, chunk|null, chunkOffset], ...]`,
    checked: inside the disk, sorted, not overlapping, each within one chunk's size.
    `delta`: a change list, where zero extents are meaningful (kept) rather than redundant."""
    if not isinstance(doc, list) or len(doc) > MAX_EXTENTS:
        raise ManifestError(where, f"must be a list of at most {MAX_EXTENTS} extents")
    out: list[Extent] = []
    last_end = 0
    for i, item in enumerate(doc):
        at = f"{where}[{i}]"
        if not isinstance(item, list) or len(item) != 4:
            raise ManifestError(at, "must be [offset, length, chunk or null, chunkOffset]")
        offset = _int(item[0], f"{at}.offset", 0, capacity)
        length = _int(item[1], f"{at}.length", 1, CHUNK_SIZE)
        chunk = item[2]
        if chunk is not None and (not isinstance(chunk, str) or not CHUNK_ID_RE.fullmatch(chunk)):
            raise ManifestError(f"{at}.chunk", "must be 64 lowercase hex digits or null")
        chunk_offset = _int(item[3], f"{at}.chunkOffset", 0, CHUNK_SIZE - length)
        if chunk is None and chunk_offset:
            raise ManifestError(f"{at}.chunkOffset", "must be 0 for a zero extent")
        if offset < last_end:
            raise ManifestError(at, "extents must be sorted by offset and must not overlap")
        if offset + length > capacity:
            raise ManifestError(at, f"ends at {offset + length}, past the disk's {capacity} bytes")
        last_end = offset + length
        if chunk is None and not delta:
            continue
        out.append(Extent(offset, length, chunk, chunk_offset))
    return tuple(out)


def parse_disk(doc: Any, where: str, *, delta: bool = False) -> Disk:
    if not isinstance(doc, dict):
        raise ManifestError(where, "must be an object")
    key = doc.get("key")
    if not isinstance(key, str) or not DISK_KEY_RE.fullmatch(key):
        raise ManifestError(f"{where}.key", "must be 1-64 of A-Z a-z 0-9 _ . : - "
                            "starting with a letter or digit")
    label = doc.get("label", "")
    if not isinstance(label, str) or len(label) > 1024:
        raise ManifestError(f"{where}.label", "must be a string of at most 1024 characters")
    capacity = _int(doc.get("capacity"), f"{where}.capacity", 0, MAX_DISK_BYTES)
    extents = parse_extents(doc.get("extents"), capacity, f"{where}.extents", delta=delta)
    return Disk(key, capacity, extents, label)


def parse(doc: Any, *, delta: bool = False) -> Manifest:
    """A Manifest from its JSON form (Manifest.to_json), every field checked; ManifestError
    names the first field that is wrong. `delta`: the changes of an incremental backup."""
    if not isinstance(doc, dict):
        raise ManifestError("manifest", "must be an object")
    if doc.get("format") != FORMAT:
        raise ManifestError("format", f"must be {FORMAT}")
    vm = doc.get("vm", {})
    if not isinstance(vm, dict):
        raise ManifestError("vm", "must be an object")
    disks_doc = doc.get("disks")
    if not isinstance(disks_doc, list) or not 1 <= len(disks_doc) <= MAX_DISKS:
        raise ManifestError("disks", f"must be a list of 1 to {MAX_DISKS} disks")
    disks = tuple(parse_disk(d, f"disks[{i}]", delta=delta) for i, d in enumerate(disks_doc))
    if len({d.key for d in disks}) != len(disks):
        raise ManifestError("disks", "disk keys must be unique")
    return Manifest(disks, vm)


def overlay(base: Iterable[Extent], changes: Iterable[Extent]) -> tuple[Extent, ...]:
    """The extents of a disk after `changes` (an incremental backup's change list, sorted)
    are written over `base` (the previous recovery point's extents, sorted).

    A base extent partly overwritten is cut, keeping the right part of its chunk
    (chunk_offset moves with the cut); zero extents of the result are dropped."""
    out: list[Extent] = []
    base_it: Iterator[Extent] = iter(base)
    pending: Extent | None = next(base_it, None)
    for change in changes:
        # base extents wholly before the change stay
        while pending is not None and pending.end <= change.offset:
            out.append(pending)
            pending = next(base_it, None)
        # a base extent overlapping the change: keep what sticks out on either side
        while pending is not None and pending.offset < change.end:
            if pending.offset < change.offset:
                out.append(Extent(pending.offset, change.offset - pending.offset,
                                  pending.chunk, pending.chunk_offset))
            if pending.end > change.end:
                cut = change.end - pending.offset
                pending = Extent(change.end, pending.end - change.end, pending.chunk,
                                 pending.chunk_offset + cut)
                break
            pending = next(base_it, None)
        if change.chunk is not None:
            out.append(change)
    while pending is not None:
        out.append(pending)
        pending = next(base_it, None)
    return tuple(e for e in out if e.chunk is not None)


def compose(base: Manifest | None, delta: Manifest) -> Manifest:
    """The full manifest of an incremental backup: each disk of `delta` over the same disk
    of `base` (a disk new since the base, or a grown one, is taken as it comes). A full
    backup is its own manifest (`base` None)."""
    if base is None:
        return Manifest(tuple(Disk(d.key, d.capacity, tuple(e for e in d.extents if e.chunk),
                                   d.label) for d in delta.disks), delta.vm)
    disks = []
    for d in delta.disks:
        prior = base.disk(d.key)
        prior_extents = tuple(e for e in prior.extents if e.end <= d.capacity) if prior else ()
        disks.append(Disk(d.key, d.capacity, overlay(prior_extents, d.extents), d.label))
    return Manifest(tuple(disks), delta.vm)


def cut(offset: int, length: int, chunk_size: int = CHUNK_SIZE) -> Iterator[tuple[int, int]]:
    """A disk range split at multiples of `chunk_size` of the disk's offsets: the pieces a
    backup makes chunks of (the same data at the same place is cut the same way every time)."""
    end = offset + length
    while offset < end:
        stop = min(end, (offset // chunk_size + 1) * chunk_size)
        yield offset, stop - offset
        offset = stop
