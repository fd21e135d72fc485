"""What the network looks like right now: adapters, addresses, gateways, routes, DNS.

Read-only views for the console's header and its "describe adapter" / "view routes" screens.
netifaces gives addresses without parsing `ip` output; routes come from `ip` when present,
else from /proc, so a minimal image without iproute2 still shows something useful.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import netifaces

# Adapters that carry no traffic of the user's: loopback and the shaper's intermediate devices.
_IGNORED_PREFIXES = ("lo", "ifb", "dummy", "veth", "docker", "virbr")


@dataclass
class Adapter:
    """One network adapter as the console shows it."""

    name: str
    mac: str | None = None
    ipv4: list[ipaddress.IPv4Interface] = field(default_factory=list)
    ipv6: list[ipaddress.IPv6Interface] = field(default_factory=list)
    gateway4: str | None = None
    gateway6: str | None = None

    @property
    def addresses(self) -> list[str]:
        """Addresses worth showing in the header: IPv4 first, link-local IPv6 left out."""
        shown = [str(a.ip) for a in self.ipv4]
        shown += [str(a.ip) for a in self.ipv6 if not a.ip.is_link_local]
        return shown


def _prefix_from_netmask(netmask: str, version: int) -> int:
    if "/" in netmask:  # netifaces writes IPv6 masks as "ffff:...::/64"
        return int(netmask.rsplit("/", 1)[1])
    if version == 4:
        return ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen
    return ipaddress.IPv6Network(f"::/{netmask}").prefixlen


def list_adapters() -> list[Adapter]:
    """Every user-facing adapter with its addresses and default gateways, sorted by name."""
    gateways = netifaces.gateways()
    defaults = gateways.get("default", {})
    result = []
    for name in sorted(netifaces.interfaces()):
        if name.startswith(_IGNORED_PREFIXES):
            continue
        info = netifaces.ifaddresses(name)
        adapter = Adapter(name=name)
        link = info.get(netifaces.AF_LINK, [])
        if link:
            adapter.mac = link[0].get("addr")
        for entry in info.get(netifaces.AF_INET, []):
            prefix = _prefix_from_netmask(entry.get("netmask", "255.255.255.255"), 4)
            adapter.ipv4.append(ipaddress.IPv4Interface(f"{entry['addr']}/{prefix}"))
        for entry in info.get(netifaces.AF_INET6, []):
            addr = entry["addr"].split("%", 1)[0]
            prefix = _prefix_from_netmask(entry.get("netmask", "/128"), 6)
            adapter.ipv6.append(ipaddress.IPv6Interface(f"{addr}/{prefix}"))
        gw4 = defaults.get(netifaces.AF_INET)
        if gw4 and gw4[1] == name:
            adapter.gateway4 = gw4[0]
        gw6 = defaults.get(netifaces.AF_INET6)
        if gw6 and gw6[1] == name:
            adapter.gateway6 = gw6[0]
        result.append(adapter)
    return result


def routes_text() -> str:
    """The routing tables as text, IPv4 then IPv6."""
    ip = shutil.which("ip", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if ip:
        parts = []
        for family in ("-4", "-6"):
            done = subprocess.run(
                [ip, family, "route", "show"], capture_output=True, text=True, timeout=10
            )
            parts.append(f"IPv{family[1]} routes:\n{done.stdout.strip() or '(none)'}")
        return "\n\n".join(parts)
    return "IPv4 routes:\n" + _proc_routes()


def _proc_routes() -> str:
    lines = []
    try:
        rows = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError as exc:
        return f"(cannot read routes: {exc.strerror})"
    for row in rows:
        cols = row.split()
        dest = ipaddress.IPv4Address(int(cols[1], 16).to_bytes(4, "little"))
        gw = ipaddress.IPv4Address(int(cols[2], 16).to_bytes(4, "little"))
        mask = ipaddress.IPv4Address(int(cols[7], 16).to_bytes(4, "little"))
        net = ipaddress.IPv4Network(f"{dest}/{mask}")
        via = f" via {gw}" if int(gw) else ""
        lines.append(f"{'default' if net.prefixlen == 0 else net}{via} dev {cols[0]}")
    return "\n".join(lines) or "(none)"


RESOLVED_UPSTREAM = "/run/systemd/resolve/resolv.conf"


def resolver_servers(resolv_conf: str = "/etc/resolv.conf") -> list[str]:
    """Name servers the system resolver uses now (from resolv.conf).

    With systemd-resolved, /etc/resolv.conf names only its stub 127.0.0.53; the servers it
    really asks are in its upstream file, which is what the user wants to see.
    """
    servers = _nameservers(resolv_conf)
    if servers == ["127.0.0.53"] and Path(RESOLVED_UPSTREAM).exists():
        return _nameservers(RESOLVED_UPSTREAM) or servers
    return servers


def _nameservers(resolv_conf: str) -> list[str]:
    try:
        text = Path(resolv_conf).read_text()
    except OSError:
        return []
    servers = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            servers.append(words[1])
    return servers
