"""Assembles the control plane: state, credentials, the JSON API and the gateway link, on
one aiohttp server. Used by the CLI and, in-process with a fake clock, by the tests.

The listener is hardened in front of aiohttp (GuardedProtocol): every connection is admitted
by a ConnectionGuard (appliance/connguard.py) until its first request head has arrived, so
slow or idle clients cannot hold every file descriptor; that head is buffered here and
bounded in size, so an oversized one gets an answer in the shape of the API it addressed
rather than aiohttp's bare plain-text 400. TLS, when configured, is started only after
admission, so a stalled handshake is bounded by the same guard.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from controlplane import atrest, credentials, gcpolicy, updates
from controlplane.backupops import BackupApi
from controlplane.backupstore import BackupStore
from controlplane.blobstore import BlobStore
from controlplane.clock import Clock, SystemClock
from controlplane.errors import ApiError
from controlplane.joblink import JobLink, JobOps
from controlplane.jobscheduler import JobScheduler, JobTimings
from controlplane.linkops import LinkOps
from controlplane.linkwire import LinkWire
from controlplane.noncelog import NonceLog
from controlplane.operations import TEST_TIMEOUT_SECONDS, BackupGatewayApi
from controlplane.pendingtests import PendingTests
from controlplane.pollhub import PollHub
from controlplane.protocol import CONTENT_TYPE, JsonApi, error_body
from controlplane.restjson import RestJsonApi
from controlplane.store import DB_FILE, Store
from controlplane.throttle import Throttle
from controlplane.updates import UpdateShelf
from controlplane.validation import compile_pattern
from controlplane.vaults import Vaults
from controlplane.vaultsettings import VAULTS_DIR, VaultStoreSettings
from controlplane.walsync import durable_answers
from controlplane.webconsole import WebConsole
from controlplane.webconsole.console import console_base
from gatewaycore.connguard import ConnectionGuard, Ticket, quiet_resource_errors

log = logging.getLogger("controlplane")
NONCES_DIR = "nonces"

MAX_API_BODY = 1 << 20
# A larger socket read buffer lets uploads stream at several Gbit/s over loopback.
READ_BUFSIZE = 1 << 20
SHUTDOWN_TIMEOUT = 5.0
_AIOHTTP = tuple(int(p) for p in aiohttp.__version__.split(".")[:2])

# A first request head is refused above these (botocore's heads are under 2 KiB).
MAX_HEAD_BYTES = 64 * 1024
MAX_HEAD_LINES = 256
# aiohttp's own parser limits sit above ours, so it never meets a first head we let through
# that it would refuse with its bare 400; later heads on a kept-alive connection are bounded
# by these and by the keep-alive timeout (idle time between requests, trickling included).
PARSER_LIMITS = {
    "max_line_size": 2 * MAX_HEAD_BYTES,
    "max_field_size": 2 * MAX_HEAD_BYTES,
    "max_headers": 2 * MAX_HEAD_LINES,
}
KEEPALIVE_TIMEOUT = 15.0
# Generous per address: the gateways of a fleet behind one NAT share an address.
GUARD_MAX_PENDING = 1024
GUARD_PER_ADDRESS = 64
GUARD_HEAD_DEADLINE = 10.0
_HEAD_END = re.compile(rb"\r?\n\r?\n")


def default_guard() -> ConnectionGuard:
    return ConnectionGuard(GUARD_MAX_PENDING, GUARD_PER_ADDRESS, GUARD_HEAD_DEADLINE,
                           name="controlplane")


def tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server context (TLS 1.2+) from PEM files; ssl.SSLError or OSError if unusable."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


class OneLineErrors(logging.Filter):
    """aiohttp's "Error handling request" records as one line, without the traceback.

    A malformed request is the client's doing: a traceback for each would let anyone fill
    the log (and bury real faults), so it is logged at INFO. The type and message are kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            what = record.getMessage()
            record.msg = "event=http_error what=%s error=%s detail=%s"
            record.args = (what, type(exc).__name__, str(exc))
            record.exc_info = None
            record.exc_text = None
            if isinstance(exc, HttpProcessingError):
                record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_ONE_LINE_ERRORS = OneLineErrors()


def head_too_large(head: bytes) -> bytes:
    """A whole HTTP 431 response in the error shape of the API the request line names."""
    line = head.split(b"\n", 1)[0].split()
    path = line[1] if len(line) > 1 else b""
    message = (f"request head larger than {MAX_HEAD_BYTES} bytes or {MAX_HEAD_LINES} lines; "
               "send smaller headers")
    if path.startswith(b"/gateway/"):  # the link's shape (docs/link-protocol.md)
        ctype = "application/json"
        body = json.dumps({"error": "RequestHeaderFieldsTooLarge", "message": message}).encode()
        extra = ""
    else:  # the AWS JSON protocol's shape
        ctype = CONTENT_TYPE
        body = error_body(ApiError("RequestHeaderFieldsTooLargeException", message))
        extra = f"x-amzn-RequestId: {uuid.uuid4()}\r\n"
    return (
        "HTTP/1.1 431 Request Header Fields Too Large\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}"
        "Connection: close\r\n\r\n"
    ).encode() + body


class GuardedProtocol(asyncio.Protocol):
    """aiohttp's RequestHandler behind admission, TLS and a bound on the first head.

    Until the first head is complete its bytes are kept here, not fed to aiohttp, so a head
    over the bound can still be answered by us (nothing reached aiohttp's parser) and the
    connection counts as pending in the guard. After that every call is passed through.
    """

    def __init__(self, handler: asyncio.Protocol, guard: ConnectionGuard,
                 tls: ssl.SSLContext | None, handshaking: set[GuardedProtocol]) -> None:
        self._handler = handler
        self._guard = guard
        self._tls = tls
        self._handshaking = handshaking
        self._ticket: Ticket | None = None
        self._transport: asyncio.Transport | None = None
        self._connected = False  # the handler has had connection_made
        self._head = bytearray()
        self._head_lines = 0
        self._head_done = False
        self._passthrough = False
        self._refused = False
        self._tls_task: asyncio.Task[None] | None = None

    # -- admission and TLS ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._ticket = self._guard.admit(str(peer[0]) if peer else "", transport.abort)
        if self._tls is None:
            self._connect_handler(transport)
            return
        transport.pause_reading()  # the first bytes are the TLS ClientHello: start_tls's
        self._handshaking.add(self)
        self._tls_task = asyncio.get_running_loop().create_task(self._start_tls(transport))

    async def _start_tls(self, raw: asyncio.Transport) -> None:
        assert self._tls is not None
        try:
            tls_transport = await asyncio.get_running_loop().start_tls(
                raw, self, self._tls, server_side=True,
                ssl_handshake_timeout=self._guard.head_deadline,
            )
        except Exception as exc:  # a failed handshake is the client's business: one line
            log.debug("event=tls_handshake_failed error=%s", exc)
            raw.abort()
            self._finish()
            return
        finally:
            self._handshaking.discard(self)
        if tls_transport is None or tls_transport.is_closing():
            self._finish()
            return
        self._transport = tls_transport
        self._connect_handler(tls_transport)

    def _connect_handler(self, transport: asyncio.Transport) -> None:
        self._connected = True
        self._handler.connection_made(transport)
        if self._head_done:  # the head came in with the end of the handshake
            self._forward()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # -- the first request head ----------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._passthrough:
            self._handler.data_received(data)
            return
        if self._refused:
            return
        start = max(0, len(self._head) - 3)
        self._head += data
        if not self._head_done:
            self._scan_head(start, data)
        if self._head_done and self._connected and not self._refused:
            self._forward()

    def _scan_head(self, start: int, data: bytes) -> None:
        """Find the end of the head; refuse it once it is over the bound."""
        end = _HEAD_END.search(self._head, start)
        if end is None:
            self._head_lines += data.count(b"\n")
            if len(self._head) > MAX_HEAD_BYTES or self._head_lines > MAX_HEAD_LINES:
                self._refuse()
            return
        head_len = end.end()
        lines = self._head.count(b"\n", 0, head_len)
        if head_len > MAX_HEAD_BYTES or lines > MAX_HEAD_LINES + 1:
            self._refuse()
            return
        self._head_done = True
        if self._ticket is not None:
            self._ticket.head_received()

    def _forward(self) -> None:
        data, self._head = bytes(self._head), bytearray()
        self._passthrough = True
        self._handler.data_received(data)

    def _refuse(self) -> None:
        self._refused = True
        peer = self._transport.get_extra_info("peername") if self._transport else None
        log.info("event=request_refused reason=head_too_large remote=%s bytes=%d",
                 str(peer[0]) if peer else "-", len(self._head))
        response = head_too_large(bytes(self._head[:4096]))
        self._head = bytearray()
        self._finish()
        if self._transport is not None:
            self._transport.write(response)
            self._transport.close()  # after the response is flushed

    # -- the rest is aiohttp's -----------------------------------------------------------

    def eof_received(self) -> bool | None:
        return self._handler.eof_received() if self._connected else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()
        if self._connected:
            self._connected = False
            self._handler.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._connected:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._connected:
            self._handler.resume_writing()

    def _finish(self) -> None:
        if self._ticket is not None:
            self._ticket.done()


# asyncio accepts up to `backlog` connections per readiness before any is admitted by the
# guard (admission runs in the connection's own callback), so this bounds the descriptors a
# flood can hold beyond the guard's caps for that moment.
ACCEPT_BACKLOG = 64


class GuardedSite(web.SockSite):
    """A SockSite whose connections go through GuardedProtocol (TLS included)."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, guard: ConnectionGuard,
                 ssl_context: ssl.SSLContext | None = None, **kwargs: float) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context, **kwargs)
        self.guard = guard
        self.handshaking: set[GuardedProtocol] = set()

    async def start(self) -> None:
        await super(web.SockSite, self).start()  # BaseSite: registers with the runner
        server = self._runner.server
        assert server is not None

        def factory() -> GuardedProtocol:
            assert server is not None
            return GuardedProtocol(server(), self.guard, self._ssl_context, self.handshaking)

        self._server = await asyncio.get_running_loop().create_server(
            factory, sock=self._sock, backlog=self._backlog
        )

    async def stop(self) -> None:
        await super().stop()
        for proto in list(self.handshaking):  # aiohttp knows only the connected ones
            proto.abort()


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
        guard: ConnectionGuard | None = None,
        hub: PollHub | None = None,
        hypervisor_test_timeout: float = TEST_TIMEOUT_SECONDS,
        job_timings: JobTimings | None = None,
        vault_store: VaultStoreSettings | None = None,
        console_url: str | None = None,
    ) -> None:
        """`clock` is business time (key expiry, last seen); `wall_clock` checks signatures.
        Tests pass their own clock, throttle, guard or hub (one that reports its waiters),
        a short `hypervisor_test_timeout` (how long TestHypervisorConfiguration waits
        for the gateway's answer) and short `job_timings` (the job scheduler's slots,
        lease, takeover deadline and tick). `vault_store`: where the vaults' bytes live
        (controlplane/vaultsettings.py; default the local STATE_DIR/vaults); an S3 bucket
        is checked first (s3store.StorageBackendError when it cannot be used)."""
        self.state_dir = state_dir
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.vault_store = vault_store or VaultStoreSettings()
        self.vault_store.check()
        self.credentials_file = credentials_file or state_dir / credentials.FILE_NAME
        keys, self.credentials_created = credentials.ensure(self.credentials_file)
        self.access_key_id, self.secret_access_key = next(iter(keys.items()))
        self.data_dir = data_dir or state_dir / "data"
        self.clock = clock or SystemClock()
        self.store = Store(state_dir / DB_FILE)
        self.blobs = BlobStore(self.data_dir)
        self.blobs.reconcile(self.store)  # what a crash left half done, before any request
        self.hub = hub or PollHub()
        # The key the hypervisor passwords are encrypted under in the database (0600).
        self.secrets = atrest.SecretsAtRest.load_or_create(state_dir / atrest.KEY_FILE)
        self.hypervisor_tests = PendingTests()
        # Backups (docs/backups.md): the vaults' bytes, the jobs and points in the same
        # database, the scheduler that gives jobs to gateways.
        self.vaults = Vaults(state_dir / VAULTS_DIR, self.secrets,
                             stores=self.vault_store.stores(state_dir),
                             keyring=self.vault_store.keyring(self.secrets, create=True))
        self.vaults.reconcile()  # what a crash left in the vaults, before any request
        self.backups = BackupStore(self.store, self.hub.notify)
        self.scheduler = JobScheduler(self.backups, self.vaults, self.clock, job_timings)
        # Published software update bundles (docs/updates.md): offered in polls, fetched
        # over the link, shown as GetGateway's NextUpdateAvailabilityTime.
        self.updates = UpdateShelf(state_dir / updates.FOLDER)
        self.api = BackupGatewayApi(self.store, self.clock, self._gateway_changed,
                                    secrets_at_rest=self.secrets, tests=self.hypervisor_tests,
                                    test_timeout=hypervisor_test_timeout,
                                    updates=self.updates)
        self.job_ops = JobOps(self.store, self.backups, self.vaults, self.scheduler,
                              self.clock)
        # The link's replay log (noncelog.py): the nonces of the signature window.
        self.nonces = NonceLog(state_dir / NONCES_DIR, now=wall_clock())
        self.link_ops = LinkOps(self.store, self.nonces, self.blobs, self.hub, self.clock,
                                wall_clock,
                                secrets_at_rest=self.secrets, tests=self.hypervisor_tests,
                                jobs=self.job_ops.poll_jobs,
                                on_poll=lambda identity: self.scheduler.polled(
                                    identity.gateway_id),
                                updates=self.updates)
        self.link_ops.housekeep()
        self.link = LinkWire(self.link_ops)
        self.job_link = JobLink(self.link, self.job_ops)
        creds = credentials.CredentialFile(self.credentials_file)
        self.json_api = JsonApi(self.api, creds.secret, wall_clock, throttle)
        self.backup_api = BackupApi(self.store, self.backups, self.vaults, self.scheduler,
                                    self.clock)
        self.rest_api = RestJsonApi(self.backup_api, creds.secret, wall_clock, throttle)
        # The web console (/console, docs/webconsole.md); `console_url` is where gateways
        # send browsers with a key (the console method), else derived from the listener.
        self.console = WebConsole(state_dir, self.api, self.access_key_id, self.backup_api)
        self.console_url = console_url
        self.guard = guard or default_guard()
        self._runner: web.AppRunner | None = None
        # LinkOps.run_housekeeping and gcpolicy.run (docs/fleet.md)
        self._background: list[asyncio.Task[None]] = []
        logging.getLogger("aiohttp.server").addFilter(_ONE_LINE_ERRORS)
        compile_pattern(r"([\p{L}\p{Z}\p{N}_.:/=+\-@]*)")  # build the Unicode tables now

    def _gateway_changed(self, key_id: str) -> None:
        """A backup-gateway call changed a gateway (created, associated, deleted...): wake
        its poll, and let the scheduler look again (its jobs may move, or it may take some)."""
        self.hub.notify(key_id)
        self.scheduler.kick()

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_API_BODY,
                              middlewares=[durable_answers(self.store.wal)])
        app.router.add_routes(self.json_api.routes())  # POST / and the rpcv2Cbor path
        app.router.add_routes(self.link.routes())
        app.router.add_routes(self.job_link.routes())
        app.router.add_routes(self.rest_api.routes())  # AWS Backup (restJson1)
        self.console.install(app)  # the web console under /console
        return app

    async def start(
        self, host: str, port: int, tls: ssl.SSLContext | None = None
    ) -> tuple[str, int]:
        """Listen on host:port (0 = any free port), HTTPS with `tls`; returns the address."""
        self.hub.bind(asyncio.get_running_loop())
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        here = sock.getsockname()  # before any key request: gateways learn the console's URL
        self.link_ops.console_url = self.console.url_for_gateways(
            self.console_url or console_base(here[0], here[1], tls is not None),
            explicit=self.console_url is not None)
        # aiohttp 3.9 moved shutdown_timeout from the site to the runner; Debian 12 has 3.8.
        where = "runner" if _AIOHTTP >= (3, 9) else "site"
        timeout = {"shutdown_timeout": SHUTDOWN_TIMEOUT}
        self._runner = web.AppRunner(
            self.make_app(), access_log=None, handle_signals=False, read_bufsize=READ_BUFSIZE,
            keepalive_timeout=KEEPALIVE_TIMEOUT, **PARSER_LIMITS,
            **(timeout if where == "runner" else {}),
        )
        await self._runner.setup()
        quiet_resource_errors(asyncio.get_running_loop())
        site = GuardedSite(self._runner, sock, self.guard, ssl_context=tls,
                           backlog=ACCEPT_BACKLOG, **(timeout if where == "site" else {}))
        await site.start()
        await self.scheduler.resume_deletes()  # point deletes a crash interrupted
        self.scheduler.start()
        self._background = [asyncio.create_task(self.link_ops.run_housekeeping()),
                            asyncio.create_task(gcpolicy.run())]
        return here[0], here[1]

    async def stop(self) -> None:
        self.hub.close()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background = []
        await self.scheduler.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.vaults.close()
        self.blobs.close()
        self.nonces.close()
        self.store.close()
