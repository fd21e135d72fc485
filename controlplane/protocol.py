"""The AWS JSON 1.0 wire format: `POST /`, `X-Amz-Target` dispatch, `__type` error bodies.

Shaped like moto's responses layer: this module knows HTTP and JSON, authenticates with
SigV4, validates the input against the model table, and hands a plain dict to one method
per operation (operations.py), which knows nothing of the wire.
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

log = logging.getLogger("controlplane.api")

CONTENT_TYPE = "application/x-amz-json-1.0"
_ACCEPTED_TYPES = {CONTENT_TYPE, "application/x-amz-json-1.1", "application/json", ""}


def _json_default(value: Any) -> Any:
    raise TypeError(f"cannot serialise {type(value).__name__}")


def response(status: int, payload: dict[str, Any], request_id: str) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload, default=_json_default).encode(),
        headers={"Content-Type": CONTENT_TYPE, "x-amzn-RequestId": request_id},
    )


def error_response(err: ApiError, request_id: str) -> web.Response:
    return response(err.status, {"__type": err.code, "message": err.message}, request_id)


class JsonApi:
    """The aiohttp handler of `POST /`."""

    def __init__(
        self,
        api: BackupGatewayApi,
        lookup_secret: Callable[[str], str | None],
        wall_clock: Callable[[], float] = time.time,
        throttle: Throttle | None = None,
    ) -> None:
        self.api = api
        self.lookup_secret = lookup_secret
        self.wall_clock = wall_clock
        self.throttle = throttle or Throttle()

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
        headers = {k.lower(): request.headers.getall(k) for k in request.headers}
        path, _, query = request.raw_path.partition("?")
        caller = sigv4.verify(
            request.method,
            path,
            query,
            headers,
            body,
            self.lookup_secret,
            SIGNING_NAME,
            self.wall_clock(),
        )
        if not self.throttle.allow(caller.access_key_id):
            raise ApiError(
                "ThrottlingException",
                f"Rate exceeded: more than {self.throttle.rate:g} requests/s sustained for "
                f"access key {caller.access_key_id}; retry later",
            )
        prefix, _, op = target.partition(".")
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
            payload = json.loads(body) if body.strip() else {}
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError("SerializationException", f"body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise ApiError("SerializationException", "body must be a JSON object")
        validate_input(payload, OPERATIONS[op][0])
        return self.api.operations[op](caller, payload)
