"""The connector interface's types, in a module of their own so that the package's
`__init__` (which picks a connector) and each connector can import them without a cycle."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

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


# -- backup and restore (docs/backups.md) ------------------------------------------------
# Every call below blocks (the job runner calls them in worker threads). A DiskReader may be
# read from several threads at once; a DiskWriter is written by one thread, in order.


class DiskReader(Protocol):
    """One disk of a VM frozen at the backup's instant."""

    key: str        # names the disk within the VM, stable across backups (libvirt: target
                    # dev "sda"; vSphere: the device key "2000"); gatewaycore.manifest rule
    label: str      # what a person calls it (a file name, "Hard disk 1")
    capacity: int   # virtual size in bytes

    def extents(self) -> list[tuple[int, int]]:
        """(offset, length) ranges to read, sorted, not overlapping: the allocated data for
        a full backup, the changed ranges since the base checkpoint for an incremental one
        (then a range that now reads as zeros is still listed: it must override the base)."""

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` (length at most gatewaycore.manifest.CHUNK_SIZE)."""


class BackupSession(Protocol):
    """A backup in progress on the hypervisor: the VM's disks frozen at one instant (a
    libvirt pull-mode backup, a vSphere snapshot) until finish()."""

    incremental: bool           # extents() are changes since the base checkpoint
    checkpoint: str | None      # what the next backup may be incremental from (None: the
                                # hypervisor cannot track changes for this VM)
    note: str                   # why it is full when an incremental was asked, else ""
    vm_config: dict[str, Any]   # the VM's configuration, enough to recreate it (JSON-able)
    disks: list[DiskReader]

    def finish(self, ok: bool) -> None:
        """End the backup on the hypervisor; idempotent and called on every path (failure,
        stop, crash recovery included). ok=True: the recovery point is durable, so older
        checkpoints of ours may go; ok=False: keep the base checkpoint as it was."""


class DiskWriter(Protocol):
    """One new disk of a VM being restored, written in increasing offsets; bytes not
    written read as zeros."""

    key: str
    capacity: int

    def write(self, offset: int, data: bytes) -> None: ...


class RestoreSession(Protocol):
    """A new VM being created by a restore; nothing is visible as a usable VM until commit."""

    disks: list[DiskWriter]     # one per disk of the manifest, same keys

    def commit(self) -> DiscoveredVm:
        """Define (not start) the VM with its disks; returns it as discovery would."""

    def abort(self) -> None:
        """Remove whatever the restore created (disks, the half-made VM); idempotent."""


class BackupConnector(Protocol):
    """A connector that backs VMs up and restores them (libvirt, vSphere)."""

    def begin_backup(self, vm_uuid: str, job_id: str,
                     base_checkpoint: str | None) -> BackupSession:
        """Freeze the VM's disks for reading. `base_checkpoint`: the checkpoint of the last
        recovery point, to read only what changed since (a full backup when it is None or
        gone; the session says which in `incremental` and `note`). A backup of ours left
        running by a gateway that died is ended first. HypervisorError when the VM is gone
        (code HypervisorError, message naming the VM) or the hypervisor refuses."""

    def restore_options(self) -> tuple[str, ...]:
        """The restore metadata keys this connector accepts besides the common ones."""

    def begin_restore(self, vm_config: Mapping[str, Any], name: str,
                      options: Mapping[str, str],
                      disks: list[tuple[str, str, int]]) -> RestoreSession:
        """Start creating a new VM called `name` from `vm_config` with new empty disks
        (key, label, capacity). Refuses (HypervisorError, a message naming the field) a
        name that exists, or an option naming something that does not exist."""
