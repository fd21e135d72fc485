"""A one-node Ceph cluster with a RADOS Gateway on 127.0.0.1: the real S3-compatible object
store the vaults' S3 backend (controlplane/s3store.py) is tested against, and that a person
trying the README can start by hand.

Why Ceph: Debian 12 packages no other S3 server (no MinIO, Garage, SeaweedFS), and moto or
LocalStack are mocks of the API, not a store. Ceph Pacific has no database-backed standalone
radosgw, so a monitor and one OSD run too; the OSD keeps its objects in memory (memstore,
capped by `memstore device bytes`), which takes the cluster from nothing to the first PUT in
about 3 s. The recipe is ../shared/reference/object-store-notes.md's, including the three
settings without which radosgw does not start (see `_config`).

Every daemon runs in the foreground (`-f`) as our child, its output in `<dir>/log/`, its PID
recorded in `<dir>/cephrgw.json`, so `stop` ends exactly what `start` began (TERM, then KILL
after a few seconds) and removes the directory. Nothing here touches /etc/ceph, /var/lib/ceph
or a Ceph of the machine's own: every path is inside the base directory and every command
gets `-c <dir>/ceph.conf`.

    python -m tools.cephrgw start --dir build/ceph [--port 7480]   # prints AWS_* exports
        [--vault-store build/vault-store.toml]   # + bucket, keys file, control plane settings
    python -m tools.cephrgw stop --dir build/ceph
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gatewaycore.atomicfile import write_atomic

REQUIRED_PROGRAMS = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")
STATE_FILE = "cephrgw.json"
RGW_NAME = "client.rgw.gw"
DEFAULT_PORT = 7480
START_TIMEOUT = 60.0
STOP_GRACE = 5.0
VAULT_BUCKET = "backup-vaults"   # --vault-store: the bucket made for the control plane
CREDENTIALS_FILE = "s3-credentials"
S3_REGION = "us-east-1"
MEMSTORE_BYTES = 4 << 30   # a cap, not an allocation: memstore holds what is stored


class CephError(RuntimeError):
    """The cluster did not start; the message names the step and ends with the daemon's log."""


@dataclass
class Rgw:
    """A running one-node cluster: its S3 endpoint, the S3 user's keys and the daemons' PIDs
    (monitor, osd, radosgw). `processes` holds the Popen objects when this process started
    the daemons (so they are reaped); a later `stop` command works from the PIDs alone."""

    base_dir: Path
    port: int
    access_key: str
    secret_key: str = field(repr=False)
    pids: dict[str, int] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def conf(self) -> Path:
        return self.base_dir / "ceph.conf"

    def stop(self, remove: bool = True) -> None:
        """TERM each daemon in turn (gateway, OSD, monitor: one at a time, because the
        gateway's clean exit talks to the cluster and hangs if the OSD and monitor go at the
        same moment), KILL one still alive STOP_GRACE seconds later, then remove the base
        directory unless `remove` is false."""
        for name in ("radosgw", "osd", "mon"):
            if name not in self.pids:
                continue
            _signal(self, name, signal.SIGTERM)
            if not _wait_exit(self, name, time.monotonic() + STOP_GRACE):
                _signal(self, name, signal.SIGKILL)
                _wait_exit(self, name, time.monotonic() + STOP_GRACE)
        if remove:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def client(self, **options: Any) -> Any:
        """A boto3 S3 client of the S3 user (path-style; checksums only where the API needs
        them), for the bucket's set-up and for looking behind the control plane's store;
        `options` go to botocore's Config."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=S3_REGION,
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"},
                                          request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required",
                                          **options))

    def admin(self, *args: str, timeout: float = 30.0) -> str:
        """Run `radosgw-admin` against this cluster; its stdout (CephError on failure)."""
        return _run(["radosgw-admin", "-c", str(self.conf), "-n", "client.admin", *args],
                    timeout=timeout)

    def save(self) -> None:
        """Write the PIDs and keys (mode 0600: the secret key is in it) for `stop`."""
        path = self.base_dir / STATE_FILE
        data = {"port": self.port, "access_key": self.access_key,
                "secret_key": self.secret_key, "pids": self.pids}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)

    @classmethod
    def load(cls, base_dir: Path) -> Rgw:
        """The cluster a `start` command left in `base_dir` (FileNotFoundError if none)."""
        data = json.loads((base_dir / STATE_FILE).read_text())
        return cls(base_dir, int(data["port"]), data["access_key"], data["secret_key"],
                   {k: int(v) for k, v in data["pids"].items()})


def missing_programs() -> list[str]:
    """The Ceph programs not on PATH (tools/install-deps.sh installs them)."""
    return [p for p in REQUIRED_PROGRAMS if shutil.which(p) is None]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(base_dir: Path, port: int | None = None, *, access_key: str | None = None,
          secret_key: str | None = None, timeout: float = START_TIMEOUT) -> Rgw:
    """Start monitor, OSD and radosgw (S3 on 127.0.0.1:`port`, a free port when None) in
    `base_dir` (created; must not hold a cluster already), and an S3 user with the given keys
    (random ones when None). Returns once an S3 request can succeed; on failure everything
    started is stopped, the directory is kept for its logs, and CephError says which step."""
    if missing := missing_programs():
        raise CephError(f"Ceph programs missing: {' '.join(missing)} (run tools/install-deps.sh)")
    base_dir = base_dir.resolve()
    if (base_dir / STATE_FILE).exists():
        raise CephError(f"{base_dir} already holds a cluster: stop it first")
    if base_dir.exists():
        shutil.rmtree(base_dir)
    for sub in ("mon", "osd", "rgw", "run", "log", "crash"):
        (base_dir / sub).mkdir(parents=True, mode=0o700)
    rgw = Rgw(base_dir, port or free_port(),
              access_key or "AK" + secrets.token_hex(9).upper(),
              secret_key or secrets.token_urlsafe(30))
    deadline = time.monotonic() + timeout
    try:
        _start(rgw, deadline)
    except BaseException:
        rgw.stop(remove=False)
        raise
    return rgw


def _start(rgw: Rgw, deadline: float) -> None:
    base, conf = rgw.base_dir, str(rgw.conf)
    fsid = str(uuid.uuid4())
    mon_v2, mon_v1 = free_port(), free_port()
    mon_addrs = f"[v2:127.0.0.1:{mon_v2},v1:127.0.0.1:{mon_v1}]"
    rgw.conf.write_text(_config(base, fsid, mon_addrs, rgw.port))

    # 1. The monitor.
    _run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", mon_addrs,
          str(base / "monmap")])
    _run(["ceph-mon", "-c", conf, "--mkfs", "-i", "a", "--monmap", str(base / "monmap")])
    _spawn(rgw, "mon", ["ceph-mon", "-c", conf, "-i", "a", "-f"])
    _poll(rgw, "mon", deadline, "the monitor answering `ceph mon stat`",
          lambda: _ok(["ceph", "-c", conf, "--connect-timeout", "5", "mon", "stat"]))

    # 2. One OSD keeping its objects in memory.
    osd_uuid = str(uuid.uuid4())
    osd_id = _run(["ceph", "-c", conf, "osd", "new", osd_uuid]).strip()
    if osd_id != "0":
        raise CephError(f"`ceph osd new` gave OSD id {osd_id!r}, expected 0")
    (base / "osd" / "ceph-0").mkdir()
    _run(["ceph-osd", "-c", conf, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid])
    _spawn(rgw, "osd", ["ceph-osd", "-c", conf, "-i", "0", "-f"])
    _poll(rgw, "osd", deadline, "osd.0 up in `ceph osd dump`", lambda: _osd_up(conf))

    # 3. The gateway; its first start creates its pools (about ten cluster-map changes).
    _spawn(rgw, "radosgw", ["radosgw", "-c", conf, "-n", RGW_NAME, "-f"])
    _poll(rgw, "radosgw", deadline,
          f"an anonymous GET {rgw.endpoint}/ answering ListAllMyBucketsResult",
          lambda: _rgw_answers(rgw.port))

    # 4. The S3 user (the keys go on the command line: this is a throw-away test cluster).
    rgw.admin("user", "create", "--uid=backup", "--display-name=backup gateway tests",
              f"--access-key={rgw.access_key}", f"--secret-key={rgw.secret_key}")
    rgw.save()


def _config(base: Path, fsid: str, mon_addrs: str, port: int) -> str:
    """ceph.conf: auth off, one replica, small placement groups, every path under `base`."""
    return f"""[global]
fsid = {fsid}
mon host = {mon_addrs}
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
run dir = {base}/run
admin socket = {base}/run/$name.asok
pid file = {base}/run/$name.pid
log file = {base}/log/$name.log
mon cluster log file = {base}/log/cluster.log
crash dir = {base}/crash
keyring = {base}/keyring
mon data = {base}/mon/$cluster-$id
osd data = {base}/osd/$cluster-$id
rgw data = {base}/rgw/$cluster-$id
osd objectstore = memstore
memstore device bytes = {MEMSTORE_BYTES}

[mon]
# radosgw's first start makes about ten map changes: ~13 s at the default 1 s each, ~2 s here
paxos propose interval = 0.05
paxos min wait = 0.01

[{RGW_NAME}]
# radosgw insists on a secure monitor connection (needs cephx); with auth off it otherwise
# loops on error -13
ms mon client mode = crc secure
# `endpoint=` alone: adding `port=` makes beast bind 0.0.0.0 first, then fail on 127.0.0.1
rgw frontends = beast endpoint=127.0.0.1:{port}
"""


def _run(argv: list[str], timeout: float = 30.0) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise CephError(f"`{argv[0]} {' '.join(argv[1:3])} ...` took more than {timeout:g}s")\
            from None
    if done.returncode != 0:
        raise CephError(f"`{' '.join(_redacted(argv))}` failed ({done.returncode}): "
                        f"{(done.stderr or done.stdout).strip()[-2000:]}")
    return done.stdout


def _redacted(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] + "=***" if a.startswith("--secret-key=") else a for a in argv]


def _ok(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=15,
                              stdin=subprocess.DEVNULL).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _osd_up(conf: str) -> bool:
    try:
        out = subprocess.run(["ceph", "-c", conf, "osd", "dump", "--format", "json"],
                             capture_output=True, text=True, timeout=15,
                             stdin=subprocess.DEVNULL)
        osds = json.loads(out.stdout).get("osds", []) if out.returncode == 0 else []
    except (subprocess.TimeoutExpired, ValueError):
        return False
    return any(o.get("osd") == 0 and o.get("up") == 1 for o in osds)


def _rgw_answers(port: int) -> bool:
    """Checks the body, not just the status: another server on the port would answer too."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.status == 200 and b"ListAllMyBucketsResult" in resp.read()
    except OSError:
        return False
    finally:
        conn.close()


def _spawn(rgw: Rgw, name: str, argv: list[str]) -> None:
    log = open(rgw.base_dir / "log" / f"{name}.out", "ab")  # noqa: SIM115 - the child owns it
    try:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        log.close()
    rgw.processes[name] = proc
    rgw.pids[name] = proc.pid


def _poll(rgw: Rgw, name: str, deadline: float, what: str,
          predicate: Callable[[], bool]) -> None:
    """Until `predicate()`; CephError with the daemon's log tail if it exits or time runs out."""
    while not predicate():
        proc = rgw.processes[name]
        if proc.poll() is not None:
            raise CephError(f"{name} exited ({proc.returncode}) before {what}\n"
                            f"{_log_tail(rgw, name)}")
        if time.monotonic() > deadline:
            raise CephError(f"timed out waiting for {what}\n{_log_tail(rgw, name)}")
        time.sleep(0.1)


def _log_tail(rgw: Rgw, name: str, lines: int = 30) -> str:
    logs = {"mon": "mon.a.log", "osd": "osd.0.log", "radosgw": f"{RGW_NAME}.log"}
    out = []
    for fname in (f"{name}.out", logs[name]):
        path = rgw.base_dir / "log" / fname
        with contextlib.suppress(OSError):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path} ---\n" + "\n".join(tail))
    return "\n".join(out)


def _signal(rgw: Rgw, name: str, sig: int) -> None:
    proc = rgw.processes.get(name)
    if proc is not None:
        if proc.poll() is None:
            proc.send_signal(sig)
        return
    pid = rgw.pids[name]
    if _is_ours(pid, rgw.conf):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_exit(rgw: Rgw, name: str, deadline: float) -> bool:
    """Whether the daemon is gone by `deadline` (a zombie counts as gone)."""
    proc = rgw.processes.get(name)
    pid = rgw.pids[name]
    while True:
        if proc is not None:
            if proc.poll() is not None:
                return True
        elif not _is_ours(pid, rgw.conf) or _is_zombie(pid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _is_ours(pid: int, conf: Path) -> bool:
    """Whether `pid` is still a daemon started with this cluster's ceph.conf (not reused)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(conf).encode() in argv


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def vault_store_toml(endpoint: str, bucket: str, credentials: Path, *, prefix: str = "",
                     key_file: str = "vault-master.key") -> str:
    """The control plane's vault store settings (`serve --vault-store`) for a bucket of
    this cluster; `key_file` relative to the settings file's directory."""
    return ("[s3]\n"
            f'endpoint_url = "{endpoint}"\n'
            f'region = "{S3_REGION}"\n'
            f'bucket = "{bucket}"\n'
            f'prefix = "{prefix}"\n'
            f'credentials_file = "{credentials}"\n'
            "# the vaults' master key, made when missing: keep a copy off this machine\n"
            f'key_file = "{key_file}"\n')


def write_vault_store(rgw: Rgw, settings: Path) -> None:
    """The bucket VAULT_BUCKET, the S3 user's keys as an AWS shared-credentials file in the
    cluster's directory (profiles `default` and `ceph`; gone with the cluster), and the
    control plane's settings for them in `settings` (its master key file beside it)."""
    rgw.client().create_bucket(Bucket=VAULT_BUCKET)
    keys = (f"aws_access_key_id = {rgw.access_key}\n"
            f"aws_secret_access_key = {rgw.secret_key}\n")
    credentials = rgw.base_dir / CREDENTIALS_FILE
    write_atomic(credentials, f"[default]\n{keys}[ceph]\n{keys}".encode(), mode=0o600)
    settings = settings.resolve()
    settings.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(settings, (
        "# Written by python -m tools.cephrgw start: vaults in the local one-node Ceph RGW.\n"
        + vault_store_toml(rgw.endpoint, VAULT_BUCKET, credentials)).encode(), mode=0o644)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.cephrgw", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("start", "stop"))
    parser.add_argument("--dir", type=Path, required=True, help="the cluster's base directory")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"the S3 port on 127.0.0.1 (start; default {DEFAULT_PORT})")
    parser.add_argument(
        "--vault-store", type=Path, metavar="FILE",
        help=f"start: also create the bucket {VAULT_BUCKET!r}, write the S3 user's keys to "
             f"<dir>/{CREDENTIALS_FILE} and FILE, the control plane's vault store settings "
             "for this cluster (python -m controlplane serve --vault-store FILE)")
    args = parser.parse_args(argv)
    if args.vault_store is not None and args.command != "start":
        parser.error("--vault-store goes with start")
    if args.command == "stop":
        try:
            rgw = Rgw.load(args.dir.resolve())
        except FileNotFoundError:
            print(f"no cluster in {args.dir}", file=sys.stderr)
            return 1
        rgw.stop()
        print(f"stopped the cluster in {args.dir} (PIDs {sorted(rgw.pids.values())})")
        return 0
    try:
        rgw = start(args.dir, args.port)
    except CephError as exc:
        print(f"Ceph did not start: {exc}", file=sys.stderr)
        return 1
    # The daemons were started in sessions of their own: they outlive this command, and
    # their Popen objects are dropped without killing them.
    rgw.processes.clear()
    print(f"# S3 endpoint {rgw.endpoint} (path-style, any region); daemons "
          f"{rgw.pids}; stop with: python -m tools.cephrgw stop --dir {args.dir}")
    if args.vault_store is not None:
        try:
            write_vault_store(rgw, args.vault_store)
        except (OSError, RuntimeError) as exc:
            rgw.stop()
            print(f"Ceph started but the vault store settings were not written: {exc}",
                  file=sys.stderr)
            return 1
        print(f"# bucket {VAULT_BUCKET}; vault store settings in {args.vault_store}")
    print(f"export AWS_ACCESS_KEY_ID={rgw.access_key}")
    print(f"export AWS_SECRET_ACCESS_KEY={rgw.secret_key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
