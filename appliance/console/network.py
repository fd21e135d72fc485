"""Menu 2, Network configuration: describe adapters, DHCP or static IPv4/IPv6, DNS, hostname.

Nothing changes until the user answers `Apply config [y/n]` with y after seeing a summary; the
change is then written as a systemd-networkd file by appliance/system/networkd.py.
"""

from __future__ import annotations

import socket
from typing import Any

from appliance.console.context import Context
from appliance.console.ui import Back
from appliance.system import netinfo
from appliance.system.networkd import (
    AdapterConfig,
    parse_dns,
    parse_gateway,
    parse_hostname,
    parse_interface,
)

MENU = [
    ("1", "Describe adapter"),
    ("2", "Configure DHCP"),
    ("3", "Configure static IP"),
    ("4", "Set hostname"),
    ("5", "Reset all to DHCP"),
    ("6", "View DNS configuration"),
    ("7", "View routes"),
]


def run(ctx: Context) -> None:
    actions = {"1": describe, "2": dhcp, "3": static, "4": hostname, "5": reset,
               "6": view_dns, "7": view_routes}
    ctx.submenu("Network configuration", MENU, actions)


def _pick_adapter(ctx: Context) -> str:
    adapters = netinfo.list_adapters()
    if not adapters:
        ctx.term.say("No network adapters found.")
        raise Back()
    if len(adapters) == 1:
        ctx.term.say(f"Adapter: {adapters[0].name}")
        return adapters[0].name
    options = [(str(i + 1), a.name) for i, a in enumerate(adapters)]
    choice = ctx.term.choose(options, prompt="Select adapter: ")
    return adapters[int(choice) - 1].name


def describe(ctx: Context) -> None:
    ctx.term.clear()
    name = _pick_adapter(ctx)
    adapter = next((a for a in netinfo.list_adapters() if a.name == name), None)
    if adapter is None:
        ctx.term.say(f"{name} has disappeared.")
        ctx.term.pause()
        return
    cfg = ctx.network.load(name)
    say = ctx.term.say
    say("")
    say(f"Adapter:      {adapter.name}")
    say(f"MAC address:  {adapter.mac or 'unknown'}")
    for iface in adapter.ipv4:
        say(f"IPv4:         {iface.ip}  prefix /{iface.network.prefixlen}  "
            f"netmask {iface.netmask}")
    for iface in adapter.ipv6:
        say(f"IPv6:         {iface.ip}/{iface.network.prefixlen}")
    if not adapter.ipv4 and not adapter.ipv6:
        say("Addresses:    none")
    say(f"IPv4 gateway: {adapter.gateway4 or 'none'}")
    say(f"IPv6 gateway: {adapter.gateway6 or 'none'}")
    if cfg is None:
        say("Configured:   DHCP (no static configuration saved by this console)")
    else:
        say(f"IPv4 by DHCP: {'yes' if cfg.ipv4_dhcp else 'no (static)'}")
        say(f"IPv6 by DHCP: {'yes' if cfg.ipv6_dhcp else 'no (static)'}")
        if cfg.dns:
            say(f"DNS servers:  {', '.join(map(str, cfg.dns))}")
    ctx.term.pause()


def _refused(ctx: Context) -> bool:
    reason = ctx.network.refusal()
    if reason:
        ctx.term.say(reason)
        ctx.term.pause()
        return True
    return False


def _apply(ctx: Context, cfg: AdapterConfig) -> None:
    ctx.term.say("")
    for line in cfg.describe():
        ctx.term.say(line)
    ctx.apply("Apply config", lambda: ctx.network.save(cfg))


def dhcp(ctx: Context) -> None:
    ctx.term.clear()
    if _refused(ctx):
        return
    name = _pick_adapter(ctx)
    cfg = ctx.network.load(name) or AdapterConfig(name)
    cfg.ipv4_dhcp = ctx.term.confirm("Assign IPv4 by DHCP")
    if cfg.ipv4_dhcp:
        cfg.ipv4_address = cfg.ipv4_gateway = None
    cfg.ipv6_dhcp = ctx.term.confirm("Assign IPv6 by DHCPv6 / router advertisements")
    if cfg.ipv6_dhcp:
        cfg.ipv6_address = cfg.ipv6_gateway = None
    if (not cfg.ipv4_dhcp and cfg.ipv4_address is None) or (
        not cfg.ipv6_dhcp and cfg.ipv6_address is None
    ):
        ctx.term.say("An address family without DHCP needs a static address: use option 3, "
                     "Configure static IP.")
        ctx.term.pause()
        return
    _apply(ctx, cfg)


def _ask_static(ctx: Context, version: int, example: str) -> tuple[Any, Any]:
    """One family's static address/prefix and its gateway (None), each checked as typed."""
    iface = ctx.term.ask_valid(f"IPv{version} address/prefix (e.g. {example}): ",
                               lambda t: parse_interface(t, version))
    assert iface is not None
    gateway = ctx.term.ask_valid(f"IPv{version} default gateway (Return for none): ",
                                 lambda t: parse_gateway(t, iface), allow_empty=True)
    return iface, gateway


def static(ctx: Context) -> None:
    term = ctx.term
    term.clear()
    if _refused(ctx):
        return
    name = _pick_adapter(ctx)
    cfg = AdapterConfig(name)
    if term.confirm("Configure a static IPv4 address"):
        cfg.ipv4_dhcp = False
        cfg.ipv4_address, cfg.ipv4_gateway = _ask_static(  # type: ignore[assignment]
            ctx, 4, "192.168.1.20/24")
    if term.confirm("Configure a static IPv6 address"):
        cfg.ipv6_dhcp = False
        cfg.ipv6_address, cfg.ipv6_gateway = _ask_static(  # type: ignore[assignment]
            ctx, 6, "2001:db8::20/64")
    primary = term.ask_valid("Primary DNS server (Return for DNS from DHCP): ", parse_dns,
                             allow_empty=True)
    if primary is not None:
        cfg.dns.append(primary)
        secondary = term.ask_valid("Secondary DNS server (Return for none): ", parse_dns,
                                   allow_empty=True)
        if secondary is not None:
            cfg.dns.append(secondary)
    if cfg.ipv4_dhcp and cfg.ipv6_dhcp and not cfg.dns:
        term.say("Nothing static was entered: use option 2 to configure DHCP.")
        term.pause()
        return
    _apply(ctx, cfg)


def hostname(ctx: Context) -> None:
    term = ctx.term
    term.clear()
    if _refused(ctx):
        return
    term.say(f"Current hostname: {socket.gethostname()}")
    # parse_hostname is gatewaycore.rules.host_name, the rule guestconfig applies at boot
    name = term.ask_valid("New hostname: ", parse_hostname)
    assert name is not None
    ctx.apply(f"Set the hostname to {name}. Apply config", lambda: ctx.network.set_hostname(name))


def reset(ctx: Context) -> None:
    term = ctx.term
    term.clear()
    if _refused(ctx):
        return
    names = [a.name for a in netinfo.list_adapters()]
    term.say("Every adapter (" + ", ".join(names) + ") will use DHCP for IPv4 and IPv6,")
    term.say("and DNS servers set here are dropped.")
    ctx.apply("Apply config", lambda: ctx.network.reset_all(names))


def view_dns(ctx: Context) -> None:
    term = ctx.term
    term.clear()
    term.say("DNS servers in use (resolver): "
             + (", ".join(netinfo.resolver_servers()) or "none"))
    for adapter in netinfo.list_adapters():
        cfg = ctx.network.load(adapter.name)
        configured = ", ".join(map(str, cfg.dns)) if cfg and cfg.dns else "from DHCP"
        term.say(f"{adapter.name}: {configured}")
    term.pause()


def view_routes(ctx: Context) -> None:
    ctx.term.clear()
    ctx.term.say(netinfo.routes_text())
    ctx.term.pause()
