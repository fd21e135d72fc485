"""`python3 -m appliance.updateinstall`: install a requested update, or roll it back (root).

Run by `appliance-update.service` when the daemon leaves a request (appliance/updatefiles.py)
and at boot when a switch was cut short. Why a separate root program: the daemon is
unprivileged under `ProtectSystem=strict` and must stay so; this program does one thing,
trusts nothing the daemon wrote (it copies the request out of the daemon's folder without
following links and checks the signature itself, with the key baked into the image), needs
no network, and ends.

The steps, each durable before the next:
1. copy the request to root's folder and take it away; verify it (gatewaycore.bundle):
   signature, hash, a version above the running one; else the result is `refused`;
2. unpack it beside the running version, `/opt/appliance/VERSION`, compiled, synced;
3. write the journal {from, to}, switch the `current` link (one rename), restart the daemon;
4. health check: the daemon answers on its local API with the new version within
   HEALTH_TIMEOUT, and does not keep crashing; then `installed`, else switch back, restart,
   `rolled_back` with the reason. Older versions but the previous one are removed.
A power cut anywhere leaves the old or the new link; at the next boot a journal left behind
is finished: the health check is run on whatever the link names, rolled back if it fails.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance import updatefiles
from appliance.localclient import ApiError, ApiUnavailable, LocalApi
from gatewaycore import atomicfile, bundle, logfmt

log = logging.getLogger("appliance.update")

HEALTH_TIMEOUT = 180.0   # a daemon's start under TCG takes 5-20 s; a loaded host, more
CRASHES_ALLOWED = 2      # restarts by systemd (Restart=on-failure) that fail the check early
KEEP_VERSIONS = 2        # the running one and the one before it


@dataclass(frozen=True)
class Paths:
    root: Path = Path("/opt/appliance")
    request: Path = Path("/var/lib/appliance") / updatefiles.REQUEST
    work: Path = Path("/var/lib/appliance-update")
    release_key: Path = Path("/usr/share/appliance/release-key.pub")

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def journal(self) -> Path:
        return self.work / "switch.json"

    @property
    def result(self) -> Path:
        return self.work / "result.json"

    @property
    def bundle(self) -> Path:
        return self.work / "update.bundle"


class Daemon:
    """The appliance daemon as systemd runs it: restart it, ask it its version."""

    def __init__(self, unit: str = "appliance.service",
                 socket_path: str = "/run/appliance/api.sock") -> None:
        self.unit = unit
        self.api = LocalApi(socket_path)

    def restart(self) -> None:
        # Type=notify: returns once it says it is ready, or has failed to start (then systemd's
        # Restart= tries again and the health check below counts it); NRestarts starts again
        # from 0. A version that fails its start is the health check's to judge, not an error.
        subprocess.run(["systemctl", "restart", self.unit], check=False)

    def restarts(self) -> int:
        out = subprocess.run(["systemctl", "show", "-p", "NRestarts", "--value", self.unit],
                             capture_output=True, text=True).stdout.strip()
        return int(out) if out.isdigit() else 0

    def version(self) -> str | None:
        try:
            return str(self.api.status().get("softwareVersion"))
        except (ApiError, ApiUnavailable, OSError):
            return None


class Installer:
    def __init__(self, paths: Paths, daemon: Daemon, health_timeout: float = HEALTH_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic,
                 pause: Callable[[float], None] = time.sleep) -> None:
        self.paths = paths
        self.daemon = daemon
        self.health_timeout = health_timeout
        self._clock = clock
        self._pause = pause

    # -- the link --------------------------------------------------------------------------

    def running(self) -> str:
        return os.readlink(self.paths.current)

    def _switch(self, version: str) -> None:
        """Point `current` at `version` in one rename, durable before the restart."""
        tmp = self.paths.root / ".current.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(version)
        os.replace(tmp, self.paths.current)
        atomicfile.fsync_dir(self.paths.root)
        log.info("event=update_switched current=%s", version)

    # -- what the service runs ----------------------------------------------------------------

    def run(self) -> int:
        self.paths.work.mkdir(mode=0o755, parents=True, exist_ok=True)
        if self.paths.journal.exists():
            self.finish_switch()
        if self.paths.request.exists():
            return self.install_request()
        return 0

    def _result(self, outcome: str, version: str, previous: str, message: str) -> int:
        updatefiles.write_result(self.paths.result, outcome, version, previous, message)
        log.info("event=update_result outcome=%s version=%s from=%s message=%s",
                 outcome, version, previous, message)
        return 0 if outcome == "installed" else 1

    def _take_request(self) -> None:
        """Copy the daemon's request into root's folder (no link followed, at most a
        bundle's size: the daemon cannot make root fill the disk) and remove it."""
        limit = bundle.MAX_PAYLOAD + 1024 * 1024
        fd = os.open(self.paths.request, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as source, open(self.paths.bundle, "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            while block := source.read(1 << 20):
                if out.tell() + len(block) > limit:
                    raise bundle.BundleError(f"larger than {limit} bytes")
                out.write(block)
        self.paths.request.unlink()

    def install_request(self) -> int:
        running = self.running()
        try:
            self._take_request()
            release = bundle.verify(self.paths.bundle, self.paths.release_key.read_bytes())
        except (bundle.BundleError, OSError) as exc:
            claimed = _named_version(self.paths.bundle)
            self.paths.request.unlink(missing_ok=True)
            self.paths.bundle.unlink(missing_ok=True)
            return self._result("refused", claimed, running, f"the bundle was refused: {exc}")
        version = release.version
        if not bundle.is_newer(version, running):
            self.paths.bundle.unlink(missing_ok=True)
            return self._result("refused", version, running,
                                f"version {version} is not newer than the installed {running}")
        target = self.paths.root / version
        staging = self.paths.root / f".{version}.partial"
        try:
            shutil.rmtree(staging, ignore_errors=True)
            bundle.extract(self.paths.bundle, release, staging)
            # ddir: tracebacks name the final folder, not the staging one
            if not compileall.compile_dir(str(staging), quiet=1, ddir=str(target)):
                raise bundle.BundleError("its Python code does not compile")
            os.sync()
            shutil.rmtree(target, ignore_errors=True)
            os.rename(staging, target)
            atomicfile.fsync_dir(self.paths.root)
        except (bundle.BundleError, OSError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            return self._result("refused", version, running, f"cannot unpack it: {exc}")
        finally:
            self.paths.bundle.unlink(missing_ok=True)
        atomicfile.write_atomic(self.paths.journal, json.dumps(
            {"from": running, "to": version}).encode(), mode=0o644)
        self._switch(version)
        self.daemon.restart()
        return self._verdict(running, version)

    def finish_switch(self) -> None:
        """A journal at boot: a switch was cut short (power cut, kill). Judge what runs."""
        try:
            doc = json.loads(self.paths.journal.read_bytes())
            previous, version = str(doc["from"]), str(doc["to"])
        except (OSError, ValueError, KeyError, TypeError):
            self.paths.journal.unlink(missing_ok=True)
            return
        log.info("event=update_resumed from=%s to=%s running=%s", previous, version,
                 self.running())
        if self.running() != version:  # never switched, or half rolled back: the old one
            if self.running() != previous:
                self._switch(previous)
                self.daemon.restart()
            self.paths.journal.unlink(missing_ok=True)
            self._result("failed", version, previous, "the update was interrupted (power "
                         f"cut or stop) before its health check; {previous} runs")
            return
        self._verdict(previous, version)

    def _verdict(self, previous: str, version: str) -> int:
        reason = self._health(version)
        if reason is None:
            self.paths.journal.unlink(missing_ok=True)
            self._prune()
            return self._result("installed", version, previous, f"{version} runs")
        log.warning("event=update_unhealthy version=%s reason=%s", version, reason)
        self._switch(previous)
        self.daemon.restart()
        self.paths.journal.unlink(missing_ok=True)
        shutil.rmtree(self.paths.root / version, ignore_errors=True)
        return self._result("rolled_back", version, previous,
                            f"{version} failed its health check ({reason}); rolled back "
                            f"to {previous}")

    def _health(self, version: str) -> str | None:
        """None when the daemon runs `version`, else why not."""
        base = self.daemon.restarts()
        deadline = self._clock() + self.health_timeout
        while self._clock() < deadline:
            if self.daemon.version() == version:
                return None
            crashes = self.daemon.restarts() - base
            if crashes >= CRASHES_ALLOWED:
                return f"the daemon stopped {crashes} times after starting"
            self._pause(1.0)
        return (f"the daemon did not answer with version {version} within "
                f"{self.health_timeout:.0f} s")

    def _prune(self) -> None:
        """Keep the running version and the newest other one (a manual way back)."""
        running = self.running()
        others = []
        for entry in self.paths.root.iterdir():
            try:
                key = bundle.parse_version(entry.name)
            except bundle.BundleError:
                continue
            if entry.name != running and entry.is_dir() and not entry.is_symlink():
                others.append((key, entry))
        for _, entry in sorted(others, reverse=True)[KEEP_VERSIONS - 1:]:
            shutil.rmtree(entry, ignore_errors=True)
            log.info("event=update_pruned version=%s", entry.name)


def _named_version(path: Path) -> str:
    """The version a refused bundle claims, if it can be read at all."""
    try:
        return bundle.read(path).version
    except bundle.BundleError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m appliance.updateinstall")
    defaults = Paths()
    parser.add_argument("--root", type=Path, default=defaults.root)
    parser.add_argument("--request", type=Path, default=defaults.request)
    parser.add_argument("--work", type=Path, default=defaults.work)
    parser.add_argument("--release-key", type=Path, default=defaults.release_key)
    parser.add_argument("--unit", default="appliance.service")
    parser.add_argument("--socket", default="/run/appliance/api.sock")
    parser.add_argument("--health-timeout", type=float, default=HEALTH_TIMEOUT)
    args = parser.parse_args(argv)
    logfmt.setup("INFO", "level=%(levelname)s %(message)s")
    paths = Paths(args.root, args.request, args.work, args.release_key)
    installer = Installer(paths, Daemon(args.unit, args.socket), args.health_timeout)
    return installer.run()


if __name__ == "__main__":
    sys.exit(main())
