"""The local API on a Unix socket (docs/local-api.md): how the console asks the daemon.

A Unix socket rather than a TCP port so that only local users in the socket's group (mode
0660) can reach it; nothing on the network can. Every error is the documented JSON shape,
never aiohttp's HTML pages, so the console can always show `message`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from appliance.activation import (
    ENDPOINT_TYPES,
    KeyIssuer,
    KeyRefused,
    ParamError,
    parse_params,
)
from appliance.localerror import LocalError
from appliance.startup import StartupError
from appliance.upload import UploadResult
from appliance.uploads import UploadRefused
from gatewaycore import regions, safejson

log = logging.getLogger("appliance.localapi")

SOCKET_MODE = 0o660
MAX_BODY = 64 * 1024
PROBE_TIMEOUT = 3.0
ACTIVATION_FIELDS = ("activationRegion", "gatewayType", "endpointType", "ipVersion", "vpcEndpoint")


def error(status: int, code: str, message: str, field: str | None = None,
          **extra: Any) -> web.Response:
    return web.json_response(
        {"error": code, "message": message, "field": field, **extra}, status=status
    )


View = Callable[[], dict[str, Any]]
Uploader = Callable[[str, AsyncIterable[bytes], bool], Awaitable[UploadResult]]


@dataclass(frozen=True)
class Backend:
    """All the local API needs of the daemon, and nothing more.

    The daemon builds it from its parts; the API sees callables, not the daemon, so it can
    neither reach into the daemon's parts nor import the module that composes them (the
    import graph stays one-way: daemon -> localapi).
    """

    status: View  # GET /v1/status
    schedule: View  # GET /v1/schedule
    shaping: View  # GET /v1/shaping
    issue_key: KeyIssuer  # POST /v1/activation-key (the same issuer as port 80)
    upload_refusal: Callable[[str], UploadRefused | None]  # checked before the body is read
    upload: Uploader  # PUT /v1/uploads/{name}: (name, body, replace)
    default_region: Callable[[], str]  # a connectivity test without a region
    clock_stepped: View  # POST /v1/clock-stepped: re-read the wall clock, the new shaping
    control_plane_host: str  # what a connectivity test probes
    control_plane_port: int
    # POST /v1/hypervisor/test: the outcome, or LocalError (409 NotAssociated)
    test_hypervisor: Callable[[], Awaitable[dict[str, Any]]] | None = None
    jobs: View | None = None  # GET /v1/jobs: the backup and restore jobs, running and waiting


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return error(405, "MethodNotAllowed", f"{request.method} not allowed; use {allowed}")
    except web.HTTPNotFound:
        return error(404, "NotFound", f"no such call {request.path}; see docs/local-api.md")
    except web.HTTPRequestEntityTooLarge:
        return error(413, "TooLarge", f"request body larger than {MAX_BODY} bytes")
    except web.HTTPException as exc:
        return error(exc.status, exc.reason.replace(" ", ""), exc.text or exc.reason)
    except Exception:
        log.exception("event=local_api_error path=%s", request.path)
        return error(500, "InternalError", "internal error; see the daemon's log")


async def _json_body(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; ParamError (400, field `body`) for anything else.

    Bytes, not `request.text()`: a body that is not UTF-8 must be a 400, not a decode error.
    """
    try:
        return safejson.loads_object(await request.read())
    except safejson.JsonError as exc:
        raise ParamError("body", f"body must be a JSON object: {exc}") from None


def _replace_param(request: web.Request) -> bool:
    """`?replace=true|false` of an upload; ParamError names the bad parameter."""
    unknown = sorted(set(request.query) - {"replace"})
    if unknown:
        raise ParamError(unknown[0], f"unknown parameter {unknown[0]!r}; only replace=true|false")
    values = request.query.getall("replace", [])
    if len(values) > 1 or (values and values[0] not in ("true", "false")):
        raise ParamError("replace", "replace must be given once, as true or false")
    return bool(values) and values[0] == "true"


async def _continued(request: web.Request) -> Any:
    """The upload body, read only once the control plane has accepted the upload.

    A client that sent `Expect: 100-continue` gets its `100 Continue` here, on the first
    read, so a refusal by the control plane (e.g. AlreadyExists) reaches it before it has
    sent a byte of its body.
    """
    if request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # an error answer may still follow
    async for chunk in request.content.iter_any():
        yield chunk


async def plain_expect(request: web.Request) -> web.StreamResponse | None:
    """aiohttp's default Expect handling, with the JSON error of this API for other values."""
    if request.headers.get("Expect", "").lower() != "100-continue":
        return error(417, "ExpectationFailed", "only 'Expect: 100-continue' is understood",
                     "Expect")
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
    return None


def make_app(backend: Backend) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY)

    async def status(_: web.Request) -> web.Response:
        return web.json_response(backend.status())

    async def activation_key(request: web.Request) -> web.Response:
        try:
            body = await _json_body(request)
            req = parse_params({k: body.get(k) for k in ACTIVATION_FIELDS}, no_redirect=True)
        except ParamError as exc:
            return error(400, "ValidationError", exc.message, exc.param)
        try:
            result = await backend.issue_key(req)
        except KeyRefused as exc:
            return error(exc.status, exc.code, exc.message)
        return web.json_response(
            {
                "activationKey": result.key,
                "region": result.region,
                "regionFallback": req.region_fallback,
                "expiresAt": result.expires_at,
            }
        )

    async def schedule(_: web.Request) -> web.Response:
        return web.json_response(backend.schedule())

    async def shaping(_: web.Request) -> web.Response:
        return web.json_response(backend.shaping())

    async def clock_stepped(_: web.Request) -> web.Response:
        # No body to read: the call only says "the wall clock was just stepped".
        return web.json_response(backend.clock_stepped())

    async def hypervisor_test(_: web.Request) -> web.Response:
        # No body: the stored settings of the associated hypervisor are tested.
        if backend.test_hypervisor is None:
            return error(409, "NotAssociated", "this daemon does not manage hypervisors")
        try:
            return web.json_response(await backend.test_hypervisor())
        except LocalError as exc:
            return error(exc.status, exc.code, exc.message, exc.field)

    async def jobs(_: web.Request) -> web.Response:
        if backend.jobs is None:
            return web.json_response({"running": 0, "waiting": 0, "maxRunning": 0,
                                      "jobs": []})
        return web.json_response(backend.jobs())

    def refused(name: str, exc: UploadRefused) -> web.Response:
        log.warning("event=upload_refused name=%s status=%d error=%s", name[:200], exc.status,
                    exc.code)
        extra = {"existing": exc.existing} if exc.existing is not None else {}
        return error(exc.status, exc.code, exc.message, exc.field, **extra)

    async def upload_expect(request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: refuse a bad name, a bad query or an unactivated gateway
        at once; otherwise go on to `upload`, which sends `100 Continue` only when the
        control plane has accepted the upload too."""
        name = request.match_info["name"]
        refusal = backend.upload_refusal(name)
        if refusal is not None:
            return refused(name, refusal)
        try:
            _replace_param(request)
        except ParamError as exc:
            return error(400, "ValidationError", exc.message, exc.param)
        if request.headers.get("Expect", "").lower() != "100-continue":
            return error(417, "ExpectationFailed", "only 'Expect: 100-continue' is understood",
                         "Expect")
        return None

    async def upload(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            replace = _replace_param(request)
        except ParamError as exc:
            return error(400, "ValidationError", exc.message, exc.param)
        # Streamed: aiohttp's reader stops reading the socket while the shaper holds a piece
        # back, so the local client is slowed to the limit instead of filling memory.
        try:
            result = await backend.upload(name, _continued(request), replace)
        except UploadRefused as exc:
            return refused(name, exc)
        return web.json_response(
            {"name": result.name, "size": result.size, "sha256": result.sha256,
             "seconds": round(result.seconds, 3)},
            status=201,
        )

    async def connectivity(request: web.Request) -> web.Response:
        try:
            body = await _json_body(request)
        except ParamError as exc:
            return error(400, "ValidationError", exc.message, exc.param)
        region_code = body.get("region") or backend.default_region()
        if not isinstance(region_code, str) or regions.get(region_code) is None:
            return error(
                400, "ValidationError",
                f"region {region_code!r} is not an AWS region code (e.g. us-west-2)", "region",
            )
        endpoint_type = body.get("endpointType") or "STANDARD"
        if endpoint_type not in ENDPOINT_TYPES:
            return error(
                400, "ValidationError",
                f"endpointType {endpoint_type!r} is not accepted; accepted: STANDARD, DUALSTACK",
                "endpointType",
            )
        results = await connectivity_test(
            backend.control_plane_host, backend.control_plane_port,
            region_code, endpoint_type,
        )
        return web.json_response({"results": results})

    route(app, "/v1/status", {"GET": status})
    route(app, "/v1/activation-key", {"POST": activation_key})
    route(app, "/v1/schedule", {"GET": schedule})
    route(app, "/v1/shaping", {"GET": shaping})
    route(app, "/v1/connectivity-test", {"POST": connectivity})
    route(app, "/v1/uploads/{name}", {"PUT": upload}, upload_expect)
    route(app, "/v1/clock-stepped", {"POST": clock_stepped})
    route(app, "/v1/hypervisor/test", {"POST": hypervisor_test})
    route(app, "/v1/jobs", {"GET": jobs})

    async def unknown(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    app.router.add_route("*", "/{tail:.*}", unknown, expect_handler=plain_expect)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


def route(app: web.Application, path: str, handlers: dict[str, Handler],
          expect: ExpectHandler = plain_expect) -> None:
    """One path, every method: the 405 and a bad `Expect` are answered in this API's JSON.

    aiohttp answers a wrong method, and an `Expect` on it, before any middleware runs (in
    plain text); routing every method here keeps those answers in the documented shape.
    """
    if "GET" in handlers:
        handlers = {**handlers, "HEAD": handlers["GET"]}

    async def dispatch(request: web.Request) -> web.StreamResponse:
        handler = handlers.get(request.method)
        if handler is None:
            raise web.HTTPMethodNotAllowed(request.method, set(handlers))
        return await handler(request)

    async def on_expect(request: web.Request) -> web.StreamResponse | None:
        if request.method not in handlers:
            return None  # dispatch answers 405 without reading a body
        return await (expect if request.method != "HEAD" else plain_expect)(request)

    app.router.add_route("*", path, dispatch, expect_handler=on_expect)


async def _probe_dns(host: str, port: int) -> tuple[dict[str, Any], list[Any]]:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), PROBE_TIMEOUT
        )
    except TimeoutError:
        return _result("DNS", host, False, f"no answer within {PROBE_TIMEOUT:.0f}s"), []
    except OSError as exc:
        return _result("DNS", host, False, f"lookup failed: {exc.strerror or exc}"), []
    addrs = sorted({info[4][0] for info in infos})
    ms = (time.monotonic() - started) * 1000
    return _result("DNS", host, True, f"{', '.join(addrs)} ({ms:.0f} ms)"), infos


async def _probe_tcp(host: str, port: int, infos: list[Any]) -> dict[str, Any]:
    target = f"{host}:{port}"
    if not infos:
        return _result("TCP", target, False, "skipped: the name did not resolve")
    errors = []
    for family, _kind, proto, _, sockaddr in infos:
        started = time.monotonic()
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(sockaddr[0], sockaddr[1], family=family, proto=proto),
                PROBE_TIMEOUT,
            )
        except TimeoutError:
            errors.append(f"{sockaddr[0]}: no answer within {PROBE_TIMEOUT:.0f}s")
            continue
        except OSError as exc:
            errors.append(f"{sockaddr[0]}: {exc.strerror or exc}")
            continue
        writer.close()
        ms = (time.monotonic() - started) * 1000
        return _result("TCP", target, True, f"connected to {sockaddr[0]} ({ms:.0f} ms)")
    return _result("TCP", target, False, "; ".join(errors))


def _result(
    name: str, target: str, passed: bool, detail: str, probed: bool = True
) -> dict[str, Any]:
    return {"name": name, "target": target, "passed": passed, "detail": detail, "probed": probed}


async def connectivity_test(
    cp_host: str, cp_port: int, region_code: str, endpoint_type: str
) -> list[dict[str, Any]]:
    """Probe the control plane (DNS, then TCP); list the region's AWS endpoint names.

    In this project the control plane URL is the regional endpoint. The AWS host names are
    only probed if the control plane URL is one of them: the appliance must not send traffic
    to a service it is not configured to use.
    """
    dns, infos = await _probe_dns(cp_host, cp_port)
    dns["name"] = "control plane DNS"
    tcp = await _probe_tcp(cp_host, cp_port, infos)
    tcp["name"] = "control plane TCP"
    results = [dns, tcp]
    region = regions.get(region_code)
    assert region is not None
    for role, host in region.endpoint_hosts(endpoint_type).items():
        if host == cp_host:
            results.append({**tcp, "name": f"{role} endpoint", "target": f"{host}:{cp_port}"})
            continue
        results.append(
            _result(
                f"{role} endpoint", f"{host}:443", False,
                "not probed: the control plane URL is used instead of this AWS endpoint",
                probed=False,
            )
        )
    return results


async def start(backend: Backend, path: Path) -> web.AppRunner:
    """Serve the API on `path` (parent created, stale socket removed, mode 0660)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket() or path.is_symlink():
            path.unlink()
    except OSError as exc:
        raise StartupError(f"cannot prepare local_api_socket {path}: {exc.strerror}") from None
    runner = web.AppRunner(make_app(backend), access_log=None, handle_signals=False)
    await runner.setup()
    old_umask = os.umask(0o117)  # no window in which the socket is wider than 0660
    try:
        await web.UnixSite(runner, str(path)).start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"cannot listen on local_api_socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, SOCKET_MODE)
    return runner
