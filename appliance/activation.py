"""The activation page: `GET /` on port 80 hands out an activation key.

Two halves:
- the parameter rules of gateway-behaviour.md section 1 (`parse_params`), shared with the
  local API's POST /v1/activation-key so the console and curl get the same answers;
- a deliberately small HTTP/1.1 server (`ActivationServer`). Port 80 faces whatever network
  the VM sits on, and it only ever needs one request shape, so it is written to be hard to
  tie up: bounded request head and body, one request per connection (`Connection: close`),
  strict parsing (every malformed head is a 4xx, never the 500 path), and incomplete requests
  admitted by `gatewaycore.connguard` (a deadline from connect that trickled bytes do not
  extend, a per-address cap, the oldest evicted first) so slow clients cannot keep a real
  one out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from gatewaycore import regions, rules
from gatewaycore.connguard import ConnectionGuard

# ENDPOINT_TYPES is re-exported for the local API; it is defined once, in gatewaycore.rules.
from gatewaycore.rules import ENDPOINT_TYPES as ENDPOINT_TYPES
from gatewaycore.rules import RuleError

log = logging.getLogger("appliance.activation")

# --- port 80 limits ------------------------------------------------------------------------
# A real client (curl, a browser, an SDK) sends its whole request in one segment within
# milliseconds: these are generous for it and small for a client that idles on purpose.
MAX_HEAD_BYTES = 8192  # request line + headers: a browser's GET / is well under 2 KB
MAX_HEADERS = 64
MAX_BODY_BYTES = 1024  # GET carries no body; allow a little, refuse more
# Seconds from connect until the whole request (head and body) has arrived; trickled bytes do
# not extend it. 5 s leaves a real client on a lossy link room for a few retransmissions and
# is all a slow client can hold a slot for.
REQUEST_DEADLINE = 5.0
# Incomplete requests in all: each costs a task and up to 2 x MAX_HEAD_BYTES of buffer, so
# 256 is a few MB. When full the oldest goes, never the newcomer (gatewaycore.connguard).
MAX_PENDING = 256
# Incomplete requests per IPv4 address / IPv6 /64: past it, a newcomer evicts that address's
# own oldest, so a slow client at one address only ever competes with itself. A browser holds
# up to 6 (plus idle preconnects), but a site behind one NAT or a test harness holds dozens;
# a quarter of MAX_PENDING still takes four such addresses to fill the table.
MAX_PENDING_PER_ADDRESS = 64
# Requests received and being answered at once (each may wait for the control plane to issue
# a key): bounds the key requests a flood can have in flight; beyond it the answer is 503.
MAX_SERVING = 64
WRITE_DEADLINE = 10.0  # a response is under 1 KB: the kernel takes it unless the peer is gone


class ParamError(Exception):
    """A parameter with a value we do not accept; the message names it and the accepted values."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True)
class ActivationRequest:
    region: str
    region_fallback: bool  # activationRegion was missing/empty/unknown: us-east-1 was used
    endpoint_type: str = "STANDARD"
    ip_version: str | None = None
    vpc_endpoint: str | None = None
    gateway_type: str = "BACKUP_VM"
    no_redirect: bool = False


def is_dns_name(name: str) -> bool:
    """Whether `name` is what `vpcEndpoint` accepts (gatewaycore.rules.dns_name)."""
    try:
        rules.dns_name(name)
    except RuleError:
        return False
    return True


# What port 80 adds to a rule's message: this parameter may be left out altogether.
_ABSENT_HINTS = {
    "endpointType": " (or leave it out for the standard endpoint)",
}


def _checked(rule: Callable[[str, str], str], name: str, value: str) -> str:
    """`value` as `rule` accepts it; its RuleError as a ParamError of the same field and
    message, in the shape port 80 has always answered: `NAME 'VALUE' is not accepted; ...`."""
    try:
        return rule(value, name)
    except RuleError as exc:
        hint = _ABSENT_HINTS.get(exc.field, "")
        raise ParamError(exc.field, f"{exc.field} {exc.message}{hint}") from None


def parse_params(params: Mapping[str, str | None], no_redirect: bool = False) -> ActivationRequest:
    """Apply section 1's rules. Empty values count as absent; unknown parameters are ignored.

    Each value is checked by its rule in gatewaycore.rules, the same one the console asks
    before it sends the request here, so the console never collects an answer that this
    refuses. Only the rule between two parameters (ipv6 needs DUALSTACK) is port 80's own."""

    def get(name: str) -> str | None:
        value = params.get(name)
        if value is not None and not isinstance(value, str):
            raise ParamError(name, f"{name} must be a string")
        return value or None

    region, fallback = regions.resolve(get("activationRegion"))
    gateway_type = _checked(rules.gateway_type, "gatewayType", get("gatewayType") or "BACKUP_VM")
    endpoint_type = _checked(
        rules.endpoint_type, "endpointType", get("endpointType") or "STANDARD"
    )

    ip_version = get("ipVersion")
    if ip_version is not None:
        ip_version = _checked(rules.ip_version, "ipVersion", ip_version)
        if endpoint_type != "DUALSTACK" and ip_version == "ipv6":
            raise ParamError(
                "ipVersion", "ipVersion ipv6 is accepted only with endpointType=DUALSTACK"
            )
    if endpoint_type == "DUALSTACK" and ip_version is None:
        ip_version = "ipv4"

    vpc_endpoint = get("vpcEndpoint")
    if vpc_endpoint is not None:
        vpc_endpoint = _checked(rules.dns_name, "vpcEndpoint", vpc_endpoint)

    return ActivationRequest(
        region=region.code,
        region_fallback=fallback,
        endpoint_type=endpoint_type,
        ip_version=ip_version,
        vpc_endpoint=vpc_endpoint,
        gateway_type=gateway_type,
        no_redirect=no_redirect,
    )


def parse_query(query: str) -> ActivationRequest:
    """Parse the query string of `GET /`; the first occurrence of a repeated parameter wins."""
    params: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        params.setdefault(name, value)
    return parse_params(params, no_redirect="no_redirect" in params)


def console_location(req: ActivationRequest, key: str, console_url: str | None = None) -> str:
    """The console URL of the 302: the key in the real query string (Terraform and the SDKs
    read `activationKey` from the Location URL's query, not from its #fragment).

    `console_url` is the control plane's web console when it sent one with the key (the
    console method lands there); only the scheme, host and base path change: the path,
    query and fragment keep the AWS console's format."""
    region = regions.get(req.region)
    assert region is not None
    base = console_url or region.console_url
    query = {"region": req.region, "activationKey": key, "activationRegion": req.region}
    if req.vpc_endpoint:
        query["vpcEndpoint"] = req.vpc_endpoint
    return f"{base}/backup/home?{urlencode(query, quote_via=quote)}#/gateways/create"


@dataclass(frozen=True)
class KeyResult:
    key: str
    region: str
    expires_at: str | None
    console_url: str | None = None  # the control plane's web console, if it named one


class KeyRefused(Exception):
    """The key cannot be issued; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


KeyIssuer = Callable[[ActivationRequest], Awaitable[KeyResult]]

_REASONS = {
    200: "OK",
    302: "Found",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    410: "Gone",
    413: "Content Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

# RFC 9110 token (method, header name); the request line is printable ASCII with single spaces.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rf"({_TOKEN}) ([!-~]+) (HTTP/[0-9]\.[0-9])")
_PRINTABLE_ASCII = re.compile(r"[ -~]*")
_HEADER_NAME = re.compile(_TOKEN)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # any control character but HTAB
# ASCII digits only: str.isdigit() accepts '²' (which int() refuses) and int() of thousands of
# digits raises; ten digits is far above MAX_BODY_BYTES and far below either problem.
_CONTENT_LENGTH = re.compile(r"[0-9]{1,10}")

TOO_SLOW = (
    f"request not received in time: the whole request must arrive within "
    f"{REQUEST_DEADLINE:g}s of connecting, and the oldest incomplete requests are closed first "
    "when more arrive\n"
)


class _Reject(Exception):
    """A request we answer with a 4xx (or 505): `str(exc)` is the one-line body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class _Request:
    method: str
    target: str


@dataclass(frozen=True)
class _Answer:
    status: int
    body: str
    headers: Mapping[str, str] = field(default_factory=dict)
    method: str = "-"
    path: str = "-"


def _parse_head(head: bytes) -> tuple[_Request, int]:
    """The request line and the body length of a complete head (ending in CRLF CRLF).

    Every rule that a head can break raises `_Reject` here, so no input reaches the server's
    generic error path.
    """
    if len(head) > MAX_HEAD_BYTES:
        raise _Reject(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
    lines = head.decode("latin-1").split("\r\n")  # latin-1 maps every byte: never raises
    request = _request_line(lines[0])
    fields = [line for line in lines[1:] if line]
    if len(fields) > MAX_HEADERS:
        raise _Reject(431, f"more than {MAX_HEADERS} header fields")
    headers: dict[str, list[str]] = {}
    for line in fields:
        name, sep, value = line.partition(":")
        if not sep or not _HEADER_NAME.fullmatch(name) or _CONTROL.search(value):
            raise _Reject(400, "malformed header field")
        headers.setdefault(name.lower(), []).append(value.strip(" \t"))
    if "transfer-encoding" in headers:
        raise _Reject(400, "request bodies with Transfer-Encoding are not accepted")
    return request, _content_length(headers.get("content-length", ["0"]))


def _request_line(line: str) -> _Request:
    if not _PRINTABLE_ASCII.fullmatch(line):
        raise _Reject(400, "malformed request line: control or non-ASCII characters")
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise _Reject(400, "malformed request line")
    method, target, version = match.groups()
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _Reject(505, "only HTTP/1.0 and HTTP/1.1 are spoken here")
    return _Request(method, target)


def _content_length(values: list[str]) -> int:
    if len(set(values)) != 1 or not _CONTENT_LENGTH.fullmatch(values[0]):
        raise _Reject(400, "Content-Length must be one number of at most 10 ASCII digits")
    length = int(values[0])
    if length > MAX_BODY_BYTES:
        raise _Reject(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    return length


def _split_target(target: str) -> tuple[str, str]:
    """(path, query) of an origin-form (`/?q`) or absolute-form (`http://h/?q`) target."""
    if target.startswith("/"):
        path, _, query = target.partition("?")
        return path.partition("#")[0], query.partition("#")[0]
    if target.lower().startswith(("http://", "https://")):
        try:
            split = urlsplit(target)
        except ValueError:  # e.g. `http://[::1/`: an unclosed IPv6 literal
            raise _Reject(400, "malformed request target") from None
        return split.path or "/", split.query
    raise _Reject(400, "malformed request target")


def _render(status: int, headers: Mapping[str, str], body: str) -> bytes:
    """A whole response: plain text, one request per connection."""
    data = body.encode()
    head = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(data)}",
        "Connection: close",
        "Cache-Control: no-store",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data


def _close_incomplete(transport: asyncio.WriteTransport) -> None:
    """The guard's close for an incomplete request: say why (408), then close.

    A real client that was merely slow learns what happened; the answer is one small write
    into an empty socket buffer, so it costs a slow client's sender nothing to hold. If the
    kernel did not take it at once, the connection is aborted rather than left waiting.
    """
    if transport.is_closing():
        return
    transport.write(_render(408, {}, TOO_SLOW))
    if transport.get_write_buffer_size():
        transport.abort()
    else:
        transport.close()


def _remote(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) else "-"


class ActivationServer:
    """The port-80 server: one `GET /` per connection, everything else answered and closed.

    A connection is admitted by a `ConnectionGuard` while its request is incomplete (the
    slowloris bound: deadline from connect, per-address cap, oldest evicted first), and counts
    against MAX_SERVING once its request has arrived and is being answered.
    """

    def __init__(self, issue_key: KeyIssuer, guard: ConnectionGuard | None = None) -> None:
        self.issue_key = issue_key
        self.guard = guard or ConnectionGuard(
            max_pending=MAX_PENDING, per_address=MAX_PENDING_PER_ADDRESS,
            head_deadline=REQUEST_DEADLINE, name="activation",
        )
        self.serving = 0

    async def serve(self, sock: socket.socket) -> asyncio.Server:
        """Answer on a listening socket. The stream limit is the head limit, so a head that
        never ends is refused (431) without buffering more than about twice that."""
        return await asyncio.start_server(
            self.handle, sock=sock, limit=MAX_HEAD_BYTES, start_serving=True
        )

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        remote = _remote(writer)
        ticket = self.guard.admit(remote, functools.partial(_close_incomplete, writer.transport))
        try:
            try:
                received: _Request | _Reject = await self._receive(reader)
            except _Reject as exc:
                received = exc
            if ticket.evicted:  # closed (and answered 408) by the guard meanwhile
                return
            ticket.head_received()
            answer = await self._answer_within_cap(received)
            writer.write(_render(answer.status, answer.headers, answer.body))
            await asyncio.wait_for(writer.drain(), WRITE_DEADLINE)
            log.info(
                "event=http_request remote=%s method=%s path=%s status=%d",
                remote, answer.method, answer.path, answer.status,
            )
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away (or was evicted) or stopped reading: no one to answer
        finally:
            ticket.done()
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    @staticmethod
    async def _receive(reader: asyncio.StreamReader) -> _Request:
        """Read the head and its (small, ignored) body; no deadline here: the guard's applies."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise _Reject(431, f"request head larger than {MAX_HEAD_BYTES} bytes") from None
        except asyncio.IncompleteReadError as exc:
            if len(exc.partial) >= MAX_HEAD_BYTES:
                raise _Reject(431, f"request head larger than {MAX_HEAD_BYTES} bytes") from None
            raise
        request, length = _parse_head(head)
        if length:
            await reader.readexactly(length)
        return request

    async def _answer_within_cap(self, received: _Request | _Reject) -> _Answer:
        if self.serving >= MAX_SERVING:
            log.warning("event=http_busy serving=%d", self.serving)
            return _Answer(503, "too many requests in progress; try again in a few seconds\n")
        self.serving += 1
        try:
            return await self._answer(received)
        finally:
            self.serving -= 1

    async def _answer(self, received: _Request | _Reject) -> _Answer:
        if isinstance(received, _Reject):
            return _Answer(received.status, f"{received}\n")
        method = received.method
        try:
            path, query = _split_target(received.target)
        except _Reject as exc:
            return _Answer(exc.status, f"{exc}\n", method=method)
        if path != "/":
            body = f"not found: {path[:200]}; the activation page is GET /\n"
            return _Answer(404, body, method=method, path=path)
        if method != "GET":
            body = f"method {method} not allowed; use GET\n"
            return _Answer(405, body, {"Allow": "GET"}, method, path)
        try:
            status, headers, body = await self._activation(query)
        except Exception:  # a bug or a failed state write: never input (_parse_head's rules)
            log.exception("event=http_error method=%s path=%s", method, path)
            status, headers, body = 500, {}, "internal error; see the appliance log\n"
        return _Answer(status, body, headers, method, path)

    async def _activation(self, query: str) -> tuple[int, dict[str, str], str]:
        try:
            req = parse_query(query)
        except ParamError as exc:
            return 400, {}, f"{exc}\n"
        try:
            result = await self.issue_key(req)
        except KeyRefused as exc:
            return exc.status, {}, f"{exc.message}\n"
        if req.no_redirect:
            return 200, {}, f"{result.key}\n"
        location = console_location(req, result.key, result.console_url)
        return 302, {"Location": location}, f"activation key {result.key}: see {location}\n"
