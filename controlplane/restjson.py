"""The AWS Backup API (service `backup`) on the wire: restJson1, as the real AWS CLI and boto3
speak it with `--endpoint-url`.

Shaped like protocol.py (the `backup-gateway` API), which explains the replay rule: this
module knows HTTP, authenticates with SigV4 (signing name `backup`), throttles per access
key, binds and validates the input against the model table (backupmodel.py) and hands a
plain dict keyed by the model's member names to one function per operation
(`api.operations[op](caller, params)`, backupops.py), which knows nothing of the wire.

restJson1 differs from AWS JSON 1.0 in where the operation and its input are: the method and
the path name the operation (one aiohttp route per modelled method and URI template); input
members travel as URI labels (percent-encoded, `/` included, since botocore encodes a label
with no safe characters), query parameters (strings: integers, booleans and ISO 8601
timestamps are converted here) or JSON body members. Errors carry their name in the header
`x-amzn-ErrorType` (what botocore reads first for `Error.Code`) and the error shape's
members (`Code`, `Message`) in a JSON body, with the status the `backup` model gives the
shape (errors.BACKUP_ERROR_STATUS).

Which error for which bad input follows the model's own descriptions: a required member
missing is MissingParameterValueException; a member of the wrong type, or one the operation
does not have, InvalidRequestException ("a parameter is of the wrong type"); a value outside
its range, length, pattern or enum, InvalidParameterValueException. One call reports every
problem it has, under the code of the first kind in that order.
"""

from __future__ import annotations

import email.utils
import inspect
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_to_bytes

from aiohttp import web

from controlplane import sigv4
from controlplane.apiauth import signed_caller
from controlplane.backupmodel import (
    OPERATIONS,
    READ_ONLY,
    SERVICE_PREFIXES,
    SHAPES,
    SIGNING_NAME,
    STRICTER,
)
from controlplane.errors import ApiError, backup_status
from controlplane.throttle import Throttle
from controlplane.validation import compile_pattern
from gatewaycore import safejson

log = logging.getLogger("controlplane.api")

CONTENT_TYPE = "application/json"
_ACCEPTED_TYPES = {
    CONTENT_TYPE, "application/x-amz-json-1.0", "application/x-amz-json-1.1", "",
}
MAX_BODY = 1 << 20  # as the JSON API (server.MAX_API_BODY)
# Errors of the wire itself whose restJson1 status differs from the JSON API's.
_WIRE_STATUS = {"UnknownOperationException": 404, "UnsupportedMediaTypeException": 415}
MISSING = "MissingParameterValueException"
WRONG_TYPE = "InvalidRequestException"
BAD_VALUE = "InvalidParameterValueException"
_PRIORITY = (MISSING, WRONG_TYPE, BAD_VALUE)
MAX_SHOWN = 10  # problems spelled out in one message
# The model's shapes with this server's own stricter limits (backupmodel.STRICTER) merged.
_SHAPES: dict[str, dict[str, Any]] = {n: {**s, **STRICTER.get(n, {})} for n, s in SHAPES.items()}
_INT_RANGE = {"integer": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
_SURROGATE = re.compile("[\ud800-\udfff]")
_LABEL = re.compile(r"\{(\w+)(\+?)\}")


@dataclass(frozen=True)
class Route:
    """One operation's method and URI template; `pattern` matches the raw (percent-encoded)
    path, one named group per label."""

    op: str
    method: str
    template: str
    aiohttp_path: str
    pattern: re.Pattern[str]
    status: int
    input: str
    output: str | None


def compile_route(op: str) -> Route:
    spec = OPERATIONS[op]
    regex: list[str] = []
    aio: list[str] = []
    for segment in spec["uri"].split("/"):
        label = _LABEL.fullmatch(segment)
        if label is None:
            regex.append(re.escape(segment))
            aio.append(segment)
            continue
        name, greedy = label.groups()
        regex.append(f"(?P<{name}>{'.+' if greedy else '[^/]+'})")
        aio.append("{" + name + (":.+" if greedy else "") + "}")
    return Route(op, spec["method"], spec["uri"], "/".join(aio), re.compile("/".join(regex)),
                 spec["status"], spec["input"], spec["output"])


ROUTES: tuple[Route, ...] = tuple(compile_route(op) for op in OPERATIONS)


class Problems:
    """The broken constraints of one request, each with the error code of its kind."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, code: str, message: str) -> None:
        self.items.append((code, message))

    def raise_any(self) -> None:
        if not self.items:
            return
        code = min((c for c, _ in self.items), key=_PRIORITY.index)
        count = len(self.items)
        noun = "error" if count == 1 else "errors"
        text = "; ".join(m for _, m in self.items[:MAX_SHOWN])
        if count > MAX_SHOWN:  # a body of 100,000 bad items gets a message, not a megabyte
            text += f"; and {count - MAX_SHOWN} more"
        raise ApiError(code, f"{count} validation {noun} detected: {text}")


def _show(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


_KIND_NAMES = {
    "string": "a string", "integer": "an integer", "long": "an integer",
    "boolean": "a boolean", "timestamp": "a timestamp (epoch seconds)",
    "structure": "an object", "list": "a list", "map": "an object (a map)",
    "double": "a number", "float": "a number",
}


def check(value: Any, shape_name: str, path: str, problems: Problems,
          secret: bool = False) -> Any:
    """Record each constraint `value` breaks (`path` names the member); returns the value,
    timestamps as float epoch seconds. `secret`: inside a sensitive shape, echo nothing."""
    shape = _SHAPES[shape_name]
    kind = shape["type"]
    secret = secret or bool(shape.get("sensitive"))
    shown = "" if secret else f" '{_show(value)}'"
    fail = f"Value{shown} at '{path}' failed to satisfy constraint: Member must"
    wrong = f"Value at '{path}' must be {_KIND_NAMES.get(kind, kind)}"
    if kind == "string":
        if not isinstance(value, str) or _SURROGATE.search(value):
            problems.add(WRONG_TYPE, wrong + (" of valid Unicode" if isinstance(value, str)
                                              else ""))
            return value
        if "enum" in shape and value not in shape["enum"]:
            problems.add(BAD_VALUE, f"{fail} satisfy enum value set: [{', '.join(shape['enum'])}]")
        if "min" in shape and len(value) < shape["min"]:
            problems.add(BAD_VALUE, f"{fail} have length greater than or equal to {shape['min']}")
        if "max" in shape and len(value) > shape["max"]:
            problems.add(BAD_VALUE, f"{fail} have length less than or equal to {shape['max']}")
        if "pattern" in shape and not compile_pattern(shape["pattern"]).fullmatch(value):
            problems.add(BAD_VALUE, f"{fail} satisfy regular expression pattern: "
                                    f"{shape['pattern']}")
    elif kind in _INT_RANGE:
        lo, hi = shape.get("min", _INT_RANGE[kind][0]), shape.get("max", _INT_RANGE[kind][1])
        if not isinstance(value, int) or isinstance(value, bool):
            problems.add(WRONG_TYPE, wrong)
        elif value < lo:
            problems.add(BAD_VALUE, f"{fail} have value greater than or equal to {lo}")
        elif value > hi:
            problems.add(BAD_VALUE, f"{fail} have value less than or equal to {hi}")
    elif kind == "boolean":
        if not isinstance(value, bool):
            problems.add(WRONG_TYPE, wrong)
    elif kind in ("timestamp", "double", "float"):
        if not isinstance(value, int | float) or isinstance(value, bool) \
                or not math.isfinite(value):
            problems.add(WRONG_TYPE, wrong)
            return value
        return float(value)
    elif kind == "structure":
        return _check_structure(value, shape, path, problems, secret)
    elif kind == "list":
        if not isinstance(value, list):
            problems.add(WRONG_TYPE, wrong)
            return value
        _check_count(len(value), shape, path, problems)
        return [check(v, shape["member"], f"{path}[{i}]", problems, secret)
                for i, v in enumerate(value)]
    elif kind == "map":
        if not isinstance(value, dict):
            problems.add(WRONG_TYPE, wrong)
            return value
        _check_count(len(value), shape, path, problems)
        out = {}
        for key, item in value.items():
            check(key, shape["key"], f"{path} (a key)", problems, secret)
            out[key] = check(item, shape["value"], f"{path}.{key}" if not secret
                             else f"{path} (a value)", problems, secret)
        return out
    return value


def _check_count(count: int, shape: dict[str, Any], path: str, problems: Problems) -> None:
    if "min" in shape and count < shape["min"]:
        problems.add(BAD_VALUE, f"Value at '{path}' must have at least {shape['min']} items")
    if "max" in shape and count > shape["max"]:
        problems.add(BAD_VALUE, f"Value at '{path}' must have at most {shape['max']} items")


def _check_structure(value: Any, shape: dict[str, Any], path: str, problems: Problems,
                     secret: bool) -> Any:
    if not isinstance(value, dict):
        problems.add(WRONG_TYPE, f"Value at '{path}' must be an object")
        return value
    members: dict[str, dict[str, Any]] = shape.get("members", {})
    for name in shape.get("required", []):
        if value.get(name) is None:
            problems.add(MISSING, f"Value null at '{_join(path, name)}' failed to satisfy "
                                  "constraint: Member must not be null")
    out = {}
    for name, item in value.items():
        if name not in members:
            problems.add(WRONG_TYPE, f"'{_show(_join(path, name))}' is not a member of "
                                     f"{path or 'the input'}; accepted: {', '.join(members)}")
        elif item is not None:
            out[name] = check(item, members[name]["shape"], _join(path, name), problems, secret)
    return out


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _decode(raw: str) -> str | None:
    """A percent-encoded URI part as text; None if it is not UTF-8."""
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None


def parse_time(text: str, fmt: str) -> float | None:
    """A timestamp from the query string or a header, as float epoch seconds; None when it
    is not in `fmt` (the member's timestampFormat; restJson1's default there is ISO 8601)."""
    try:
        if fmt == "unixTimestamp":
            value = float(text)
            return value if math.isfinite(value) else None
        if fmt == "rfc822":
            return email.utils.parsedate_to_datetime(text).timestamp()
        moment = datetime.fromisoformat(text)
    except (ValueError, TypeError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


_TIME_FORMATS = {
    "iso8601": "ISO 8601 (2024-05-01T12:00:00Z)",
    "unixTimestamp": "epoch seconds",
    "rfc822": "an HTTP date",
}


def from_query(text: str, member: dict[str, Any], name: str, problems: Problems) -> Any:
    """A query parameter's text as the member's type; the raw text if it is not one."""
    shape = _SHAPES[member["shape"]]
    kind = shape["type"]
    where = f"Value '{_show(text)}' at '{name}' (query parameter {member['locationName']})"
    if kind in _INT_RANGE:
        if re.fullmatch(r"-?[0-9]{1,20}", text):
            return int(text)
        problems.add(WRONG_TYPE, f"{where} must be an integer")
    elif kind == "boolean":
        if text in ("true", "false"):
            return text == "true"
        problems.add(WRONG_TYPE, f"{where} must be true or false")
    elif kind == "timestamp":
        fmt = member.get("timestampFormat", shape.get("timestampFormat", "iso8601"))
        value = parse_time(text, fmt)
        if value is not None:
            return value
        problems.add(WRONG_TYPE, f"{where} must be a timestamp in {_TIME_FORMATS.get(fmt, fmt)}")
    elif kind in ("double", "float"):
        try:
            return float(text)
        except ValueError:
            problems.add(WRONG_TYPE, f"{where} must be a number")
    elif kind != "string":  # lists and maps in a query string: none in this table
        problems.add(WRONG_TYPE, f"{where}: a {kind} is not accepted in the query string")
    return text


def parse_query(raw_query: str, problems: Problems) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for part in raw_query.split("&") if raw_query else []:
        if not part:
            continue
        raw_key, _, raw_value = part.partition("=")
        key, value = _decode(raw_key), _decode(raw_value)
        if key is None or value is None:
            problems.add(WRONG_TYPE, f"query parameter '{_show(raw_key)}' is not UTF-8 "
                                     "percent-encoded")
            continue
        out.setdefault(key, []).append(value)
    return out


def bind(route: Route, raw_path: str, raw_query: str, body: bytes,
         content_type: str) -> dict[str, Any]:
    """The operation's input from the URI labels, the query string and the JSON body, keyed
    by member name and validated; ApiError naming every member that is wrong."""
    shape = _SHAPES[route.input]
    members: dict[str, dict[str, Any]] = shape["members"]
    problems = Problems()
    params: dict[str, Any] = {}
    labels = route.pattern.fullmatch(raw_path)
    if labels is None:  # aiohttp matched a decoded path this template's raw form does not
        raise _unknown_operation(route.method, raw_path)
    query = parse_query(raw_query, problems)
    for name, member in members.items():
        location = member.get("location")
        if location == "uri":
            text = _decode(labels.group(member["locationName"]))
            if text is None:
                problems.add(WRONG_TYPE, f"Value at '{name}' (URI label) is not UTF-8 "
                                         "percent-encoded")
            else:
                params[name] = text
        elif location == "querystring" and member["locationName"] in query:
            values = query[member["locationName"]]
            if len(values) > 1:
                problems.add(WRONG_TYPE, f"'{name}' (query parameter "
                                         f"{member['locationName']}) is given {len(values)} "
                                         "times; give it once")
            params[name] = from_query(values[0], member, name, problems)
    if body.strip():
        if content_type not in _ACCEPTED_TYPES:
            raise ApiError("UnsupportedMediaTypeException",
                           f"Content-Type must be {CONTENT_TYPE}, not '{_show(content_type)}'")
        try:
            document = safejson.loads_object(body)
        except safejson.JsonError as exc:
            raise ApiError("SerializationException", f"request body: {exc}") from None
        in_body = [n for n, m in members.items() if "location" not in m]
        for name, value in document.items():
            if name not in in_body:
                accepted = ", ".join(in_body) if in_body else "none (this operation has no body)"
                problems.add(WRONG_TYPE, f"'{_show(name)}' is not a body member of "
                                         f"{route.op}; accepted: {accepted}")
            elif value is not None:
                params[name] = value
    params = _check_structure(params, {**shape, "members": members}, "", problems, False)
    problems.raise_any()
    return params


def _unknown_operation(method: str, raw_path: str) -> ApiError:
    path = raw_path.split("?")[0]
    allowed = sorted({r.method for r in ROUTES if r.pattern.fullmatch(path)})
    if allowed:
        return ApiError("UnknownOperationException",
                        f"{method} {_show(path)} is not an operation of AWS Backup here; this "
                        f"path accepts {', '.join(allowed)}")
    return ApiError(
        "UnknownOperationException",
        f"{method} {_show(path)} is not an operation of AWS Backup served here; served: "
        + ", ".join(sorted(OPERATIONS)),
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):  # restJson1's default in a body: epoch seconds
        return value.timestamp()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def ok_response(route: Route, result: Any, request_id: str) -> web.Response:
    """The operation's answer with the model's success status; no output shape, no body."""
    body = b""
    if route.output is not None:
        if not isinstance(result, dict):
            raise TypeError(f"{route.op} returned {type(result).__name__}, not a dict")
        body = json.dumps(result, default=_json_default, allow_nan=False).encode()
    return web.Response(status=route.status, body=body, headers={
        "Content-Type": CONTENT_TYPE, "x-amzn-RequestId": request_id,
    })


def error_status(err: ApiError) -> int:
    return _WIRE_STATUS.get(err.code) or backup_status(err)


def error_response(err: ApiError, request_id: str) -> web.Response:
    """restJson1's error: the name in x-amzn-ErrorType, the shape's members in the body
    (`Code`, `Message`; `message` too, which botocore reads first)."""
    body = {"Code": err.error_code, "Message": err.message, "message": err.message}
    return web.Response(status=error_status(err), body=json.dumps(body).encode(), headers={
        "Content-Type": CONTENT_TYPE,
        "x-amzn-ErrorType": err.code,
        "x-amzn-RequestId": request_id,
    })


Handler = Callable[[web.Request], Awaitable[web.Response]]


class RestJsonApi:
    """The aiohttp handlers of the `backup` API: one route per modelled method and URI
    template, and a restJson1 404 for anything else under the service's path prefixes."""

    def __init__(
        self,
        api: Any,
        lookup_secret: Callable[[str], str | None],
        wall_clock: Callable[[], float] = time.time,
        throttle: Throttle | None = None,
        replay: sigv4.ReplayCache | None = None,
    ) -> None:
        self.api = api
        self.lookup_secret = lookup_secret
        self.wall_clock = wall_clock
        self.throttle = throttle or Throttle()
        self.replay = replay or sigv4.ReplayCache()

    def routes(self) -> list[web.RouteDef]:
        defs = [web.route(r.method, r.aiohttp_path, self._handler(r)) for r in ROUTES]
        for prefix in SERVICE_PREFIXES:  # after the operations': aiohttp tries them in order
            defs.append(web.route("*", f"/{prefix}", self.handle_unknown))
            defs.append(web.route("*", f"/{prefix}/{{tail:.*}}", self.handle_unknown))
        return defs

    def _handler(self, route: Route) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            return await self._serve(request, route)
        return handle

    async def handle_unknown(self, request: web.Request) -> web.Response:
        return await self._serve(request, None)

    async def _serve(self, request: web.Request, route: Route | None) -> web.Response:
        request_id = str(uuid.uuid4())
        op = route.op if route else "-"
        try:
            body = await self._read(request)
            caller, path, query = self._authenticate(request, body)
            # The method and the path are signed: the operation is the one the caller signed.
            if route is None:
                raise _unknown_operation(request.method, path)
            result = self._dispatch(request, route, caller, path, query, body)
            if inspect.isawaitable(result):  # an operation that waits
                result = await result
            answer = ok_response(route, result, request_id)  # unencodable: ours, a 500
        except ApiError as err:
            log.info("event=api service=backup op=%s status=%d error=%s request_id=%s",
                     op, error_status(err), err.code, request_id)
            return error_response(err, request_id)
        except Exception:
            log.exception("event=api_failed service=backup op=%s request_id=%s", op, request_id)
            err = ApiError("InternalServerException",
                           f"internal error; see the server log ({request_id})")
            return error_response(err, request_id)
        log.info("event=api service=backup op=%s status=%d request_id=%s", op, answer.status,
                 request_id)
        return answer

    @staticmethod
    async def _read(request: web.Request) -> bytes:
        too_large = ApiError("SerializationException",
                             f"request body larger than {MAX_BODY // 1024} KiB (1 MiB)")
        if (request.content_length or 0) > MAX_BODY:
            raise too_large
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large from None
        if len(body) > MAX_BODY:
            raise too_large
        return body

    def _authenticate(self, request: web.Request, body: bytes) -> tuple[sigv4.Caller, str, str]:
        """The signer (SigV4, scope `backup`) once its key's rate allows; the raw path and
        query it signed."""
        return signed_caller(request, body, self.lookup_secret, SIGNING_NAME,
                             self.wall_clock(), self.throttle)

    def _dispatch(self, request: web.Request, route: Route, caller: sigv4.Caller, path: str,
                  query: str, body: bytes) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        if route.op not in READ_ONLY:  # a throttled call has not used up its signature
            self.replay.remember(caller.signature, caller.signed_at, self.wall_clock())
        operation = self.api.operations.get(route.op)
        if operation is None:
            raise ApiError("UnknownOperationException",
                           f"{route.op} is modelled but not served by this control plane")
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        params = bind(route, path, query, body, ctype)
        result: dict[str, Any] | Awaitable[dict[str, Any]] = operation(caller, params)
        return result
