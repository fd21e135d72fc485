"""Real hypervisors for the connector tests: private libvirtd daemons (SASL over TCP, IPv4 and
IPv6) and the govmomi vSphere simulator, each started once per session and stopped by PID.

Nothing is mocked. What the first run costs: building the simulator (tools/vcsim/build.sh,
skipped when build/vcsim/vcsim is newer than main.go) and libvirt's QEMU capability probe
(about 4 s under TCG, cached in build/libvirt-cache for the next runs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import libvirtd  # noqa: E402
import vcsim  # noqa: E402

LIBVIRT_CACHE = REPO / "build" / "libvirt-cache"
VCSIM_SOURCE = REPO / "tools" / "vcsim" / "main.go"


def _need_root_and(*programs: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("a private libvirtd needs root (mount namespace)")
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run tools/install-deps.sh")


def _free_port_both() -> int:
    """A port free on 127.0.0.1 and on ::1."""
    import socket

    for _ in range(50):
        port = free_port()
        try:
            with socket.socket(socket.AF_INET6) as sock:
                sock.bind(("::1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on both loopback addresses")


@pytest.fixture(scope="session")
def libvirt_daemon() -> Iterator[libvirtd.Libvirtd]:
    _need_root_and("libvirtd", "virtlogd", "unshare", "saslpasswd2", "qemu-img")
    daemon = libvirtd.start("127.0.0.1", _free_port_both(), LIBVIRT_CACHE)
    print(f"\nlibvirtd (127.0.0.1:{daemon.port}) up in {daemon.started_s:.2f}s", flush=True)
    try:
        started = time.monotonic()
        daemon.define("probe-capabilities")  # pays the capability probe once, here
        daemon.undefine("probe-capabilities")
        print(f"libvirt QEMU capabilities ready in {time.monotonic() - started:.1f}s", flush=True)
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def libvirt_daemon_v6(libvirt_daemon: libvirtd.Libvirtd) -> Iterator[libvirtd.Libvirtd]:
    """A second private daemon on [::1] (libvirtd listens on one address per daemon)."""
    daemon = libvirtd.start("::1", _free_port_both(), LIBVIRT_CACHE)
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def vcsim_binary() -> Path:
    """build/vcsim/vcsim, built now when missing or older than main.go (`make test` builds
    it first through the Makefile's rule; this covers a bare pytest run)."""
    binary = vcsim.BINARY
    if not binary.exists() or binary.stat().st_mtime < VCSIM_SOURCE.stat().st_mtime:
        if shutil.which("go") is None:
            pytest.fail("golang-go is missing: run tools/install-deps.sh")
        started = time.monotonic()
        subprocess.run([str(REPO / "tools" / "vcsim" / "build.sh"), str(binary)], check=True)
        print(f"\nvcsim built in {time.monotonic() - started:.1f}s", flush=True)
    return binary


@pytest.fixture(scope="session")
def vcsim_server(vcsim_binary: Path, tmp_path_factory: pytest.TempPathFactory,
                 ) -> Iterator[vcsim.Vcsim]:
    server = vcsim.start(free_port(), tmp_path_factory.mktemp("vcsim"))
    print(f"\nvcsim up in {server.started_s:.2f}s on 127.0.0.1:{server.port}", flush=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def kvm(libvirt_daemon: libvirtd.Libvirtd) -> Iterator[libvirtd.Libvirtd]:
    """The session's libvirtd with a "default" storage pool (where restores go)."""
    from guests import ensure_default_pool
    ensure_default_pool(libvirt_daemon)
    yield libvirt_daemon
