"""Apply the settings the hypervisor hands the VM at boot, before the network and the daemon start.

Two sources, both optional, both read-only for the guest:

- vSphere vApp properties, from VMware Tools (`vmtoolsd --cmd "info-get guestinfo.ovfEnv"`),
  filled in by the user in "Deploy OVF Template" (keys `appliance.*`, see ovf/appliance.toml);
- QEMU SMBIOS OEM strings (`-smbios type=11,value=backupgateway.KEY=VALUE`), which is how
  `tools/run-vm.sh` and the VM tests point the appliance at the control plane on their host.

Settings: hostname, ipv4_mode (dhcp|static), ipv4_address (A.B.C.D/PREFIX), ipv4_gateway,
dns_servers (comma-separated), control_plane_url. A source's settings are applied when they
differ from what was applied from it last time, so a later change in the console survives a
reboot while a change of the vApp properties still takes effect. A bad value is logged with
the setting's name and what it accepts, and skipped: a typo must never stop the VM booting.
"""

from __future__ import annotations

# Only what every boot needs is imported here: this runs at every boot under QEMU's TCG, where
# each import is tens of ms of CPU (docs/image.md, "Boot"). The network store, the TOML
# parser and the XML parser are imported where a source has settings to read or apply.
import argparse
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from gatewaycore import rules
from gatewaycore.atomicfile import write_atomic
from gatewaycore.rules import RuleError

if TYPE_CHECKING:
    from appliance.system.networkd import NetworkdStore

LOG = logging.getLogger("guestconfig")

OVF_ENV_NS = "http://schemas.dmtf.org/ovf/environment/1"
VAPP_PREFIX = "appliance."
SMBIOS_PREFIX = "backupgateway."
DMI_VENDOR = "/sys/class/dmi/id/sys_vendor"  # "VMware, Inc." on vSphere and ESXi
KEYS = (
    "hostname",
    "ipv4_mode",
    "ipv4_address",
    "ipv4_gateway",
    "dns_servers",
    "control_plane_url",
)
# The adapter the vApp network settings are for: the first NIC (net.ifnames=0 in the image).
ADAPTER = "eth0"


class SettingError(ValueError):
    """One setting's value is unusable; the message names the setting and what it accepts."""


# --- reading the sources -------------------------------------------------------------------


def parse_ovf_env(xml_text: str) -> dict[str, str]:
    """The `appliance.*` properties of an OVF environment document, prefix removed
    (xml.etree.ElementTree.ParseError when it is not XML)."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(xml_text)
    found: dict[str, str] = {}
    for prop in root.iter(f"{{{OVF_ENV_NS}}}Property"):
        key = prop.get(f"{{{OVF_ENV_NS}}}key", "")
        if key.startswith(VAPP_PREFIX):
            found[key[len(VAPP_PREFIX) :]] = prop.get(f"{{{OVF_ENV_NS}}}value", "")
    return found


def parse_smbios_type11(raw: bytes) -> list[str]:
    """The strings of one SMBIOS type 11 (OEM strings) structure as the kernel exposes it."""
    if len(raw) < 5 or raw[0] != 11:
        return []
    strings = raw[raw[1] :].split(b"\0")
    out = []
    for item in strings:
        if not item:
            break
        out.append(item.decode("utf-8", "replace"))
    return out


def read_smbios(dmi_dir: Path) -> dict[str, str]:
    """`backupgateway.KEY=VALUE` OEM strings from every type 11 structure."""
    found: dict[str, str] = {}
    for entry in sorted(dmi_dir.glob("11-*")):
        try:
            raw = (entry / "raw").read_bytes()
        except OSError:
            continue
        for text in parse_smbios_type11(raw):
            name, sep, value = text.partition("=")
            if sep and name.startswith(SMBIOS_PREFIX):
                found[name[len(SMBIOS_PREFIX) :]] = value
    return found


def read_vapp() -> dict[str, str]:
    """vApp properties when running on VMware with VMware Tools; empty elsewhere."""
    # The firmware's vendor, as systemd-detect-virt also reads it: no process to start (tenths
    # of a second of CPU at every boot under TCG, docs/image.md "Boot").
    try:
        vendor = Path(DMI_VENDOR).read_text(errors="replace").strip()
    except OSError:
        return {}
    if vendor != "VMware, Inc." or shutil.which("vmtoolsd") is None:
        return {}
    try:
        proc = subprocess.run(
            ["vmtoolsd", "--cmd", "info-get guestinfo.ovfEnv"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        LOG.warning("event=vapp_unreadable reason=%r", str(exc))
        return {}
    if proc.returncode != 0 or not proc.stdout.strip():
        LOG.info("event=vapp_absent")
        return {}
    from xml.etree.ElementTree import ParseError

    try:
        return parse_ovf_env(proc.stdout)
    except ParseError as exc:
        LOG.warning("event=vapp_unreadable reason=%r", f"ovfEnv is not XML: {exc}")
        return {}


# --- validating ----------------------------------------------------------------------------


def validate(settings: dict[str, str]) -> dict[str, object]:
    """Checked values for the known, non-empty settings; bad ones are logged and left out."""
    good: dict[str, object] = {}
    for key, value in settings.items():
        value = value.strip()
        if key not in KEYS:
            LOG.warning("event=setting_unknown setting=%s accepted=%s", key, ",".join(KEYS))
            continue
        if not value:
            continue
        try:
            good[key] = _check(key, value)
        except SettingError as exc:
            LOG.warning("event=setting_invalid setting=%s reason=%r", key, str(exc))
    if good.get("ipv4_mode") == "static" and "ipv4_address" not in good:
        LOG.warning("event=setting_invalid setting=ipv4_address reason='static mode needs one'")
        good.pop("ipv4_mode")
    return good


# The settings whose rule the appliance applies too: checked by that same rule, so a value
# accepted here is one the console and the daemon accept (a URL this writes never stops the
# daemon) and a value they accept is never skipped here.
_SHARED_RULES: dict[str, Callable[[str, str], str]] = {
    "hostname": rules.host_name,
    "control_plane_url": rules.control_plane_url,
}


def _check(key: str, value: str) -> object:
    if key in _SHARED_RULES:
        try:
            return _SHARED_RULES[key](value, key)
        except RuleError as exc:
            raise SettingError(f"{exc.field}: {exc.message}") from None
    if key == "ipv4_mode":
        if value.lower() not in ("dhcp", "static"):
            raise SettingError(f"ipv4_mode: {value!r} is not one of dhcp, static")
        return value.lower()
    if key == "ipv4_address":
        try:
            iface = ipaddress.IPv4Interface(value)
        except ValueError:
            raise SettingError(f"ipv4_address: {value!r} is not A.B.C.D/PREFIX") from None
        if "/" not in value:
            raise SettingError(f"ipv4_address: {value!r} needs its prefix, e.g. /24")
        return str(iface)
    if key == "ipv4_gateway":
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            raise SettingError(f"ipv4_gateway: {value!r} is not an IPv4 address") from None
    if key == "dns_servers":
        servers = [s.strip() for s in value.split(",") if s.strip()]
        try:
            return [str(ipaddress.ip_address(s)) for s in servers]
        except ValueError:
            raise SettingError(
                f"dns_servers: {value!r} is not a comma-separated list of IP addresses"
            ) from None
    raise SettingError(f"{key}: unknown")  # pragma: no cover - KEYS is checked before


# --- applying ------------------------------------------------------------------------------


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def set_config(config_file: Path, key: str, value: object) -> None:
    """Set one top-level key of the daemon's flat TOML settings file, keeping the others."""
    import tomllib

    try:
        data = tomllib.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        data = {}
    data[key] = value
    lines = ["# The appliance daemon's settings (appliance/config.py names them all)."]
    lines += [f"{k} = {toml_value(v)}" for k, v in data.items()]
    config_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(config_file, ("\n".join(lines) + "\n").encode(), mode=0o644)


def apply(settings: dict[str, object], root: Path, live: bool) -> bool:
    """Write what `settings` asks for under `root` (/ in the VM); `live` also sets the hostname.

    The network file is the console's own (appliance.system.networkd), so the console shows
    and edits what the hypervisor set, and a console change later wins until this source changes.
    """
    from appliance.system.networkd import NetworkConfigError, NetworkdStore

    store = NetworkdStore(
        root / "etc/systemd/network", apply=False, hostname_file=root / "etc/hostname"
    )
    try:
        _apply(settings, root, live, store)
    except (NetworkConfigError, OSError) as exc:
        LOG.error("event=apply_failed reason=%r", str(exc))
        return False
    return True


def _apply(settings: dict[str, object], root: Path, live: bool, store: NetworkdStore) -> None:
    from appliance.system.networkd import AdapterConfig

    if "hostname" in settings:
        name = str(settings["hostname"])
        store.set_hostname(name)
        if live:
            import socket

            socket.sethostname(name)
    mode = settings.get("ipv4_mode")
    if mode == "static":
        cfg = AdapterConfig(
            ADAPTER,
            ipv4_dhcp=False,
            ipv4_address=ipaddress.IPv4Interface(str(settings["ipv4_address"])),
            ipv4_gateway=(
                ipaddress.IPv4Address(str(settings["ipv4_gateway"]))
                if "ipv4_gateway" in settings
                else None
            ),
            dns=[ipaddress.ip_address(d) for d in settings.get("dns_servers", [])],  # type: ignore[attr-defined]
        )
        store.save(cfg)
        LOG.info("event=network_static adapter=%s address=%s", ADAPTER, settings["ipv4_address"])
    elif mode == "dhcp":
        store.save(AdapterConfig(ADAPTER))
        LOG.info("event=network_dhcp adapter=%s", ADAPTER)
    if "dns_servers" in settings and mode != "static":
        LOG.warning("event=setting_ignored setting=dns_servers reason='only used with static'")
    if "control_plane_url" in settings:
        url = settings["control_plane_url"]
        set_config(root / "etc/appliance/appliance.toml", "control_plane_url", url)
        LOG.info("event=control_plane_set url=%s", url)


def apply_if_changed(
    source: str, raw: dict[str, str], root: Path, state_dir: Path, live: bool
) -> bool:
    """Apply a source's settings when they differ from the last ones applied from it."""
    settings = validate(raw)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    record = state_dir / f"{source}.sha256"
    try:
        if record.read_text().strip() == digest:
            LOG.info("event=unchanged source=%s", source)
            return False
    except FileNotFoundError:
        pass
    if not apply(settings, root, live):
        return False  # not recorded: tried again at the next boot
    state_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(record, (digest + "\n").encode(), mode=0o600)
    LOG.info("event=applied source=%s settings=%s", source, ",".join(sorted(settings)) or "-")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/"), help="filesystem to write into")
    parser.add_argument("--state-dir", type=Path, default=Path("/var/lib/appliance-guestconfig"))
    parser.add_argument("--dmi-dir", type=Path, default=Path("/sys/firmware/dmi/entries"))
    parser.add_argument("--done-marker", type=Path, default=None,
                        help="a file made when this is over, applied or not (the unit's "
                             "/run/appliance-guestconfig/done: the daemon, started beside "
                             "this, waits for it before it reads its settings)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    live = args.root == Path("/")
    try:
        sources = {"vapp": read_vapp(), "smbios": read_smbios(args.dmi_dir)}
        for source, raw in sources.items():
            if raw:
                apply_if_changed(source, raw, args.root, args.state_dir, live)
            else:
                LOG.info("event=source_empty source=%s", source)
    finally:
        if args.done_marker is not None:
            done(args.done_marker)
    return 0


def done(marker: Path) -> None:
    """Say this boot's settings are applied (or were tried): an empty file, world-readable."""
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.close(fd)
    except OSError as exc:
        LOG.error("event=marker_failed path=%s reason=%r", marker, str(exc))


if __name__ == "__main__":
    sys.exit(main())
