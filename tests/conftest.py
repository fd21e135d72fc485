"""Shared fixtures: the control plane and the appliance daemon as real processes on loopback.

Each process gets free ports and its own temporary directories; a fixture returns once the
process has printed its `event=ready` line (no sleeps), and stops it at the end of the test.
Output is read by a thread into a list so a test can wait for a log event and so a full pipe
never blocks the process.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from appliance.localclient import UnixHTTPConnection

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
READY_TIMEOUT = 30.0


def free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition",
    interval: float = 0.05,
) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class Proc:
    """A child process whose stdout and stderr lines are collected as they come."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, text=True, bufsize=1,
        )
        self._threads = [
            threading.Thread(target=self._pump, args=(stream,), daemon=True)
            for stream in (self.popen.stdout, self.popen.stderr)
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_line(self, pattern: str, timeout: float = READY_TIMEOUT, start: int = 0) -> str:
        """The first line (from index `start`) matching the regex; fails if the process exits."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    if rx.search(line):
                        return line
                if self.popen.poll() is not None and not any(t.is_alive() for t in self._threads):
                    raise AssertionError(
                        f"{self.argv[2:4]} exited ({self.popen.returncode}) before {pattern!r}:\n"
                        + "\n".join(self.lines[-30:])
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"no line matching {pattern!r} within {timeout}s:\n"
                        + "\n".join(self.lines[-30:])
                    )
                self._cond.wait(min(remaining, 0.2))

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_exit(self, timeout: float = 20.0) -> int:
        rc = self.popen.wait(timeout)
        for t in self._threads:
            t.join(timeout)
        return rc

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        for t in self._threads:
            t.join(5)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        for t in self._threads:
            t.join(5)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class ControlPlane:
    state_dir: Path
    port: int
    proc: Proc | None = None
    extra_args: list[str] = field(default_factory=list)  # e.g. ["--vault-store", FILE]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ControlPlane:
        self.proc = Proc(
            [PYTHON, "-m", "controlplane", "serve", "--listen", f"127.0.0.1:{self.port}",
             "--state-dir", str(self.state_dir), *self.extra_args],
            env=child_env(),
        )
        self.proc.wait_for_line(r"event=ready")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def aws_env(self) -> dict[str, str]:
        """Environment for the AWS CLI / boto3: only this control plane's credentials."""
        env = child_env(
            AWS_SHARED_CREDENTIALS_FILE=str(self.state_dir / "credentials"),
            AWS_CONFIG_FILE=os.devnull,
            AWS_EC2_METADATA_DISABLED="true",
            AWS_PAGER="",
        )
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                    "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
            env.pop(key, None)
        return env

    def aws(self, *args: str, region: str = "us-west-2", check: bool = True,
            service: str = "backup-gateway") -> Any:
        """Run the real AWS CLI against this control plane (`aws SERVICE ARGS...`, the
        backup-gateway API unless `service="backup"`); parsed JSON output."""
        argv = [str(Path(PYTHON).parent / "aws"), service, *args,
                "--endpoint-url", self.url, "--region", region, "--output", "json"]
        done = subprocess.run(argv, env=self.aws_env(), capture_output=True, text=True,
                              timeout=60, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"aws {' '.join(args)} failed: {done.stderr.strip()}")
        if not check:
            return done
        return json.loads(done.stdout) if done.stdout.strip() else {}


@dataclass
class Appliance:
    state_dir: Path
    socket_path: Path
    port: int
    control_plane_url: str
    extra_args: list[str] = field(default_factory=list)
    config_file: Path | None = None  # when set: only `--config FILE` and `extra_args`
    proc: Proc | None = None

    @property
    def argv(self) -> list[str]:
        if self.config_file is not None:
            return [PYTHON, "-m", "appliance", "serve", "--config", str(self.config_file),
                    *self.extra_args]
        return [
            PYTHON, "-m", "appliance", "serve", "--config", os.devnull,
            "--listen", f"127.0.0.1:{self.port}", "--state-dir", str(self.state_dir),
            "--control-plane", self.control_plane_url,
            "--local-api-socket", str(self.socket_path), "--link-retry-max", "0.5",
            *self.extra_args,
        ]

    def start(self, wait: bool = True) -> Appliance:
        self.proc = Proc(self.argv, env=child_env())
        if wait:
            self.proc.wait_for_line(r"event=ready")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def get(self, target: str, method: str = "GET") -> tuple[int, dict[str, str], str]:
        """One request to the activation page; redirects are NOT followed."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, target)
            resp = conn.getresponse()
            body = resp.read().decode()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
        finally:
            conn.close()

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One call to the local API over its Unix socket."""
        conn = UnixHTTPConnection(str(self.socket_path), timeout=30)
        try:
            data = None if body is None else json.dumps(body)
            conn.request(method, path, body=data,
                         headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def status(self) -> dict[str, Any]:
        code, doc = self.api("GET", "/v1/status")
        assert code == 200, doc
        return doc



@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[ControlPlane]:
    """A running control plane on a free loopback port (stopped at the end)."""
    cp = ControlPlane(tmp_path / "controlplane", free_port())
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def make_appliance(tmp_path: Path) -> Iterator[Callable[..., Appliance]]:
    """Factory: an appliance daemon pointed at a control plane URL (stopped at the end)."""
    made: list[Appliance] = []

    def make(control_plane_url: str, start: bool = True, **kwargs: Any) -> Appliance:
        n = len(made)
        # AF_UNIX paths are limited to 108 bytes: keep the socket path short.
        sock_dir = Path(f"/tmp/appl-{os.getpid()}-{id(made)}-{n}")
        app = Appliance(
            state_dir=tmp_path / f"appliance{n}", socket_path=sock_dir / "api.sock",
            port=free_port(), control_plane_url=control_plane_url, **kwargs,
        )
        made.append(app)
        if start:
            app.start()
        return app

    try:
        yield make
    finally:
        for app in made:
            app.stop()
            with contextlib.suppress(OSError):
                app.socket_path.unlink()
            with contextlib.suppress(OSError):
                app.socket_path.parent.rmdir()


@pytest.fixture
def appliance(control_plane: ControlPlane, make_appliance: Callable[..., Appliance]) -> Appliance:
    """A running appliance daemon linked to the `control_plane` fixture."""
    return make_appliance(control_plane.url)


def activate(cp: Any, app: Any, name: str = "demo", region: str = "us-west-2") -> str:
    """Key from the appliance's port 80, create-gateway with the AWS CLI, seen by the daemon."""
    status, _, body = app.get(f"/?activationRegion={region}&no_redirect")
    assert status == 200, body
    arn = cp.aws(
        "create-gateway", "--activation-key", body.splitlines()[0],
        "--gateway-display-name", name, "--gateway-type", "BACKUP_VM",
    )["GatewayArn"]
    wait_until(lambda: app.status()["gatewayArn"] == arn, what="activation seen by the daemon")
    return str(arn)


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Callable[..., Any]:
    """`wait_until(predicate, timeout, what)` for test modules (they cannot import conftest)."""
    return wait_until


@pytest.fixture(scope="module")
def shared_appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    """One control plane and one (never activated) appliance for a whole test module."""
    tmp = tmp_path_factory.mktemp("shared")
    cp = ControlPlane(tmp / "cp", free_port()).start()
    app = Appliance(
        state_dir=tmp / "app", socket_path=Path(f"/tmp/appl-{os.getpid()}-{id(tmp)}/api.sock"),
        port=free_port(), control_plane_url=cp.url,
    )
    try:
        app.start()
        yield app
    finally:
        app.stop()
        cp.stop()
        with contextlib.suppress(OSError):
            app.socket_path.parent.rmdir()
