"""What the local API shows: the status and schedule views, read from the parts that know.

Read-only: a view never changes the state, so the API can answer it at any moment without
waiting for (or racing with) the link loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from appliance.gatewaystate import GatewayState
from appliance.identity import Identity
from appliance.link import LinkClient
from appliance.shaping import ScheduledShaper
from appliance.version import __version__
from gatewaycore import regions


class StatusView:
    """`GET /v1/status`, `/v1/schedule`, `/v1/shaping` (docs/local-api.md) and the default
    region of a connectivity test."""

    def __init__(
        self,
        identity: Identity,
        link: LinkClient,
        gateway: GatewayState,
        shaper: ScheduledShaper,
        control_plane_url: str,
        syncing: Callable[[], bool] = lambda: False,
        jobs: Callable[[], dict[str, int]] | None = None,
        update: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._identity = identity
        self._link = link
        self._gateway = gateway
        self._shaper = shaper
        self._url = control_plane_url
        self._syncing = syncing
        self._jobs = jobs
        self._update = update

    def status(self) -> dict[str, Any]:
        st = self._gateway.state
        link = self._link
        return {
            "softwareVersion": __version__,
            "keyId": self._identity.key_id,
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
                **(self._update() if self._update is not None else {}),
            },
            "controlPlane": {
                "url": self._url,
                "reachable": link.reachable,
                "lastContact": link.last_contact,
                "lastError": link.last_error,
            },
            "shaping": self._shaper.status(),
            "hypervisor": self.hypervisor(),
            "jobs": self._jobs() if self._jobs is not None else None,
        }

    def hypervisor(self) -> dict[str, Any] | None:
        """The associated hypervisor and its last test and sync; never its password."""
        st = self._gateway.state
        if st.hypervisor_arn is None:
            return None
        last_sync = st.hypervisor_last_sync
        vms = last_sync.get("vms") if last_sync else None
        return {
            "hypervisorArn": st.hypervisor_arn,
            "host": st.hypervisor_host,
            "username": st.hypervisor_username,
            "passwordPending": st.hypervisor_password is None and st.hypervisor_password_pending,
            "syncing": self._syncing(),
            "lastTest": _outcome(st.hypervisor_last_test),
            "lastSync": _outcome(last_sync),
            "vmCount": vms if type(vms) is int else None,
        }

    def shaping(self) -> dict[str, Any]:
        return self._shaper.status()

    def schedule(self) -> dict[str, Any]:
        shaping = self._shaper.status()
        schedule = self._shaper.schedule
        return {
            "intervals": schedule.to_api(),
            "inForce": shaping["inForce"],
            "limitBitsPerSec": shaping["limitBitsPerSec"],
            "nextChange": shaping["nextChange"],
            "preview": schedule.preview(),
        }

    def default_region(self) -> str:
        """The activated region, else the default one (us-east-1)."""
        return self._gateway.state.region or regions.default_region()


def _outcome(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored outcome as shown: only the documented fields (the file may be older)."""
    if not record:
        return None
    return {k: record.get(k) for k in ("ok", "errorCode", "message", "at")}
