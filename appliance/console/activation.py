"""Menu 0, Get activation key: the documented question order, then the key from the daemon.

Order: gateway family (2 = Backup Gateway), region, network type (1 public / 2 VPC endpoint,
then the endpoint's DNS name), endpoint type (1 standard / 2 dual-stack), and for dual-stack
the IP version. The daemon asks the control plane for the key; the console only asks and shows.
"""

from __future__ import annotations

from datetime import UTC, datetime

from appliance.console.context import Context
from appliance.localclient import ApiError, ApiUnavailable
from gatewaycore import regions, rules, utctime
from gatewaycore.rules import RuleError

DEFAULT_REGION = "us-east-1"


def parse_region(text: str) -> str:
    """A region code's shape (gatewaycore.rules.region_code); typed case does not matter."""
    try:
        return rules.region_code(text.strip().lower(), "activationRegion")
    except RuleError as exc:
        raise ValueError(exc.message) from None


def parse_vpc_endpoint(text: str) -> str:
    """The VPC endpoint's DNS name by gatewaycore.rules.dns_name, the rule the daemon applies
    to `vpcEndpoint`: a name taken here is never refused after the last question."""
    try:
        return rules.dns_name(text, "vpcEndpoint")
    except RuleError as exc:
        raise ValueError(exc.message) from None


def ask_region(ctx: Context, question: str) -> str:
    """A region the service knows; an unknown one falls back to us-east-1, said aloud."""
    term = ctx.term
    while True:
        region = term.ask_valid(f"{question} (Return for {DEFAULT_REGION}): ", parse_region,
                                allow_empty=True, empty=DEFAULT_REGION)
        assert region is not None
        if region == DEFAULT_REGION:
            term.say(f"Region: {DEFAULT_REGION}")
            return region
        if regions.get(region) is not None:
            return region
        term.say(f"'{region}' is not a region this gateway knows: the gateway would fall back "
                 f"to {DEFAULT_REGION}.")
        if term.confirm(f"Use {DEFAULT_REGION} instead"):
            term.say(f"Region: {DEFAULT_REGION}")
            return DEFAULT_REGION


def _expiry_text(expires_at: str) -> str:
    try:
        when = utctime.parse_utc(expires_at)
    except ValueError:
        return expires_at
    minutes = max(0, int((when - datetime.now(UTC)).total_seconds() // 60))
    return f"{when:%Y-%m-%d %H:%M:%S} UTC (in about {minutes} minutes)"


def run(ctx: Context) -> None:
    term = ctx.term
    status, _ = ctx.status()
    if status and status.get("activated"):
        term.clear()
        term.say(f"This gateway is already activated as {status.get('gatewayName')}")
        term.say(f"({status.get('gatewayArn')}). No new key can be issued.")
        term.pause()
        return
    term.clear()
    term.choose([("2", "Backup Gateway")], prompt="Select gateway family: ",
                title="Get activation key", footer=["", "(Ctrl-C goes back)"])
    term.say("")
    region = ask_region(ctx, "Enter the AWS Region to activate in")
    term.say("")
    network = term.choose([("1", "Public"), ("2", "VPC endpoint")], prompt="Select network type: ")
    vpc = None
    if network == "2":
        vpc = term.ask_valid("Enter the VPC endpoint DNS name: ", parse_vpc_endpoint)
    term.say("")
    endpoint = term.choose([("1", "Standard endpoint"), ("2", "Dual-stack endpoint")],
                           prompt="Select endpoint type: ")
    ip_version = None
    if endpoint == "2":
        term.say("")
        ip_version = {"1": "ipv4", "2": "ipv6"}[
            term.choose([("1", "IPv4"), ("2", "IPv6")], prompt="Select IP version: ")
        ]
    term.say("")
    term.say("Requesting an activation key...")
    try:
        answer = ctx.api.activation_key(
            activationRegion=region, gatewayType="BACKUP_VM",
            endpointType="DUALSTACK" if endpoint == "2" else None,
            ipVersion=ip_version, vpcEndpoint=vpc,
        )
    except ApiError as exc:
        messages = {
            "AlreadyActivated": "This gateway is already activated; no new key can be issued.",
            "GatewayDeleted": "This gateway was deleted and can never be activated again.",
            "ControlPlaneUnreachable": "The activation service cannot be reached: "
                                       f"{exc.message}. Check option 3, Test network "
                                       "connectivity.",
        }
        text = messages.get(exc.code, f"{exc.message}" + (f" (field {exc.field})"
                                                           if exc.field else ""))
        term.say(f"[FAILED] {text}")
        term.pause()
        return
    except ApiUnavailable as exc:
        term.say(f"[FAILED] {exc}.")
        term.pause()
        return
    if answer.get("regionFallback"):
        term.say(f"Note: '{region}' is not a region the service knows: the key was issued "
                 f"for {answer.get('region')}.")
    term.say("")
    term.say(f"Activation key: {answer.get('activationKey')}")
    term.say(f"Region:         {answer.get('region')}")
    term.say(f"Expires:        {_expiry_text(str(answer.get('expiresAt', '')))}")
    term.say("Use it once, in the console or with `aws backup-gateway create-gateway`.")
    term.pause()
