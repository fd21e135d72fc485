"""The API on the wire: AWS JSON 1.0 on `POST /` and Smithy RPC v2 CBOR on
`POST /service/BackupOnPremises_v20210101/operation/<Op>`, one dispatch path for both.

Shaped like moto's responses layer: this module knows HTTP and the two codecs, authenticates
with SigV4, validates the input against the model table, and hands a plain dict to one
method per operation (operations.py), which knows nothing of the wire. The two protocols
differ only in a Wire: where the operation name is (X-Amz-Target, or the path), which
headers a request must carry, and how bodies and errors are encoded. botocore's model lists
both (`protocols: [smithy-rpc-v2-cbor, json]`), so an SDK may pick either.

Replays: SigV4 has no nonce and X-Amz-Date has one-second resolution, so two identical calls
a second apart carry the same signature (boto3 calling ListGateways twice in a row does).
A replayed read gives an eavesdropper nothing it could not already see, while a replayed
change (DeleteGateway, an old schedule) does harm; so the signatures of state-changing
operations go through the replay cache (each accepted once) and reads do not. The operation
is signed either way: X-Amz-Target must be a signed header, and the CBOR path is the
signed canonical URI.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from controlplane import cbor, sigv4
from controlplane.apiauth import signed_caller
from controlplane.apimodel import OPERATIONS, SIGNING_NAME, TARGET_PREFIX
from controlplane.errors import MODELED_ERRORS, ApiError
from controlplane.operations import BackupGatewayApi
from controlplane.throttle import Throttle
from controlplane.validation import validate_input
from gatewaycore import safejson

log = logging.getLogger("controlplane.api")

CONTENT_TYPE = "application/x-amz-json-1.0"
_ACCEPTED_TYPES = {CONTENT_TYPE, "application/x-amz-json-1.1", "application/json", ""}
READ_ONLY = frozenset(op for op in OPERATIONS if op.startswith(("Get", "List")))

CBOR_CONTENT_TYPE = "application/cbor"
SMITHY_PROTOCOL = "rpc-v2-cbor"
# The Smithy namespace of the service and its errors (`__type` is an absolute shape id in
# rpcv2Cbor); the errors of the protocol itself are named as AWS's own front end names them.
NAMESPACE = "com.amazonaws.backupgateway"
PROTOCOL_NAMESPACE = "com.amazon.coral.service"
RPCV2_PATH = "/service/{service}/operation/{operation}"
_SERVICE_NAMES = {TARGET_PREFIX, f"{NAMESPACE}.{TARGET_PREFIX}"}
_CBOR_ACCEPT = {"", CBOR_CONTENT_TYPE, "*/*", "application/*"}

# Members of the model's structures that are timestamps. The operations return timestamps as
# epoch seconds (AWS JSON 1.0's form); rpcv2Cbor wants tag 1, and only the model says which
# numbers are times. In this model every timestamp member has a name no other kind of
# member has, so the name decides; a unit test checks both facts against botocore's model.
TIMESTAMP_MEMBERS = frozenset({
    "DeprecationDate",
    "LastBackupDate",
    "LastSeenTime",
    "LastSuccessfulMetadataSyncTime",
    "NextUpdateAvailabilityTime",
})


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):  # epoch seconds, as AWS JSON 1.0 sends timestamps
        return value.timestamp()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def response(status: int, payload: dict[str, Any], request_id: str) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload, default=_json_default).encode(),
        headers={"Content-Type": CONTENT_TYPE, "x-amzn-RequestId": request_id},
    )


def error_body(err: ApiError) -> bytes:
    """The JSON protocol's error shape; also written raw by the listener (server.py)."""
    return json.dumps({"__type": err.code, **err.members()}).encode()


def error_response(err: ApiError, request_id: str) -> web.Response:
    return web.Response(
        status=err.status,
        body=error_body(err),
        headers={"Content-Type": CONTENT_TYPE, "x-amzn-RequestId": request_id},
    )


def cbor_error_body(err: ApiError) -> bytes:
    """The rpcv2Cbor error shape: the error's members and `__type`, its absolute shape id."""
    namespace = NAMESPACE if err.code in MODELED_ERRORS else PROTOCOL_NAMESPACE
    return cbor.dumps({"__type": f"{namespace}#{err.code}", **err.members()})


def cbor_response(status: int, body: bytes, request_id: str) -> web.Response:
    return web.Response(
        status=status,
        body=body,
        headers={
            "Content-Type": CBOR_CONTENT_TYPE,
            "smithy-protocol": SMITHY_PROTOCOL,
            "x-amzn-RequestId": request_id,
        },
    )


def error_for_path(path: bytes | str, err: ApiError) -> tuple[str, bytes, dict[str, str]]:
    """(Content-Type, body, extra headers) of `err` in the protocol a request path names,
    for the listener's raw answers (server.py's head_too_large)."""
    text = path.decode("latin-1") if isinstance(path, bytes) else path
    if text.startswith("/service/"):
        return CBOR_CONTENT_TYPE, cbor_error_body(err), {"smithy-protocol": SMITHY_PROTOCOL}
    return CONTENT_TYPE, error_body(err), {}


class Wire:
    """What one protocol decides: the operation's name, the request's headers, the codecs."""

    name = ""
    expected = ""  # how a request names its operation, for UnknownOperationException

    def operation(self, request: web.Request) -> tuple[str, str]:
        """(operation name, what the client named, for messages); '' when it names none."""
        raise NotImplementedError

    def check(self, request: web.Request, body: bytes) -> None:
        """Refuse a request whose headers this protocol forbids or does not understand."""
        raise NotImplementedError

    def decode(self, body: bytes) -> dict[str, Any]:
        raise NotImplementedError

    def ok(self, payload: dict[str, Any], request_id: str) -> web.Response:
        raise NotImplementedError

    def error(self, err: ApiError, request_id: str) -> web.Response:
        raise NotImplementedError


class JsonWire(Wire):
    """AWS JSON 1.0: `X-Amz-Target: BackupOnPremises_v20210101.<Op>`, JSON bodies."""

    name = "json"
    expected = f"{TARGET_PREFIX}.<Operation>"

    def operation(self, request: web.Request) -> tuple[str, str]:
        target = request.headers.get("X-Amz-Target", "")
        prefix, _, op = target.partition(".")
        return (op if prefix == TARGET_PREFIX else ""), f"X-Amz-Target '{target}'"

    def check(self, request: web.Request, body: bytes) -> None:
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype not in _ACCEPTED_TYPES:
            raise ApiError(
                "SerializationException",
                f"Content-Type must be {CONTENT_TYPE}, not '{ctype}'",
            )

    def decode(self, body: bytes) -> dict[str, Any]:
        try:
            return safejson.loads_object(body)
        except safejson.JsonError as exc:
            raise ApiError("SerializationException", str(exc)) from None

    def ok(self, payload: dict[str, Any], request_id: str) -> web.Response:
        return response(200, payload, request_id)

    def error(self, err: ApiError, request_id: str) -> web.Response:
        return error_response(err, request_id)


class CborWire(Wire):
    """Smithy RPC v2 CBOR: the operation in the path, `smithy-protocol: rpc-v2-cbor`,
    `application/cbor` bodies (an empty body is an empty input), tag-1 timestamps."""

    name = "cbor"
    expected = f"/service/{TARGET_PREFIX}/operation/<Operation>"

    def operation(self, request: web.Request) -> tuple[str, str]:
        service = request.match_info.get("service", "")
        op = request.match_info.get("operation", "")
        named = f"path '{request.path[:300]}'"
        return (op if service in _SERVICE_NAMES else ""), named

    def check(self, request: web.Request, body: bytes) -> None:
        protocol = request.headers.get("smithy-protocol", "")
        if protocol != SMITHY_PROTOCOL:
            raise ApiError(
                "SerializationException",
                f"header smithy-protocol must be '{SMITHY_PROTOCOL}', not '{protocol[:100]}'",
            )
        for name in ("X-Amz-Target", "X-Amzn-Target"):
            if name in request.headers:
                raise ApiError(
                    "SerializationException",
                    f"an rpc-v2-cbor request must not carry {name} (the path names the "
                    "operation)",
                )
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != CBOR_CONTENT_TYPE and (body or ctype):
            raise ApiError(
                "SerializationException",
                f"Content-Type must be {CBOR_CONTENT_TYPE}, not '{ctype[:100]}'",
            )
        accept = {a.split(";")[0].strip().lower()
                  for a in request.headers.get("Accept", "").split(",")}
        if not accept & _CBOR_ACCEPT:
            raise ApiError(
                "NotAcceptableException",
                f"Accept must allow {CBOR_CONTENT_TYPE}, the only type of this protocol",
            )

    def decode(self, body: bytes) -> dict[str, Any]:
        if not body:
            return {}
        try:
            value = cbor.loads(body)
        except cbor.CborError as exc:
            raise ApiError("SerializationException", str(exc)) from None
        if not isinstance(value, dict):
            raise ApiError("SerializationException", "body must be a CBOR map")
        return value

    def ok(self, payload: dict[str, Any], request_id: str) -> web.Response:
        return cbor_response(200, cbor.dumps(payload, TIMESTAMP_MEMBERS), request_id)

    def error(self, err: ApiError, request_id: str) -> web.Response:
        return cbor_response(err.status, cbor_error_body(err), request_id)


JSON_WIRE = JsonWire()
CBOR_WIRE = CborWire()


class JsonApi:
    """The aiohttp handlers of both protocols (see routes()), over one dispatch path."""

    def __init__(
        self,
        api: BackupGatewayApi,
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
        """`POST /` (AWS JSON 1.0) and `POST /service/<service>/operation/<Op>` (rpcv2Cbor)."""
        return [web.post("/", self.handle), web.post(RPCV2_PATH, self.handle_cbor)]

    async def handle(self, request: web.Request) -> web.Response:
        return await self._serve(request, JSON_WIRE)

    async def handle_cbor(self, request: web.Request) -> web.Response:
        return await self._serve(request, CBOR_WIRE)

    async def _serve(self, request: web.Request, wire: Wire) -> web.Response:
        request_id = str(uuid.uuid4())
        named = wire.operation(request)[0]
        # The CBOR path is percent-decoded: keep what a client names out of the log's syntax.
        op = named if named.isidentifier() and len(named) <= 64 else "-"
        try:
            body = await request.read()
            result = self._call(request, wire, body)
            if inspect.isawaitable(result):  # an operation that waits (e.g. for a gateway)
                result = await result
            answer = wire.ok(result, request_id)  # an unencodable result is ours: a 500
        except ApiError as err:
            log.info(
                "event=api op=%s protocol=%s status=%d error=%s request_id=%s",
                op, wire.name, err.status, err.code, request_id,
            )
            return wire.error(err, request_id)
        except web.HTTPRequestEntityTooLarge:
            err = ApiError("SerializationException", "request body larger than 1 MiB")
            return wire.error(err, request_id)
        except Exception:
            log.exception("event=api_failed op=%s protocol=%s request_id=%s",
                          op, wire.name, request_id)
            err = ApiError(
                "InternalServerException", f"internal error; see the server log ({request_id})"
            )
            return wire.error(err, request_id)
        log.info("event=api op=%s protocol=%s status=200 request_id=%s", op, wire.name,
                 request_id)
        return answer

    def _call(
        self, request: web.Request, wire: Wire, body: bytes
    ) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        now = self.wall_clock()
        caller, _, _ = signed_caller(request, body, self.lookup_secret, SIGNING_NAME, now,
                                     self.throttle)
        # verify() refused a signature leaving X-Amz-Target out, and the path is signed:
        # `op` is the one the caller signed.
        op, named = wire.operation(request)
        if op not in READ_ONLY:
            self.replay.remember(caller.signature, caller.signed_at, now)
        if op not in self.api.operations or op not in OPERATIONS:  # served only if modelled
            raise ApiError(
                "UnknownOperationException",
                f"{named} is not an operation of this service; expected {wire.expected} "
                "with one of: " + ", ".join(sorted(set(self.api.operations) & set(OPERATIONS))),
            )
        wire.check(request, body)
        payload = wire.decode(body)
        validate_input(payload, OPERATIONS[op][0])
        return self.api.operations[op](caller, payload)
