"""The `backup-gateway` operations: one method per operation, over the store.

Input has already passed the model's constraints (validation.py) when a method runs; here
are the rules the model cannot express: activation keys used once, in their region, before
they expire; regional visibility of gateways, hypervisors and VMs; the schedule's own rules
(gatewaycore.schedule, shared with the appliance so both agree on every edge); one
hypervisor per gateway; passwords kept encrypted (controlplane.atrest) and never answered.

Every method returns the output dict, except TestHypervisorConfiguration: the gateway runs
that test, so the method is a coroutine the protocol layer awaits (it must not block the
event loop while the gateway works).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from controlplane import walsync
from controlplane.atrest import SecretDecryptError, SecretsAtRest
from controlplane.clock import Clock
from controlplane.errors import ApiError, conflict, not_found, validation
from controlplane.pendingtests import PendingTests, TestResult, TooManyTests
from controlplane.sigv4 import Caller
from controlplane.store import (
    Gateway,
    Hypervisor,
    Store,
    StoreError,
    VirtualMachine,
    partition_of,
    state_of,
)
from controlplane.updates import UpdateShelf
from gatewaycore import rules
from gatewaycore.maintenance import Window, WindowError
from gatewaycore.schedule import Schedule, ScheduleError

log = logging.getLogger("controlplane.api")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_TAGS = 50
MAX_TAG_MAPPINGS = 100
# How long TestHypervisorConfiguration waits for the gateway: under the CLI's 60 s read
# timeout, and one long-poll period, so a gateway that is polling at all answers in time.
TEST_TIMEOUT_SECONDS = 25.0
# What each cause a gateway reports for a failed test means for the caller.
_TEST_HINTS = {
    "AuthenticationFailed": "the hypervisor refused the Username and Password; check them",
    "HostUnreachable": "the gateway cannot reach the host; check its address, the port and "
                       "the firewalls between the gateway and the hypervisor",
    "CertificateError": "the hypervisor's TLS certificate is not trusted by the gateway",
    "InvalidHost": "Host is not an address or URI the gateway can use for a hypervisor",
    "HypervisorError": "the hypervisor answered with an error",
}
_ARN_PARTS = re.compile(
    r"arn:(?P<partition>[^:]+):backup-gateway:(?P<region>[^:]+):(?P<account>[^:]+):"
    r"(?P<type>[a-z]+)/(?P<id>.+)"
)


# What _token() writes: version, region, a sequence number SQLite can hold (< 2**63), and
# for lists other than ListGateways the list it belongs to (a token fits one list only).
_TOKEN_RE = re.compile(
    r"v1\|(?P<region>[a-z0-9-]{1,32})\|(?P<seq>[0-9]{1,18})(?:\|(?P<kind>[a-z]{1,16}))?"
)
_LIST_OF_KIND = {"": "ListGateways", "hypervisors": "ListHypervisors",
                 "vms": "ListVirtualMachines"}


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


def hypervisor_host(value: str, member: str = "Host") -> str:
    """The Host of a hypervisor, by the rule the gateway connects with (gatewaycore.rules):
    what is imported here is what a gateway can use, nothing more."""
    try:
        rules.hypervisor_host(value, member)
    except rules.RuleError as exc:
        raise validation(f"{exc.field}: {exc.message}") from None
    return value


def mapped_tags(mappings: list[dict[str, str]], vmware_tags: list[dict[str, str]]
                ) -> list[tuple[str, str]]:
    """The AWS tags a VM's VMware tags map to under its hypervisor's mappings."""
    have = {(t["VmwareCategory"], t["VmwareTagName"]) for t in vmware_tags}
    return [
        (m["AwsTagKey"], m["AwsTagValue"]) for m in mappings
        if (m["VmwareCategory"], m["VmwareTagName"]) in have
    ]



def model_version(version: str) -> str:
    """The gateway's version as the model's `SoftwareVersion` (shape `Name`, pattern
    `[a-zA-Z0-9-]*`) allows it: the appliance's `0.1.0` is shown as `0-1-0`."""
    return re.sub(r"[^a-zA-Z0-9-]", "-", version)[:100]

class BackupGatewayApi:
    """What each API call does. `on_change(key_id)` wakes that gateway's long-polls."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        on_change: Callable[[str], None] = lambda key_id: None,
        secrets_at_rest: SecretsAtRest | None = None,
        tests: PendingTests | None = None,
        test_timeout: float = TEST_TIMEOUT_SECONDS,
        updates: UpdateShelf | None = None,
    ) -> None:
        """`secrets_at_rest` encrypts the hypervisor passwords (an in-memory key when not
        given: nothing then survives a restart); `tests` is the registry the gateway link
        shares; `test_timeout` how long TestHypervisorConfiguration waits for a gateway."""
        self.store = store
        self.clock = clock
        self.on_change = on_change
        self.secrets = secrets_at_rest or SecretsAtRest.ephemeral()
        self.tests = tests or PendingTests()
        self.test_timeout = test_timeout
        self.updates = updates  # the published update bundles (NextUpdateAvailabilityTime)
        self.account = store.account_id()
        self.operations: dict[
            str, Callable[[Caller, dict[str, Any]], dict[str, Any] | Awaitable[dict[str, Any]]]
        ] = {
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
                "import_hypervisor_configuration",
                "get_hypervisor",
                "list_hypervisors",
                "update_hypervisor",
                "delete_hypervisor",
                "test_hypervisor_configuration",
                "associate_gateway_to_server",
                "disassociate_gateway_from_server",
                "get_hypervisor_property_mappings",
                "put_hypervisor_property_mappings",
                "start_virtual_machines_metadata_sync",
                "list_virtual_machines",
                "get_virtual_machine",
            )
        }

    # -- helpers ------------------------------------------------------------------------

    def _in_region(self, caller: Caller, arn: str, kind: str, label: str,
                   find: Callable[[str], Any], member: str,
                   missing: Callable[[str], ApiError]) -> Any:
        """The resource `arn` names, if it is of `kind`, of this account and in the caller's
        region (the API is regional: another region's resource is not found, with a hint);
        `missing` makes the error (ResourceNotFoundException, or ValidationException where
        the model lists no ResourceNotFoundException for the operation)."""
        parts = _ARN_PARTS.fullmatch(arn)
        if parts is None or parts["type"] != kind:
            raise missing(f"{member} '{arn}' does not name a {label.lower()}")
        found = find(arn)
        if found is None or parts["account"] != self.account:
            raise missing(f"{label} {arn} was not found")
        if found.region != caller.region:
            raise missing(
                f"{label} {arn} was not found in region {caller.region} (it is in "
                f"{found.region}; call with --region {found.region})"
            )
        return found

    def _gateway(self, caller: Caller, arn: str, member: str = "GatewayArn",
                 missing: Callable[[str], ApiError] = not_found) -> Gateway:
        gateway: Gateway = self._in_region(caller, arn, "gateway", "Gateway",
                                           self.store.gateway, member, missing)
        return gateway

    def _hypervisor(self, caller: Caller, arn: str, member: str = "HypervisorArn",
                    missing: Callable[[str], ApiError] = not_found) -> Hypervisor:
        hypervisor: Hypervisor = self._in_region(caller, arn, "hypervisor", "Hypervisor",
                                                 self.store.hypervisor, member, missing)
        return hypervisor

    def _vm(self, caller: Caller, arn: str, member: str = "ResourceArn") -> VirtualMachine:
        vm: VirtualMachine = self._in_region(caller, arn, "vm", "Virtual machine",
                                             self.store.vm, member, not_found)
        return vm

    def _taggable(self, caller: Caller, arn: str, member: str) -> str:
        """The ARN of a gateway, hypervisor or VM that can carry tags."""
        parts = _ARN_PARTS.fullmatch(arn)
        kind = parts["type"] if parts else ""
        if kind == "hypervisor":
            return self._hypervisor(caller, arn, member).arn
        if kind == "vm":
            return self._vm(caller, arn, member).arn
        if kind == "gateway":
            return self._gateway(caller, arn, member).arn
        raise not_found(f"{member} '{arn}' does not name a gateway, hypervisor or virtual "
                        "machine")

    def _password_blob(self, password: str | None, arn: str) -> bytes | None:
        return self.secrets.encrypt(password, arn) if password else None

    def _password(self, hypervisor: Hypervisor) -> str | None:
        """The stored password in the clear (only to compare it); None if none or unreadable."""
        if hypervisor.password is None:
            return None
        try:
            return self.secrets.decrypt(hypervisor.password, hypervisor.arn)
        except SecretDecryptError as exc:
            log.error("event=secret_unreadable arn=%s error=%s", hypervisor.arn, exc)
            return None

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
        walsync.keyed_reads()  # its only read is the gateway's (the update shelf is files)
        gateway = self._gateway(caller, body["GatewayArn"])
        details = self._summary(gateway)
        if gateway.maintenance:
            details["MaintenanceStartTime"] = gateway.maintenance
        if gateway.vpc_endpoint:
            details["VpcEndpoint"] = gateway.vpc_endpoint
        if gateway.software_version:
            details["SoftwareVersion"] = model_version(gateway.software_version)
        offered = self.updates.offer_for(gateway.software_version) if self.updates else None
        if offered is not None:
            details["NextUpdateAvailabilityTime"] = self._update_time(
                offered.published_at, gateway.maintenance)
        if gateway.hypervisor_id:
            details["HypervisorId"] = gateway.hypervisor_id
        return {"Gateway": details}

    def _update_time(self, published_at: float, window: dict[str, int] | None) -> float:
        """When a published update reaches the gateway: its next maintenance window (it
        installs then, docs/updates.md), or the publication when it has none (it is
        available from then, installed on UpdateGatewaySoftwareNow)."""
        if not window:
            return published_at
        now = datetime.fromtimestamp(max(self.clock.now(), published_at), UTC)
        return Window.from_api(window).next_start(now).timestamp()

    def list_gateways(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        walsync.keyed_reads()  # its only reads are the page's gateways
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
    def _token(region: str, seq: int, kind: str = "") -> str:
        text = f"v1|{region}|{seq}" + (f"|{kind}" if kind else "")
        return base64.urlsafe_b64encode(text.encode()).decode()

    @staticmethod
    def _parse_token(token: str, region: str, kind: str = "") -> int:
        """The sequence number in a token of ours; anything else is a ValidationException.

        An allow-list, not `str.isdigit`: that also takes '²' (int() then fails) and digits
        enough to overflow SQLite's 64-bit integers (both were a 500). A token of another
        list (ListGateways' given to ListHypervisors) is refused too.
        """
        parts = _TOKEN_RE.fullmatch(_b64_text(token))
        if parts is None or (parts["kind"] or "") != kind:
            raise validation(
                "NextToken: not a token this service returned for this list (the accepted "
                f"form is the opaque NextToken of the previous {_LIST_OF_KIND[kind]} "
                "response, unchanged)"
            )
        if parts["region"] != region:
            raise validation(
                f"NextToken: was returned for region {parts['region']}, not {region}"
            )
        return int(parts["seq"])

    def _page_args(self, caller: Caller, body: dict[str, Any], kind: str) -> tuple[int, int]:
        """(after, limit) of a paginated call."""
        limit = min(body.get("MaxResults") or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = 0
        if body.get("NextToken"):
            after = self._parse_token(body["NextToken"], caller.region, kind)
        return after, limit

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
        arn = self._taggable(caller, body["ResourceARN"], "ResourceARN")
        new = self._tags(body["Tags"])
        merged = dict(self.store.tags(arn)) | dict(new)
        if len(merged) > MAX_TAGS:
            raise validation(
                f"Tags: a resource holds at most {MAX_TAGS} tags; this call would make "
                f"{len(merged)}"
            )
        self.store.tag(arn, new)
        return {"ResourceARN": arn}

    def untag_resource(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        arn = self._taggable(caller, body["ResourceARN"], "ResourceARN")
        self.store.untag(arn, body["TagKeys"])
        return {"ResourceARN": arn}

    def list_tags_for_resource(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        """The resource's tags; a VM's also include the AWS tags its VMware tags map to
        (PutHypervisorPropertyMappings), a tag set on the VM itself winning on a clash."""
        arn = self._taggable(caller, body["ResourceArn"], "ResourceArn")
        tags = dict(self.store.tags(arn))
        if ":vm/" in arn:
            vm = self.store.vm(arn)
            hypervisor = self.store.hypervisor_by_id(vm.hypervisor_id) if vm else None
            if vm is not None and hypervisor is not None:
                tags = dict(mapped_tags(hypervisor.mappings, vm.tags)) | tags
        listed = [{"Key": k, "Value": v} for k, v in sorted(tags.items())]
        return {"ResourceArn": arn, "Tags": listed}

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
        maintenance = {
            k: body[k]
            for k in ("HourOfDay", "MinuteOfHour", "DayOfWeek", "DayOfMonth")
            if body.get(k) is not None
        }
        try:  # the rule the gateway applies to the window too (gatewaycore/maintenance.py)
            window = Window.from_api(maintenance)
        except WindowError as exc:
            raise validation(str(exc)) from None
        if self.store.update_gateway(gateway.arn, maintenance=maintenance) is None:
            raise not_found(f"Gateway {gateway.arn} was not found")
        log.info("event=maintenance_set arn=%s window=%s", gateway.arn, window.describe())
        self._changed(gateway)  # the gateway installs updates in this window: tell it now
        return {"GatewayArn": gateway.arn}


    # -- hypervisors ----------------------------------------------------------------------

    @staticmethod
    def _hypervisor_summary(hypervisor: Hypervisor) -> dict[str, Any]:
        out: dict[str, Any] = {
            "Host": hypervisor.host,
            "HypervisorArn": hypervisor.arn,
            "Name": hypervisor.name,
            "State": hypervisor.state,
        }
        if hypervisor.kms_key_arn:
            out["KmsKeyArn"] = hypervisor.kms_key_arn
        return out

    def import_hypervisor_configuration(self, caller: Caller, body: dict[str, Any]
                                        ) -> dict[str, Any]:
        host = hypervisor_host(body["Host"])
        tags = self._tags(body.get("Tags") or [])
        while True:  # 32 random bits: a clash is rare, and the UNIQUE column backs this
            hypervisor_id = "hype-" + secrets.token_hex(4).upper()
            if self.store.hypervisor_by_id(hypervisor_id) is None:
                break
        arn = (f"arn:{partition_of(caller.region)}:backup-gateway:{caller.region}:"
               f"{self.account}:hypervisor/{hypervisor_id}")
        try:
            self.store.create_hypervisor(
                hypervisor_id, arn, caller.region, body["Name"], host, body.get("Username"),
                self._password_blob(body.get("Password"), arn), body.get("KmsKeyArn"), tags,
                self.clock.now(),
            )
        except StoreError as exc:
            raise conflict(f"Host: {exc.message}; change that one with UpdateHypervisor, or "
                           "DeleteHypervisor it first") from None
        log.info("event=hypervisor_imported arn=%s name=%s host=%s", arn, body["Name"], host)
        return {"HypervisorArn": arn}

    def get_hypervisor(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        hypervisor = self._hypervisor(caller, body["HypervisorArn"])
        details = self._hypervisor_summary(hypervisor)
        if hypervisor.log_group_arn:
            details["LogGroupArn"] = hypervisor.log_group_arn
        if hypervisor.last_sync is not None:
            details["LastSuccessfulMetadataSyncTime"] = hypervisor.last_sync
        if hypervisor.sync_status:
            details["LatestMetadataSyncStatus"] = hypervisor.sync_status
        if hypervisor.sync_message:
            details["LatestMetadataSyncStatusMessage"] = hypervisor.sync_message
        return {"Hypervisor": details}

    def list_hypervisors(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        after, limit = self._page_args(caller, body, "hypervisors")
        page = self.store.list_hypervisors(caller.region, after, limit + 1)
        out: dict[str, Any] = {"Hypervisors": [self._hypervisor_summary(h) for h in page[:limit]]}
        if len(page) > limit:
            out["NextToken"] = self._token(caller.region, page[limit - 1].seq, "hypervisors")
        return out

    def update_hypervisor(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        """Change what is given; a new Host, Username or Password goes to the associated
        gateways, which sync again with it (the hypervisor is PENDING until they report)."""
        hypervisor = self._hypervisor(caller, body["HypervisorArn"])
        changes: dict[str, Any] = {}
        if body.get("Name") is not None:
            changes["name"] = body["Name"]
        if body.get("Host") is not None:
            changes["host"] = hypervisor_host(body["Host"])
        if body.get("Username") is not None:
            changes["username"] = body["Username"]
        if body.get("Password") is not None:
            changes["password"] = self._password_blob(body["Password"], hypervisor.arn)
        if body.get("LogGroupArn") is not None:
            changes["log_group_arn"] = body["LogGroupArn"] or None  # "" clears it
        if not changes:
            return {"HypervisorArn": hypervisor.arn}
        try:
            result = self.store.update_hypervisor(hypervisor.arn, **changes)
        except StoreError as exc:
            raise conflict(f"Host: {exc.message}") from None
        if result is None:
            raise not_found(f"Hypervisor {hypervisor.arn} was not found")
        for key_id in result[1]:
            self.on_change(key_id)
        log.info("event=hypervisor_updated arn=%s changed=%s gateways_told=%d",
                 hypervisor.arn, ",".join(sorted(changes)), len(result[1]))
        return {"HypervisorArn": hypervisor.arn}

    def delete_hypervisor(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        """Delete it with its VMs; refused (ConflictException) while gateways use it."""
        hypervisor = self._hypervisor(caller, body["HypervisorArn"])
        try:
            deleted = self.store.delete_hypervisor(hypervisor.arn)
        except StoreError as exc:
            raise conflict(
                f"Hypervisor {hypervisor.arn} is associated with gateway(s) {exc.message}; "
                "DisassociateGatewayFromServer them first"
            ) from None
        if deleted is None:
            raise not_found(f"Hypervisor {hypervisor.arn} was not found")
        log.info("event=hypervisor_deleted arn=%s", hypervisor.arn)
        return {"HypervisorArn": hypervisor.arn}

    async def test_hypervisor_configuration(self, caller: Caller, body: dict[str, Any]
                                            ) -> dict[str, Any]:
        """Ask the gateway to connect to the host with these credentials, and wait for its
        answer (`test_timeout` at most): the gateway is the one on the hypervisor's network.

        A coroutine: the protocol layer awaits it, so the event loop serves the gateway's
        poll and its test result meanwhile.
        """
        gateway = self._gateway(caller, body["GatewayArn"])
        host = hypervisor_host(body["Host"])
        try:
            test = self.tests.open(gateway.key_id, gateway.arn, host, body.get("Username"),
                                   body.get("Password"))
        except TooManyTests:
            raise conflict(f"Gateway {gateway.arn} already has the most tests waiting for it; "
                           "retry when they are answered") from None
        try:
            self.store.bump_version(gateway.key_id)
            self.on_change(gateway.key_id)
            log.info("event=hypervisor_test_started gateway=%s host=%s test_id=%s",
                     gateway.arn, host, test.test_id)
            try:
                result = await asyncio.wait_for(asyncio.shield(test.result), self.test_timeout)
            except TimeoutError:
                log.info("event=hypervisor_test_unanswered gateway=%s test_id=%s wait=%g",
                         gateway.arn, test.test_id, self.test_timeout)
                raise conflict(
                    f"Gateway {gateway.arn} is unreachable: it did not answer the test within "
                    f"{self.test_timeout:g} s (it is powered off, cannot reach this control "
                    "plane, or not activated on it); check the gateway's console and network, "
                    "then retry",
                    error_code="GatewayUnreachable",
                ) from None
        finally:
            self.tests.close(test.test_id)
        log.info("event=hypervisor_test_answered gateway=%s test_id=%s ok=%s error=%s",
                 gateway.arn, test.test_id, str(result.ok).lower(), result.error_code)
        self._note_test(gateway, host, body.get("Username"), body.get("Password"), result)
        if result.ok:
            return {}
        code = result.error_code or "HypervisorError"
        hint = _TEST_HINTS.get(code, "")
        raise validation(
            f"Gateway {gateway.arn} could not use hypervisor {host}: {code}: "
            f"{result.message or 'no detail given'} ({hint})",
            error_code=code,
        )

    def _note_test(self, gateway: Gateway, host: str, username: str | None,
                   password: str | None, result: TestResult) -> None:
        """A test of exactly the gateway's hypervisor's settings tells its State too."""
        if not gateway.hypervisor_id:
            return
        hypervisor = self.store.hypervisor_by_id(gateway.hypervisor_id)
        if hypervisor is None or (hypervisor.host, hypervisor.username) != (host, username):
            return
        if self._password(hypervisor) != (password or None):
            return
        self.store.set_hypervisor_state(hypervisor.hypervisor_id, state_of(result.ok,
                                                                           result.error_code))

    def associate_gateway_to_server(self, caller: Caller, body: dict[str, Any]
                                    ) -> dict[str, Any]:
        """One hypervisor per gateway: a gateway associated elsewhere is a
        ConflictException (disassociate it first); again with its own, a new sync."""
        gateway = self._gateway(caller, body["GatewayArn"], missing=validation)
        hypervisor = self._hypervisor(caller, body["ServerArn"], "ServerArn", missing=validation)
        try:
            key_ids = self.store.associate(gateway.arn, hypervisor.hypervisor_id)
        except StoreError as exc:
            if exc.reason == "Associated":
                raise conflict(
                    f"Gateway {gateway.arn} is already associated with hypervisor "
                    f"{exc.message}; DisassociateGatewayFromServer first"
                ) from None
            raise validation(exc.message) from None
        for key_id in key_ids:
            self.on_change(key_id)
        log.info("event=gateway_associated gateway=%s hypervisor=%s", gateway.arn,
                 hypervisor.arn)
        return {"GatewayArn": gateway.arn}

    def disassociate_gateway_from_server(self, caller: Caller, body: dict[str, Any]
                                         ) -> dict[str, Any]:
        gateway = self._gateway(caller, body["GatewayArn"])
        previous = self.store.disassociate(gateway.arn)
        if previous is None:
            raise conflict(f"Gateway {gateway.arn} is not associated with a hypervisor")
        self.on_change(gateway.key_id)
        log.info("event=gateway_disassociated gateway=%s hypervisor_id=%s", gateway.arn,
                 previous)
        return {"GatewayArn": gateway.arn}

    def get_hypervisor_property_mappings(self, caller: Caller, body: dict[str, Any]
                                         ) -> dict[str, Any]:
        hypervisor = self._hypervisor(caller, body["HypervisorArn"])
        out: dict[str, Any] = {
            "HypervisorArn": hypervisor.arn,
            "VmwareToAwsTagMappings": hypervisor.mappings,
        }
        if hypervisor.iam_role_arn:
            out["IamRoleArn"] = hypervisor.iam_role_arn
        return out

    def put_hypervisor_property_mappings(self, caller: Caller, body: dict[str, Any]
                                         ) -> dict[str, Any]:
        """Replace the VMware-to-AWS tag mappings; they apply to the VMs' tags as listed
        (ListTagsForResource of a VM ARN)."""
        hypervisor = self._hypervisor(caller, body["HypervisorArn"])
        items = body["VmwareToAwsTagMappings"]
        if len(items) > MAX_TAG_MAPPINGS:
            raise validation(f"VmwareToAwsTagMappings: at most {MAX_TAG_MAPPINGS} mappings, "
                             f"got {len(items)}")
        seen: set[tuple[str, str, str]] = set()
        mappings = []
        for i, item in enumerate(items):
            mapping = {k: item[k] for k in ("VmwareCategory", "VmwareTagName", "AwsTagKey",
                                            "AwsTagValue")}
            if mapping["AwsTagKey"].lower().startswith("aws:"):
                raise validation(f"VmwareToAwsTagMappings[{i}].AwsTagKey: keys starting with "
                                 "'aws:' are reserved")
            key = (mapping["VmwareCategory"], mapping["VmwareTagName"], mapping["AwsTagKey"])
            if key in seen:
                raise validation(f"VmwareToAwsTagMappings[{i}]: maps {key[0]}/{key[1]} to "
                                 f"{key[2]} a second time")
            seen.add(key)
            mappings.append(mapping)
        if not self.store.put_mappings(hypervisor.arn, mappings, body["IamRoleArn"]):
            raise not_found(f"Hypervisor {hypervisor.arn} was not found")
        log.info("event=hypervisor_mappings_set arn=%s mappings=%d", hypervisor.arn,
                 len(mappings))
        return {"HypervisorArn": hypervisor.arn}

    def start_virtual_machines_metadata_sync(self, caller: Caller, body: dict[str, Any]
                                             ) -> dict[str, Any]:
        """Ask the associated gateways to report the hypervisor's VMs (syncRequest + 1)."""
        hypervisor = self._hypervisor(caller, body["HypervisorArn"])
        if not self.store.gateways_of(hypervisor.hypervisor_id):
            raise validation(
                f"HypervisorArn: no gateway is associated with {hypervisor.arn}, so none can "
                "sync its virtual machines; AssociateGatewayToServer first"
            )
        result = self.store.request_sync(hypervisor.arn)
        if result is None:
            raise not_found(f"Hypervisor {hypervisor.arn} was not found")
        updated, key_ids = result
        for key_id in key_ids:
            self.on_change(key_id)
        log.info("event=vm_sync_requested arn=%s sync_request=%d gateways=%d",
                 hypervisor.arn, updated.sync_request, len(key_ids))
        return {"HypervisorArn": hypervisor.arn}

    # -- virtual machines -----------------------------------------------------------------

    @staticmethod
    def _vm_summary(vm: VirtualMachine) -> dict[str, Any]:
        out: dict[str, Any] = {
            "HypervisorId": vm.hypervisor_id,
            "Name": vm.name,
            "Path": vm.path,
            "ResourceArn": vm.arn,
        }
        if vm.host_name:
            out["HostName"] = vm.host_name
        if vm.last_backup is not None:
            out["LastBackupDate"] = vm.last_backup
        return out

    def list_virtual_machines(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        hypervisor_id = None
        if body.get("HypervisorArn"):
            hypervisor_id = self._hypervisor(caller, body["HypervisorArn"],
                                             missing=validation).hypervisor_id
        after, limit = self._page_args(caller, body, "vms")
        page = self.store.list_vms(caller.region, hypervisor_id, after, limit + 1)
        out: dict[str, Any] = {"VirtualMachines": [self._vm_summary(v) for v in page[:limit]]}
        if len(page) > limit:
            out["NextToken"] = self._token(caller.region, page[limit - 1].seq, "vms")
        return out

    def get_virtual_machine(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        vm = self._vm(caller, body["ResourceArn"])
        details = self._vm_summary(vm)
        details["VmwareTags"] = vm.tags
        return {"VirtualMachine": details}

