"""The `backup-gateway` operations: one method per operation, over the store.

Input has already passed the model's constraints (validation.py) when a method runs; here
are the rules the model cannot express: activation keys used once, in their region, before
they expire; regional visibility of gateways; the schedule's own rules (gatewaycore.schedule,
shared with the appliance so both agree on every edge).
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Callable
from typing import Any

from controlplane.clock import Clock
from controlplane.errors import not_found, validation
from controlplane.sigv4 import Caller
from controlplane.store import Gateway, Store, StoreError
from gatewaycore.schedule import Schedule, ScheduleError

log = logging.getLogger("controlplane.api")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_TAGS = 50
_ARN_PARTS = re.compile(
    r"arn:(?P<partition>[^:]+):backup-gateway:(?P<region>[^:]+):(?P<account>[^:]+):"
    r"(?P<type>[a-z]+)/(?P<id>.+)"
)


# What _token() writes: version, region, and a sequence number SQLite can hold (< 2**63).
_TOKEN_RE = re.compile(r"v1\|(?P<region>[a-z0-9-]{1,32})\|(?P<seq>[0-9]{1,18})")


def _b64_text(token: str) -> str:
    """The decoded text of a urlsafe-base64 token, or '' when it does not decode."""
    if not re.fullmatch(r"[A-Za-z0-9_=-]{1,1000}", token):
        return ""
    try:
        return base64.urlsafe_b64decode(token).decode("ascii")
    except (ValueError, binascii.Error):
        return ""


def _operation_name(method: str) -> str:
    return "".join(part.capitalize() for part in method.split("_"))


class BackupGatewayApi:
    """What each API call does. `on_change(key_id)` wakes that gateway's long-polls."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        on_change: Callable[[str], None] = lambda key_id: None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.on_change = on_change
        self.account = store.account_id()
        self.operations: dict[str, Callable[[Caller, dict[str, Any]], dict[str, Any]]] = {
            _operation_name(name): getattr(self, name)
            for name in (
                "create_gateway",
                "get_gateway",
                "list_gateways",
                "update_gateway_information",
                "delete_gateway",
                "update_gateway_software_now",
                "tag_resource",
                "untag_resource",
                "list_tags_for_resource",
                "put_bandwidth_rate_limit_schedule",
                "get_bandwidth_rate_limit_schedule",
                "put_maintenance_start_time",
            )
        }

    # -- helpers ------------------------------------------------------------------------

    def _gateway(self, caller: Caller, arn: str, member: str = "GatewayArn") -> Gateway:
        parts = _ARN_PARTS.fullmatch(arn)
        if parts is None or parts["type"] != "gateway":
            raise not_found(f"{member} '{arn}' does not name a gateway")
        gateway = self.store.gateway(arn)
        if gateway is None or parts["account"] != self.account:
            raise not_found(f"Gateway {arn} was not found")
        if gateway.region != caller.region:
            raise not_found(
                f"Gateway {arn} was not found in region {caller.region} (it is in "
                f"{gateway.region}; call with --region {gateway.region})"
            )
        return gateway

    @staticmethod
    def _tags(items: list[dict[str, str]], member: str = "Tags") -> list[tuple[str, str]]:
        if len(items) > MAX_TAGS:
            raise validation(f"{member}: at most {MAX_TAGS} tags per resource, got {len(items)}")
        for i, tag in enumerate(items):
            if tag["Key"].lower().startswith("aws:"):
                raise validation(f"{member}[{i}].Key: keys starting with 'aws:' are reserved")
        return [(t["Key"], t["Value"]) for t in items]

    def _changed(self, gateway: Gateway) -> None:
        self.on_change(gateway.key_id)

    # -- operations ---------------------------------------------------------------------

    def create_gateway(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        tags = self._tags(body.get("Tags") or [])
        try:
            gateway = self.store.create_gateway(
                key=body["ActivationKey"],
                region=caller.region,
                account=self.account,
                name=body["GatewayDisplayName"],
                gateway_type=body["GatewayType"],
                tags=tags,
                now=self.clock.now(),
            )
        except StoreError as exc:
            log.info("event=activation_refused reason=%s region=%s", exc.reason, caller.region)
            raise validation(exc.message) from None
        log.info("event=gateway_created arn=%s name=%s", gateway.arn, gateway.name)
        self._changed(gateway)
        return {"GatewayArn": gateway.arn}

    @staticmethod
    def _summary(gateway: Gateway) -> dict[str, Any]:
        out: dict[str, Any] = {
            "GatewayArn": gateway.arn,
            "GatewayDisplayName": gateway.name,
            "GatewayType": gateway.gateway_type,
        }
        if gateway.last_seen is not None:
            out["LastSeenTime"] = gateway.last_seen
        return out

    def get_gateway(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        gateway = self._gateway(caller, body["GatewayArn"])
        details = self._summary(gateway)
        if gateway.maintenance:
            details["MaintenanceStartTime"] = gateway.maintenance
        if gateway.vpc_endpoint:
            details["VpcEndpoint"] = gateway.vpc_endpoint
        if gateway.software_version:
            details["SoftwareVersion"] = gateway.software_version
        return {"Gateway": details}

    def list_gateways(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        limit = min(body.get("MaxResults") or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = 0
        if body.get("NextToken"):
            after = self._parse_token(body["NextToken"], caller.region)
        page = self.store.list_gateways(caller.region, after, limit + 1)
        out: dict[str, Any] = {"Gateways": [self._summary(g) for g in page[:limit]]}
        if len(page) > limit:
            out["NextToken"] = self._token(caller.region, page[limit - 1].seq)
        return out

    @staticmethod
    def _token(region: str, seq: int) -> str:
        return base64.urlsafe_b64encode(f"v1|{region}|{seq}".encode()).decode()

    @staticmethod
    def _parse_token(token: str, region: str) -> int:
        """The sequence number in a token of ours; anything else is a ValidationException.

        An allow-list, not `str.isdigit`: that also takes '²' (int() then fails) and digits
        enough to overflow SQLite's 64-bit integers (both were a 500).
        """
        parts = _TOKEN_RE.fullmatch(_b64_text(token))
        if parts is None:
            raise validation(
                "NextToken: not a token this service returned (the accepted form is the "
                "opaque NextToken of the previous ListGateways response, unchanged)"
            )
        if parts["region"] != region:
            raise validation(
                f"NextToken: was returned for region {parts['region']}, not {region}"
            )
        return int(parts["seq"])

    def update_gateway_information(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        gateway = self._gateway(caller, body["GatewayArn"])
        if body.get("GatewayDisplayName") is not None:
            updated = self.store.update_gateway(gateway.arn, name=body["GatewayDisplayName"])
            if updated is None:
                raise not_found(f"Gateway {gateway.arn} was not found")
            log.info("event=gateway_renamed arn=%s name=%s", gateway.arn, updated.name)
            self._changed(gateway)
        return {"GatewayArn": gateway.arn}

    def delete_gateway(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        gateway = self._gateway(caller, body["GatewayArn"])
        if self.store.delete_gateway(gateway.arn, self.clock.now()) is None:
            raise not_found(f"Gateway {gateway.arn} was not found")
        log.info("event=gateway_deleted arn=%s key_id=%s", gateway.arn, gateway.key_id)
        self._changed(gateway)
        return {"GatewayArn": gateway.arn}

    def update_gateway_software_now(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        gateway = self._gateway(caller, body["GatewayArn"])
        updated = self.store.update_gateway(gateway.arn, software_update_request=True)
        if updated is None:
            raise not_found(f"Gateway {gateway.arn} was not found")
        log.info(
            "event=software_update_requested arn=%s request=%d",
            gateway.arn,
            updated.software_update_request,
        )
        self._changed(gateway)
        return {"GatewayArn": gateway.arn}

    def tag_resource(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        gateway = self._gateway(caller, body["ResourceARN"], "ResourceARN")
        new = self._tags(body["Tags"])
        merged = dict(self.store.tags(gateway.arn)) | dict(new)
        if len(merged) > MAX_TAGS:
            raise validation(
                f"Tags: a resource holds at most {MAX_TAGS} tags; this call would make "
                f"{len(merged)}"
            )
        self.store.tag(gateway.arn, new)
        return {"ResourceARN": gateway.arn}

    def untag_resource(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        gateway = self._gateway(caller, body["ResourceARN"], "ResourceARN")
        self.store.untag(gateway.arn, body["TagKeys"])
        return {"ResourceARN": gateway.arn}

    def list_tags_for_resource(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        gateway = self._gateway(caller, body["ResourceArn"], "ResourceArn")
        tags = [{"Key": k, "Value": v} for k, v in self.store.tags(gateway.arn)]
        return {"ResourceArn": gateway.arn, "Tags": tags}

    def put_bandwidth_rate_limit_schedule(
        self, caller: Caller, body: dict[str, Any]
    ) -> dict[str, Any]:
        gateway = self._gateway(caller, body["GatewayArn"])
        try:
            schedule = Schedule.from_api(body["BandwidthRateLimitIntervals"])
        except ScheduleError as exc:
            raise validation(str(exc)) from None
        updated = self.store.update_gateway(gateway.arn, schedule=schedule.to_api())
        if updated is None:
            raise not_found(f"Gateway {gateway.arn} was not found")
        log.info(
            "event=schedule_set arn=%s intervals=%d", gateway.arn, len(schedule.intervals)
        )
        self._changed(gateway)
        return {"GatewayArn": gateway.arn}

    def get_bandwidth_rate_limit_schedule(
        self, caller: Caller, body: dict[str, Any]
    ) -> dict[str, Any]:
        gateway = self._gateway(caller, body["GatewayArn"])
        return {"GatewayArn": gateway.arn, "BandwidthRateLimitIntervals": gateway.schedule}

    def put_maintenance_start_time(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        gateway = self._gateway(caller, body["GatewayArn"])
        if body.get("DayOfWeek") is not None and body.get("DayOfMonth") is not None:
            raise validation(
                "DayOfWeek, DayOfMonth: give one of them (weekly or monthly), not both"
            )
        maintenance = {
            k: body[k]
            for k in ("HourOfDay", "MinuteOfHour", "DayOfWeek", "DayOfMonth")
            if body.get(k) is not None
        }
        self.store.update_gateway(gateway.arn, bump=False, maintenance=maintenance)
        return {"GatewayArn": gateway.arn}

