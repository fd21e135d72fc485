"""The daemon's settings: one model filled from a TOML file, then from command-line flags.

Flags override the file so an operator can try a setting without editing the file. Every
bad value becomes a `ConfigError` whose message names the setting and what it accepts, so
`serve` can print one line and exit 2 instead of a traceback.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from appliance import updatefiles
from gatewaycore import rules
from gatewaycore.rules import RuleError

DEFAULT_CONFIG_FILE = Path("/etc/appliance/appliance.toml")
DEFAULT_LISTEN = ("0.0.0.0:80", "[::]:80")
DEFAULT_STATE_DIR = Path("/var/lib/appliance")
DEFAULT_CONTROL_PLANE_URL = "http://10.0.2.2:8443"
DEFAULT_LOCAL_API_SOCKET = Path("/run/appliance/api.sock")
DEFAULT_LINK_RETRY_MAX = 30.0


class ConfigError(Exception):
    """A setting that cannot be used; the message is one line naming the setting."""


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    listen: tuple[ListenAddress, ...]
    state_dir: Path
    control_plane_url: str
    local_api_socket: Path
    link_retry_max: float = DEFAULT_LINK_RETRY_MAX
    config_file: Path | None = field(default=None)
    # PEM CA certificates a vCenter's (or ESXi host's) certificate is verified against
    # instead of the system store: the way to trust a vCenter's own VMCA (self-signed) root
    hypervisor_ca_file: Path | None = None
    # Where the root installer writes the outcome of the last software update
    update_result_file: Path = updatefiles.DEFAULT_RESULT

    @property
    def control_plane_host(self) -> str:
        return urlsplit(self.control_plane_url).hostname or ""

    @property
    def control_plane_port(self) -> int:
        parts = urlsplit(self.control_plane_url)
        return parts.port or (443 if parts.scheme == "https" else 80)


# key -> what it accepts, for the error message of an unknown key
KNOWN_KEYS = {
    "listen": "a list of HOST:PORT strings",
    "state_dir": "a directory path",
    "control_plane_url": "an http://HOST[:PORT] or https://HOST[:PORT] URL",
    "local_api_socket": "a socket path",
    "link_retry_max": "seconds (number, 1-3600) the link waits at most between retries",
    "hypervisor_ca_file": "a PEM file of the CA certificates a vCenter is verified against",
    "update_result_file": "the file the update installer writes its result to",
}


def parse_listen(text: str) -> ListenAddress:
    """Parse `HOST:PORT` or `[V6HOST]:PORT`; ConfigError names the bad entry."""
    if not isinstance(text, str):
        raise ConfigError(f"listen: {text!r} is not a HOST:PORT string")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"listen: {text!r} is not [IPV6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ConfigError(f"listen: {text!r} is not HOST:PORT (write IPv6 as [ADDR]:PORT)")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"listen: {host!r} in {text!r} is not an IP address") from None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"listen: port in {text!r} must be 1-65535")
    return ListenAddress(host, int(port_text))


def _check_url(url: Any) -> str:
    """gatewaycore.rules.control_plane_url, the rule guestconfig applies at boot too, so a
    URL the hypervisor's settings could write is one the daemon starts with."""
    try:
        return rules.control_plane_url(url, "control_plane_url")
    except RuleError as exc:
        raise ConfigError(f"{exc.field}: {exc.message}") from None


def _check_path(key: str, value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: must be a non-empty path string")
    return Path(value)


def read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - set(KNOWN_KEYS))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown setting {unknown[0]!r}; accepted: {', '.join(KNOWN_KEYS)}"
        )
    return data


def load(
    config_file: Path | None,
    overrides: dict[str, Any],
    default_file: Path = DEFAULT_CONFIG_FILE,
) -> Settings:
    """Build the settings: defaults, then the file (if any), then non-None `overrides`."""
    path = config_file
    if path is None and default_file.exists():
        path = default_file
    raw: dict[str, Any] = read_file(path) if path is not None else {}
    raw.update({k: v for k, v in overrides.items() if v is not None})

    listen_raw = raw.get("listen", list(DEFAULT_LISTEN))
    if isinstance(listen_raw, str):
        listen_raw = [listen_raw]
    if not isinstance(listen_raw, list) or not listen_raw:
        raise ConfigError("listen: must be a non-empty list of HOST:PORT strings")
    listen = tuple(parse_listen(item) for item in listen_raw)

    retry = raw.get("link_retry_max", DEFAULT_LINK_RETRY_MAX)
    if isinstance(retry, bool) or not isinstance(retry, int | float) or not 0.1 <= retry <= 3600:
        raise ConfigError(f"link_retry_max: {retry!r} must be a number of seconds, 0.1-3600")

    return Settings(
        listen=listen,
        state_dir=_check_path("state_dir", raw.get("state_dir", str(DEFAULT_STATE_DIR))),
        control_plane_url=_check_url(raw.get("control_plane_url", DEFAULT_CONTROL_PLANE_URL)),
        local_api_socket=_check_path(
            "local_api_socket", raw.get("local_api_socket", str(DEFAULT_LOCAL_API_SOCKET))
        ),
        link_retry_max=float(retry),
        config_file=path,
        hypervisor_ca_file=(None if raw.get("hypervisor_ca_file") is None else
                            _check_path("hypervisor_ca_file", raw["hypervisor_ca_file"])),
        update_result_file=_check_path("update_result_file", raw.get(
            "update_result_file", str(updatefiles.DEFAULT_RESULT))),
    )
