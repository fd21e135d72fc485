"""The AWS JSON 1.0 wire format: `POST /`, `X-Amz-Target` dispatch, `__type` error bodies.

Shaped like moto's responses layer: this module knows HTTP and JSON, authenticates with
SigV4, validates the input against the model table, and hands a plain dict to one method
per operation (operations.py), which knows nothing of the wire.

Replays: SigV4 has no nonce and X-Amz-Date has one-second resolution, so two identical calls
a second apart carry the same signature (boto3 calling ListGateways twice in a row does).
A replayed read gives an eavesdropper nothing it could not already see, while a replayed
change (DeleteGateway, an old schedule) does harm; so the signatures of state-changing
operations go through the replay cache (each accepted once) and reads do not.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from controlplane import sigv4
from controlplane.apimodel import OPERATIONS, SIGNING_NAME, TARGET_PREFIX
from controlplane.errors import ApiError
from controlplane.operations import BackupGatewayApi
from controlplane.throttle import Throttle
from controlplane.validation import validate_input
from gatewaycore import safejson

log = logging.getLogger("controlplane.api")

CONTENT_TYPE = "application/x-amz-json-1.0"
_ACCEPTED_TYPES = {CONTENT_TYPE, "application/x-amz-json-1.1", "application/json", ""}
READ_ONLY = frozenset(op for op in OPERATIONS if op.startswith(("Get", "List")))


def _json_default(value: Any) -> Any:
    raise TypeError(f"cannot serialise {type(value).__name__}")


def response(status: int, payload: dict[str, Any], request_id: str) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload, default=_json_default).encode(),
        headers={"Content-Type": CONTENT_TYPE, "x-amzn-RequestId": request_id},
    )


def error_body(err: ApiError) -> bytes:
    """The protocol's error shape; also written raw by the listener (server.py)."""
    return json.dumps({"__type": err.code, "message": err.message}).encode()


def error_response(err: ApiError, request_id: str) -> web.Response:
    return web.Response(
        status=err.status,
        body=error_body(err),
        headers={"Content-Type": CONTENT_TYPE, "x-amzn-RequestId": request_id},
    )


class JsonApi:
    """The aiohttp handler of `POST /`."""

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

    async def handle(self, request: web.Request) -> web.Response:
        request_id = str(uuid.uuid4())
        target = request.headers.get("X-Amz-Target", "")
        op = target.rpartition(".")[2] or "-"
        try:
            body = await request.read()
            result = self._call(request, target, body)
        except ApiError as err:
            log.info(
                "event=api op=%s status=%d error=%s request_id=%s",
                op, err.status, err.code, request_id,
            )
            return error_response(err, request_id)
        except web.HTTPRequestEntityTooLarge:
            err = ApiError("SerializationException", "request body larger than 1 MiB")
            return error_response(err, request_id)
        except Exception:
            log.exception("event=api_failed op=%s request_id=%s", op, request_id)
            err = ApiError(
                "InternalServerException", f"internal error; see the server log ({request_id})"
            )
            return error_response(err, request_id)
        log.info("event=api op=%s status=200 request_id=%s", op, request_id)
        return response(200, result, request_id)

    def _call(self, request: web.Request, target: str, body: bytes) -> dict[str, Any]:
        headers: dict[str, list[str]] = {}
        for name, value in request.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        path, _, query = request.raw_path.partition("?")
        now = self.wall_clock()
        caller = sigv4.verify(
            request.method,
            path,
            query,
            headers,
            body,
            self.lookup_secret,
            SIGNING_NAME,
            now,
        )
        if not self.throttle.allow(caller.access_key_id):
            raise ApiError(
                "ThrottlingException",
                f"Rate exceeded: more than {self.throttle.rate:g} requests/s sustained for "
                f"access key {caller.access_key_id}; retry later",
            )
        # verify() refused a signature leaving X-Amz-Target out: `op` is the signed one.
        prefix, _, op = target.partition(".")
        if op not in READ_ONLY:
            self.replay.remember(caller.signature, caller.signed_at, now)
        if prefix != TARGET_PREFIX or op not in self.api.operations:
            raise ApiError(
                "UnknownOperationException",
                f"X-Amz-Target '{target}' is not an operation of this service; expected "
                f"{TARGET_PREFIX}.<Operation> with one of: "
                + ", ".join(sorted(self.api.operations)),
            )
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype not in _ACCEPTED_TYPES:
            raise ApiError(
                "SerializationException",
                f"Content-Type must be {CONTENT_TYPE}, not '{ctype}'",
            )
        try:
            payload = safejson.loads_object(body)
        except safejson.JsonError as exc:
            raise ApiError("SerializationException", str(exc)) from None
        validate_input(payload, OPERATIONS[op][0])
        return self.api.operations[op](caller, payload)
