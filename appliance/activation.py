"""The activation page: `GET /` on port 80 hands out an activation key.

Two halves:
- the parameter rules of gateway-behaviour.md section 1 (`parse_params`), shared with the
  local API's POST /v1/activation-key so the console and curl get the same answers;
- a deliberately small HTTP/1.1 server (`ActivationServer`). Port 80 faces whatever network
  the VM sits on, and it only ever needs one request shape, so it is written to be hard to
  tie up: bounded request head, bounded body, a deadline for the whole request, a cap on
  connections, and one request per connection (`Connection: close`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from appliance import regions

log = logging.getLogger("appliance.activation")

GATEWAY_TYPES = ("BACKUP_VM",)
ENDPOINT_TYPES = ("STANDARD", "DUALSTACK")
IP_VERSIONS = ("ipv4", "ipv6")

MAX_HEAD_BYTES = 8192  # request line + headers
MAX_HEADERS = 64
MAX_BODY_BYTES = 1024  # GET carries no body; allow a little, refuse more
REQUEST_DEADLINE = 10.0  # seconds to receive the whole request (slowloris bound)
WRITE_DEADLINE = 10.0
MAX_CONNECTIONS = 256

_DNS_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


class ParamError(Exception):
    """A parameter with a value we do not accept; the message names it and the accepted values."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


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
    if len(name) > 253:
        return False
    labels = name.rstrip(".").split(".")
    return len(labels) >= 2 and all(_DNS_LABEL.match(label) for label in labels)


def parse_params(params: Mapping[str, str | None], no_redirect: bool = False) -> ActivationRequest:
    """Apply section 1's rules. Empty values count as absent; unknown parameters are ignored."""

    def get(name: str) -> str | None:
        value = params.get(name)
        if value is not None and not isinstance(value, str):
            raise ParamError(name, f"{name} must be a string")
        return value or None

    region, fallback = regions.resolve(get("activationRegion"))

    gateway_type = get("gatewayType") or "BACKUP_VM"
    if gateway_type not in GATEWAY_TYPES:
        raise ParamError(
            "gatewayType", f"gatewayType {gateway_type!r} is not accepted; accepted: BACKUP_VM"
        )

    endpoint_type = get("endpointType") or "STANDARD"
    if endpoint_type not in ENDPOINT_TYPES:
        raise ParamError(
            "endpointType",
            f"endpointType {endpoint_type!r} is not accepted; accepted: STANDARD, DUALSTACK "
            "(or leave it out for the standard endpoint)",
        )

    ip_version = get("ipVersion")
    if ip_version is not None:
        if ip_version not in IP_VERSIONS:
            raise ParamError(
                "ipVersion", f"ipVersion {ip_version!r} is not accepted; accepted: ipv4, ipv6"
            )
        if endpoint_type != "DUALSTACK" and ip_version == "ipv6":
            raise ParamError(
                "ipVersion", "ipVersion ipv6 is accepted only with endpointType=DUALSTACK"
            )
    if endpoint_type == "DUALSTACK" and ip_version is None:
        ip_version = "ipv4"

    vpc_endpoint = get("vpcEndpoint")
    if vpc_endpoint is not None and not is_dns_name(vpc_endpoint):
        raise ParamError(
            "vpcEndpoint",
            f"vpcEndpoint {vpc_endpoint[:100]!r} is not accepted; accepted: a DNS name such as "
            "vpce-0123abcd-xyz.backup-gateway.us-west-2.vpce.amazonaws.com",
        )

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


def console_location(req: ActivationRequest, key: str) -> str:
    """The console URL of the 302: the key in the real query string (Terraform and the SDKs
    read `activationKey` from the Location URL's query, not from its #fragment)."""
    region = regions.get(req.region)
    assert region is not None
    query = {"region": req.region, "activationKey": key, "activationRegion": req.region}
    if req.vpc_endpoint:
        query["vpcEndpoint"] = req.vpc_endpoint
    return f"{region.console_url}/backup/home?{urlencode(query, quote_via=quote)}#/gateways/create"


@dataclass(frozen=True)
class KeyResult:
    key: str
    region: str
    expires_at: str | None


class KeyRefused(Exception):
    """The key cannot be issued; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
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
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ActivationServer:
    """The port-80 server: one `GET /` per connection, everything else answered and closed."""

    def __init__(self, issue_key: KeyIssuer) -> None:
        self.issue_key = issue_key
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        remote = peer[0] if isinstance(peer, tuple) else "-"
        if self.connections >= MAX_CONNECTIONS:
            log.warning("event=http_refused reason=too_many_connections remote=%s", remote)
            writer.close()
            return
        self.connections += 1
        try:
            status, headers, body, method, path = await self._respond(reader)
            await self._write(writer, status, headers, body)
            log.info(
                "event=http_request remote=%s method=%s path=%s status=%d",
                remote, method, path, status,
            )
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self.connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _respond(
        self, reader: asyncio.StreamReader
    ) -> tuple[int, dict[str, str], str, str, str]:
        method, path = "-", "-"
        try:
            method, target = await asyncio.wait_for(self._read_request(reader), REQUEST_DEADLINE)
            if target.startswith("/"):  # origin form (the usual)
                path, _, query = target.partition("?")
                path = path.partition("#")[0]
            elif target.lower().startswith(("http://", "https://")):  # absolute form
                split = urlsplit(target)
                path, query = split.path or "/", split.query
            else:
                raise _Reject(400, "malformed request target")
            if path != "/":
                raise _Reject(404, f"not found: {path[:200]}; the activation page is GET /")
            if method != "GET":
                body = f"method {method} not allowed; use GET\n"
                return 405, {"Allow": "GET"}, body, method, path
            return (*await self._activation(query.partition("#")[0]), method, path)
        except _Reject as exc:
            return exc.status, {}, f"{exc}\n", method, path
        except TimeoutError:
            return 408, {}, "request not received in time\n", method, path
        except (ConnectionError, asyncio.IncompleteReadError):
            raise
        except Exception:  # a bug or a failed state write: one line, never a traceback
            log.exception("event=http_error method=%s path=%s", method, path)
            return 500, {}, "internal error; see the appliance log\n", method, path

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, str]:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise _Reject(431, f"request head larger than {MAX_HEAD_BYTES} bytes") from None
        except asyncio.IncompleteReadError as exc:
            if len(exc.partial) >= MAX_HEAD_BYTES:
                raise _Reject(431, f"request head larger than {MAX_HEAD_BYTES} bytes") from None
            raise
        if len(head) > MAX_HEAD_BYTES:
            raise _Reject(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
        try:
            lines = head.decode("latin-1").split("\r\n")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
            raise _Reject(400, "request head is not text") from None
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
            raise _Reject(400, "malformed request line")
        method, target, version = parts
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            raise _Reject(505, "only HTTP/1.0 and HTTP/1.1 are spoken here")
        header_lines = [line for line in lines[1:] if line]
        if len(header_lines) > MAX_HEADERS:
            raise _Reject(431, f"more than {MAX_HEADERS} header fields")
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _Reject(400, "malformed header field")
            headers[name.lower()] = value.strip()
        if "transfer-encoding" in headers:
            raise _Reject(400, "request bodies with Transfer-Encoding are not accepted")
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit():
            raise _Reject(400, "Content-Length must be a number")
        length = int(length_text)
        if length > MAX_BODY_BYTES:
            raise _Reject(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        if length:
            await reader.readexactly(length)
        return method, target

    async def _activation(self, query: str) -> tuple[int, dict[str, str], str]:
        try:
            req = parse_query(query)
        except ParamError as exc:
            return 400, {}, f"{exc}\n"
        try:
            result = await self.issue_key(req)
        except KeyRefused as exc:
            return exc.status, {}, f"{exc}\n"
        if req.no_redirect:
            return 200, {}, f"{result.key}\n"
        location = console_location(req, result.key)
        return 302, {"Location": location}, f"activation key {result.key}: see {location}\n"

    @staticmethod
    async def _write(
        writer: asyncio.StreamWriter, status: int, headers: dict[str, str], body: str
    ) -> None:
        data = body.encode()
        head = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(data)}",
            "Connection: close",
            "Cache-Control: no-store",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data)
        await asyncio.wait_for(writer.drain(), WRITE_DEADLINE)
