"""Fixtures for the console tests: a local NTP responder and the real console in a
pseudo-terminal (pexpect). The control plane and the daemon come from tests/conftest.py (real
processes on loopback). Every file the console writes goes to the test's temporary directory,
and its NTP probes go to the responder on 127.0.0.1, never to a public server.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest

from appliance.console.auth import PasswordStore

REPO = Path(__file__).resolve().parents[2]

NTP_EPOCH_DELTA = 2208988800  # seconds from 1900-01-01 to 1970-01-01


def _ntp_timestamp(unix: float) -> bytes:
    value = unix + NTP_EPOCH_DELTA
    seconds = int(value)
    fraction = int((value - seconds) * 2**32)
    return struct.pack("!II", seconds, fraction)


class NtpResponder:
    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset
        self.requests = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(512)
            except OSError:
                return  # closed
            if len(data) < 48:
                continue
            received = time.time() + self.offset
            self.requests += 1
            header = struct.pack("!BBbbII4s", (3 << 3) | 4, 1, 4, -20, 0, 0, b"LOCL")
            reply = (
                header
                + _ntp_timestamp(received)  # reference
                + data[40:48]  # originate = the client's transmit timestamp
                + _ntp_timestamp(received)  # receive
                + _ntp_timestamp(time.time() + self.offset)  # transmit
            )
            self.sock.sendto(reply, peer)

    def close(self) -> None:
        self.sock.close()


class Console:
    """The real console (`python -m appliance console`) in an 80x24 pseudo-terminal."""

    PASSWORD = "s3cret-pass"

    def __init__(self, tmp: Path, socket_path: Path, ntp_port: int,
                 password: str | None = PASSWORD) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.password_file = tmp / "console-password"
        if password is not None and not self.password_file.exists():
            PasswordStore(self.password_file).set(password)
        self.networkd_dir = tmp / "network"
        self.timesyncd_conf = tmp / "timesyncd.conf.d" / "appliance.conf"
        self.hostname_file = tmp / "hostname"
        self.log = tmp / "console.log"
        self.transcript = tmp / "console.pty"
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "appliance", "console", "--socket", str(socket_path),
             "--password-file", str(self.password_file),
             "--networkd-dir", str(self.networkd_dir),
             "--timesyncd-conf", str(self.timesyncd_conf),
             "--hostname-file", str(self.hostname_file),
             "--ntp-port", str(ntp_port), "--ntp-timeout", "2",
             "--no-apply", "--log-file", str(self.log)],
            cwd=str(REPO),
            env={"TERM": "vt100", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                 "LANG": "C.UTF-8", "HOME": str(tmp)},
            dimensions=(24, 80), timeout=30, encoding="utf-8", codec_errors="replace",
        )
        self.child.logfile_read = self.transcript.open("w")

    def expect(self, pattern: str | list, timeout: float = 30) -> int:
        return self.child.expect(pattern, timeout=timeout)

    def seen(self, text: str, timeout: float = 30) -> str:
        """Wait for literal `text`; returns everything printed before it."""
        self.child.expect(re.escape(text), timeout=timeout)
        return self.child.before

    def send(self, text: str) -> None:
        self.child.sendline(text)

    def answer(self, prompt: str, text: str) -> None:
        self.seen(prompt)
        self.child.sendline(text)

    def login(self, password: str = PASSWORD) -> None:
        self.answer("login:", "admin")
        self.answer("Password:", password)
        self.seen("Enter command:")

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)
        self.child.logfile_read.close()


@pytest.fixture
def ntp() -> Iterator[NtpResponder]:
    responder = NtpResponder()
    yield responder
    responder.close()


@pytest.fixture
def console_factory(tmp_path: Path, ntp: NtpResponder) -> Iterator[Callable[..., Console]]:
    """Factory: `console_factory(socket_path, password=...)`; password None = first boot."""
    made: list[Console] = []

    def make(socket_path: Path, password: str | None = Console.PASSWORD) -> Console:
        con = Console(tmp_path / f"console{len(made)}", socket_path, ntp.port, password)
        made.append(con)
        return con

    yield make
    for con in made:
        con.close()
