"""Hypervisor connectors: test a hypervisor's credentials and list its VMs.

The control plane hands the gateway a Target (a host and credentials); `connector_for` picks
the connector from the host's shape, so the two kinds never need a separate "type" field:
a libvirt URI (`qemu+tcp://kvm1/system`) goes to libvirt, anything else that reads as a host
name, IPv4 address or [IPv6] address with an optional port goes to vSphere, and everything
else is refused as InvalidHost before any network traffic.

Every call blocks and is bounded by the timeout (the daemon calls them with
asyncio.to_thread). Each connector imports its client library only when it is used, so the
daemon starts on a machine that has neither.
"""

from __future__ import annotations

from gatewaycore import rules

from .model import (
    AUTHENTICATION_FAILED,
    CERTIFICATE_ERROR,
    CODES,
    HOST_UNREACHABLE,
    HYPERVISOR_ERROR,
    INVALID_HOST,
    Connector,
    DiscoveredVm,
    HypervisorError,
    Target,
    parse_host,
)

__all__ = [
    "AUTHENTICATION_FAILED", "CERTIFICATE_ERROR", "CODES", "HOST_UNREACHABLE",
    "HYPERVISOR_ERROR", "INVALID_HOST", "LIBVIRT_SCHEMES", "Connector", "DiscoveredVm",
    "HypervisorError", "Target", "connector_for", "parse_host",
]

LIBVIRT_SCHEMES = rules.LIBVIRT_SCHEMES


def connector_for(target: Target, timeout: float = 20.0, *,
                  ca_file: str | None = None) -> Connector:
    """The connector for `target`; raises HypervisorError(InvalidHost) for a malformed host.

    `ca_file` (vSphere only): a PEM file of CA certificates to trust instead of the system
    store; None (the default) verifies against the system CA store, where an administrator
    adds the vCenter's VMCA root certificate."""
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    where = parse_host(target.host)
    if where.kind == "libvirt":
        from .libvirt import LibvirtConnector
        return LibvirtConnector(target, timeout)
    from .vsphere import VsphereConnector
    return VsphereConnector(target, timeout, ca_file=ca_file)
