"""Update bundles (docs/updates.md): the appliance's code for one version, signed.

A bundle is an uncompressed tar of three members, in this order:

- `release.json`: `{"format": 1, "version", "created", "payload": {"sha256", "size"}}`;
- `release.sig`: the 64-byte Ed25519 signature of `release.json`'s exact bytes;
- `payload.tar.gz`: the `appliance/` and `gatewaycore/` packages of that version.

The signature covers the small document and the document names the payload's hash, so a
bundle is checked before a byte of it is unpacked, and one rule (here) serves the release
tool that writes bundles, the control plane that publishes them (form and hash: it holds
no key) and the appliance's installer (form, hash and the release key baked into the
image). Unpacking is an allow-list: regular files and folders under the two packages,
names of plain characters, bounded in count and size. Nothing else is accepted, even
signed: a leaked key should not also be a way to write outside the install folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

FORMAT = 1
RELEASE = "release.json"
SIGNATURE = "release.sig"
PAYLOAD = "payload.tar.gz"
SIGNATURE_BYTES = 64
MAX_RELEASE_DOC = 16 * 1024
MAX_PAYLOAD = 64 * 1024 * 1024       # compressed
MAX_UNPACKED = 128 * 1024 * 1024     # what the payload may unpack to
MAX_FILES = 4000
PACKAGES = ("appliance", "gatewaycore")
VERSION_FILE = "appliance/version.py"
# Release numbers: 2 to 4 dot-separated numbers, no leading zeros ("0.1.0", "1.2").
_VERSION = re.compile(r"(0|[1-9][0-9]{0,5})(\.(0|[1-9][0-9]{0,5})){1,3}")
VERSION_ACCEPTED = "2 to 4 numbers joined by dots, e.g. 0.2.0"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # a payload's hash, in release.json and offers
_MEMBER = re.compile(r"(appliance|gatewaycore)(/[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}){0,8}")
_VERSION_LINE = re.compile(r'^__version__ = "([^"]*)"$', re.M)


class BundleError(Exception):
    """A bundle that is not to be trusted or cannot be used; the message says why."""


def parse_version(text: Any, field: str = "version") -> tuple[int, ...]:
    """`text` as a tuple of numbers, the order versions compare in."""
    if not isinstance(text, str) or not _VERSION.fullmatch(text):
        raise BundleError(f"{field}: {text!r} is not accepted; accepted: {VERSION_ACCEPTED}")
    return tuple(int(part) for part in text.split("."))


def is_newer(candidate: str, installed: str | None) -> bool:
    """Whether `candidate` is a later release than `installed`; an installed version that is
    no release number (a development build) is never offered an update."""
    try:
        return parse_version(candidate) > parse_version(installed)
    except BundleError:
        return False


@dataclass(frozen=True)
class Release:
    """The signed document of a bundle, and its signature."""

    version: str
    created: str
    sha256: str
    size: int
    document: bytes
    signature: bytes

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "sha256": self.sha256, "size": self.size,
                "created": self.created}


# -- keys ------------------------------------------------------------------------------------

def new_key() -> tuple[bytes, bytes]:
    """A fresh release key: (private PEM, public PEM)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def load_public(pem: bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise BundleError(f"release public key: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError("release public key: not an Ed25519 key")
    return key


def load_private(pem: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"release private key: not an unencrypted PEM key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError("release private key: not an Ed25519 key")
    return key


# -- reading ---------------------------------------------------------------------------------

def _members(archive: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = archive.getmembers()
    if [m.name for m in members] != [RELEASE, SIGNATURE, PAYLOAD] or not all(
        m.isfile() for m in members
    ):
        raise BundleError(f"not a bundle: its members must be {RELEASE}, {SIGNATURE}, "
                          f"{PAYLOAD}, in that order, as regular files")
    return members


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    stream = archive.extractfile(member)
    if stream is None:  # pragma: no cover - _members checked it is a regular file
        raise BundleError(f"{member.name}: cannot be read")
    return stream


def _document(raw: bytes) -> tuple[str, str, str, int]:
    try:
        doc = json.loads(raw)
    except ValueError:
        raise BundleError(f"{RELEASE}: not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BundleError(f"{RELEASE}: format must be {FORMAT}")
    version = doc.get("version")
    parse_version(version, f"{RELEASE} version")
    payload = doc.get("payload")
    if not isinstance(payload, dict):
        raise BundleError(f"{RELEASE}: payload must be an object {{sha256, size}}")
    sha, size = payload.get("sha256"), payload.get("size")
    if not isinstance(sha, str) or not SHA256_HEX.fullmatch(sha):
        raise BundleError(f"{RELEASE}: payload.sha256 must be 64 lowercase hex digits")
    if type(size) is not int or not 0 < size <= MAX_PAYLOAD:
        raise BundleError(f"{RELEASE}: payload.size must be 1 to {MAX_PAYLOAD} bytes")
    created = doc.get("created")
    return version, created if isinstance(created, str) else "", sha, size


def read(path: str | os.PathLike[str]) -> Release:
    """The bundle's release document, its form checked and its payload's hash matched.

    Does not check the signature (`verify` does): the control plane, which holds no key,
    publishes what passes this."""
    try:
        with tarfile.open(path, mode="r:") as archive:
            doc_m, sig_m, payload_m = _members(archive)
            if doc_m.size > MAX_RELEASE_DOC:
                raise BundleError(f"{RELEASE}: larger than {MAX_RELEASE_DOC} bytes")
            if sig_m.size != SIGNATURE_BYTES:
                raise BundleError(f"{SIGNATURE}: must be {SIGNATURE_BYTES} bytes")
            raw = _read_member(archive, doc_m).read()
            signature = _read_member(archive, sig_m).read()
            version, created, sha, size = _document(raw)
            if payload_m.size != size:
                raise BundleError(f"{PAYLOAD}: {payload_m.size} bytes, but {RELEASE} says "
                                  f"{size}")
            digest = hashlib.sha256()
            stream = _read_member(archive, payload_m)
            while block := stream.read(1 << 20):
                digest.update(block)
            if digest.hexdigest() != sha:
                raise BundleError(f"{PAYLOAD}: its SHA-256 is not the one {RELEASE} names")
    except (tarfile.TarError, EOFError):
        raise BundleError("not a bundle: not a readable tar archive") from None
    except OSError as exc:
        raise BundleError(f"cannot read the bundle: {exc.strerror or exc}") from None
    return Release(version, created, sha, size, raw, signature)


def verify(path: str | os.PathLike[str], public_pem: bytes) -> Release:
    """`read`, and the signature checked with the release key."""
    key = load_public(public_pem)
    release = read(path)
    try:
        key.verify(release.signature, release.document)
    except InvalidSignature:
        raise BundleError(f"{SIGNATURE}: not signed by this appliance's release key") from None
    return release


def extract(path: str | os.PathLike[str], release: Release, dest: Path) -> int:
    """Unpack the (verified) payload into `dest`, a folder that must not exist; returns the
    number of files. The payload's version file must name the release's version."""
    dest.mkdir(mode=0o755)
    files = unpacked = 0
    version_seen = None
    with tarfile.open(path, mode="r:") as archive:
        payload = _read_member(archive, _members(archive)[2])
        with tarfile.open(fileobj=payload, mode="r|gz") as inner:
            for member in inner:
                name = member.name
                if not _MEMBER.fullmatch(name):
                    raise BundleError(f"{PAYLOAD}: {name!r} is not accepted; accepted: "
                                      f"paths under {' or '.join(PACKAGES)}/ of letters, "
                                      "digits, _ . -")
                target = dest / name
                if member.isdir():
                    target.mkdir(mode=0o755, parents=True, exist_ok=True)
                    continue
                if not member.isfile():
                    raise BundleError(f"{PAYLOAD}: {name!r} is not a regular file or folder")
                files += 1
                unpacked += member.size
                if files > MAX_FILES or unpacked > MAX_UNPACKED:
                    raise BundleError(f"{PAYLOAD}: more than {MAX_FILES} files or "
                                      f"{MAX_UNPACKED} bytes")
                source = inner.extractfile(member)
                data = source.read() if source is not None else b""
                if name == VERSION_FILE:
                    found = _VERSION_LINE.search(data.decode("utf-8", "replace"))
                    version_seen = found.group(1) if found else ""
                target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o644)
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
    if version_seen != release.version:
        raise BundleError(f"{PAYLOAD}: {VERSION_FILE} says {version_seen!r}, the release "
                          f"{release.version!r}")
    return files


# -- writing ---------------------------------------------------------------------------------

def with_version(source: bytes, version: str) -> bytes:
    """`appliance/version.py` with its `__version__` set to `version`."""
    text, count = _VERSION_LINE.subn(f'__version__ = "{version}"', source.decode())
    if count != 1:
        raise BundleError(f"{VERSION_FILE}: has no single __version__ line to set")
    return text.encode()


def _payload(files: Iterable[tuple[str, bytes]], version: str) -> bytes:
    buffer = io.BytesIO()
    # mtime 0, owner root, sorted: the same sources give the same payload, byte for byte.
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        seen = False
        for name, data in sorted(files):
            if not _MEMBER.fullmatch(name):
                raise BundleError(f"{name!r}: not a file of {' or '.join(PACKAGES)}")
            if name == VERSION_FILE:
                data, seen = with_version(data, version), True
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
        if not seen:
            raise BundleError(f"the sources have no {VERSION_FILE}")
    return buffer.getvalue()


def build(files: Iterable[tuple[str, bytes]], version: str, private_pem: bytes,
          created: str) -> bytes:
    """A signed bundle of `files` (path under a package, content) at `version`."""
    parse_version(version)
    key = load_private(private_pem)
    payload = _payload(files, version)
    document = json.dumps({
        "format": FORMAT, "version": version, "created": created,
        "payload": {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)},
    }, sort_keys=True).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((RELEASE, document), (SIGNATURE, key.sign(document)),
                           (PAYLOAD, payload)):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()
