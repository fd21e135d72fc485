"""A qemu-guest-agent client on QEMU's chardev socket: what the VM tests and the boot
benchmark use to look inside a guest that has no SSH and no password (guest-exec only)."""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from pathlib import Path
from typing import Any


class GuestAgentError(Exception):
    pass


class GuestAgent:
    """A qemu-guest-agent client on QEMU's chardev socket (one JSON command at a time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buf = b""

    def sync(self, timeout: float) -> None:
        """Wait until the agent answers (after boot or reboot); stale output is discarded."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.sock is None:
                    self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self.sock.connect(str(self.path))
                token = random.randrange(1, 2**31)
                self._send({"execute": "guest-sync-delimited", "arguments": {"id": token}})
                while True:
                    reply = self._read_message(min(5.0, max(0.1, deadline - time.monotonic())),
                                               delimited=True)
                    if reply.get("return") == token:
                        return
            except (OSError, TimeoutError, GuestAgentError):
                self.close()
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"the guest agent did not answer within {timeout:.0f}s"
                    ) from None
                time.sleep(0.5)

    def call(self, command: str, arguments: dict[str, Any] | None = None,
             timeout: float = 30.0) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        self._send(msg)
        reply = self._read_message(timeout)
        if "error" in reply:
            raise GuestAgentError(f"{command}: {reply['error']}")
        return reply.get("return")

    def exec(self, argv: list[str], timeout: float = 60.0) -> tuple[int, str, str]:
        """Run a command in the guest (as root, by the agent); exit code, stdout, stderr."""
        pid = self.call("guest-exec", {"path": argv[0], "arg": argv[1:],
                                       "capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        while True:
            st = self.call("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
                err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
                return int(st.get("exitcode", -1)), out, err
            if time.monotonic() > deadline:
                raise AssertionError(f"{argv} did not finish in the guest within {timeout:.0f}s")
            time.sleep(0.2)

    def sh(self, script: str, timeout: float = 60.0) -> str:
        """Run a shell snippet; its stdout, or AssertionError with its stderr."""
        rc, out, err = self.exec(["/bin/sh", "-c", script], timeout)
        if rc != 0:
            raise AssertionError(f"guest: {script!r} exited {rc}: {err.strip() or out.strip()}")
        return out

    def _send(self, msg: dict[str, Any]) -> None:
        assert self.sock is not None
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def _read_message(self, timeout: float, delimited: bool = False) -> dict[str, Any]:
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        while True:
            if delimited and b"\xff" in self.buf:
                self.buf = self.buf[self.buf.rindex(b"\xff") + 1 :]
                delimited = False
            if not delimited and b"\n" in self.buf:
                line, _, self.buf = self.buf.partition(b"\n")
                line = line.strip()
                if not line:
                    continue
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    continue  # a fragment from before a reboot
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from the guest agent")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise GuestAgentError("the guest agent socket closed")
            self.buf += chunk
