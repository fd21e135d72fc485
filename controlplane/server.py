"""Assembles the control plane: state, credentials, the JSON API and the gateway link, on
one aiohttp server. Used by the CLI and, in-process with a fake clock, by the tests.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from controlplane import credentials
from controlplane.clock import Clock, SystemClock
from controlplane.gatewaylink import GatewayLink, PollHub
from controlplane.operations import BackupGatewayApi
from controlplane.protocol import JsonApi
from controlplane.store import DB_FILE, Store
from controlplane.throttle import Throttle
from controlplane.validation import compile_pattern

log = logging.getLogger("controlplane")

MAX_API_BODY = 1 << 20
# A larger socket read buffer lets uploads stream at several Gbit/s over loopback.
READ_BUFSIZE = 1 << 20
SHUTDOWN_TIMEOUT = 5.0
_AIOHTTP = tuple(int(p) for p in aiohttp.__version__.split(".")[:2])


class ControlPlane:
    """One control plane instance over a state directory."""

    def __init__(
        self,
        state_dir: Path,
        credentials_file: Path | None = None,
        data_dir: Path | None = None,
        clock: Clock | None = None,
        wall_clock: Callable[[], float] = time.time,
        throttle: Throttle | None = None,
    ) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.credentials_file = credentials_file or state_dir / credentials.FILE_NAME
        keys, self.credentials_created = credentials.ensure(self.credentials_file)
        self.access_key_id, self.secret_access_key = next(iter(keys.items()))
        self.data_dir = data_dir or state_dir / "data"
        self.clock = clock or SystemClock()
        self.store = Store(state_dir / DB_FILE)
        self.hub = PollHub()
        self.api = BackupGatewayApi(self.store, self.clock, self.hub.notify)
        self.link = GatewayLink(self.store, self.clock, self.hub, self.data_dir, wall_clock)
        creds = credentials.CredentialFile(self.credentials_file)
        self.json_api = JsonApi(self.api, creds.secret, wall_clock, throttle)
        self._runner: web.AppRunner | None = None
        compile_pattern(r"([\p{L}\p{Z}\p{N}_.:/=+\-@]*)")  # build the Unicode tables now

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_API_BODY)
        app.router.add_post("/", self.json_api.handle)
        app.router.add_routes(self.link.routes())
        return app

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (0 = any free port); returns the address actually bound."""
        self.hub.bind(asyncio.get_running_loop())
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        # aiohttp 3.9 moved shutdown_timeout from the site to the runner; Debian 12 has 3.8.
        where = "runner" if _AIOHTTP >= (3, 9) else "site"
        timeout = {"shutdown_timeout": SHUTDOWN_TIMEOUT}
        self._runner = web.AppRunner(
            self.make_app(), access_log=None, handle_signals=False, read_bufsize=READ_BUFSIZE,
            **(timeout if where == "runner" else {}),
        )
        await self._runner.setup()
        await web.SockSite(self._runner, sock, **(timeout if where == "site" else {})).start()
        bound = sock.getsockname()
        return bound[0], bound[1]

    async def stop(self) -> None:
        self.hub.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.store.close()
