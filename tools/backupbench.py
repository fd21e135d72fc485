"""Backup and restore figures of `make bench`: `python -m tools.backupbench [--quick]`.

Everything is real: a private libvirtd (tools/libvirtd.py, SASL over TCP) runs TCG domains
with qcow2 disks on virtio-scsi; the control plane runs in this process (its loop in a
thread); the gateway is the appliance daemon as a subprocess, activated with its port-80
key and driven with boto3 (backup-gateway and AWS Backup APIs), as a user would. The
control plane stands in for AWS, so its state (vault, SQLite) lives in /dev/shm: on the
disk the VMs use, its per-request SQLite fsyncs, made on its event loop, wait behind the
vault's writes and stall its reading for up to ~150 ms (--plane-on-disk shows it).

Why ratios against baselines measured in the same run: absolute throughput on this shared
2-core machine moves by tens of percent between runs, so each figure is printed beside a
plain tool doing the same work on the same disk minutes apart:

1. full backup throughput (allocated bytes / the job's RUNNING-to-COMPLETED time, from the
   job's own InitiationDate and CompletionDate) against `nbdcopy` reading the same kind of
   pull-mode export (begun with the gateway's own libvirtbackup.begin_backup) to a sparse
   file, measured before and after the gateway's backup (A-B-A: a drift of the host weighs
   on both sides);
2. an incremental after scattered random writes to 1 % of the disk (qemu-io in the running
   QEMU, through its monitor): the bytes the control plane received (chunk PUT bodies +
   the `complete` body, i.e. the manifest, counted by a hook in the in-process control
   plane as it reads them) against the changed bytes rounded out to the dirty bitmap's
   64 KiB granules plus the same manifest;
3. a forced full backup of the unchanged VM (its checkpoints deleted on the hypervisor, so
   the gateway falls back to full): what it sends against its allocated bytes (dedup);
4. restore throughput (data bytes / the job's RUNNING-to-COMPLETED time, read from the
   control plane's job record) against `qemu-nbd` serving a new qcow2 on a Unix socket
   written with libnbd `pwrite` of the same data ranges, then flushed;
5. four concurrent backups of four VMs under a 200 Mbit/s schedule, the daemon restarted
   behind a counting TCP proxy (a process of its own that never pauses reading, so it counts
   what the gateway put on the wire, 10 ms bins): aggregate aligned 1 s windows and the
   worst sliding 1 s window as % of the limit; the same from the hook (what the control
   plane read, which also shows its own stalls); Jain's index of the four jobs' bytes
   (hook, per job) while all four sent;
6. a full backup of the main VM by a second gateway to a second control plane whose vault
   is in an S3 bucket of a one-node Ceph RGW (tools/cephrgw.py) against a plain boto3 PUT
   loop of the same bytes (the disk's allocated data in 4 MiB pieces) to the same bucket,
   before and after (A-B-A).

Each figure is followed by `profile:` lines: where the job's time went (the daemon's own
log events), the job's read or write side run alone with the gateway's own connector (its
ceiling), and CPU seconds per GB by process and thread (the event loops against the worker
threads), so a ratio under its goal says why.

Figures only: nothing asserts. Every process this starts (libvirtd and its QEMUs, the
daemon, the proxy, qemu-nbd, nbdcopy) is stopped by its PID at the end, on Ctrl-C, SIGTERM
or failure too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import boto3
import psutil
from aiohttp import web
from botocore.config import Config

import controlplane.joblink as cp_joblink
from appliance.hypervisors import Target, connector_for
from appliance.hypervisors.libvirtbackup import running_backup
from appliance.localclient import UnixHTTPConnection
from controlplane import vaultsettings
from controlplane.server import ControlPlane
from controlplane.vaultsettings import VaultStoreSettings
from tools import cephrgw, libvirtd

REPO = Path(__file__).resolve().parents[1]
LIBVIRT_CACHE = REPO / "build" / "libvirt-cache"
PYTHON = sys.executable
MiB = 1 << 20
GiB = 1 << 30
GRANULE = 64 * 1024            # qcow2 cluster and dirty-bitmap granularity
REGION = "us-west-2"
ROLE = "arn:aws:iam::123456789012:role/backup"
VAULT = "bench"
LIMIT_BPS = 200_000_000        # figure 5's schedule
BINS_PER_SEC = 100             # 10 ms bins
POLL = 0.1                     # job polling interval (the durations come from job records)
JOB_TIMEOUT = 600.0
DISK_DEV = "scsi0-0-0-0"       # the QEMU block backend of sda on the virtio-scsi controller
T = TypeVar("T")


# -- small helpers ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], T], timeout: float, what: str,
               interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy (no fixed sleeps elsewhere)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def mb_s(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else float("nan")


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when every job got the same, 1/n when one got all."""
    if not values or not any(values):
        return 0.0
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def stamp(value: Any) -> float:
    """A job record's date (a datetime from boto3) as epoch seconds."""
    return value.timestamp() if isinstance(value, datetime) else float(value)


# -- disk contents ------------------------------------------------------------------------------


def layout(capacity: int, fraction: float, rng: random.Random) -> list[tuple[int, int]]:
    """Scattered 1-4 MiB extents (64 KiB aligned) covering about `fraction` of the disk:
    what a used filesystem looks like to a backup, many extents and holes between them."""
    mean_len = 2.5 * MiB
    mean_gap = mean_len * (1 - fraction) / fraction
    extents: list[tuple[int, int]] = []
    pos = rng.randint(0, int(2 * mean_gap) // GRANULE) * GRANULE
    while True:
        length = rng.randint(16, 64) * GRANULE
        if pos + length > capacity:
            return extents
        extents.append((pos, length))
        pos += length + rng.randint(0, int(2 * mean_gap) // GRANULE) * GRANULE


def compressible(n: int, rng: random.Random) -> bytes:
    """Log-like text (zlib level 1 shrinks it to about a quarter), unique to this extent, so
    the chunks of one disk never deduplicate among themselves."""
    out = bytearray()
    while len(out) < n:
        out += (f"2026-11-26T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} INFO "
                f"event=write block={rng.getrandbits(32):08x} size={rng.randint(1, 65536)} "
                f"user=u{rng.randint(0, 999)} status=ok\n").encode()
    return bytes(out[:n])


def make_disk(path: Path, capacity: int, fraction: float, seed: int,
              text_share: float) -> list[tuple[int, int]]:
    """A qcow2 disk (compat 1.1: dirty bitmaps) holding random extents, `text_share` of them
    compressible text, the rest incompressible random bytes; returns the extents. Written as
    a sparse raw file first, then converted (qemu-img keeps the holes)."""
    rng = random.Random(seed)
    extents = layout(capacity, fraction, rng)
    raw = path.with_suffix(".gen.raw")
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, capacity)
        for offset, length in extents:
            data = (compressible(length, rng) if rng.random() < text_share
                    else rng.randbytes(length))
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1", str(raw),
        str(path))
    raw.unlink()
    return extents


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """The allocated data ranges of an image (qemu-img map; -U: a running QEMU holds it)."""
    doc = json.loads(run("qemu-img", "map", "-U", "--output=json", str(path)))
    out: list[tuple[int, int]] = []
    for item in doc:
        if item.get("data") and not item.get("zero"):
            start, length = int(item["start"]), int(item["length"])
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], out[-1][1] + length)
            else:
                out.append((start, length))
    return out


# -- the hypervisor -----------------------------------------------------------------------------


@dataclass
class Domain:
    name: str
    uuid: str
    disk: Path
    capacity: int
    allocated: int


class Hypervisor:
    """The private libvirtd with the bench's running TCG domains and a "default" pool."""

    def __init__(self, root: Path) -> None:
        self.daemon = libvirtd.start("127.0.0.1", free_port(), LIBVIRT_CACHE, root=root)
        self.pool_dir = root / "pool-default"
        try:
            self.pool_dir.mkdir()
            # where restores put the new VMs' volumes (restorekeys.DEFAULT_STORAGE_POOL)
            self._admin(lambda conn: conn.storagePoolCreateXML(
                f"<pool type='dir'><name>default</name><target><path>{self.pool_dir}</path>"
                "</target></pool>", 0))
        except BaseException:
            self.daemon.stop()
            raise

    def _admin(self, fn: Callable[[Any], T]) -> T:
        import libvirt

        conn = libvirt.open(self.daemon.admin_uri)
        try:
            return fn(conn)
        finally:
            conn.close()

    @property
    def target(self) -> Target:
        return Target(self.daemon.tcp_uri(), libvirtd.SASL_USER, libvirtd.SASL_PASSWORD)

    def start_domain(self, name: str, disk: Path, capacity: int, allocated: int) -> Domain:
        """Define and start a 128 MiB TCG domain without an OS on `disk` (sda, virtio-scsi:
        the bus whose backend qemu-io in the monitor can write to)."""
        import uuid as uuidlib

        dom_uuid = str(uuidlib.uuid4())
        xml = f"""<domain type='qemu'><name>{name}</name><uuid>{dom_uuid}</uuid>
  <memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <controller type='scsi' model='virtio-scsi'/>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{disk}'/><target dev='sda' bus='scsi'/></disk>
  </devices>
</domain>"""
        self._admin(lambda conn: conn.defineXML(xml).create())
        return Domain(name, dom_uuid, disk, capacity, allocated)

    def qemu_pid(self, name: str) -> int:
        return int((self.daemon.root / "run_libvirt" / "qemu" / f"{name}.pid").read_text())

    def hmp(self, name: str, command: str) -> str:
        import libvirt_qemu

        def call(conn: Any) -> str:
            return str(libvirt_qemu.qemuMonitorCommand(
                conn.lookupByName(name), command,
                libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP))
        return self._admin(call)

    def guest_write(self, name: str, offset: int, source: Path, length: int) -> None:
        """A write through the running QEMU's block layer (as a guest's would be: it dirties
        the checkpoint's bitmap), bytes taken from `source`, then a flush."""
        out = self.hmp(name, f'qemu-io -d {DISK_DEV} "write -s {source} {offset} {length}"')
        out += self.hmp(name, f'qemu-io -d {DISK_DEV} "flush"')
        if "error" in out.lower() or "fail" in out.lower():
            raise RuntimeError(f"qemu-io in {name}: {out.strip()}")

    def delete_checkpoints(self, name: str) -> list[str]:
        def delete(conn: Any) -> list[str]:
            dom = conn.lookupByName(name)
            names = []
            for cp in dom.listAllCheckpoints(0):
                names.append(cp.getName())
                cp.delete(0)
            return names
        return self._admin(delete)

    def backup_port(self, name: str) -> int:
        return self._admin(lambda conn: running_backup(
            conn.lookupByName(name).backupGetXMLDesc(0))[0])

    def stop(self) -> None:
        """The domains' QEMUs first (libvirtd leaves them running when it stops), by the PIDs
        in its pid files, then libvirtd and virtlogd by PID (tools/libvirtd), and its state."""
        run_dir = self.daemon.root / "run_libvirt" / "qemu"
        for pid_file in run_dir.glob("*.pid") if run_dir.exists() else []:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        self.daemon.stop(remove=True)


# -- the control plane, in this process ------------------------------------------------------


class Receipts:
    """What the control plane read of the job bodies, as it read them: 10 ms bins of chunk
    PUT body bytes per job, and totals per job and kind ("chunk", "manifest").

    Installed in place of controlplane.joblink's `read_at_most` (the one function that reads
    a chunk's or a manifest's body): it counts what the control plane received, by job, with
    no copy or process added on the data path (figures 1-4 measure throughput). Being on
    the control plane's loop it also sees that loop's own stalls; figure 5 therefore adds a
    counting proxy for the wire."""

    PATH = re.compile(r"^/gateway/jobs/([^/]+)/(chunks/[0-9a-f]{64}|complete)$")

    def __init__(self) -> None:
        self.bins: dict[str, Counter[int]] = defaultdict(Counter)
        self.totals: Counter[tuple[str, str]] = Counter()
        self.complete_seconds: dict[str, float] = {}

    async def read_at_most(self, request: web.Request, limit: int) -> bytes:
        match = self.PATH.match(request.path) if request.method in ("PUT", "POST") else None
        job = match.group(1) if match else ""
        kind = "chunk" if match and match.group(2).startswith("chunks/") else "manifest"
        bins = self.bins[job] if match and kind == "chunk" else None
        chunks: list[bytes] = []
        size = 0
        mono = time.monotonic
        while size < limit:
            piece = await request.content.read(limit - size)
            if not piece:
                break
            if bins is not None:
                bins[int(mono() * BINS_PER_SEC)] += len(piece)
            chunks.append(piece)
            size += len(piece)
        if match:
            self.totals[(job, kind)] += size
        return b"".join(chunks)

    def timed_complete(self, original: Callable[..., Awaitable[dict[str, Any]]]
                       ) -> Callable[..., Awaitable[dict[str, Any]]]:
        """JobOps.complete, timed: how long the control plane takes to make a backup durable
        (compose, every chunk and the manifest synced) is part of the job's time."""
        async def complete(identity: Any, job_id: str, payload: dict[str, Any]
                           ) -> dict[str, Any]:
            started = time.monotonic()
            try:
                return await original(identity, job_id, payload)
            finally:
                self.complete_seconds[job_id] = (self.complete_seconds.get(job_id, 0.0)
                                                 + time.monotonic() - started)
        return complete

    def sent(self, job: str) -> tuple[int, int]:
        """(chunk body bytes, manifest bytes) received for `job`."""
        return self.totals[(job, "chunk")], self.totals[(job, "manifest")]


class Plane:
    """The real control plane on 127.0.0.1:<free port>, its loop in a thread of this process
    (tests/integration/test_jobrunner.py runs it the same way), with the Receipts hook."""

    def __init__(self, state_dir: Path, receipts: Receipts,
                 vault_store: VaultStoreSettings | None = None) -> None:
        cp_joblink.read_at_most = receipts.read_at_most  # type: ignore[assignment]
        self.plane = ControlPlane(state_dir, vault_store=vault_store)
        self.plane.job_ops.complete = receipts.timed_complete(  # type: ignore[method-assign]
            self.plane.job_ops.complete)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="controlplane",
                                       daemon=True)
        self.thread.start()
        host, port = self.call(self.plane.start("127.0.0.1", 0))
        self.url = f"http://{host}:{port}"
        kw: dict[str, Any] = {
            "endpoint_url": self.url, "region_name": REGION,
            "aws_access_key_id": self.plane.access_key_id,
            "aws_secret_access_key": self.plane.secret_access_key,
            "config": Config(retries={"max_attempts": 3})}
        self.gw = boto3.client("backup-gateway", **kw)
        self.backup = boto3.client("backup", **kw)

    def call(self, coro: Awaitable[T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def on_loop(self, fn: Callable[[], T]) -> T:
        """`fn()` on the control plane's loop thread (its SQLite store is used from there)."""
        done: Future[T] = Future()

        def go() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # handed to the waiting thread
                done.set_exception(exc)
        self.loop.call_soon_threadsafe(go)
        return done.result(30)

    def job_times(self, job_id: str) -> tuple[float, float]:
        """(started_at, completed_at) of a job, from the control plane's own record: when
        it became RUNNING (given to the gateway) and when it became COMPLETED."""
        job = self.on_loop(lambda: self.plane.backups.job(job_id))
        assert job is not None and job.started_at and job.completed_at
        return float(job.started_at), float(job.completed_at)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.plane.stop(), 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# -- a counting TCP proxy, in a process of its own ------------------------------------------


class _Upstream(asyncio.Protocol):
    """The proxy's connection to the control plane: what it answers goes back as it comes."""

    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Downstream(asyncio.Protocol):
    """One gateway connection: every byte it sends is binned (10 ms) as it arrives, then
    forwarded. Reading is never paused for the control plane: a stall of the receiver must
    not hold back what is counted, so this counts what the gateway put on the wire."""

    def __init__(self, upstream_port: int, bins: Counter[int]) -> None:
        self.port = upstream_port
        self.bins = bins
        self.pending: list[bytes] = []
        self.up: _Upstream | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        assert self.transport is not None
        try:
            _, up = await asyncio.get_running_loop().create_connection(
                lambda: _Upstream(self.transport), "127.0.0.1", self.port)  # type: ignore[arg-type]
        except OSError:
            self.transport.close()
            return
        self.up = up
        assert up.transport is not None
        for data in self.pending:
            up.transport.write(data)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.bins[int(time.monotonic() * BINS_PER_SEC)] += len(data)
        if self.up is not None and self.up.transport is not None:
            self.up.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()


def run_proxy(upstream_port: int) -> None:
    """`--proxy PORT`: relay 127.0.0.1:<printed port> to PORT; on SIGTERM print the bins
    (JSON: {"bins": {bin: bytes}}) and exit. The bench reads them from stdout."""
    bins: Counter[int] = Counter()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the bench, which stops us

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Downstream(upstream_port, bins),
                                          "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()

    asyncio.run(serve())
    print(json.dumps({"bins": bins}), flush=True)


class Proxy:
    """The counting proxy as a subprocess (see run_proxy)."""

    def __init__(self, upstream_url: str) -> None:
        port = int(upstream_url.rsplit(":", 1)[1])
        self.proc = subprocess.Popen([PYTHON, "-m", "tools.backupbench", "--proxy", str(port)],
                                     cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"

    def bins(self) -> Counter[int]:
        """Stop it (by its PID) and take its bins."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        return Counter({int(k): v for k, v in json.loads(out.splitlines()[-1])["bins"].items()})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


# -- the gateway ------------------------------------------------------------------------------


class Gateway:
    """The appliance daemon as a subprocess (README "Without a VM"), its log in a file."""

    def __init__(self, root: Path, control_plane_url: str) -> None:
        root.mkdir()
        self.root = root
        self.socket = root / "api.sock"
        self.log_path = root / "daemon.log"
        self._log = self.log_path.open("a")
        self.start(control_plane_url)

    def start(self, control_plane_url: str) -> None:
        """Start the daemon over its state directory (again: a restart, same identity)."""
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["PYTHONUNBUFFERED"] = "1"
        mark = len(self.log())
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "appliance", "serve", "--config", os.devnull,
             "--listen", f"127.0.0.1:{self.port}", "--state-dir", str(self.root / "state"),
             "--control-plane", control_plane_url, "--local-api-socket", str(self.socket)],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)
        try:
            wait_until(lambda: self.proc.poll() is not None or "event=ready" in self.log()[mark:],
                       30, "the daemon's event=ready")
        except BaseException:
            self.stop(close_log=False)
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def activation_key(self) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", f"/?activationRegion={REGION}&gatewayType=BACKUP_VM"
                                "&endpointType=DUALSTACK&ipVersion=ipv4&no_redirect")
            resp = conn.getresponse()
            body = resp.read().decode()
            if resp.status != 200:
                raise RuntimeError(f"activation page: {resp.status} {body}")
            return body.splitlines()[0]
        finally:
            conn.close()

    def status(self) -> dict[str, Any]:
        conn = UnixHTTPConnection(str(self.socket), timeout=10)
        try:
            conn.request("GET", "/v1/status")
            return dict(json.loads(conn.getresponse().read()))
        finally:
            conn.close()

    def cpu(self) -> tuple[float, float]:
        """(all threads, the event loop's thread: the main one) CPU seconds so far."""
        t = self.ps.cpu_times()
        main = next((th for th in self.ps.threads() if th.id == self.proc.pid), None)
        return t.user + t.system, (main.user_time + main.system_time) if main else 0.0

    def events(self, job_id: str) -> dict[str, float]:
        """The epoch time of each `event=` line of the daemon's log naming `job_id` (its
        own timestamps, local time, ms): where the job's time went, as the gateway saw it."""
        out: dict[str, float] = {}
        for line in self.log().splitlines():
            if job_id not in line:
                continue
            m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*?event=(\S+)", line)
            if m:
                t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
                out.setdefault(m.group(3), t + int(m.group(2)) / 1000)
        return out

    def field(self, job_id: str, event: str, key: str) -> str:
        """A field of the job's `event=...` log line (`note`, the last, runs to the end)."""
        for line in self.log().splitlines():
            if f"event={event} " in line and job_id in line and f" {key}=" in line:
                value = line.split(f" {key}=", 1)[1]
                return value if key == "note" else value.split(" ", 1)[0]
        return ""

    def stop(self, close_log: bool = True) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if close_log:
            self._log.close()


# -- the site: everything wired as a user would -------------------------------------------------


class Cpu:
    """CPU seconds spent during a job, split by where: the gateway daemon's event loop and
    its worker threads (NBD reads, SHA-256, zlib), the control plane's event loop and its
    worker threads (vault: decode, SHA-256, AES-GCM, writes), the VM's QEMU (the export).
    Thread CPU comes from /proc (psutil); a worker thread that ended meanwhile is counted
    through the process total."""

    def __init__(self, gateway: Gateway, plane: Plane, qemu_pid: int | None) -> None:
        self._gateway, self._plane = gateway, plane
        self._qemu = psutil.Process(qemu_pid) if qemu_pid else None
        self._me = psutil.Process()
        self._start = self._now()

    def _now(self) -> dict[str, float]:
        g_all, g_loop = self._gateway.cpu()
        t = self._me.cpu_times()
        threads = {th.id: th.user_time + th.system_time for th in self._me.threads()}
        p_loop = threads.get(self._plane.thread.native_id or 0, 0.0)
        mine = threads.get(threading.main_thread().native_id or 0, 0.0)
        q = sum(self._qemu.cpu_times()[:2]) if self._qemu else 0.0
        return {"gateway loop": g_loop, "gateway workers": g_all - g_loop,
                "control plane loop": p_loop,
                "control plane workers": t.user + t.system - p_loop - mine, "QEMU": q}

    def stop(self) -> dict[str, float]:
        now = self._now()
        return {k: now[k] - self._start[k] for k in now}


@dataclass
class JobResult:
    job_id: str
    doc: dict[str, Any]
    requested: float        # epoch: StartBackupJob / StartRestoreJob called
    started: float          # epoch: RUNNING (the control plane's record)
    completed: float        # epoch: COMPLETED
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.completed - self.started

    @property
    def end_to_end(self) -> float:
        return self.completed - self.requested


class Site:
    """The control plane, an activated gateway daemon, the hypervisor imported and associated,
    a vault: what a user sets up before the first backup."""

    def __init__(self, work: Path, plane_dir: Path, stack: contextlib.ExitStack,
                 hv: Hypervisor, vault_store: VaultStoreSettings | None = None,
                 name: str = "gateway") -> None:
        self.hv = hv
        self.receipts = Receipts()
        self.plane = Plane(plane_dir, self.receipts, vault_store)
        stack.callback(self.plane.stop)
        self.gateway = Gateway(work / name, self.plane.url)
        stack.callback(self.gateway.stop)
        gw = self.plane.gw
        self.gateway_arn = gw.create_gateway(
            ActivationKey=self.gateway.activation_key(), GatewayDisplayName="bench",
            GatewayType="BACKUP_VM")["GatewayArn"]
        wait_until(lambda: self.gateway.status().get("gatewayArn") == self.gateway_arn, 30,
                   "the daemon to see its activation")
        self.hypervisor_arn = gw.import_hypervisor_configuration(
            Name="bench-kvm", Host=hv.daemon.tcp_uri(), Username=libvirtd.SASL_USER,
            Password=libvirtd.SASL_PASSWORD)["HypervisorArn"]
        gw.associate_gateway_to_server(GatewayArn=self.gateway_arn,
                                       ServerArn=self.hypervisor_arn)
        self.plane.backup.create_backup_vault(BackupVaultName=VAULT)

    def vm_arns(self, names: list[str]) -> dict[str, str]:
        """Wait until the gateway's sync lists every VM; their ARNs by name."""
        def listed() -> dict[str, str] | None:
            doc = self.plane.gw.list_virtual_machines(HypervisorArn=self.hypervisor_arn)
            arns = {vm["Name"]: vm["ResourceArn"] for vm in doc.get("VirtualMachines", [])}
            return arns if set(names) <= set(arns) else None
        return wait_until(listed, 60, "the VMs in ListVirtualMachines", interval=0.2)

    def limit(self, bits_per_sec: int | None) -> None:
        """Put a whole-week schedule and wait until the daemon's shaper follows it."""
        intervals = [] if bits_per_sec is None else [{
            "AverageUploadRateLimitInBitsPerSec": bits_per_sec, "StartHourOfDay": 0,
            "StartMinuteOfHour": 0, "EndHourOfDay": 23, "EndMinuteOfHour": 59,
            "DaysOfWeek": [0, 1, 2, 3, 4, 5, 6]}]
        self.plane.gw.put_bandwidth_rate_limit_schedule(
            GatewayArn=self.gateway_arn, BandwidthRateLimitIntervals=intervals)
        wait_until(lambda: self.gateway.status()["shaping"]["limitBitsPerSec"] == bits_per_sec,
                   30, "the daemon's shaper to take the schedule")

    def _wait(self, describe: Callable[[], dict[str, Any]], key: str, what: str
              ) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            if self.gateway.proc.poll() is not None:
                raise RuntimeError(f"the gateway daemon exited ({self.gateway.proc.returncode}) "
                                   f"while waiting for {what}: {self.gateway.log()[-1500:]}")
            doc = describe()
            if doc[key] in ("FAILED", "ABORTED"):
                raise RuntimeError(f"{what} {doc[key]}: {doc.get('StatusMessage')}")
            return doc if doc[key] == "COMPLETED" else None
        return wait_until(ended, JOB_TIMEOUT, what, interval=POLL)

    def backup(self, vm_arn: str, qemu_pid: int) -> JobResult:
        cpu = Cpu(self.gateway, self.plane, qemu_pid)
        requested = time.time()
        job_id = self.plane.backup.start_backup_job(
            BackupVaultName=VAULT, ResourceArn=vm_arn, IamRoleArn=ROLE)["BackupJobId"]
        doc = self._wait(lambda: self.plane.backup.describe_backup_job(BackupJobId=job_id),
                         "State", f"backup job {job_id}")
        return JobResult(job_id, doc, requested, stamp(doc["InitiationDate"]),
                         stamp(doc["CompletionDate"]), cpu.stop())

    def restore(self, point_arn: str, name: str) -> JobResult:
        cpu = Cpu(self.gateway, self.plane, None)
        requested = time.time()
        job_id = self.plane.backup.start_restore_job(
            RecoveryPointArn=point_arn, IamRoleArn=ROLE, Metadata={"vmName": name},
        )["RestoreJobId"]
        doc = self._wait(lambda: self.plane.backup.describe_restore_job(RestoreJobId=job_id),
                         "Status", f"restore job {job_id}")
        started, completed = self.plane.job_times(job_id)
        return JobResult(job_id, doc, requested, started, completed, cpu.stop())


# -- the baselines, and the profiles of the job's two sides ------------------------------------


@dataclass
class Copy:
    seconds: float
    nbytes: int
    cpu: float              # the tool's own CPU seconds
    qemu_cpu: float = 0.0   # the QEMU serving or writing the image


def nbdcopy_baseline(hv: Hypervisor, dom: Domain, out: Path) -> Copy:
    """`nbdcopy` from a pull-mode export of `dom` to a sparse file. The export is begun with
    the gateway's own connector (libvirtbackup.begin_backup: the same <domainbackup>, TCP on
    127.0.0.1, a checkpoint), so only the reader differs; the checkpoint is removed after
    (finish(ok=False)), leaving the VM as it was."""
    connector = connector_for(hv.target)
    session = connector.begin_backup(dom.uuid, "bench-nbdcopy", None)  # type: ignore[attr-defined]
    try:
        disk = session.disks[0]
        allocated = sum(n for _, n in disk.extents())
        port = hv.backup_port(dom.name)
        qemu = psutil.Process(hv.qemu_pid(dom.name))
        qemu0 = sum(qemu.cpu_times()[:2])
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        subprocess.run(["nbdcopy", f"nbd://127.0.0.1:{port}/{disk.key}", str(out)], check=True)
        seconds = time.monotonic() - started
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        qemu_cpu = sum(qemu.cpu_times()[:2]) - qemu0
    finally:
        session.finish(ok=False)
        out.unlink(missing_ok=True)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return Copy(seconds, allocated, cpu, qemu_cpu)


def reader_alone(hv: Hypervisor, dom: Domain) -> Copy:
    """Not a baseline but a profile: the gateway's own connector reading the export the way
    a backup job plans and reads it (appliance.backupjob's chunk plan, its reader threads,
    reads of up to 4 MiB, SHA-256 of each chunk), and nothing else: the ceiling of the
    job's read side, so the rest of the job's time is its sending and the control plane's
    storing."""
    from concurrent.futures import ThreadPoolExecutor

    from appliance.backupjob import FULL_GAP, READERS, chunk_id, normalize, plan_chunks

    connector = connector_for(hv.target)
    session = connector.begin_backup(dom.uuid, "bench-reader", None)  # type: ignore[attr-defined]
    try:
        disk = session.disks[0]
        cpu0 = time.process_time()
        started = time.monotonic()
        plans = plan_chunks(0, normalize(disk.extents(), disk.capacity, disk.key), FULL_GAP)
        with ThreadPoolExecutor(READERS) as pool:
            list(pool.map(lambda p: chunk_id(disk.read(p.start, p.length)), plans))
        seconds = time.monotonic() - started
        cpu = time.process_time() - cpu0
        allocated = sum(p.data_bytes for p in plans)
    finally:
        session.finish(ok=False)
    return Copy(seconds, allocated, cpu)


def libvirt_writer_alone(hv: Hypervisor, dom: Domain, source_raw: Path,
                         ranges: list[tuple[int, int]], name: str) -> tuple[Copy, float]:
    """Not a baseline but a profile: the gateway's own libvirt restore path (libvirtbackup:
    a raw volume written through libvirt's upload stream over qemu+tcp with SASL, then
    converted to qcow2 by the pool) fed straight from a raw copy of the disk, in order, 4 MiB
    at a time: the ceiling of the job's write side. Returns the copy (seconds: begin, writes
    and commit) and the commit's seconds (stream end, conversion, define)."""
    import libvirt

    conn = libvirt.open(hv.daemon.admin_uri)
    try:
        domain_xml = conn.lookupByName(dom.name).XMLDesc(0)
    finally:
        conn.close()
    connector = connector_for(hv.target)
    started = time.monotonic()
    session = connector.begin_restore(  # type: ignore[attr-defined]
        {"kind": "libvirt", "domainXml": domain_xml}, name, {}, [("sda", "sda", dom.capacity)])
    (writer,) = session.disks
    written = 0
    fd = os.open(source_raw, os.O_RDONLY)
    try:
        for offset, length in ranges:
            end = offset + length
            while offset < end:
                n = min(4 * MiB, end - offset)
                writer.write(offset, os.pread(fd, n, offset))
                offset += n
                written += n
    finally:
        os.close(fd)
    committing = time.monotonic()
    session.commit()
    done = time.monotonic()
    connector.close()
    return Copy(done - started, written, 0.0), done - committing


def qemu_nbd_baseline(work: Path, source_raw: Path, ranges: list[tuple[int, int]],
                      capacity: int) -> Copy:
    """A new qcow2 (compat 1.1, like the restore's volume) served by `qemu-nbd` on a Unix
    socket, the data ranges written with libnbd `pwrite` in 4 MiB pieces read from a raw
    copy of the source (in the page cache), then flushed; timed from creating the image to
    qemu-nbd's exit after the disconnect. What a plain tool does to write the same bytes."""
    import nbd

    target = work / "baseline-restore.qcow2"
    sock = work / "qemu-nbd.sock"
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0 = time.process_time()
    started = time.monotonic()
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1", str(target),
        str(capacity))
    proc = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "--socket", str(sock), str(target)],
                            stdin=subprocess.DEVNULL)
    written = 0
    try:
        h = nbd.NBD()
        wait_until(lambda: sock.exists() or proc.poll() is not None, 10, "qemu-nbd's socket",
                   interval=0.005)
        h.connect_unix(str(sock))
        fd = os.open(source_raw, os.O_RDONLY)
        try:
            for offset, length in ranges:
                end = offset + length
                while offset < end:
                    n = min(4 * MiB, end - offset)
                    h.pwrite(os.pread(fd, n, offset), offset)
                    offset += n
                    written += n
        finally:
            os.close(fd)
        h.flush()
        h.shutdown()
        del h
        proc.wait(30)
        seconds = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    qemu_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    target.unlink()
    return Copy(seconds, written, time.process_time() - cpu0, qemu_cpu)


# -- the figures ----------------------------------------------------------------------------------


@dataclass
class Sizes:
    """How big the run is: the main disk, and the four disks of the concurrent run."""

    disk: int
    fraction: float = 0.30
    text_share: float = 0.20
    change: float = 0.01
    concurrent_disk: int = 384 * MiB
    concurrent_fraction: float = 0.25


def say(text: str = "") -> None:
    print(text, flush=True)


def cpu_line(job: JobResult, nbytes: int) -> str:
    gb = nbytes / 1e9
    total = sum(job.cpu.values())
    parts = ", ".join(f"{k} {v / gb:.2f}" for k, v in job.cpu.items() if v > 0.005)
    return (f"CPU s/GB: {parts} (total {total / gb:.2f}, i.e. {total / job.seconds:.2f} of "
            f"the {psutil.cpu_count()} CPUs during the job)")


def phases(events: dict[str, float], started: float, completed: float,
           steps: list[tuple[str, str]], complete_s: float | None = None) -> str:
    """Where a job's RUNNING-to-COMPLETED time went, from the daemon's log events."""
    parts = []
    last = started
    for label, event in steps:
        at = events.get(event)
        if at is None:
            continue
        parts.append(f"{label} {max(0.0, at - last):.2f} s")
        last = at
    parts.append(f"to COMPLETED {max(0.0, completed - last):.2f} s")
    if complete_s is not None:
        parts.append(f"(`complete` on the control plane {complete_s:.2f} s)")
    return ", ".join(parts)


def full_backup(site: Site, dom: Domain, arn: str, work: Path) -> tuple[JobResult, list[Copy]]:
    """Figure 1: nbdcopy, the gateway's full backup, nbdcopy again; then the job's read side
    alone, to show where the rest of the time goes."""
    hv = site.hv
    copies = [nbdcopy_baseline(hv, dom, work / "nbdcopy.raw")]
    job = site.backup(arn, hv.qemu_pid(dom.name))
    copies.append(nbdcopy_baseline(hv, dom, work / "nbdcopy.raw"))
    reader = reader_alone(hv, dom)
    allocated = copies[0].nbytes
    base = sum(c.nbytes for c in copies) / sum(c.seconds for c in copies)
    rate = allocated / job.seconds
    chunks, manifest = site.receipts.sent(job.job_id)
    ev = site.gateway.events(job.job_id)
    gb = allocated / 1e9
    say(f"1. full backup of a {dom.capacity / GiB:g} GiB qcow2 disk, {allocated / MiB:.1f} MiB "
        f"allocated ({allocated / dom.capacity * 100:.1f} %) in {count_extents(dom)} extents, "
        f"no limit:")
    say(f"   gateway: {mb_s(allocated, job.seconds):7.1f} MB/s  (RUNNING->COMPLETED "
        f"{job.seconds:.2f} s; end to end from StartBackupJob {job.end_to_end:.2f} s, "
        f"{mb_s(allocated, job.end_to_end):.1f} MB/s); sent {chunks / MiB:.1f} MiB of chunks "
        f"+ {manifest / 1024:.1f} KiB manifest; BytesTransferred "
        f"{job.doc.get('BytesTransferred', 0) / MiB:.1f} MiB")
    say(f"   nbdcopy: {base / 1e6:7.1f} MB/s  (before {copies[0].seconds:.2f} s, after "
        f"{copies[1].seconds:.2f} s; the same kind of export, to a sparse file)")
    say(f"   ratio {rate / base:.2f}x   goal >= 0.8x   "
        f"{'met' if rate / base >= 0.8 else 'NOT met'}")
    say("   profile: " + phases(ev, job.started, job.completed, [
        ("poll to start", "job_started"), ("begin_backup", "libvirt_backup_begun"),
        ("extents+started", "backup_started"), ("read/hash/send/complete",
                                                  "backup_completed")],
        site.receipts.complete_seconds.get(job.job_id)))
    say(f"   profile: the job's read side alone (its connector and chunk plan, 2 reader "
        f"threads, SHA-256): {mb_s(reader.nbytes, reader.seconds):.1f} MB/s, "
        f"{reader.cpu / gb:.2f} CPU s/GB")
    say(f"   profile: {cpu_line(job, allocated)}")
    say(f"   profile: nbdcopy CPU s/GB {copies[0].cpu / gb:.2f}, its QEMU "
        f"{copies[0].qemu_cpu / gb:.2f}")
    return job, copies


def count_extents(dom: Domain) -> int:
    return len(data_ranges(dom.disk))


def forced_full(site: Site, dom: Domain, arn: str, allocated: int) -> JobResult:
    """Figure 3: the checkpoints deleted on the hypervisor, so the next backup is full;
    every chunk is already in the vault."""
    deleted = site.hv.delete_checkpoints(dom.name)
    job = site.backup(arn, site.hv.qemu_pid(dom.name))
    chunks, manifest = site.receipts.sent(job.job_id)
    sent = chunks + manifest
    say(f"3. second full backup of the unchanged VM (checkpoint {', '.join(deleted)} deleted "
        f"on the hypervisor; job {job.doc.get('BackupType')}, the gateway's note: "
        f"{site.gateway.field(job.job_id, 'backup_started', 'note') or '-'}):")
    say(f"   sent {chunks} B of chunks + {manifest / 1024:.1f} KiB manifest = "
        f"{sent / allocated * 100:.3f} % of its {allocated / MiB:.1f} MiB allocated   "
        f"goal < 1 %   {'met' if sent < 0.01 * allocated else 'NOT met'}")
    say(f"   took {job.seconds:.2f} s RUNNING->COMPLETED ({mb_s(allocated, job.seconds):.1f} "
        f"MB/s read and hashed); {cpu_line(job, allocated)}")
    return job


def scattered_changes(site: Site, dom: Domain, fraction: float, work: Path, seed: int
                      ) -> tuple[int, int, int]:
    """Random bytes written by the running QEMU at random 4 KiB-aligned places, 4-256 KiB
    each, until `fraction` of the disk is written; returns (writes, bytes, the bytes of
    the 64 KiB granules they touch)."""
    rng = random.Random(seed)
    target = int(dom.capacity * fraction)
    granules: set[int] = set()
    written = writes = 0
    src_dir = work / "changes"
    src_dir.mkdir(exist_ok=True)
    while written < target:
        length = rng.randint(1, 64) * 4096
        offset = rng.randrange(0, (dom.capacity - length) // 4096) * 4096
        src = src_dir / f"w{writes}.bin"
        src.write_bytes(rng.randbytes(length))
        site.hv.guest_write(dom.name, offset, src, length)
        granules.update(range(offset // GRANULE, (offset + length - 1) // GRANULE + 1))
        written += length
        writes += 1
    shutil.rmtree(src_dir)
    return writes, written, len(granules) * GRANULE


def incremental(site: Site, dom: Domain, arn: str, sizes: Sizes, work: Path) -> JobResult:
    """Figure 2: scattered writes to 1 % of the disk, then an incremental backup."""
    writes, written, rounded = scattered_changes(site, dom, sizes.change, work, 2)
    job = site.backup(arn, site.hv.qemu_pid(dom.name))
    chunks, manifest = site.receipts.sent(job.job_id)
    ratio = (chunks + manifest) / (rounded + manifest)
    say(f"2. incremental after {writes} scattered random writes (4-256 KiB) of "
        f"{written / MiB:.2f} MiB ({written / dom.capacity * 100:.2f} % of the disk) "
        f"through qemu-io in the running QEMU (job {job.doc.get('BackupType')}):")
    say(f"   sent {chunks / MiB:.2f} MiB of chunk bodies + {manifest / 1024:.1f} KiB manifest "
        f"(counted by the control plane as it read them; the job's BytesTransferred is "
        f"{job.doc.get('BytesTransferred', 0) / MiB:.2f} MiB)")
    say(f"   changed bytes rounded out to 64 KiB granules {rounded / MiB:.2f} MiB + the same "
        f"manifest: ratio {ratio:.3f}x   goal <= 1.1x   {'met' if ratio <= 1.1 else 'NOT met'}")
    dirty = int(site.gateway.field(job.job_id, "backup_started", "bytes") or 0)
    say(f"   profile: the dirty bitmap gave {dirty / MiB:.2f} MiB in "
        f"{site.gateway.field(job.job_id, 'backup_started', 'chunks')} chunks; chunks are "
        f"zlib'd when that saves 3 %, so granules that were holes or text cost less")
    say(f"   took {job.seconds:.2f} s RUNNING->COMPLETED")
    return job


def restore(site: Site, dom: Domain, point_arn: str, work: Path, kind: str) -> None:
    """Figure 4: the latest recovery point restored to a new VM, against qemu-nbd + libnbd
    writing the same ranges (before and after); then the job's write side alone."""
    snap = work / "source.raw"
    run("qemu-img", "convert", "-U", "-O", "raw", str(dom.disk), str(snap))
    ranges = data_ranges(dom.disk)
    point = site.plane.backup.describe_recovery_point(BackupVaultName=VAULT,
                                                      RecoveryPointArn=point_arn)
    data = int(point["BackupSizeInBytes"])
    name = f"{dom.name}-restored"
    base1 = qemu_nbd_baseline(work, snap, ranges, dom.capacity)
    job = site.restore(point_arn, name)
    base2 = qemu_nbd_baseline(work, snap, ranges, dom.capacity)
    alone, commit_s = libvirt_writer_alone(site.hv, dom, snap, ranges, f"{dom.name}-direct")
    snap.unlink()
    base = (base1.nbytes + base2.nbytes) / (base1.seconds + base2.seconds)
    rate = data / job.seconds
    restored = site.hv.pool_dir / f"{name}-sda.qcow2"
    same = subprocess.run(["qemu-img", "compare", "-U", str(dom.disk), str(restored)],
                          capture_output=True, text=True)
    ev = site.gateway.events(job.job_id)
    ev.update({k: v for k, v in site.gateway.events(name).items() if k.startswith("libvirt")})
    say(f"4. restore of the last recovery point ({data / MiB:.1f} MiB of data; {kind}) to a "
        f"new VM in the hypervisor's 'default' pool:")
    say(f"   gateway: {mb_s(data, job.seconds):7.1f} MB/s  (RUNNING->COMPLETED {job.seconds:.2f} s"
        f" from the control plane's job record; end to end {job.end_to_end:.2f} s); restored "
        f"disk {'identical to' if same.returncode == 0 else 'DIFFERS from'} the source "
        f"(qemu-img compare)")
    say(f"   qemu-nbd + libnbd pwrite: {base / 1e6:7.1f} MB/s  (before {base1.seconds:.2f} s, "
        f"after {base2.seconds:.2f} s, {base1.nbytes / MiB:.1f} MiB in {len(ranges)} ranges)")
    say(f"   ratio {rate / base:.2f}x   goal >= 0.8x   "
        f"{'met' if rate / base >= 0.8 else 'NOT met'}")
    say("   profile: " + phases(ev, job.started, job.completed, [
        ("poll to start", "job_started"), ("manifest+begin_restore", "restore_started"),
        ("write+commit", "libvirt_restore_committed")]))
    say(f"   profile: the job's write side alone (libvirtbackup's upload stream over qemu+tcp "
        f"SASL, then the pool's conversion to qcow2), fed from a raw file: "
        f"{mb_s(alone.nbytes, alone.seconds):.1f} MB/s ({alone.seconds - commit_s:.2f} s "
        f"writing, {commit_s:.2f} s commit)")
    say(f"   profile: {cpu_line(job, data)}")


def windows(bins: Counter[int], lo: int, hi: int) -> tuple[list[int], list[int]]:
    """Aligned 1 s windows (whole seconds of the monotonic clock) and sliding 1 s windows
    (10 ms steps) of the bins in [lo, hi) (bin numbers), partial seconds at the ends left
    out of the aligned ones."""
    first = -(-lo // BINS_PER_SEC) * BINS_PER_SEC
    last = hi // BINS_PER_SEC * BINS_PER_SEC
    aligned = [sum(bins.get(b, 0) for b in range(s, s + BINS_PER_SEC))
               for s in range(first, last, BINS_PER_SEC)]
    series = [bins.get(b, 0) for b in range(lo, hi)]
    sliding: list[int] = []
    if len(series) >= BINS_PER_SEC:
        total = sum(series[:BINS_PER_SEC])
        sliding.append(total)
        for i in range(BINS_PER_SEC, len(series)):
            total += series[i] - series[i - BINS_PER_SEC]
            sliding.append(total)
    return aligned, sliding


def worst_window(bins: Counter[int], lo: int, hi: int, limit: float) -> str:
    """What precedes the highest sliding 1 s window: a reservation bucket lets a sender that
    was held up (nothing sent for a while) catch up by up to its burst, so a window that
    starts just after a gap carries that much over the limit."""
    _, sliding = windows(bins, lo, hi)
    if not sliding:
        return "-"
    k = lo + max(range(len(sliding)), key=sliding.__getitem__)
    gap = 0
    while k - gap - 1 >= lo and bins.get(k - gap - 1, 0) == 0:
        gap += 1
    before = sum(bins.get(b, 0) for b in range(k - 20, k))
    first = sum(bins.get(b, 0) for b in range(k, k + 10))
    return (f"starts after {gap * 10} ms with no byte (the 200 ms before it carried "
            f"{before / limit * 500:.0f} % of the limit), its first 100 ms "
            f"{first / limit * 1000:.0f} %")


def pct(values: list[int], limit: float) -> str:
    if not values:
        return "-"
    return f"{min(values) / limit * 100:.1f}..{max(values) / limit * 100:.1f} %"


def concurrent(site: Site, doms: list[Domain], arns: dict[str, str],
               stack: contextlib.ExitStack) -> None:
    """Figure 5: four backups at once under a 200 Mbit/s whole-week schedule. The daemon is
    restarted (same state) behind a counting TCP proxy in a process of its own, which counts
    what the gateway puts on the wire; the hook in the control plane counts what it read and
    which job it was for (Jain's index)."""
    proxy = Proxy(site.plane.url)
    stack.callback(proxy.stop)
    site.gateway.stop(close_log=False)
    site.gateway.start(proxy.url)
    wait_until(lambda: site.gateway.status()["controlPlane"]["reachable"], 30,
               "the restarted daemon to reach the control plane through the proxy")
    site.limit(LIMIT_BPS)
    started = time.monotonic()
    ids = [site.plane.backup.start_backup_job(BackupVaultName=VAULT, ResourceArn=arns[d.name],
                                              IamRoleArn=ROLE)["BackupJobId"] for d in doms]
    for job_id in ids:
        site._wait(lambda j=job_id: site.plane.backup.describe_backup_job(BackupJobId=j),
                   "State", f"backup job {job_id}")
    wall = time.monotonic() - started
    site.limit(None)
    wire = proxy.bins()
    per_job = [site.receipts.bins[j] for j in ids]
    if not all(per_job):
        raise RuntimeError("a concurrent job sent nothing")
    firsts = [min(b) for b in per_job]
    lasts = [max(b) + 1 for b in per_job]
    read: Counter[int] = Counter()
    for b in per_job:
        read.update(b)
    limit = LIMIT_BPS / 8
    lo, hi = min(firsts), max(lasts)          # the whole transfer
    lo4, hi4 = max(firsts), min(lasts)        # while all four sent
    shares = [sum(v for k, v in b.items() if lo4 <= k < hi4) for b in per_job]
    sent = sum(sum(b.values()) for b in per_job)
    j = jain([float(x) for x in shares])
    span = (hi - lo) / BINS_PER_SEC
    say(f"5. 4 concurrent backups of 4 VMs ({', '.join(f'{d.allocated / MiB:.0f}' for d in doms)}"
        f" MiB of random data) under a {LIMIT_BPS / 1e6:.0f} Mbit/s whole-week schedule, "
        f"10 ms bins, % of the limit:")
    say(f"   sending {span:.2f} s ({mb_s(sent, span) * 8:.1f} Mbit/s average); all 4 sending "
        f"for {(hi4 - lo4) / BINS_PER_SEC:.2f} s; jobs done {wall:.1f} s after the first "
        f"StartBackupJob")
    verdict = ""
    for label, bins in (("on the wire (counting proxy, own process)", wire),
                        ("as the control plane read them (hook)", read)):
        aligned, sliding = windows(bins, lo, hi)
        aligned4, sliding4 = windows(bins, lo4, hi4)
        say(f"   {label}: aligned 1 s {pct(aligned, limit)} ({len(aligned)} windows), "
            f"while all 4 sent {pct(aligned4, limit)}; sliding 1 s (10 ms steps) "
            f"{pct(sliding, limit)}, while all 4 sent {pct(sliding4, limit)}; worst sliding "
            f"{max(sliding, default=0) / limit * 100:.1f} %, which "
            f"{worst_window(bins, lo, hi, limit)}")
        if not verdict:
            inside = (all(0.99 * limit <= w <= 1.01 * limit for w in aligned)
                      and max(sliding, default=0) <= 1.01 * limit
                      and min(sliding4, default=0) >= 0.99 * limit)
            verdict = "met" if inside else "NOT met"
    say(f"   goal: within 1 % of the limit (on the wire: every aligned window, the highest "
        f"sliding window, the lowest sliding window while all 4 sent)   {verdict}")
    say(f"   Jain's index of the 4 jobs' bytes while all 4 sent: {j:.4f} (MiB each: "
        f"{', '.join(f'{x / MiB:.1f}' for x in shares)})   goal >= 0.99   "
        f"{'met' if j >= 0.99 else 'NOT met'}")


# -- figure 6: the vault in an S3 bucket (Ceph RGW) --------------------------------------------


S3_BUCKET = cephrgw.VAULT_BUCKET
PLAIN_PREFIX = "plain-put/"       # the baseline's objects, beside the vault's (prefix "")


def disk_pieces(dom: Domain, work: Path) -> tuple[Path, list[tuple[int, int]]]:
    """The VM's disk as raw (qemu-img convert, sparse) and its allocated data cut in chunk
    sized pieces: the bytes the backup reads, for the plain PUT loop to send."""
    raw = work / "s3-plain.raw"
    run("qemu-img", "convert", "-U", "-O", "raw", str(dom.disk), str(raw))
    pieces = []
    for start, length in data_ranges(raw):
        for at in range(start, start + length, 4 * MiB):
            pieces.append((at, min(4 * MiB, start + length - at)))
    return raw, pieces


def plain_put_loop(s3: Any, raw: Path, pieces: list[tuple[int, int]], threads: int = 1
                   ) -> Copy:
    """The baseline: each piece PUT with boto3 as it is, one after another (or `threads`
    at once), then deleted so the in-memory OSD holds only the vault."""
    def put(item: tuple[int, tuple[int, int]]) -> None:
        index, (at, n) = item
        with raw.open("rb") as f:
            f.seek(at)
            s3.put_object(Bucket=S3_BUCKET, Key=f"{PLAIN_PREFIX}{index:08d}", Body=f.read(n))

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    if threads == 1:
        for item in enumerate(pieces):
            put(item)
    else:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(put, enumerate(pieces)))
    seconds = time.monotonic() - started
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    keys = [{"Key": f"{PLAIN_PREFIX}{i:08d}"} for i in range(len(pieces))]
    for i in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=S3_BUCKET, Delete={"Objects": keys[i:i + 1000], "Quiet": True})
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return Copy(seconds, sum(n for _, n in pieces), cpu)


def stored_bytes(s3: Any, prefix: str) -> tuple[int, int]:
    """(objects, bytes) under `prefix` in the bench bucket."""
    count = total = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            count += 1
            total += int(item["Size"])
    return count, total


def s3_backup(work: Path, plane_root: Path, stack: contextlib.ExitStack, hv: Hypervisor,
              dom: Domain) -> None:
    """Figure 6: a second control plane whose vaults live in a bucket of a one-node Ceph RGW
    (tools/cephrgw.py, its OSD in memory), a second gateway daemon activated on it; a full
    backup of the main VM to it, between two plain boto3 PUT loops of the same bytes (the
    disk's allocated data in 4 MiB pieces) to the same bucket."""
    rgw = cephrgw.start(work / "ceph")
    stack.callback(rgw.stop)
    s3 = rgw.client(max_pool_connections=16)
    settings_file = work / "vault-store.toml"
    cephrgw.write_vault_store(rgw, settings_file)  # as the README's walkthrough does
    settings = vaultsettings.load(settings_file)
    raw, pieces = disk_pieces(dom, work)
    site = Site(work, plane_root / "controlplane-s3", stack, hv, vault_store=settings,
                name="gateway-s3")
    arn = site.vm_arns([dom.name])[dom.name]
    before = plain_put_loop(s3, raw, pieces)
    job = site.backup(arn, hv.qemu_pid(dom.name))
    after = plain_put_loop(s3, raw, pieces)
    wide = plain_put_loop(s3, raw, pieces, threads=4)
    raw.unlink()
    allocated = before.nbytes
    base = (before.nbytes + after.nbytes) / (before.seconds + after.seconds)
    rate = allocated / job.seconds
    objects, stored = stored_bytes(s3, "")  # the plain loops' objects are deleted by now
    chunks, manifest = site.receipts.sent(job.job_id)
    say(f"6. full backup of the same VM ({allocated / MiB:.1f} MiB allocated) by a second "
        f"gateway to a control plane whose vault is in an S3 bucket (one-node Ceph RGW "
        f"{rgw.endpoint}, OSD in memory):")
    say(f"   gateway to the bucket: {mb_s(allocated, job.seconds):7.1f} MB/s  "
        f"(RUNNING->COMPLETED {job.seconds:.2f} s; sent {chunks / MiB:.1f} MiB of chunks + "
        f"{manifest / 1024:.1f} KiB manifest; the bucket holds {objects} objects, "
        f"{stored / MiB:.1f} MiB: chunks compressed and encrypted, manifests, vault records)")
    say(f"   plain PUT loop:        {base / 1e6:7.1f} MB/s  (boto3 put_object of the same "
        f"bytes in {len(pieces)} pieces of <= 4 MiB, one at a time, to the same bucket; before "
        f"{before.seconds:.2f} s, after {after.seconds:.2f} s)")
    say(f"   ratio {rate / base:.2f}x   goal >= 0.8x   "
        f"{'met' if rate / base >= 0.8 else 'NOT met'}")
    say("   profile: " + phases(site.gateway.events(job.job_id), job.started, job.completed, [
        ("poll to start", "job_started"), ("begin_backup", "libvirt_backup_begun"),
        ("extents+started", "backup_started"), ("read/hash/send/complete",
                                                  "backup_completed")],
        site.receipts.complete_seconds.get(job.job_id)))
    say(f"   profile: the same loop with 4 PUTs at once {mb_s(wide.nbytes, wide.seconds):.1f} "
        f"MB/s; {cpu_line(job, allocated)}")


# -- the run ----------------------------------------------------------------------------------


def busy_seconds() -> float:
    """CPU seconds all CPUs of the machine have been busy since boot (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_seconds(hv: Hypervisor) -> float:
    """CPU seconds of this bench's processes: itself and the children it reaped (nbdcopy,
    qemu-img, qemu-nbd, the proxy, the first daemon), the live ones (the daemon, libvirtd)
    and the domains' QEMUs (libvirt's, not our children)."""
    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    pids = {p.pid for p in me.children(recursive=True)}
    run_dir = hv.daemon.root / "run_libvirt" / "qemu"
    for pid_file in run_dir.glob("*.pid") if run_dir.exists() else []:
        with contextlib.suppress(OSError, ValueError):
            pids.add(int(pid_file.read_text().strip()))
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            c = psutil.Process(pid).cpu_times()
            total += c.user + c.system
    return total


def bench(sizes: Sizes, work: Path, plane_dir: Path, s3_only: bool = False) -> None:
    with contextlib.ExitStack() as stack:
        t0 = time.monotonic()
        busy0 = busy_seconds()
        hv = Hypervisor(work / "libvirtd")
        stack.callback(hv.stop)
        disks = hv.daemon.domains_dir
        extents = make_disk(disks / "main.qcow2", sizes.disk, sizes.fraction, 1,
                            sizes.text_share)
        main = hv.start_domain("bench-main", disks / "main.qcow2", sizes.disk,
                               sum(n for _, n in extents))
        others = []
        for i in range(0 if s3_only else 4):
            path = disks / f"conc{i}.qcow2"
            ext = make_disk(path, sizes.concurrent_disk, sizes.concurrent_fraction, 10 + i, 0.0)
            others.append(hv.start_domain(f"bench-conc{i}", path, sizes.concurrent_disk,
                                          sum(n for _, n in ext)))
        if s3_only:
            s3_backup(work, plane_dir.parent, stack, hv, main)
            return
        site = Site(work, plane_dir, stack, hv)
        arns = site.vm_arns([main.name] + [d.name for d in others])
        say(f"backup benchmark: {psutil.cpu_count()} CPUs; private libvirtd on "
            f"{hv.daemon.tcp_uri()} (TCG domains, qcow2 on virtio-scsi); control plane in this "
            f"process on {site.plane.url}, its state in {plane_dir.parent}; gateway daemon pid "
            f"{site.gateway.proc.pid}; set up in {time.monotonic() - t0:.1f} s")
        _, copies = full_backup(site, main, arns[main.name], work)
        forced_full(site, main, arns[main.name], copies[0].nbytes)
        inc = incremental(site, main, arns[main.name], sizes, work)
        restore(site, main, inc.doc["RecoveryPointArn"], work,
                f"{inc.doc.get('BackupType', '?').lower()}, composed by the control plane")
        concurrent(site, others, arns, stack)
        s3_backup(work, plane_dir.parent, stack, hv, main)
        wall = time.monotonic() - t0
        busy, own = busy_seconds() - busy0, own_seconds(hv)
        cpus = psutil.cpu_count() or 1
        say(f"host: its {cpus} CPUs were busy {busy / wall / cpus * 100:.0f} % of the run, this "
            f"bench's processes {own / wall / cpus * 100:.0f} %, others "
            f"{max(0.0, busy - own) / wall / cpus * 100:.0f} % (figures move with that)")
        say(f"backup benchmark total {time.monotonic() - t0:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.backupbench",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--disk-gib", type=float, default=None,
                        help="size of the main disk in GiB (1; --quick: 0.25)")
    parser.add_argument("--quick", action="store_true",
                        help="small disks: a smoke run of every figure in about a minute")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    parser.add_argument("--s3-only", action="store_true",
                        help="figure 6 alone (the vault in a Ceph RGW bucket)")
    parser.add_argument("--proxy", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument(
        "--plane-on-disk", action="store_true",
        help="keep the control plane's state (vault, database) on disk beside the VMs' disks "
             "instead of in /dev/shm: its SQLite fsyncs on its event loop then stall the "
             "receiving end for up to ~150 ms while the vault writes (see figure 5)")
    args = parser.parse_args(argv)
    if args.proxy:
        run_proxy(args.proxy)
        return 0
    if os.geteuid() != 0:
        print("backupbench: run as root (libvirtd runs in its own mount namespace)",
              file=sys.stderr)
        return 1
    missing = libvirtd.missing_programs() + cephrgw.missing_programs() + [
        p for p in ("nbdcopy", "qemu-nbd", "qemu-io")
                                             if shutil.which(p) is None]
    if missing:
        print(f"backupbench: missing {', '.join(missing)}: run tools/install-deps.sh",
              file=sys.stderr)
        return 1
    gib = args.disk_gib if args.disk_gib is not None else (0.25 if args.quick else 1.0)
    sizes = Sizes(disk=int(gib * GiB) // GRANULE * GRANULE)
    if args.quick:
        sizes.concurrent_disk = 128 * MiB
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # Ctrl-C unwinds even when started with SIGINT ignored (a background job of a script),
    # and SIGTERM (make interrupted, a CI timeout) the same way: every process is stopped
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="backupbench-"))
    # The control plane stands in for AWS: its storage is not the gateway's. On the disk the
    # VMs use, its per-request SQLite fsyncs (on its event loop) wait behind the vault's
    # writes and stall its reading, which figure 5 would then charge to the gateway.
    shm = Path("/dev/shm")
    plane_dir = Path(tempfile.mkdtemp(prefix="backupbench-cp-",
                                      dir=None if args.plane_on_disk or not shm.is_dir()
                                      else shm)) / "controlplane"
    try:
        bench(sizes, work, plane_dir, args.s3_only)
    except KeyboardInterrupt:
        print("backupbench: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"backupbench: work directories kept: {work} {plane_dir.parent}",
                  file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(plane_dir.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
