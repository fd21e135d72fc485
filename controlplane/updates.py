"""The published update bundles (docs/updates.md): a folder, STATE_DIR/updates.

`python -m controlplane publish-update FILE` checks a bundle's form and hash
(gatewaycore.bundle.read; the control plane holds no release key, the gateway checks the
signature) and copies it in atomically as `VERSION.bundle`. A running control plane sees it
at the next poll without a restart: the listing is re-read when the folder changes (one
stat per look). Gateways are offered the newest bundle above the version they run, and
fetch it over the signed link (`GET /gateway/update/VERSION`).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from gatewaycore import atomicfile, bundle

FOLDER = "updates"
SUFFIX = ".bundle"


class PublishError(Exception):
    """The bundle cannot be published; the message says why."""


@dataclass(frozen=True)
class Published:
    release: bundle.Release
    path: Path
    published_at: float  # when it was published (the file's time), epoch seconds


class UpdateShelf:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._newest: Published | None = None

    def publish(self, source: Path) -> tuple[Published, bool]:
        """Check `source` and publish it; (the bundle, False) when this very bundle was
        published already. A different bundle of a published version is refused: gateways
        may have installed that one."""
        try:
            release = bundle.read(source)
        except bundle.BundleError as exc:
            raise PublishError(f"{source}: {exc}") from None
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = self.directory / f"{release.version}{SUFFIX}"
        if target.exists():
            try:
                same = bundle.read(target).document == release.document
            except bundle.BundleError:
                same = False
            if not same:
                raise PublishError(f"version {release.version} is published already with "
                                   "other contents; publish a new version number")
            return self._published(release, target), False
        atomicfile.write_atomic(target, source.read_bytes(), mode=0o600)
        return self._published(release, target), True

    @staticmethod
    def _published(release: bundle.Release, path: Path) -> Published:
        return Published(release, path, path.stat().st_mtime)

    def newest(self) -> Published | None:
        """The newest published bundle (re-read only when the folder changed)."""
        try:
            st = os.stat(self.directory)
        except FileNotFoundError:
            return None
        seen = (st.st_mtime_ns, st.st_ino)
        with self._lock:
            if seen != self._seen:
                self._newest, self._seen = self._scan(), seen
            return self._newest

    def _scan(self) -> Published | None:
        best: tuple[tuple[int, ...], Path] | None = None
        for path in self.directory.glob(f"*{SUFFIX}"):
            try:
                key = bundle.parse_version(path.name[: -len(SUFFIX)])
            except bundle.BundleError:
                continue
            if best is None or key > best[0]:
                best = (key, path)
        if best is None:
            return None
        try:
            return self._published(bundle.read(best[1]), best[1])
        except bundle.BundleError:
            return None  # written only through publish(): a damaged file offers nothing

    def offer_for(self, installed: str | None) -> Published | None:
        """The bundle a gateway running `installed` should install, if any."""
        newest = self.newest()
        if newest is None or installed is None or not bundle.is_newer(
                newest.release.version, installed):
            return None
        return newest

    def path_of(self, version: str) -> Path | None:
        """The published bundle of `version`, if there is one."""
        try:
            bundle.parse_version(version)
        except bundle.BundleError:
            return None
        path = self.directory / f"{version}{SUFFIX}"
        return path if path.is_file() else None
