"""`python -m appliance serve`: the daemon that ties the appliance's pieces together.

It owns the one copy of the state and is the only writer of the state file, so every
change (a key request, what a poll brought, a schedule) goes through `_save`, which writes
atomically before the change is visible anywhere else. The activation page, the local API
and the link loop run as tasks of one event loop: none of them can block another.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from collections.abc import AsyncIterable
from typing import Any

import aiohttp

from appliance import identity as identity_mod
from appliance.activation import ActivationRequest, ActivationServer, KeyRefused, KeyResult
from appliance.config import ListenAddress, Settings
from appliance.link import (
    POLL_WAIT,
    Backoff,
    LinkClient,
    LinkError,
    PollAnswer,
    Refused,
    Unreachable,
    now_iso,
    sleep_or_wake,
)
from appliance.shaping import ScheduledShaper, ShaperClosed
from appliance.state import State, StateStore
from appliance.upload import UploadError, UploadResult, check_name
from appliance.upload import upload as send_upload
from appliance.version import __version__
from gatewaycore import regions
from gatewaycore.schedule import Schedule, ScheduleError

log = logging.getLogger("appliance.daemon")


class StartupError(Exception):
    """The daemon cannot start; one line for the operator, exit status 1."""


class UploadRefused(Exception):
    """An upload the daemon will not (or could not) forward: the local API's error answer."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 existing: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field
        self.existing = existing  # AlreadyExists: the object stored under the name


# Connecting is bounded; sending is not: at 51,200 bit/s a large backup takes hours.
UPLOAD_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10)


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = StateStore(settings.state_dir)
        self.identity: identity_mod.Identity | None = None
        self.link: LinkClient | None = None
        self.shaper = ScheduledShaper()
        self._wake_poll = asyncio.Event()
        self._stop = asyncio.Event()
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._local_api_runner: Any = None
        self._upload_session: aiohttp.ClientSession | None = None
        self._uploads: set[asyncio.Task[Any]] = set()

    @property
    def state(self) -> State:
        return self.store.state

    # --- start and stop ------------------------------------------------------------------

    def load(self) -> None:
        """Read (or create) the identity and the state; StartupError names the bad file."""
        state_dir = self.settings.state_dir
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StartupError(f"cannot create state_dir {state_dir}: {exc.strerror}") from None
        try:
            self.identity, created = identity_mod.load_or_create(state_dir)
        except identity_mod.IdentityError as exc:
            raise StartupError(str(exc)) from None
        if created:
            log.info("event=identity_created key_id=%s", self.identity.key_id)
        self.store.load()  # StateError propagates: cli prints it and exits 1
        self._apply_schedule(self.state.schedule, at_start=True)

    async def run(self) -> None:
        from appliance import localapi  # here, so a console import never drags the daemon in

        self.load()
        assert self.identity is not None
        self.link = LinkClient(self.settings.control_plane_url, self.identity)
        self.shaper.start()
        activation = ActivationServer(self.issue_key)
        bound = []
        for address in self.settings.listen:
            sock = self._bind(address)
            if sock is None:
                continue
            server = await activation.serve(sock)
            self._servers.append(server)
            bound.append(str(address))
        if not bound:
            raise StartupError("no listen address could be bound")
        self._local_api_runner = await localapi.start(self, self.settings.local_api_socket)
        self._tasks.append(asyncio.create_task(self._poll_loop(), name="poll"))

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        st = self.state
        log.info(
            "event=ready version=%s key_id=%s listen=%s local_api=%s control_plane=%s "
            "activated=%s deleted=%s",
            __version__, self.identity.key_id, ",".join(bound), self.settings.local_api_socket,
            self.settings.control_plane_url, str(st.activated).lower(), str(st.deleted).lower(),
        )
        try:
            await self._stop.wait()
        finally:
            await self._shutdown()

    def stop(self) -> None:
        self._stop.set()

    async def _shutdown(self) -> None:
        log.info("event=stopping")
        # Uploads in flight are cut (the control plane keeps nothing of a cut upload), so a
        # slow shaped upload never holds up the stop.
        for task in (*self._tasks, *self._uploads):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            server.close()
        if self._local_api_runner is not None:
            await self._local_api_runner.cleanup()
        self.shaper.close()
        if self.link is not None:
            await self.link.close()
        if self._upload_session is not None:
            await self._upload_session.close()

    @staticmethod
    def _bind(address: ListenAddress) -> socket.socket | None:
        """A listening socket; IPv6 ones are V6ONLY so `[::]:80` and `0.0.0.0:80` coexist."""
        family = socket.AF_INET6 if address.is_ipv6 else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            if exc.errno == errno.EAFNOSUPPORT:
                log.warning("event=listen_skipped address=%s reason=no_ipv6", address)
                return None
            raise
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if address.is_ipv6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address.host, address.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if address.is_ipv6 and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                log.warning("event=listen_skipped address=%s reason=%s", address, exc.strerror)
                return None
            raise StartupError(f"cannot listen on {address}: {exc.strerror}") from None
        return sock

    # --- state ---------------------------------------------------------------------------

    def _save(self, **changes: Any) -> State:
        return self.store.update(**changes)

    def _apply_schedule(self, intervals: list[dict[str, Any]], at_start: bool = False) -> bool:
        """Hand the schedule to the shaper; False (and the old schedule kept) if it is invalid."""
        try:
            schedule = Schedule.from_api(intervals)
        except ScheduleError as exc:
            log.error("event=schedule_rejected reason=%s", str(exc))
            return False
        self.shaper.set_schedule(schedule)
        if not at_start:
            log.info("event=schedule_applied intervals=%d", len(schedule.intervals))
        return True

    # --- the activation key (port 80 and the local API) ----------------------------------

    async def issue_key(self, req: ActivationRequest) -> KeyResult:
        st = self.state
        if st.deleted:
            raise KeyRefused(410, self._deleted_message(st.deleted_gateway_arn), "GatewayDeleted")
        if st.activated:
            raise KeyRefused(
                409, f"this gateway is already activated as {st.gateway_arn}", "AlreadyActivated"
            )
        assert self.link is not None
        try:
            issued = await self.link.request_activation_key(
                req.region, req.endpoint_type, req.ip_version, req.vpc_endpoint
            )
        except Unreachable as exc:
            log.warning("event=key_failed reason=%s", str(exc))
            raise KeyRefused(504, str(exc), "ControlPlaneUnreachable") from None
        except Refused as exc:
            return self._key_refused(exc)
        except LinkError as exc:
            log.warning("event=key_failed reason=%s", str(exc))
            raise KeyRefused(502, f"control plane answer not understood: {exc}", exc.code) from None
        if not self.state.registered:
            self._save(registered=True)
        self._wake_poll.set()  # start polling now, and cut any backoff short: it answered
        log.info(
            "event=key_issued region=%s fallback=%s endpoint_type=%s ip_version=%s vpc=%s",
            issued.region, str(req.region_fallback).lower(), req.endpoint_type,
            req.ip_version or "-", req.vpc_endpoint or "-",
        )
        return KeyResult(issued.key, issued.region, issued.expires_at)

    def _key_refused(self, exc: Refused) -> KeyResult:
        self._wake_poll.set()
        if exc.code == "AlreadyActivated":
            # We missed the activation (e.g. were down): the poll will bring the details.
            if not self.state.registered:
                self._save(registered=True)
            raise KeyRefused(
                409, f"this gateway is already activated as {exc.gateway_arn}", exc.code
            )
        if exc.code == "GatewayDeleted":
            self._forget(exc.gateway_arn)
            raise KeyRefused(410, self._deleted_message(exc.gateway_arn), exc.code)
        log.warning("event=key_refused code=%s reason=%s", exc.code, str(exc))
        if exc.code == "Throttled":
            raise KeyRefused(429, f"the control plane is busy: {exc}", exc.code)
        raise KeyRefused(502, f"control plane refused the key request: {exc.code}: {exc}", exc.code)

    @staticmethod
    def _deleted_message(arn: str | None) -> str:
        return (
            f"gateway {arn or '(unknown)'} was deleted; this appliance can never be activated "
            "again: deploy a new one"
        )

    def _forget(self, arn: str | None) -> None:
        if self.state.deleted:
            return
        self._save(
            deleted=True, activated=False, deleted_gateway_arn=arn or self.state.gateway_arn,
            gateway_arn=None, gateway_name=None, region=None, schedule=[],
        )
        self._apply_schedule([])
        log.info("event=gateway_deleted gateway_arn=%s", arn)

    # --- uploads (the local API's PUT /v1/uploads/{name}) ----------------------------------

    def upload_refusal(self, name: str) -> UploadRefused | None:
        """Why an upload would be refused before any byte of it is read; None if it may go."""
        try:
            check_name(name)
        except UploadError as exc:
            return UploadRefused(400, "ValidationError", exc.message, "name")
        st = self.state
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
        refusal = self.upload_refusal(name)
        if refusal is not None:
            raise refusal
        assert self.identity is not None
        if self._upload_session is None:
            # No cookie jar, no env proxies: data goes straight to the configured URL.
            self._upload_session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(), trust_env=False, timeout=UPLOAD_TIMEOUT
            )
        task = asyncio.current_task()
        if task is not None:
            self._uploads.add(task)
        log.info("event=upload_started name=%s limit=%s", name, self.shaper.limit_bps or "none")
        try:
            return await send_upload(
                self._upload_session, self.settings.control_plane_url, self.identity, name,
                source, self.shaper, replace=replace,
            )
        except ShaperClosed:
            raise UploadRefused(503, "ShuttingDown", "the daemon is stopping; retry") from None
        except UploadError as exc:
            raise self._upload_error(exc) from None
        finally:
            if task is not None:
                self._uploads.discard(task)

    def _upload_error(self, exc: UploadError) -> UploadRefused:
        message = exc.message
        url = self.settings.control_plane_url
        if exc.code == "AlreadyExists":
            return UploadRefused(409, "AlreadyExists", message, "name", exc.existing)
        if exc.code == "ConnectionError" or exc.status >= 500:
            return UploadRefused(
                504, "ControlPlaneUnreachable", f"control plane {url} unreachable: {message}"
            )
        if exc.code == "NotActivated":
            self._wake_poll.set()  # the control plane knows better: catch up now
            return UploadRefused(409, "NotActivated", f"the control plane refused: {message}")
        if exc.code == "SourceError":
            return UploadRefused(400, "BodyError", f"the request body broke off: {message}")
        return UploadRefused(
            502, exc.code, f"control plane {url} refused the upload: {message}"
        )

    # --- the link loop -------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        """Long-poll while registered or activated; back off (capped, jittered) on errors."""
        assert self.link is not None
        backoff = Backoff(cap=self.settings.link_retry_max)
        # The first poll, and the first after an error, returns at once: the link's status
        # (reachable, last contact) is then known without waiting out a long-poll.
        quick = True
        while True:
            st = self.state
            if st.deleted:
                return
            if not (st.registered or st.activated):
                await self._wake_poll.wait()
                self._wake_poll.clear()
                continue
            try:
                answer = await self.link.poll(
                    after=st.config_version, wait=0 if quick else POLL_WAIT
                )
            except Refused as exc:
                if exc.code == "UnknownGateway" and not st.activated:
                    # The control plane forgets identities that never activate (a day after
                    # their last key expired): stop polling until a key is asked for again.
                    log.info("event=registration_lapsed")
                    self._save(registered=False)
                    continue
                quick = True
                delay = backoff.next_delay()
                log.warning("event=link_retry delay=%.1f reason=%s", delay, str(exc))
                await sleep_or_wake(self._wake_poll, delay)
                continue
            except LinkError as exc:
                quick = True
                delay = backoff.next_delay()
                log.warning("event=link_retry delay=%.1f reason=%s", delay, str(exc))
                await sleep_or_wake(self._wake_poll, delay)
                continue
            if backoff.attempt:
                log.info("event=link_restored")
            backoff.reset()
            quick = False
            self._wake_poll.clear()
            try:
                self.apply_poll(answer)
            except OSError as exc:  # e.g. a full disk: keep the old state, retry the poll
                delay = backoff.next_delay()
                log.error("event=state_write_failed delay=%.1f reason=%s", delay, str(exc))
                await sleep_or_wake(self._wake_poll, delay)

    def apply_poll(self, answer: PollAnswer) -> None:
        """Fold one poll answer into the state, written once, atomically."""
        st = self.state
        if answer.state == "deleted":
            self._forget(answer.gateway_arn)
            self._save(config_version=answer.version)
            return
        changes: dict[str, Any] = {"config_version": answer.version}
        if answer.state == "activated":
            if not st.activated:
                log.info(
                    "event=activated gateway_arn=%s name=%s region=%s",
                    answer.gateway_arn, answer.gateway_name, answer.region,
                )
            elif answer.gateway_name != st.gateway_name:
                log.info(
                    "event=renamed gateway_arn=%s old=%s new=%s",
                    answer.gateway_arn, st.gateway_name, answer.gateway_name,
                )
            changes.update(
                activated=True, registered=True, gateway_arn=answer.gateway_arn,
                gateway_name=answer.gateway_name, region=answer.region,
            )
        if answer.intervals != st.schedule and self._apply_schedule(answer.intervals):
            changes["schedule"] = answer.intervals
        if answer.software_update_request > st.software_update_request:
            log.info(
                "event=software_update_requested request=%d version=%s",
                answer.software_update_request, __version__,
            )
            changes.update(
                software_update_request=answer.software_update_request,
                software_update_requested_at=now_iso(),
            )
        self._save(**changes)

    # --- what the local API shows ----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        st = self.state
        assert self.identity is not None and self.link is not None
        return {
            "softwareVersion": __version__,
            "keyId": self.identity.key_id,
            "activated": st.activated,
            "deleted": st.deleted,
            "registered": st.registered,
            "gatewayArn": st.gateway_arn,
            "gatewayName": st.gateway_name,
            "region": st.region,
            "deletedGatewayArn": st.deleted_gateway_arn,
            "configVersion": st.config_version,
            "softwareUpdate": {
                "requests": st.software_update_request,
                "lastRequestedAt": st.software_update_requested_at,
            },
            "controlPlane": {
                "url": self.settings.control_plane_url,
                "reachable": self.link.reachable,
                "lastContact": self.link.last_contact,
                "lastError": self.link.last_error,
            },
            "shaping": self.shaper.status(),
        }

    def schedule_view(self) -> dict[str, Any]:
        shaping = self.shaper.status()
        schedule = self.shaper.schedule
        return {
            "intervals": schedule.to_api(),
            "inForce": shaping["inForce"],
            "limitBitsPerSec": shaping["limitBitsPerSec"],
            "nextChange": shaping["nextChange"],
            "preview": schedule.preview(),
        }

    def default_region(self) -> str:
        return self.state.region or regions.default_region()

