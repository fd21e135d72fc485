"""`python -m tools.release keygen|bundle`: the release key and the update bundles.

- `keygen` makes the development release key, `build/release/release-key.pem` (0600, never
  committed: build/ is ignored) and its public half `release-key.pub`, which `make ova`
  puts into the image. It keeps an existing key: the images built with it trust it.
- `bundle --version V` signs the appliance's code (`appliance/`, `gatewaycore/`: the files
  git tracks, or the folders outside git) as update bundle V (gatewaycore/bundle.py),
  `build/backup-gateway-V.bundle` by default. `make release` runs it for the version in
  appliance/version.py.

A real release would keep its key offline and pass it with `--key`; the format and the
checks are the same.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from gatewaycore import atomicfile, bundle
from gatewaycore.utctime import format_utc

REPO = Path(__file__).resolve().parent.parent
KEY_DIR = REPO / "build" / "release"
PRIVATE = "release-key.pem"
PUBLIC = "release-key.pub"


def keygen(directory: Path = KEY_DIR) -> tuple[Path, bool]:
    """The key pair in `directory`, made when missing: (private key path, made now)."""
    private, public = directory / PRIVATE, directory / PUBLIC
    if private.exists() and public.exists():
        return private, False
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_pem, public_pem = bundle.new_key()
    atomicfile.write_atomic(private, private_pem, mode=0o600)
    atomicfile.write_atomic(public, public_pem, mode=0o644)
    return private, True


def source_files(root: Path = REPO) -> Iterator[tuple[str, bytes]]:
    """(path, content) of the packages a bundle carries: git's file list when in git (no
    stray editor or cache files), else every file but caches."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", *bundle.PACKAGES],
            check=True, capture_output=True).stdout.split(b"\0")
        names = [n.decode() for n in listed if n]
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(root)) for package in bundle.PACKAGES
                 for p in (root / package).rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts]
    for name in names:
        path = root / name
        if path.is_file():  # a tracked file deleted in the working tree is left out
            yield name, path.read_bytes()


def make_bundle(version: str, key: Path, out: Path, root: Path = REPO) -> bundle.Release:
    data = bundle.build(source_files(root), version, key.read_bytes(), format_utc())
    out.parent.mkdir(parents=True, exist_ok=True)
    atomicfile.write_atomic(out, data, mode=0o644)
    return bundle.read(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.release", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("keygen", help="make the development release key if missing")
    gen.add_argument("--dir", type=Path, default=KEY_DIR)
    make = sub.add_parser("bundle", help="sign the appliance's code as an update bundle")
    make.add_argument("--version", required=True, help=bundle.VERSION_ACCEPTED)
    make.add_argument("--key", type=Path, default=KEY_DIR / PRIVATE,
                      help="the release private key (PEM, Ed25519)")
    make.add_argument("--out", type=Path, default=None,
                      help="default build/backup-gateway-VERSION.bundle")
    args = parser.parse_args(argv)
    try:
        if args.command == "keygen":
            private, made = keygen(args.dir)
            print(f"{'made' if made else 'kept'} release key {private} "
                  f"(public half {private.parent / PUBLIC})")
            return 0
        bundle.parse_version(args.version, "--version")
        if not os.access(args.key, os.R_OK):
            print(f"release: --key {args.key} cannot be read; make one with "
                  "`python -m tools.release keygen`", file=sys.stderr)
            return 2
        out = args.out or REPO / "build" / f"backup-gateway-{args.version}.bundle"
        release = make_bundle(args.version, args.key, out)
    except bundle.BundleError as exc:
        print(f"release: {exc}", file=sys.stderr)
        return 2
    print(f"{out}: version {release.version}, {release.size} bytes of code, "
          f"sha256 {release.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
