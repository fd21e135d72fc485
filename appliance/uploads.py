"""Forwarding the local API's uploads to the control plane, through the gateway's one shaper.

`appliance/upload.py` is the HTTP client of the link's upload endpoint; this module decides
whether an upload may go at all (name, activation), keeps the one aiohttp session every
upload shares, tracks the uploads in flight so a stop can cut them, and turns the client's
errors into the local API's answers (`UploadRefused`, with structured fields).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Callable
from typing import Any

import aiohttp

from appliance.gatewaystate import GatewayState
from appliance.identity import Identity
from appliance.localerror import LocalError
from appliance.shaping import ScheduledShaper, ShaperClosed
from appliance.upload import UploadError, UploadResult, check_name
from appliance.upload import upload as send_upload

log = logging.getLogger(__name__)

# Connecting is bounded; sending is not: at 51,200 bit/s a large backup takes hours.
UPLOAD_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10)


class UploadRefused(LocalError):
    """An upload the daemon will not (or could not) forward: the local API's error answer."""


class Uploads:
    """The gateway's uploads: refused early when they cannot succeed, else forwarded shaped.

    `wake_poll`: called when the control plane says the gateway is not activated, so the
    link loop catches up at once instead of at its next heartbeat.
    """

    def __init__(
        self,
        control_plane_url: str,
        identity: Identity,
        gateway: GatewayState,
        shaper: ScheduledShaper,
        wake_poll: Callable[[], None],
    ) -> None:
        self._url = control_plane_url
        self._identity = identity
        self._gateway = gateway
        self._shaper = shaper
        self._wake_poll = wake_poll
        # Made at the first upload, inside the event loop it belongs to; most appliances
        # upload rarely, and a daemon that never uploads never opens it.
        self._session: aiohttp.ClientSession | None = None
        self._in_flight: set[asyncio.Task[Any]] = set()

    def refusal(self, name: str) -> UploadRefused | None:
        """Why an upload would be refused before any byte of it is read; None if it may go."""
        try:
            check_name(name)
        except UploadError as exc:
            return UploadRefused(400, "ValidationError", exc.message, "name")
        st = self._gateway.state
        if st.deleted:
            return UploadRefused(
                409, "NotActivated",
                f"gateway {st.deleted_gateway_arn} was deleted; uploads are refused",
            )
        if not st.activated:
            return UploadRefused(
                409, "NotActivated",
                "this gateway is not activated; activate it (menu 0 of the console), then upload",
            )
        return None

    async def upload(
        self, name: str, source: AsyncIterable[bytes], replace: bool = False
    ) -> UploadResult:
        """Forward `source` to the control plane through the gateway's one shaper.

        Streamed piece by piece: nothing is buffered beyond a piece, so a body of any size
        costs the same memory. `source` is first read only once the control plane has
        accepted the upload (Expect: 100-continue on the link). `replace`: overwrite an
        object stored under `name`. Raises UploadRefused with the local API's answer.
        """
        refusal = self.refusal(name)
        if refusal is not None:
            raise refusal
        if self._session is None:
            # No cookie jar, no env proxies: data goes straight to the configured URL.
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(), trust_env=False, timeout=UPLOAD_TIMEOUT
            )
        log.info("event=upload_started name=%s limit=%s", name, self._shaper.limit_bps or "none")
        # The transfer runs as a task of its own, so a stop cuts it and the local API still
        # answers (503 ShuttingDown) on a connection left intact. Cancelling the request's
        # own task instead drops the connection, and aiohttp's client then resends a PUT
        # once on a new one, which reached a server already shutting down and held the
        # daemon's stop for aiohttp's 60 s shutdown timeout.
        transfer = asyncio.ensure_future(send_upload(
            self._session, self._url, self._identity, name, source, self._shaper,
            replace=replace,
        ))
        self._in_flight.add(transfer)
        try:
            return await transfer  # a cancelled request (client gone) cancels it too
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise UploadRefused(
                503, "ShuttingDown",
                "the daemon is stopping: the upload was cut and nothing of it is kept; retry",
            ) from None
        except ShaperClosed:
            raise UploadRefused(503, "ShuttingDown", "the daemon is stopping; retry") from None
        except UploadError as exc:
            raise self._refused(exc) from None
        finally:
            self._in_flight.discard(transfer)

    def _refused(self, exc: UploadError) -> UploadRefused:
        """The upload client's error (structured: code, status, message) as the API's answer."""
        message = exc.message
        if exc.code == "AlreadyExists":
            return UploadRefused(409, "AlreadyExists", message, "name", exc.existing)
        if exc.code == "ConnectionError" or exc.status >= 500:
            return UploadRefused(
                504, "ControlPlaneUnreachable", f"control plane {self._url} unreachable: {message}"
            )
        if exc.code == "NotActivated":
            self._wake_poll()  # the control plane knows better: catch up now
            return UploadRefused(409, "NotActivated", f"the control plane refused: {message}")
        if exc.code == "SourceError":
            return UploadRefused(400, "BodyError", f"the request body broke off: {message}")
        return UploadRefused(
            502, exc.code, f"control plane {self._url} refused the upload: {message}"
        )

    def cancel(self) -> None:
        """Cut the uploads in flight (the control plane keeps nothing of a cut upload), so a
        slow shaped upload never holds up a stop; each is answered 503 ShuttingDown."""
        for task in self._in_flight:
            task.cancel()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
