"""The gateway link on the wire (docs/link-protocol.md): the `/gateway/...` routes of the
aiohttp app. The link's counterpart of protocol.py.

Here, and only here, are HTTP things: headers, bodies (bounded, parsed by safejson), the
Ed25519 signature of every request (gatewaycore.linkproto, shared with the appliance),
`Expect: 100-continue`, and the mapping of every refusal to the protocol's JSON error
`{"error": <code>, "message": <one line>, <fields>...}`: never a traceback page. What each
request then does is linkops.LinkOps's.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from controlplane.linkops import MAX_WAIT_SECONDS, AdmittedUpload, LinkError, LinkOps, invalid
from controlplane.store import Identity
from controlplane.throttle import source_of
from gatewaycore import linkproto, safejson

log = logging.getLogger("controlplane.link")

MAX_JSON_BODY = 64 * 1024
# An inventory lists every VM of a hypervisor (thousands, with paths and tags).
MAX_INVENTORY_BODY = 8 * 1024 * 1024


# Where the Expect handler leaves its admission for the upload handler (no second nonce).
_ADMITTED: Any = (
    web.RequestKey("linkwire_admitted", AdmittedUpload)  # type: ignore[attr-defined]
    if hasattr(web, "RequestKey") else "linkwire_admitted"
)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


class LinkWire:
    """Handlers of `/gateway/...` over a LinkOps."""

    def __init__(self, ops: LinkOps) -> None:
        self.ops = ops

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/gateway/activation-key", self._wrap(self.activation_key)),
            web.post("/gateway/poll", self._wrap(self.poll)),
            web.post("/gateway/hypervisor/test-result", self._wrap(self.test_result)),
            web.post("/gateway/hypervisor/inventory", self._wrap(self.inventory)),
            web.get("/gateway/update/{version}", self._wrap(self.update_bundle)),
            web.put("/gateway/data/{name}", self._wrap(self.upload),
                    expect_handler=self._upload_expect),
        ]

    # -- errors ---------------------------------------------------------------------------

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse | None:
        """Run a handler; every refusal is the protocol's JSON error, never a traceback page."""
        try:
            self.ops.housekeep()
            return await handler(request)
        except LinkError as err:
            log.log(
                logging.DEBUG if err.status == 429 else logging.INFO,
                "event=link_refused path=%s status=%d error=%s message=%s",
                request.path, err.status, err.code, err.message,
            )
            body = {"error": err.code, "message": err.message, **err.fields}
            headers = {"Retry-After": str(err.retry_after)} if err.retry_after else None
            return web.json_response(body, status=err.status, headers=headers)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception:
            ref = uuid.uuid4()
            log.exception("event=link_failed path=%s ref=%s", request.path, ref)
            return web.json_response(
                {"error": "InternalError", "message": f"see the server log ({ref})"},
                status=500,
            )

    def _wrap(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def run(request: web.Request) -> web.StreamResponse:
            response = await self._answer(request, handler)
            assert response is not None
            return response

        return run

    # -- for the link's other route sets (controlplane/joblink.py) ------------------------

    def wrap(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """`handler` with this link's error mapping and housekeeping."""
        return self._wrap(handler)

    async def answer(self, request: web.Request, handler: Handler
                     ) -> web.StreamResponse | None:
        return await self._answer(request, handler)

    def signed_by(self, request: web.Request) -> tuple[Identity, str]:
        """The registered identity that signed `request` (its nonce now used up) and the
        body hash the signature declares (checked by the caller once the body is read)."""
        identity = self._identity(request)
        return identity, self._verify(request, identity.public_key, identity.key_id)

    async def signed_json(self, request: web.Request, limit: int = MAX_JSON_BODY
                          ) -> tuple[Identity, dict[str, Any]]:
        return await self._signed_json(request, limit)

    @staticmethod
    def check_body_hash(declared: str, body: bytes) -> None:
        LinkWire._check_body_hash(declared, body)

    # -- authentication -------------------------------------------------------------------

    def _verify(self, request: web.Request, public_raw: bytes, key_id: str) -> str:
        """Verify the signature and use up its nonce; returns the declared body hash."""
        try:
            nonce, content = linkproto.verify(
                request.headers, request.method, request.raw_path, public_raw,
                self.ops.wall_clock(),
            )
        except linkproto.LinkAuthError as exc:
            raise LinkError(401, "InvalidSignature", str(exc)) from None
        self.ops.use_nonce(key_id, nonce)
        return content

    @staticmethod
    def _check_body_hash(declared: str, body: bytes) -> None:
        if declared != linkproto.body_sha256(body):
            raise LinkError(
                401, "InvalidSignature",
                f"{linkproto.H_CONTENT_SHA256} does not match the body received",
            )

    def _identity(self, request: web.Request) -> Identity:
        key_id = request.headers.get(linkproto.H_KEY_ID, "")
        if not linkproto.is_key_id(key_id):
            raise LinkError(
                401, "InvalidSignature", f"{linkproto.H_KEY_ID} must be 32 lowercase hex digits"
            )
        return self.ops.identity(key_id)

    @staticmethod
    async def _json_body(request: web.Request, limit: int = MAX_JSON_BODY
                         ) -> tuple[bytes, dict[str, Any]]:
        if request.content_length is not None and request.content_length > limit:
            raise LinkError(413, "ValidationError", f"body: larger than {limit} bytes")
        body = await read_at_most(request, limit + 1)
        if len(body) > limit:
            raise LinkError(413, "ValidationError", f"body: larger than {limit} bytes")
        try:
            payload = safejson.loads_object(body)
        except safejson.JsonError as exc:
            raise invalid("body", str(exc)) from None
        return body, payload

    # -- POST /gateway/activation-key -----------------------------------------------------

    async def activation_key(self, request: web.Request) -> web.StreamResponse:
        self.ops.admit_registration(request.headers.get(linkproto.H_KEY_ID, ""),
                                    source_of(request.remote))
        body, payload = await self._json_body(request)
        try:
            public_raw = linkproto.decode_public_key(str(payload.get("publicKey", "")))
        except ValueError as exc:
            raise invalid("publicKey", str(exc)) from None
        key_id = linkproto.key_id(public_raw)
        if request.headers.get(linkproto.H_KEY_ID) != key_id:
            raise LinkError(
                401, "InvalidSignature", f"{linkproto.H_KEY_ID} does not match publicKey"
            )
        self._check_body_hash(self._verify(request, public_raw, key_id), body)
        answer = self.ops.issue_key(
            key_id, public_raw,
            region=payload.get("region"),
            endpoint_type=payload.get("endpointType"),
            ip_version=payload.get("ipVersion"),
            vpc_endpoint=payload.get("vpcEndpoint"),
            software_version=payload.get("softwareVersion"),
        )
        return web.json_response(answer)

    # -- POST /gateway/poll ---------------------------------------------------------------

    async def poll(self, request: web.Request) -> web.StreamResponse:
        identity = self._identity(request)
        body, payload = await self._json_body(request)
        self._check_body_hash(self._verify(request, identity.public_key, identity.key_id), body)
        answer = await self.ops.poll(
            identity,
            after=payload.get("after", 0),
            wait=payload.get("wait", MAX_WAIT_SECONDS),
            software_version=payload.get("softwareVersion"),
            seal_key=payload.get("sealKey"),
            update_status=payload.get("updateStatus"),
        )
        return web.json_response(answer)

    # -- GET /gateway/update/{version} ----------------------------------------------------

    async def update_bundle(self, request: web.Request) -> web.StreamResponse:
        """A published update bundle, streamed from its file (docs/updates.md)."""
        identity, declared = self.signed_by(request)
        self._check_body_hash(declared, await read_at_most(request, MAX_JSON_BODY))
        path = self.ops.update_bundle(identity, request.match_info["version"])
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})

    # -- POST /gateway/hypervisor/test-result and /inventory ------------------------------

    async def _signed_json(self, request: web.Request, limit: int = MAX_JSON_BODY
                           ) -> tuple[Identity, dict[str, Any]]:
        """The signature is checked before the body is read: only a registered gateway
        can make the server buffer up to `limit` bytes."""
        identity = self._identity(request)
        declared = self._verify(request, identity.public_key, identity.key_id)
        body, payload = await self._json_body(request, limit)
        self._check_body_hash(declared, body)
        return identity, payload

    async def test_result(self, request: web.Request) -> web.StreamResponse:
        identity, payload = await self._signed_json(request)
        answer = self.ops.test_result(
            identity,
            test_id=payload.get("testId"),
            ok=payload.get("ok"),
            error_code=payload.get("errorCode"),
            message=payload.get("message"),
        )
        return web.json_response(answer)

    async def inventory(self, request: web.Request) -> web.StreamResponse:
        identity, payload = await self._signed_json(request, MAX_INVENTORY_BODY)
        answer = self.ops.inventory(
            identity,
            hypervisor_arn=payload.get("hypervisorArn"),
            sync_request=payload.get("syncRequest"),
            ok=payload.get("ok"),
            error_code=payload.get("errorCode"),
            message=payload.get("message"),
            vms=payload.get("vms"),
        )
        return web.json_response(answer)

    # -- PUT /gateway/data/{name} ---------------------------------------------------------

    async def _upload_expect(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: every refusal (signature, name, not activated, the name
        already stored) is answered before the client sends a byte of its body."""

        async def admit(request: web.Request) -> None:
            request[_ADMITTED] = self._admit_upload(request)
            if request.headers.get("Expect", "").lower() != "100-continue":
                raise LinkError(417, "ExpectationFailed",
                                "only 'Expect: 100-continue' is understood")
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return None

        return await self._answer(request, admit)

    def _admit_upload(self, request: web.Request) -> AdmittedUpload:
        """The checks made before the body is read (once: they use up the nonce)."""
        identity = self._identity(request)
        declared = self._verify(request, identity.public_key, identity.key_id)
        return self.ops.admit_upload(identity, request.match_info["name"],
                                     _replace_param(request), declared)

    async def upload(self, request: web.Request) -> web.StreamResponse:
        admitted = request.get(_ADMITTED) or self._admit_upload(request)
        answer = await self.ops.upload(admitted, request.content.readany)
        return web.json_response(answer, status=201)


def _replace_param(request: web.Request) -> bool:
    """The query of an upload: nothing, or `replace=true|false` once."""
    unknown = sorted(set(request.query) - {"replace"})
    if unknown:
        raise invalid("query", f"unknown parameter {unknown[0]!r}; only replace=true|false")
    values = request.query.getall("replace", [])
    if len(values) > 1 or (values and values[0] not in ("true", "false")):
        raise invalid("replace", "must be given once, as true or false")
    return bool(values) and values[0] == "true"


async def read_at_most(request: web.Request, limit: int) -> bytes:
    """Up to `limit` bytes of the body: `StreamReader.read(n)` may return one chunk at a
    time, so a large body takes several reads."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await request.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
