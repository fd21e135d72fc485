"""The upload client: stream data to the control plane's `PUT /gateway/data/{name}`, shaped.

The body is an async generator of pieces, each acquired from the gateway's one shared shaper
just before it is handed to the socket, so every upload of the gateway together keeps to the
schedule's limit (docs/link-protocol.md; the limit is on the data, not on HTTP framing).
The request is signed with the gateway identity; the body hash is either precomputed by the
caller or `UNSIGNED-PAYLOAD`, and in both cases the client hashes what it sends and checks the
server's answer, so a backup is only reported stored when the server holds exactly its bytes.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from appliance.identity import Identity
from appliance.shaping import UNLIMITED_PIECE, ScheduledShaper
from gatewaycore import linkproto, rules
from gatewaycore.rules import RuleError

log = logging.getLogger(__name__)

Source = bytes | bytearray | memoryview | Path | AsyncIterable[bytes]


class UploadError(Exception):
    """The upload was refused or its result does not match what was sent.

    `code` is the control plane's error name (`InvalidSignature`, `NotActivated`,
    `ChecksumMismatch`, `AlreadyExists`, ...) or `BadResponse`; `status` the HTTP status (0
    if none); `message` the one line; `existing` the object already stored under the name
    (`name`, `size`, `sha256`, `storedAt`) when the code is AlreadyExists.
    """

    def __init__(self, code: str, message: str, status: int = 0,
                 existing: dict[str, Any] | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.existing = existing


@dataclass(frozen=True)
class UploadResult:
    name: str
    size: int
    sha256: str
    seconds: float

    @property
    def bits_per_sec(self) -> float:
        return self.size * 8 / self.seconds if self.seconds > 0 else 0.0


def check_name(name: str) -> str:
    """gatewaycore.rules.upload_name, the rule the control plane applies, checked before any
    byte is sent."""
    try:
        return rules.upload_name(name, "name")
    except RuleError as exc:
        raise UploadError("ValidationError", f"{exc.field}: {exc.message}") from None


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, for callers that want the server to check a signed body hash."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


async def _chunks(source: Source, piece: int) -> AsyncIterator[bytes | memoryview]:
    if isinstance(source, bytes | bytearray | memoryview):
        yield memoryview(source)
    elif isinstance(source, Path):
        # Local reads of at most one piece from the page cache take well under a millisecond;
        # a thread hop per piece would cost more than it saves.
        with source.open("rb") as f:
            while chunk := f.read(piece):
                yield chunk
    else:
        async for chunk in source:
            yield chunk


class _Body:
    """The shaped body generator; counts and hashes what it hands to aiohttp."""

    def __init__(self, source: Source, shaper: ScheduledShaper | None, verify: bool):
        self._source = source
        self._shaper = shaper
        self._hash = hashlib.sha256() if verify else None
        self.size = 0
        # Set when reading the source failed (e.g. the local client went away): aiohttp then
        # leaves the chunked body unterminated, so the server keeps nothing, and the caller
        # is told it was the source, not the control plane.
        self.source_error: BaseException | None = None

    @property
    def sha256(self) -> str | None:
        return self._hash.hexdigest() if self._hash is not None else None

    def _piece(self) -> int:
        return self._shaper.piece_size if self._shaper is not None else UNLIMITED_PIECE

    async def __aiter__(self) -> AsyncIterator[bytes | memoryview]:
        shaper = self._shaper
        chunks = _chunks(self._source, self._piece()).__aiter__()
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
            except Exception as exc:
                self.source_error = exc
                raise
            view = memoryview(chunk).cast("B")
            while view:
                # The piece size follows the rate in force, re-read for every piece.
                part = view[: self._piece()]
                view = view[len(part) :]
                if shaper is not None:
                    await shaper.acquire(len(part))
                if self._hash is not None:
                    self._hash.update(part)
                self.size += len(part)
                yield part


async def upload(
    session: aiohttp.ClientSession,
    base_url: str,
    identity: Identity,
    name: str,
    source: Source,
    shaper: ScheduledShaper | None = None,
    *,
    content_sha256: str | None = None,
    verify: bool = True,
    replace: bool = False,
) -> UploadResult:
    """PUT `source` as `name`; return what the server stored. Raises UploadError.

    `content_sha256`: the body's hex SHA-256 if known (the server then refuses a body that
    differs); otherwise UNSIGNED-PAYLOAD. `verify`: hash while sending and compare with the
    server's answer (costs about one SHA-256 pass over the data). `replace`: overwrite an
    object stored under `name` (otherwise the server refuses with AlreadyExists).

    Sent with `Expect: 100-continue`: the server's refusals (name taken, not activated, bad
    signature) come before the first byte of `source` is read, so a refused upload neither
    sends nor consumes its data.
    """
    check_name(name)
    path = f"/gateway/data/{name}" + ("?replace=true" if replace else "")
    headers = identity.sign("PUT", path, content_sha256 or linkproto.UNSIGNED_PAYLOAD)
    headers["Content-Type"] = "application/octet-stream"
    body = _Body(source, shaper, verify)
    started = time.monotonic()
    try:
        async with session.put(
            base_url.rstrip("/") + path, data=body.__aiter__(), headers=headers,
            expect100=True,
        ) as resp:
            try:
                payload = await resp.json(content_type=None)
            except (ValueError, aiohttp.ContentTypeError):
                payload = None
            status = resp.status
    except Exception as exc:
        if body.source_error is not None:
            err = body.source_error
            log.warning("event=upload_failed name=%s error=source:%s", name, type(err).__name__)
            raise UploadError("SourceError", f"reading the data failed: {err!r}") from err
        if not isinstance(exc, aiohttp.ClientError | OSError | TimeoutError):
            raise
        log.warning("event=upload_failed name=%s error=%s", name, type(exc).__name__)
        raise UploadError("ConnectionError", f"{type(exc).__name__}: {exc}") from exc
    seconds = time.monotonic() - started
    if not isinstance(payload, dict):
        raise UploadError("BadResponse", f"HTTP {status} without a JSON object", status)
    if status != 201:
        code = str(payload.get("error", f"HTTP{status}"))
        log.warning("event=upload_refused name=%s status=%d error=%s", name, status, code)
        existing = None
        if code == "AlreadyExists":
            existing = {k: payload.get(k) for k in ("name", "size", "sha256", "storedAt")}
        raise UploadError(code, str(payload.get("message", "")), status, existing)
    size, digest = payload.get("size"), payload.get("sha256")
    if size != body.size:
        raise UploadError("BadResponse", f"server stored {size} bytes, sent {body.size}", status)
    if body.sha256 is not None and digest != body.sha256:
        raise UploadError("ChecksumMismatch", f"server sha256 {digest} != sent {body.sha256}")
    log.info(
        "event=upload_done name=%s bytes=%d seconds=%.3f bps=%.0f",
        name,
        body.size,
        seconds,
        body.size * 8 / seconds if seconds else 0.0,
    )
    return UploadResult(name=name, size=body.size, sha256=str(digest), seconds=seconds)
