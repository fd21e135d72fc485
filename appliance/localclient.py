"""Client of the daemon's local API: HTTP/1.1 over a Unix socket (docs/local-api.md).

One client for the console, the `appliance status` command and the tests. It is stdlib
http.client with a Unix-socket connection: the console is a sequence of blocking prompts, so
a blocking client is the simplest correct one. Every failure becomes ApiError or
ApiUnavailable with a message fit for the screen.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from appliance.localerror import LocalError

DEFAULT_SOCKET = "/run/appliance/api.sock"


class ApiUnavailable(Exception):
    """The daemon could not be reached or answered garbage."""


class ApiError(LocalError):
    """The daemon answered with an error body."""


class UnixHTTPConnection(http.client.HTTPConnection):
    """An http.client connection to a Unix socket instead of a TCP port."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class LocalApi:
    def __init__(self, socket_path: str = DEFAULT_SOCKET) -> None:
        self.socket_path = socket_path

    def _call(self, method: str, path: str, body: dict | None = None,
              timeout: float = 10.0) -> dict[str, Any]:
        conn = UnixHTTPConnection(self.socket_path, timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except FileNotFoundError:
            raise ApiUnavailable(
                f"the appliance daemon is not running (no socket at {self.socket_path})"
            ) from None
        except TimeoutError:
            raise ApiUnavailable(f"the appliance daemon did not answer within {timeout:g} s") \
                from None
        except (OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise ApiUnavailable(f"cannot talk to the appliance daemon: {reason}") from None
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            raise ApiUnavailable(f"the daemon answered {resp.status} with a body that is "
                                 "not JSON") from None
        if resp.status >= 400:
            if not isinstance(data, dict):
                data = {}
            existing = data.get("existing")
            raise ApiError(resp.status, str(data.get("error", f"HTTP{resp.status}")),
                           str(data.get("message", resp.reason)), data.get("field"),
                           existing if isinstance(existing, dict) else None)
        if not isinstance(data, dict):
            raise ApiUnavailable("the daemon answered with an unexpected body")
        return data

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/v1/status", timeout=5.0)

    def activation_key(self, **params: str | None) -> dict[str, Any]:
        body = {k: v for k, v in params.items() if v is not None}
        return self._call("POST", "/v1/activation-key", body, timeout=40.0)

    def connectivity_test(self, region: str | None, endpoint_type: str | None) -> dict[str, Any]:
        body = {k: v for k, v in (("region", region), ("endpointType", endpoint_type)) if v}
        return self._call("POST", "/v1/connectivity-test", body, timeout=90.0)

    def schedule(self) -> dict[str, Any]:
        return self._call("GET", "/v1/schedule", timeout=5.0)

    def shaping(self) -> dict[str, Any]:
        return self._call("GET", "/v1/shaping", timeout=5.0)

    def clock_stepped(self) -> dict[str, Any]:
        """Tell the daemon the wall clock was just stepped, so its shaper re-reads it now."""
        return self._call("POST", "/v1/clock-stepped", timeout=5.0)

    def test_hypervisor(self) -> dict[str, Any]:
        """Test the associated hypervisor now: `{"ok", "errorCode", "message", ...}`.

        The daemon's connector gives up after 20 s per step; the timeout leaves room for it.
        """
        return self._call("POST", "/v1/hypervisor/test", timeout=90.0)
