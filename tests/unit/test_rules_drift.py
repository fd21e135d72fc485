"""Every path that takes the same kind of value agrees on it, run end to end.

Each table below came from a drift between copies of one rule, shown by running them:

1. guestconfig (the hypervisor's settings at boot) wrote a control-plane URL, `http://cp:99999`,
   that the daemon's settings loader then refused, so a typo in a vApp/QEMU setting stopped the
   daemon although guestconfig promises a typo never stops the VM;
2. the console's activation flow took a VPC endpoint, `single-label`, that the daemon refused
   after every question had been answered;
3. the console's Set hostname took `gw.lab.example`, which guestconfig refused at boot.

The paths are driven as they run, not by comparing their rule functions: guestconfig's
validate and apply write the files, the daemon's `config.load` reads the one written; the
console's screens run with a scripted terminal and hand their answer to the daemon's
`parse_params` (what the local API does) and to port 80's `parse_query`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import types
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from appliance import activation, config
from appliance.console import activation as console_activation
from appliance.console import network as console_network
from appliance.console.ui import Back, Terminal
from appliance.system.networkd import NetworkdStore

REPO = Path(__file__).resolve().parents[2]


def _load_guestconfig() -> types.ModuleType:
    """guestconfig is a script of the image (tools/image/guest), not a package module."""
    spec = importlib.util.spec_from_file_location(
        "guestconfig_drift", REPO / "tools" / "image" / "guest" / "guestconfig.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gc = _load_guestconfig()


class ScriptedTerminal(Terminal):
    """The console's Terminal with its prompt_toolkit input replaced by a script: `answers`
    maps a piece of a prompt to the answers given to it in turn. ask_valid, confirm and the
    re-prompt on a ValueError are the real ones. When a prompt's answers run out the user
    presses Ctrl-C (Back), which is how a refused answer ends the screen here."""

    def __init__(self, answers: dict[str, list[str]]) -> None:  # no PromptSession: no tty
        self.answers = {key: list(values) for key, values in answers.items()}
        self.errors: list[str] = []
        self.said: list[str] = []

    def clear(self) -> None:
        pass

    def say(self, text: str = "") -> None:
        self.said.append(text)

    def error(self, text: str) -> None:
        self.errors.append(text)

    def ask(self, message: str, password: bool = False) -> str:
        if "Press Return" in message:
            return ""
        for key, values in self.answers.items():
            if key in message:
                if not values:
                    raise Back()
                return values.pop(0)
        raise AssertionError(f"unscripted prompt {message!r}")

    def choose(self, options: list[tuple[str, str]], prompt: str = "Enter command: ",
               **_: Any) -> str:
        answer = self.ask(prompt)
        assert answer in dict(options), (prompt, answer, options)
        return answer


# --- 1. control-plane URL: guestconfig at boot vs the daemon's settings loader ---------------

URLS = [
    "http://cp:99999", "http://cp:0", "http://cp:65535", "http://cp:65536", "http://cp:",
    "ftp://x", "HTTP://cp", "http://u:p@cp", "http://cp/path", "http://cp:8443//",
    "http://cp?x=1", "http://cp#top", "https://[::1]:8443", "http://[::1", "http://::1:80",
    "http://cp:8443/", "http://cp:8443", "https://cp.example.test:8443/", "http://10.0.2.2:8443",
    "http://1.2.3.4.5", "http://a b:80", "http://-cp", "http://", "cp:8443", " http://cp ",
    'http://cp"x', "http://cp\\x",
]


def _daemon_loads(url: str, tmp_path: Path) -> str | None:
    """The URL the daemon starts with when its setting is `url`, None when it refuses."""
    try:
        loaded = config.load(None, {"control_plane_url": url}, default_file=tmp_path / "none")
    except config.ConfigError as exc:
        assert str(exc).startswith("control_plane_url: ") and "\n" not in str(exc)
        return None
    return loaded.control_plane_url


@pytest.mark.parametrize("url", URLS)
def test_guestconfig_and_daemon_agree_on_control_plane_urls(url: str, tmp_path: Path) -> None:
    settings = gc.validate({"control_plane_url": url})
    daemon_url = _daemon_loads(url.strip(), tmp_path)  # guestconfig strips each value
    if "control_plane_url" not in settings:
        assert daemon_url is None, f"guestconfig skips {url!r}, which the daemon accepts"
        return
    assert daemon_url == settings["control_plane_url"], f"daemon refuses {url!r}"
    # what guestconfig writes is a file the daemon starts with, reading the same URL
    root = tmp_path / "root"
    assert gc.apply(settings, root, live=False)
    written = root / "etc/appliance/appliance.toml"
    started = config.load(written, {}, default_file=tmp_path / "none")
    assert started.control_plane_url == daemon_url


def test_guestconfig_skips_a_bad_url_and_goes_on(tmp_path: Path) -> None:
    """The VM still boots: the bad value is left out, the other settings still apply."""
    settings = gc.validate({"control_plane_url": "http://cp:99999", "hostname": "gw01"})
    assert settings == {"hostname": "gw01"}
    (tmp_path / "etc").mkdir()
    assert gc.apply(settings, tmp_path, live=False)
    assert not (tmp_path / "etc/appliance/appliance.toml").exists()


# --- 2. VPC endpoint: the console's activation flow vs the daemon and port 80 ---------------

VPC_ENDPOINTS = [
    "single-label", "-bad-.example.com", "bad-.example.com", "a" * 64 + ".example.com",
    "a" * 63 + ".example.com", "vpce-1.example.com", "VPCE-1.Example.COM", "vpce-1.example.com.",
    "under_score.example.com", "https://vpce.example/", "vpce.example/path", "a..b", "a b.com",
    ".".join(["abcdefghi"] * 26), ".".join(["abcdefghi"] * 25),
    "vpce-0123456789abcdef0-abcd1234.backup-gateway.us-west-2.vpce.amazonaws.com",
    " vpce-1.example.com ",
]


class RecordingApi:
    """The local API's activation-key call: the body goes through `parse_params`, as
    appliance/localapi.py does, and a refusal is answered as the daemon answers it."""

    def __init__(self) -> None:
        self.accepted: list[activation.ActivationRequest] = []
        self.refused: list[activation.ParamError] = []

    def activation_key(self, **params: str | None) -> dict[str, Any]:
        body = {k: v for k, v in params.items() if v is not None}
        try:
            req = activation.parse_params(body, no_redirect=True)
        except activation.ParamError as exc:
            self.refused.append(exc)
            from appliance.localclient import ApiError
            raise ApiError(400, "ValidationError", str(exc), exc.param) from None
        self.accepted.append(req)
        return {"activationKey": "K", "region": req.region, "regionFallback": False,
                "expiresAt": "2030-01-01T00:00:00Z"}


def _console_activation(vpc: str) -> tuple[ScriptedTerminal, RecordingApi]:
    term = ScriptedTerminal({
        "gateway family": ["2"], "AWS Region": ["us-west-2"], "network type": ["2"],
        "VPC endpoint DNS name": [vpc.strip()],  # the terminal hands over stripped text
        "endpoint type": ["1"],
    })
    api = RecordingApi()
    ctx = types.SimpleNamespace(term=term, api=api, status=lambda: (None, "not asked"))
    with contextlib.suppress(Back):
        console_activation.run(ctx)  # type: ignore[arg-type]
    return term, api


def _port80(vpc: str) -> str | None:
    try:
        return activation.parse_query(f"vpcEndpoint={quote(vpc)}&no_redirect").vpc_endpoint
    except activation.ParamError as exc:
        assert exc.param == "vpcEndpoint" and "accepted" in str(exc)
        return None


@pytest.mark.parametrize("vpc", VPC_ENDPOINTS)
def test_console_and_daemon_agree_on_vpc_endpoints(vpc: str) -> None:
    term, api = _console_activation(vpc)
    assert api.refused == [], f"console took {vpc!r}, the daemon refused it at the end"
    port80 = _port80(vpc)
    if not api.accepted:  # the console refused it when typed and asked again
        assert term.errors and "DNS name" in term.errors[0]
        assert port80 is None, f"console refuses {vpc!r}, which port 80 accepts"
        return
    assert api.accepted[0].vpc_endpoint == port80, f"port 80 refuses {vpc!r}"
    assert any("Activation key: K" in line for line in term.said)


# --- 3. host name: the console's Set hostname vs guestconfig at boot --------------------------

HOST_NAMES = [
    "gw.lab.example", "gw01", "GW-01", "gw01.", "-gw", "gw-", "gw_01", "gw 01", "bad_host!",
    "a" * 63, "a" * 64, "a" * 65, "a" * 31 + "." + "b" * 32, "a" * 32 + "." + "b" * 32,
    "gw..lab", "gw.lab.example.", "123", "xn--bcher-kva.example", " gw01 ",
]


def _console_hostname(name: str, tmp_path: Path) -> tuple[str | None, ScriptedTerminal]:
    """What Set hostname writes to the hostname file for the answer `name` (None: refused)."""
    hostname_file = tmp_path / "console" / "etc" / "hostname"
    hostname_file.parent.mkdir(parents=True)  # /etc is there in the VM
    term = ScriptedTerminal({"New hostname": [name.strip()], "Apply config": ["y"]})
    store = NetworkdStore(tmp_path / "console" / "etc" / "network", apply=False,
                          hostname_file=hostname_file)

    def apply(_question: str, change: Any) -> None:
        for line in change():
            term.say(line)

    ctx = types.SimpleNamespace(term=term, network=store, apply=apply)
    with contextlib.suppress(Back):
        console_network.hostname(ctx)  # type: ignore[arg-type]
    return (hostname_file.read_text() if hostname_file.exists() else None), term


def _guestconfig_hostname(name: str, tmp_path: Path) -> str | None:
    """What guestconfig writes to /etc/hostname for the setting `name` (None: skipped)."""
    root = tmp_path / "boot"
    (root / "etc").mkdir(parents=True)  # /etc is there in the VM
    settings = gc.validate({"hostname": name})
    assert gc.apply(settings, root, live=False)
    written = root / "etc/hostname"
    return written.read_text() if written.exists() else None


@pytest.mark.parametrize("name", HOST_NAMES)
def test_console_and_guestconfig_agree_on_host_names(name: str, tmp_path: Path) -> None:
    console, term = _console_hostname(name, tmp_path)
    boot = _guestconfig_hostname(name, tmp_path)
    assert console == boot, f"{name!r}: console wrote {console!r}, guestconfig {boot!r}"
    if console is None:
        assert term.errors and "valid hostname" in term.errors[0]


# -- a hypervisor's Host: what the control plane imports, the gateway can connect to ---------

HYPERVISOR_HOSTS = [
    "vcenter.example.com", "10.0.0.6:443", "[fd00::1]:443", "fd00::2", "esx-3",
    "qemu+ssh://root@kvm1.example.com/system", "qemu:///system", "qemu+tcp://[::1]:16509/system",
    "qemu+tls://10.0.0.7:16514/system?no_verify=1", "esx://root@esx9.lab/", "999.1.1.1",
    "qemu+tcp://u@h/system", "qemu+tcp://h/", "h:0", "fe80::1%eth0", "qemu+tcp://u:p@h/system",
]


@pytest.mark.parametrize("host", HYPERVISOR_HOSTS)
def test_control_plane_and_gateway_agree_on_a_hypervisor_host(host: str) -> None:
    from appliance.hypervisors import HypervisorError, Target, connector_for
    from controlplane.errors import ApiError
    from controlplane.operations import hypervisor_host

    try:
        hypervisor_host(host)
        imported = True
    except ApiError:
        imported = False
    try:
        connector_for(Target(host, "u", "p")).close()
        usable = True
    except HypervisorError:
        usable = False
    assert imported == usable, (host, imported, usable)
