"""One validator per rule that the appliance, its console, its boot-time settings and the
control plane all apply.

When two places each kept their own copy of a rule, the copies drifted: the boot-time
settings accepted a control-plane URL the daemon refused (so a typo stopped the daemon), the
console accepted a VPC endpoint the daemon refused after every other question was answered.
Here each rule is written once, as an allow-list, and every caller asks it.

A validator takes the raw value, returns the value to use (normalised where the rule says
so) or raises RuleError naming the field and what it accepts. Callers turn RuleError into
their own answer shape (a 400 on port 80, a ValidationError on the link, a line on the
console) from its structured fields, never by parsing its text.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

ENDPOINT_TYPES = ("STANDARD", "DUALSTACK")
IP_VERSIONS = ("ipv4", "ipv6")
GATEWAY_TYPES = ("BACKUP_VM",)

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-[0-9]{1,2}")
_UPLOAD_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")
_SOFTWARE_VERSION = re.compile(r"[A-Za-z0-9.+_-]{1,100}")
HOST_NAME_MAX = 64  # Linux's HOST_NAME_MAX: what sethostname() and hostnamed accept
DNS_NAME_MAX = 253

UPLOAD_NAME_RULE = "1-200 characters of A-Z a-z 0-9 . _ -, not '.' or '..'"
DNS_NAME_EXAMPLE = "vpce-0123abcd-xyz.backup-gateway.us-west-2.vpce.amazonaws.com"


class RuleError(ValueError):
    """`field` has a value the rule does not accept; `message` says what it accepts."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return repr(text[:100] + ("..." if len(text) > 100 else ""))


def _text(value: Any, field: str, what: str) -> str:
    if not isinstance(value, str):
        raise RuleError(field, f"must be {what}, got {type(value).__name__}")
    return value


def _labels_ok(name: str) -> bool:
    return all(_LABEL.fullmatch(label) for label in name.split("."))


def dns_name(value: Any, field: str = "vpcEndpoint") -> str:
    """A fully qualified DNS name: two or more letter-digit-hyphen labels, at most 253
    characters; a trailing dot is dropped and the name lower-cased (DNS is case-blind)."""
    text = _text(value, field, "a DNS name").strip()
    name = text[:-1] if text.endswith(".") else text
    if not (0 < len(name) <= DNS_NAME_MAX and "." in name and _labels_ok(name)):
        raise RuleError(
            field, f"{_shown(text)} is not a DNS name; accepted: two or more labels of letters, "
            f"digits and hyphens separated by dots, e.g. {DNS_NAME_EXAMPLE}",
        )
    return name.lower()


def host_name(value: Any, field: str = "hostname") -> str:
    """The appliance's own host name: one or more letter-digit-hyphen labels (a short name
    such as `gw01` or a full one such as `gw01.lab.example`), at most 64 characters."""
    text = _text(value, field, "a host name").strip()
    name = text[:-1] if text.endswith(".") else text
    if not (0 < len(name) <= HOST_NAME_MAX and _labels_ok(name)):
        raise RuleError(
            field, f"{_shown(text)} is not a host name; accepted: letters, digits and hyphens "
            f"in labels of 1-63 characters separated by dots, {HOST_NAME_MAX} characters in "
            "all, no hyphen at either end of a label (e.g. gw01 or gw01.lab.example)",
        )
    return name


def control_plane_url(value: Any, field: str = "control_plane_url") -> str:
    """`http://HOST[:PORT]` or `https://HOST[:PORT]`, port 1-65535, nothing after the host
    but one optional `/`. Returned without the trailing slash."""
    text = _text(value, field, "an http:// or https:// URL").strip()
    accepted = "accepted: http://HOST[:PORT] or https://HOST[:PORT] with port 1-65535"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise RuleError(field, f"{_shown(text)} has a bad host or port; {accepted}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RuleError(field, f"{_shown(text)} is not a URL of the control plane; {accepted}")
    if port == 0 or parts.username is not None or parts.password is not None:
        raise RuleError(field, f"{_shown(text)} has a bad host or port; {accepted}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise RuleError(field, f"{_shown(text)} has a path, query or fragment; {accepted}")
    return text.rstrip("/")


def region_code(value: Any, field: str = "region") -> str:
    """The shape of an AWS region code (us-west-2); whether it is a known region is
    `regions.get`'s question."""
    text = _text(value, field, "a region code")
    if not _REGION.fullmatch(text):
        raise RuleError(
            field, f"{_shown(text)} is not a region code; accepted: codes such as us-east-1, "
            "eu-west-2 or ap-south-1",
        )
    return text


def endpoint_type(value: Any, field: str = "endpointType") -> str:
    if value not in ENDPOINT_TYPES:
        raise RuleError(
            field, f"{_shown(value)} is not accepted; accepted: {', '.join(ENDPOINT_TYPES)}"
        )
    return str(value)


def ip_version(value: Any, field: str = "ipVersion") -> str:
    if value not in IP_VERSIONS:
        raise RuleError(
            field, f"{_shown(value)} is not accepted; accepted: {', '.join(IP_VERSIONS)}"
        )
    return str(value)


def gateway_type(value: Any, field: str = "gatewayType") -> str:
    if value not in GATEWAY_TYPES:
        raise RuleError(
            field, f"{_shown(value)} is not accepted; accepted: {', '.join(GATEWAY_TYPES)}"
        )
    return str(value)


def upload_name(value: Any, field: str = "name") -> str:
    """The name an upload is stored under on the control plane: a plain file name."""
    text = _text(value, field, "a name")
    if not _UPLOAD_NAME.fullmatch(text) or text in (".", ".."):
        raise RuleError(field, f"{_shown(text)} is not accepted; accepted: {UPLOAD_NAME_RULE}")
    return text


def software_version(value: Any, field: str = "softwareVersion") -> str:
    text = _text(value, field, "a version string")
    if not _SOFTWARE_VERSION.fullmatch(text):
        raise RuleError(
            field, f"{_shown(text)} is not accepted; accepted: 1-100 characters of "
            "A-Z a-z 0-9 . + _ -",
        )
    return text
