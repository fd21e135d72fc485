"""Update bundles (gatewaycore/bundle.py): what is accepted, and every way one is refused."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from gatewaycore import bundle
from tools import release

KEY, PUBLIC = bundle.new_key()
OTHER_KEY, _ = bundle.new_key()
FILES = [
    ("appliance/__init__.py", b""),
    ("appliance/version.py", b'"""v"""\n\n__version__ = "0.1.0"\n'),
    ("gatewaycore/__init__.py", b"X = 1\n"),
]


def write(tmp_path: Path, data: bytes, name: str = "b.bundle") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def raw_bundle(payload: bytes, version: str = "0.2.0", key: bytes = KEY,
               document: bytes | None = None) -> bytes:
    """A bundle around any payload, signed: to reach the checks behind the signature."""
    if document is None:
        document = json.dumps({"format": 1, "version": version, "created": "x", "payload": {
            "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}}).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:") as tar:
        for name, data in ((bundle.RELEASE, document),
                           (bundle.SIGNATURE, bundle.load_private(key).sign(document)),
                           (bundle.PAYLOAD, payload)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def payload_of(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_a_built_bundle_verifies_and_unpacks_with_its_version(tmp_path: Path) -> None:
    path = write(tmp_path, bundle.build(FILES, "0.2.0", KEY, "2026-11-27T00:00:00Z"))
    found = bundle.verify(path, PUBLIC)
    assert (found.version, found.created) == ("0.2.0", "2026-11-27T00:00:00Z")
    assert bundle.extract(path, found, tmp_path / "out") == 3
    assert b'__version__ = "0.2.0"' in (tmp_path / "out/appliance/version.py").read_bytes()
    # the same sources give the same payload (a release can be rebuilt and compared)
    again = bundle.build(FILES, "0.2.0", KEY, "2026-11-27T00:00:00Z")
    assert bundle.read(write(tmp_path, again, "c.bundle")).sha256 == found.sha256


def test_another_key_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, bundle.build(FILES, "0.2.0", OTHER_KEY, "t"))
    bundle.read(path)  # well formed: the control plane would publish it
    with pytest.raises(bundle.BundleError, match="not signed by this appliance's release key"):
        bundle.verify(path, PUBLIC)


def test_a_changed_payload_is_refused_by_its_hash(tmp_path: Path) -> None:
    data = bytearray(bundle.build(FILES, "0.2.0", KEY, "t"))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        start = tar.getmember(bundle.PAYLOAD).offset_data
    data[start + 20] ^= 0xFF  # one byte of the payload
    with pytest.raises(bundle.BundleError, match="SHA-256"):
        bundle.verify(write(tmp_path, bytes(data)), PUBLIC)


def test_a_changed_document_breaks_the_signature(tmp_path: Path) -> None:
    payload = payload_of([("appliance/version.py", b'__version__ = "9.0.0"\n')])
    doc = json.dumps({"format": 1, "version": "9.0.0", "created": "x", "payload": {
        "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}}).encode()
    signed = raw_bundle(payload, document=doc)
    forged = signed.replace(b'"9.0.0", "created"', b'"9.0.1", "created"')
    with pytest.raises(bundle.BundleError, match="not signed"):
        bundle.verify(write(tmp_path, forged), PUBLIC)


@pytest.mark.parametrize("name", ["../evil.py", "/etc/passwd", "appliance/../../x",
                                  "other/x.py", "appliance/.hidden"])
def test_paths_outside_the_packages_are_refused_even_signed(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, raw_bundle(payload_of([(name, b"x")])))
    release_ = bundle.verify(path, PUBLIC)
    with pytest.raises(bundle.BundleError, match="is not accepted"):
        bundle.extract(path, release_, tmp_path / "out")
    assert not (tmp_path / "evil.py").exists()


def test_links_are_refused_even_signed(tmp_path: Path) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        info = tarfile.TarInfo("appliance/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
        tar.addfile(info)
    path = write(tmp_path, raw_bundle(out.getvalue()))
    with pytest.raises(bundle.BundleError, match="not a regular file"):
        bundle.extract(path, bundle.verify(path, PUBLIC), tmp_path / "out")


def test_the_version_file_must_name_the_release(tmp_path: Path) -> None:
    payload = payload_of([("appliance/version.py", b'__version__ = "0.1.0"\n')])
    path = write(tmp_path, raw_bundle(payload, version="0.3.0"))
    with pytest.raises(bundle.BundleError, match=r"says .0\.1\.0., the release .0\.3\.0."):
        bundle.extract(path, bundle.verify(path, PUBLIC), tmp_path / "out")


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(bundle.BundleError, match="not a readable tar"):
        bundle.read(write(tmp_path, b"hello"))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:") as tar:
        info = tarfile.TarInfo("release.json")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(bundle.BundleError, match="its members must be"):
        bundle.read(write(tmp_path, out.getvalue()))


@pytest.mark.parametrize(("candidate", "installed", "newer"), [
    ("0.2.0", "0.1.0", True), ("0.10.0", "0.9.9", True), ("1.0", "0.9.9", True),
    ("0.1.0", "0.1.0", False), ("0.1.0", "0.2.0", False),
    ("0.2.0", "0.1.0+dev", False), ("0.2.0", None, False),
])
def test_version_order(candidate: str, installed: str | None, newer: bool) -> None:
    assert bundle.is_newer(candidate, installed) is newer


@pytest.mark.parametrize("bad", ["1", "01.2", "1.2.3.4.5", "1.2-rc1", "", "v1.2"])
def test_version_allow_list_names_the_accepted_form(bad: str) -> None:
    with pytest.raises(bundle.BundleError, match="accepted: 2 to 4 numbers"):
        bundle.parse_version(bad)


def test_release_tool_signs_the_repository_code(tmp_path: Path) -> None:
    private, made = release.keygen(tmp_path / "keys")
    assert made and (private.stat().st_mode & 0o777) == 0o600
    assert release.keygen(tmp_path / "keys") == (private, False)  # kept, not replaced
    out = tmp_path / "x.bundle"
    assert release.main(["bundle", "--version", "7.0.0", "--key", str(private),
                         "--out", str(out)]) == 0
    public = (tmp_path / "keys" / release.PUBLIC).read_bytes()
    found = bundle.verify(out, public)
    assert bundle.extract(out, found, tmp_path / "code") > 20
    assert (tmp_path / "code/appliance/daemon.py").exists()
    assert release.main(["bundle", "--version", "7", "--key", str(private)]) == 2
