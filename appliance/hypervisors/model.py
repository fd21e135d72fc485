"""The connector interface's types, in a module of their own so that the package's
`__init__` (which picks a connector) and each connector can import them without a cycle."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Protocol

from gatewaycore import rules

# The codes a HypervisorError carries: the control plane and the console show a different
# remedy for each, so they must stay distinct and few.
AUTHENTICATION_FAILED = "AuthenticationFailed"
HOST_UNREACHABLE = "HostUnreachable"
CERTIFICATE_ERROR = "CertificateError"
INVALID_HOST = "InvalidHost"
HYPERVISOR_ERROR = "HypervisorError"
CODES = (AUTHENTICATION_FAILED, HOST_UNREACHABLE, CERTIFICATE_ERROR, INVALID_HOST,
         HYPERVISOR_ERROR)


@dataclass(frozen=True)
class Target:
    """What the control plane hands the gateway: where the hypervisor is and how to log in.

    `host` is a libvirt URI (qemu:///system, qemu+tcp://HOST[:PORT]/system, qemu+tls://...,
    qemu+ssh://...) or a vSphere host name, IPv4 address or [IPv6] address with an optional
    :port."""

    host: str
    username: str | None
    password: str | None

    def __repr__(self) -> str:
        # a Target ends up in tracebacks and debug logs: the password must not
        return (f"Target(host={self.host!r}, username={self.username!r}, "
                f"password={'***' if self.password else None!r})")


@dataclass(frozen=True)
class DiscoveredVm:
    """One virtual machine as discovery reports it to the control plane.

    `uuid` is the id that survives renames and moves (libvirt's domain UUID, vSphere's
    instanceUuid); `path` is where a person finds it (vSphere: /Datacenter/vm/Folder/name;
    libvirt: "<host>/<domain name>"); `tags` are (key, value) pairs in a stable order."""

    uuid: str
    name: str
    path: str
    host_name: str
    tags: tuple[tuple[str, str], ...]


class HypervisorError(Exception):
    """A failure the user can act on; `code` says which remedy applies (see CODES) and
    `message` says what happened in words, never with the password in it."""

    def __init__(self, code: str, message: str) -> None:
        if code not in CODES:
            raise ValueError(f"unknown hypervisor error code {code!r}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Connector(Protocol):
    """One hypervisor or vCenter. Every call blocks (the daemon runs them with
    asyncio.to_thread) and returns or raises HypervisorError within the connector's timeout."""

    def test(self) -> None:
        """Connect, authenticate and make one cheap call."""

    def inventory(self) -> list[DiscoveredVm]:
        """Every VM the credentials can see."""

    def close(self) -> None:
        """Drop the session; the connector may be used again afterwards (it reconnects)."""


def scrub(text: str, secret: str | None) -> str:
    """`text` with every occurrence of `secret` masked: a library's error text is passed on
    to the user, and none of them should ever echo a password, but this makes sure."""
    if secret:
        text = text.replace(secret, "***")
    return text[:500]


def parse_host(text: str) -> rules.HypervisorHost:
    """`text` by the one hypervisor-host rule the control plane also imports with
    (gatewaycore.rules.hypervisor_host); HypervisorError(InvalidHost) saying why not."""
    try:
        return rules.hypervisor_host(text)
    except rules.RuleError as exc:
        raise HypervisorError(INVALID_HOST, exc.message) from None


def reach_error(exc: OSError, host: str, where: str, timeout: float,
                refused_hint: str) -> HypervisorError:
    """The one wording of a TCP connection to a hypervisor that failed (both connectors):
    a name that does not resolve, a refusal, silence, or another network error."""
    if isinstance(exc, socket.gaierror):
        return HypervisorError(HOST_UNREACHABLE, f"the host name {host!r} does not resolve "
                               "(check DNS or use an address)")
    if isinstance(exc, ConnectionRefusedError):
        return HypervisorError(HOST_UNREACHABLE, f"connection refused by {where}: "
                               f"{refused_hint}")
    if isinstance(exc, TimeoutError):
        return HypervisorError(HOST_UNREACHABLE, f"no answer from {where} within "
                               f"{timeout:g}s (host down or a firewall)")
    return HypervisorError(HOST_UNREACHABLE, f"cannot reach {where}: {exc.strerror or exc}")
