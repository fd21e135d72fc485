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
from collections.abc import Callable
from dataclasses import dataclass
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
        return _address_ok(host[1:-1], bracketed=True)
    return _address_ok(host, bracketed=False)


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


_CONSOLE_PATH = re.compile(r"(/[A-Za-z0-9._~-]+)*/?")


def console_url(value: Any, field: str = "consoleUrl") -> str:
    """A web console's base URL, which a gateway puts into the Location of its port-80
    redirect: `http(s)://HOST[:PORT]` as `control_plane_url` takes it, then an optional
    path of letters, digits and `. _ ~ -` segments; no query, fragment, user part, quote or
    space. Returned without the trailing slash."""
    text = _text(value, field, "an http:// or https:// URL").strip()
    accepted = ("accepted: http(s)://HOST[:PORT] then an optional path of letters, digits "
                "and . _ ~ - segments, no query or fragment")
    scheme, sep, rest = text.partition("://")
    host, slash, path = rest.partition("/")
    try:
        origin = control_plane_url(f"{scheme}{sep}{host}", field)
    except RuleError:
        raise RuleError(field, f"{_shown(text)} is not a console URL; {accepted}") from None
    if not _CONSOLE_PATH.fullmatch(slash + path):
        raise RuleError(field, f"{_shown(text)} has a path that is not accepted; {accepted}")
    return (origin + slash + path).rstrip("/")


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


# --- a hypervisor's Host ----------------------------------------------------------------------

LIBVIRT_SCHEMES = ("qemu", "qemu+tcp", "qemu+tls", "qemu+ssh", "qemu+unix")
LIBVIRT_LOCAL_SCHEMES = ("qemu", "qemu+unix")  # the gateway's own libvirtd: no host
LIBVIRT_PATHS = ("/system", "/session")
HYPERVISOR_HOST_MAX = 128  # the model's Host: 3-128 characters
_URI_HEAD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_PORT = re.compile(r"[1-9][0-9]{0,4}")
HYPERVISOR_HOST_RULE = (
    "accepted: a vSphere host name, IPv4 address or [IPv6] address with an optional :PORT "
    "(vcenter.example.com, 192.0.2.10:443, [2001:db8::10]), or a libvirt URI "
    "qemu[+tcp|+tls|+ssh|+unix]://[HOST[:PORT]]/system (a user name only for qemu+ssh, no "
    "password and no ?parameters in the URI)"
)


@dataclass(frozen=True)
class HypervisorHost:
    """A checked hypervisor Host: `kind` is "libvirt" (then `scheme`, `path` and, for
    qemu+ssh, `username` are set) or "vsphere". `host` is lower-case, IPv6 without brackets,
    empty for the gateway's own libvirtd; `port` is None when not given."""

    text: str
    kind: str
    host: str
    port: int | None
    scheme: str = ""
    path: str = ""
    username: str | None = None

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


def _address_ok(host: str, bracketed: bool) -> bool:
    """An IPv6 literal (no zone) where brackets or colons say so, else an IPv4 address, else
    a DNS name of one or more labels (an all-digit name must be a valid IPv4 address)."""
    if bracketed or ":" in host:
        try:
            return ipaddress.IPv6Address(host).scope_id is None
        except ValueError:
            return False
    if all(label.isdigit() for label in host.split(".")):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return _name_ok(_drop_root(host), DNS_NAME_MAX, 1)


def _port(text: str) -> int | None:
    if not _PORT.fullmatch(text) or int(text) > 65535:
        return None
    return int(text)


def hypervisor_host(value: Any, field: str = "Host") -> HypervisorHost:
    """The Host of a hypervisor, as the control plane stores it and the gateway connects to
    it: what one side accepts the other can use, and nothing a gateway would refuse."""
    text = _text(value, field, "a host or libvirt URI").strip()

    def refuse(why: str) -> RuleError:
        # a text with a user part may hold a password: it is not repeated back
        shown = "the URI" if "@" in text else _shown(text)
        return RuleError(field, f"{shown} {why}; {HYPERVISOR_HOST_RULE}")

    if not 0 < len(text) <= HYPERVISOR_HOST_MAX:
        raise refuse(f"must be 1-{HYPERVISOR_HOST_MAX} characters")
    if any(ch.isspace() or not ch.isprintable() for ch in text):
        raise refuse("has spaces or control characters")
    head = _URI_HEAD.match(text)
    if head:
        userinfo = text.split("://", 1)[1].split("/", 1)[0].rpartition("@")[0]
        if ":" in userinfo:
            raise refuse("carries a password: give it in Password, where it is stored "
                         "encrypted")
        return _libvirt_uri(text, head.group(1).lower(), refuse)
    if "/" in text or "@" in text or "?" in text or "#" in text:
        raise refuse("is neither a host[:port] nor a libvirt URI")
    host, port = _host_port(text, refuse, bare_ipv6=True)
    return HypervisorHost(text, "vsphere", host, port)


def _libvirt_uri(
    text: str, scheme: str, refuse: Callable[[str], RuleError]
) -> HypervisorHost:
    if scheme not in LIBVIRT_SCHEMES:
        raise refuse(f"has the scheme {scheme[:20]!r}, which is not a libvirt one")
    rest = text.split("://", 1)[1]
    if "?" in rest or "#" in rest:
        raise refuse("carries URI parameters, which name local programs and files")
    authority, slash, path = rest.partition("/")
    path = slash + path
    if path not in LIBVIRT_PATHS:
        raise refuse(f"has the path {path[:40]!r}, not {' or '.join(LIBVIRT_PATHS)}")
    userinfo, at, hostport = authority.rpartition("@")
    if not at:
        hostport, userinfo = authority, ""
    if at and (scheme != "qemu+ssh" or not userinfo):
        raise refuse("has a user name, which only qemu+ssh takes in the URI")
    if scheme in LIBVIRT_LOCAL_SCHEMES:
        if hostport:
            raise refuse(f"names a host, but {scheme}:// is the gateway's own libvirtd")
        return HypervisorHost(text, "libvirt", "", None, scheme, path)
    if not hostport:
        raise refuse(f"needs a host: {scheme}://HOST[:PORT]{path}")
    host, port = _host_port(hostport, refuse, bare_ipv6=False)
    return HypervisorHost(text, "libvirt", host, port, scheme, path, userinfo or None)


def _host_port(
    text: str, refuse: Callable[[str], RuleError], bare_ipv6: bool
) -> tuple[str, int | None]:
    """`HOST[:PORT]` or `[IPv6][:PORT]` (and, where `bare_ipv6`, an IPv6 address without
    brackets, which then cannot carry a port): the host lower-cased without brackets."""
    host, port_text, bracketed = text, "", False
    if text.startswith("["):
        inner, bracket, after = text[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise refuse("is not [IPv6] or [IPv6]:PORT")
        host, port_text, bracketed = inner, after[1:], True
        if after and not port_text:
            raise refuse("has an empty port")
    elif text.count(":") == 1 or (":" in text and not bare_ipv6):
        host, _, port_text = text.partition(":")
        if not port_text:
            raise refuse("has an empty port")
    port = None
    if port_text:
        port = _port(port_text)
        if port is None:
            raise refuse("has a port that is not 1-65535")
    if not _address_ok(host, bracketed):
        raise refuse("names no valid host name, IPv4 address or IPv6 address")
    return host.lower(), port
