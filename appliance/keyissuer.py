"""Issuing activation keys: the one answer to a key request, for port 80 and the local API.

Both the activation page and the console's `POST /v1/activation-key` call `KeyIssuer.issue`,
so a refusal (already activated, deleted, control plane unreachable, throttled) has the same
status and message wherever it is asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from appliance.activation import ActivationRequest, KeyRefused, KeyResult
from appliance.gatewaystate import GatewayState
from appliance.link import LinkClient, LinkError, Refused, Unreachable

log = logging.getLogger(__name__)


def deleted_message(arn: str | None) -> str:
    """Why a deleted gateway gets no key: an identity once deleted is never reused."""
    return (
        f"gateway {arn or '(unknown)'} was deleted; this appliance can never be activated "
        "again: deploy a new one"
    )


class KeyIssuer:
    """Asks the control plane for a key bound to this gateway's identity.

    `wake_poll`: called whenever the control plane has just answered, so the link loop starts
    polling at once (a new registration) or cuts a backoff short (it is reachable again).
    """

    def __init__(
        self, link: LinkClient, gateway: GatewayState, wake_poll: Callable[[], None]
    ) -> None:
        self._link = link
        self._gateway = gateway
        self._wake_poll = wake_poll

    async def issue(self, req: ActivationRequest) -> KeyResult:
        """A key for `req`; KeyRefused carries the status, message and code to answer with."""
        st = self._gateway.state
        if st.deleted:
            raise KeyRefused(410, deleted_message(st.deleted_gateway_arn), "GatewayDeleted")
        if st.activated:
            raise KeyRefused(
                409, f"this gateway is already activated as {st.gateway_arn}", "AlreadyActivated"
            )
        try:
            issued = await self._link.request_activation_key(
                req.region, req.endpoint_type, req.ip_version, req.vpc_endpoint
            )
        except Unreachable as exc:
            log.warning("event=key_failed reason=%s", str(exc))
            raise KeyRefused(504, str(exc), "ControlPlaneUnreachable") from None
        except Refused as exc:
            raise self._refused(exc) from None
        except LinkError as exc:
            log.warning("event=key_failed reason=%s", str(exc))
            raise KeyRefused(502, f"control plane answer not understood: {exc}", exc.code) from None
        if not self._gateway.state.registered:
            self._gateway.save(registered=True)
        self._wake_poll()  # start polling now, and cut any backoff short: it answered
        log.info(
            "event=key_issued region=%s fallback=%s endpoint_type=%s ip_version=%s vpc=%s",
            issued.region, str(req.region_fallback).lower(), req.endpoint_type,
            req.ip_version or "-", req.vpc_endpoint or "-",
        )
        return KeyResult(issued.key, issued.region, issued.expires_at, issued.console_url)

    def _refused(self, exc: Refused) -> KeyRefused:
        """The control plane's refusal as ours; what it tells of the gateway is kept."""
        self._wake_poll()
        if exc.code == "AlreadyActivated":
            # We missed the activation (e.g. were down): the poll will bring the details.
            if not self._gateway.state.registered:
                self._gateway.save(registered=True)
            return KeyRefused(
                409, f"this gateway is already activated as {exc.gateway_arn}", exc.code
            )
        if exc.code == "GatewayDeleted":
            self._gateway.forget(exc.gateway_arn)
            return KeyRefused(410, deleted_message(exc.gateway_arn), exc.code)
        log.warning("event=key_refused code=%s reason=%s", exc.code, str(exc))
        if exc.code == "Throttled":
            return KeyRefused(429, f"the control plane is busy: {exc}", exc.code)
        return KeyRefused(
            502, f"control plane refused the key request: {exc.code}: {exc}", exc.code
        )
