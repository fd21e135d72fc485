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

import ipaddress
import re
from typing import Any

ENDPOINT_TYPES = ("STANDARD", "DUALSTACK")
IP_VERSIONS = ("ipv4", "ipv6")
GATEWAY_TYPES = ("BACKUP_VM",)

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# scheme://host[:port][/]: the host a bracketed IPv6 literal or dot-separated labels (checked
# further below), the port 1-5 digits without a leading zero, nothing else after the host.
_URL = re.compile(r"(?P<scheme>https?)://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)"
                  r"(?::(?P<port>[1-9][0-9]{0,4}))?/?")
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


def _name_ok(name: str, max_len: int, min_labels: int) -> bool:
    return 0 < len(name) <= max_len and name.count(".") + 1 >= min_labels and _labels_ok(name)


def _drop_root(text: str) -> str:
    """`example.com.` (the fully qualified form with the root's dot) is `example.com`."""
    return text[:-1] if text.endswith(".") else text


def dns_name(value: Any, field: str = "vpcEndpoint") -> str:
    """A fully qualified DNS name: two or more letter-digit-hyphen labels, at most 253
    characters; a trailing dot is dropped and the name lower-cased (DNS is case-blind)."""
    text = _text(value, field, "a DNS name").strip()
    accepted = (
        "accepted: two or more labels of letters, digits and hyphens separated by dots, e.g. "
        + DNS_NAME_EXAMPLE
    )
    if "://" in text or "/" in text:
        # The commonest mistake is pasting the endpoint's URL: say so rather than "bad name".
        raise RuleError(
            field, f"{_shown(text)} is not a DNS name: give the DNS name only, without "
            f"https:// or a path; {accepted}",
        )
    name = _drop_root(text)
    if not _name_ok(name, DNS_NAME_MAX, 2):
        raise RuleError(field, f"{_shown(text)} is not a DNS name; {accepted}")
    return name.lower()


def server_name(value: Any, field: str = "server") -> str:
    """The name of a server to look up (an NTP server): one or more letter-digit-hyphen
    labels, at most 253 characters. A single label (`ntp`) is allowed, since the resolver's
    search domains complete it; a trailing dot is dropped."""
    text = _text(value, field, "a host name").strip()
    name = _drop_root(text)
    if not _name_ok(name, DNS_NAME_MAX, 1):
        raise RuleError(
            field, f"{_shown(text)} is not a valid hostname; accepted: letters, digits and "
            f"hyphens in labels of 1-63 characters separated by dots, {DNS_NAME_MAX} "
            "characters in all, no hyphen at either end of a label (e.g. ntp.example.com)",
        )
    return name


def host_name(value: Any, field: str = "hostname") -> str:
    """The appliance's own host name: one or more letter-digit-hyphen labels (a short name
    such as `gw01` or a full one such as `gw01.lab.example`), at most 64 characters, since
    that is what sethostname() and hostnamed take. A trailing dot is dropped."""
    text = _text(value, field, "a host name").strip()
    name = _drop_root(text)
    if not _name_ok(name, HOST_NAME_MAX, 1):
        raise RuleError(
            field, f"{_shown(text)} is not a valid hostname; accepted: letters, digits and "
            f"hyphens in labels of 1-63 characters separated by dots, {HOST_NAME_MAX} "
            "characters in all, no hyphen at either end of a label (e.g. gw01 or "
            "gw01.lab.example)",
        )
    return name


def _url_host_ok(host: str) -> bool:
    """A bracketed IPv6 literal (no zone), an IPv4 address, or a DNS name of 1+ labels."""
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    if all(label.isdigit() for label in host.split(".")):
        # all digits reads as an IPv4 address, so it must be one (not 1.2.3.4.5 or 999.1.1.1)
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return _name_ok(host, DNS_NAME_MAX, 1)


def control_plane_url(value: Any, field: str = "control_plane_url") -> str:
    """`http://HOST[:PORT]` or `https://HOST[:PORT]`, port 1-65535, nothing after the host
    but one optional `/`. HOST is a DNS name (one label is enough: `cp`), an IPv4 address or
    an IPv6 address in brackets. Returned without the trailing slash.

    An allow-list of the whole text rather than urlsplit's reading of it: urlsplit takes
    `http://cp?`, `http://a b` or a user:password@ part, none of which the link can use."""
    text = _text(value, field, "an http:// or https:// URL").strip()
    accepted = (
        "accepted: http://HOST[:PORT] or https://HOST[:PORT], HOST a DNS name, an IPv4 "
        "address or [IPv6], port 1-65535, no path, query or fragment"
    )
    if not text.startswith(("http://", "https://")):
        raise RuleError(field, f"{_shown(text)} must be an http:// or https:// URL; {accepted}")
    rest = text.split("://", 1)[1]
    if any(mark in rest.removesuffix("/") for mark in "/?#"):
        raise RuleError(field, f"{_shown(text)} must have no path, query or fragment; {accepted}")
    match = _URL.fullmatch(text)
    if (
        match is None
        or not _url_host_ok(match["host"])
        or (match["port"] is not None and int(match["port"]) > 65535)
    ):
        raise RuleError(field, f"{_shown(text)} has a bad host or port; {accepted}")
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


def _one_of(value: Any, field: str, accepted: tuple[str, ...]) -> str:
    if value not in accepted:
        raise RuleError(field, f"{_shown(value)} is not accepted; accepted: {', '.join(accepted)}")
    return str(value)


def endpoint_type(value: Any, field: str = "endpointType") -> str:
    return _one_of(value, field, ENDPOINT_TYPES)


def ip_version(value: Any, field: str = "ipVersion") -> str:
    return _one_of(value, field, IP_VERSIONS)


def gateway_type(value: Any, field: str = "gatewayType") -> str:
    return _one_of(value, field, GATEWAY_TYPES)


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
