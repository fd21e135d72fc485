"""Network configuration as systemd-networkd `.network` files.

The console writes one file per adapter, `10-appliance-<adapter>.network`, in the networkd
directory (default /etc/systemd/network, so it survives reboots), then asks networkd to apply
it (`networkctl reload` + `networkctl reconfigure <adapter>`). Files we did not write are never
touched. Every address is checked with the `ipaddress` module before anything is written, so a
typo is reported to the user instead of leaving an adapter without an address.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from gatewaycore import rules
from gatewaycore.atomicfile import write_atomic
from gatewaycore.rules import RuleError

log = logging.getLogger(__name__)

DEFAULT_DIR = "/etc/systemd/network"
_PREFIX = "10-appliance-"


class NetworkConfigError(Exception):
    """A configuration change was refused or failed; the message is for the user."""


@dataclass
class AdapterConfig:
    """The configuration the console manages for one adapter."""

    adapter: str
    ipv4_dhcp: bool = True
    ipv4_address: ipaddress.IPv4Interface | None = None
    ipv4_gateway: ipaddress.IPv4Address | None = None
    ipv6_dhcp: bool = True
    ipv6_address: ipaddress.IPv6Interface | None = None
    ipv6_gateway: ipaddress.IPv6Address | None = None
    dns: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = field(default_factory=list)

    def describe(self) -> list[str]:
        """Human-readable lines, used for the summary before `Apply config`."""
        lines = [f"Adapter: {self.adapter}"]
        if self.ipv4_dhcp:
            lines.append("IPv4: DHCP")
        else:
            gw = self.ipv4_gateway or "none"
            lines.append(f"IPv4: static {self.ipv4_address}, gateway {gw}")
        if self.ipv6_dhcp:
            lines.append("IPv6: DHCPv6 / router advertisements")
        else:
            gw = self.ipv6_gateway or "none"
            lines.append(f"IPv6: static {self.ipv6_address}, gateway {gw}")
        lines.append("DNS servers: " + (", ".join(map(str, self.dns)) or "from DHCP"))
        return lines

    def render(self) -> str:
        """The `.network` file text."""
        dhcp = {(True, True): "yes", (True, False): "ipv4", (False, True): "ipv6"}.get(
            (self.ipv4_dhcp, self.ipv6_dhcp), "no"
        )
        out = [
            "# Written by the appliance console; edit it from the console's network menu.",
            "[Match]",
            f"Name={self.adapter}",
            "",
            "[Network]",
            f"DHCP={dhcp}",
            f"IPv6AcceptRA={'yes' if self.ipv6_dhcp else 'no'}",
        ]
        if not self.ipv4_dhcp and self.ipv4_address:
            out.append(f"Address={self.ipv4_address}")
            if self.ipv4_gateway:
                out.append(f"Gateway={self.ipv4_gateway}")
        if not self.ipv6_dhcp and self.ipv6_address:
            out.append(f"Address={self.ipv6_address}")
            if self.ipv6_gateway:
                out.append(f"Gateway={self.ipv6_gateway}")
        out.extend(f"DNS={server}" for server in self.dns)
        return "\n".join(out) + "\n"


def parse_config(text: str) -> AdapterConfig | None:
    """Read back a file this module wrote (None when it is not one of ours)."""
    adapter = None
    cfg = AdapterConfig(adapter="")
    for raw in text.splitlines():
        key, sep, value = raw.strip().partition("=")
        if not sep:
            continue
        value = value.strip()
        try:
            if key == "Name":
                adapter = value
            elif key == "DHCP":
                cfg.ipv4_dhcp = value in ("yes", "ipv4")
                cfg.ipv6_dhcp = value in ("yes", "ipv6")
            elif key == "Address":
                iface = ipaddress.ip_interface(value)
                if iface.version == 4:
                    cfg.ipv4_address = iface  # type: ignore[assignment]
                else:
                    cfg.ipv6_address = iface  # type: ignore[assignment]
            elif key == "Gateway":
                gw = ipaddress.ip_address(value)
                if gw.version == 4:
                    cfg.ipv4_gateway = gw  # type: ignore[assignment]
                else:
                    cfg.ipv6_gateway = gw  # type: ignore[assignment]
            elif key == "DNS":
                cfg.dns.append(ipaddress.ip_address(value))
        except ValueError:
            continue  # a hand-edited line we cannot read: show the rest
    if not adapter:
        return None
    cfg.adapter = adapter
    return cfg


# ---- input checks: each returns the parsed value or raises ValueError with a user message ----


def parse_interface(text: str, version: int) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """An address with its prefix, e.g. `192.168.1.20/24` or `2001:db8::20/64`."""
    text = text.strip()
    example = "192.168.1.20/24" if version == 4 else "2001:db8::20/64"
    if "/" not in text:
        raise ValueError(f"give the address with its prefix length, e.g. {example}")
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        raise ValueError(
            f"'{text}' is not an IPv{version} address/prefix, e.g. {example}"
        ) from None
    if iface.version != version:
        raise ValueError(f"'{text}' is not an IPv{version} address, e.g. {example}")
    ip = iface.ip
    if ip.is_multicast or ip.is_unspecified or ip.is_loopback:
        raise ValueError(
            f"{ip} cannot be an adapter's address (multicast, unspecified or loopback)"
        )
    if version == 4 and iface.network.prefixlen < 31 and ip in (
        iface.network.network_address,
        iface.network.broadcast_address,
    ):
        raise ValueError(f"{ip} is the network or broadcast address of {iface.network}")
    return iface


def parse_gateway(
    text: str, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A default gateway, which must be on the adapter's subnet (or link-local for IPv6)."""
    text = text.strip()
    try:
        gw = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"'{text}' is not an IPv{iface.version} address") from None
    if gw.version != iface.version:
        raise ValueError(f"'{text}' is not an IPv{iface.version} address")
    if gw == iface.ip:
        raise ValueError(f"the gateway cannot be the adapter's own address {gw}")
    if gw not in iface.network and not (gw.version == 6 and gw.is_link_local):
        raise ValueError(f"gateway {gw} is not in the adapter's subnet {iface.network}")
    return gw


def parse_dns(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A DNS server address (IPv4 or IPv6)."""
    text = text.strip()
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"'{text}' is not an IPv4 or IPv6 address") from None
    if addr.is_multicast or addr.is_unspecified:
        raise ValueError(f"{addr} cannot be a DNS server")
    return addr


def parse_hostname(text: str) -> str:
    """The appliance's host name, by gatewaycore.rules.host_name: the rule guestconfig
    applies to the hypervisor's `hostname` setting too, so both set the same names."""
    try:
        return rules.host_name(text)
    except RuleError as exc:
        raise ValueError(exc.message) from None


def writable_refusal(directory: Path) -> str | None:
    """Why files cannot be created in `directory` (or its nearest existing ancestor)."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        return f"{directory} is not writable by this console. Nothing was changed."
    return None


# ---- the store -------------------------------------------------------------------------------


class NetworkdStore:
    """Reads and writes our `.network` files and applies them."""

    def __init__(
        self,
        directory: str | os.PathLike[str] = DEFAULT_DIR,
        apply: bool = True,
        hostname_file: str | os.PathLike[str] = "/etc/hostname",
    ) -> None:
        self.directory = Path(directory)
        self.apply = apply
        self.hostname_file = Path(hostname_file)

    def path_for(self, adapter: str) -> Path:
        return self.directory / f"{_PREFIX}{adapter}.network"

    def refusal(self) -> str | None:
        """Why this process may not change the network configuration, or None if it may."""
        if self.apply and os.geteuid() != 0:
            return (
                "Network changes need root: this console runs as user id "
                f"{os.geteuid()}. Nothing was changed."
            )
        return writable_refusal(self.directory)

    def load(self, adapter: str) -> AdapterConfig | None:
        try:
            return parse_config(self.path_for(adapter).read_text())
        except OSError:
            return None

    def save(self, cfg: AdapterConfig) -> list[str]:
        """Write and apply one adapter's configuration; returns messages for the user."""
        reason = self.refusal()
        if reason:
            raise NetworkConfigError(reason)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path_for(cfg.adapter), cfg.render().encode(), mode=0o644)
        except OSError as exc:
            path = self.path_for(cfg.adapter)
            raise NetworkConfigError(f"cannot write {path}: {exc.strerror}") from None
        log.info("event=network_config_written adapter=%s path=%s", cfg.adapter,
                 self.path_for(cfg.adapter))
        return [f"Saved {self.path_for(cfg.adapter)}", *self._apply([cfg.adapter])]

    def reset_all(self, adapters: list[str]) -> list[str]:
        """Every adapter back to DHCP for IPv4 and IPv6, our DNS overrides dropped."""
        reason = self.refusal()
        if reason:
            raise NetworkConfigError(reason)
        messages = []
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for old in self.directory.glob(f"{_PREFIX}*.network"):
                old.unlink()
            for name in adapters:
                write_atomic(self.path_for(name), AdapterConfig(name).render().encode(), 0o644)
                messages.append(f"{name}: DHCP")
        except OSError as exc:
            raise NetworkConfigError(f"cannot write in {self.directory}: {exc.strerror}") from None
        log.info("event=network_reset adapters=%s", ",".join(adapters))
        return messages + self._apply(adapters)

    def set_hostname(self, name: str) -> list[str]:
        reason = self.refusal()
        if reason:
            raise NetworkConfigError(reason)
        try:
            write_atomic(self.hostname_file, f"{name}\n".encode(), mode=0o644)
        except OSError as exc:
            raise NetworkConfigError(f"cannot write {self.hostname_file}: {exc.strerror}") from None
        log.info("event=hostname_set hostname=%s", name)
        messages = [f"Saved {self.hostname_file}"]
        if self.apply:
            messages += _run(["hostname", name])
        return messages

    def _apply(self, adapters: list[str]) -> list[str]:
        if not self.apply:
            return ["Not applied now (--no-apply): takes effect at the next boot."]
        messages = _run(["networkctl", "reload"])
        for name in adapters:
            messages += _run(["networkctl", "reconfigure", name])
        return messages or ["Applied."]


def _run(argv: list[str]) -> list[str]:
    exe = shutil.which(argv[0], path="/usr/sbin:/usr/bin:/sbin:/bin")
    if exe is None:
        return [f"{argv[0]} is not installed: the change takes effect at the next boot."]
    try:
        done = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return [f"{' '.join(argv)} timed out after 30 s."]
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        return [f"{' '.join(argv)} failed: {detail[-1] if detail else done.returncode}"]
    return []
