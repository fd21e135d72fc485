"""Settings: defaults, the TOML file, flags over the file, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import config
from appliance.config import ConfigError, ListenAddress


def load(tmp_path: Path, toml: str | None = None, **overrides: object) -> config.Settings:
    path = None
    if toml is not None:
        path = tmp_path / "appliance.toml"
        path.write_text(toml)
    return config.load(path, overrides, default_file=tmp_path / "absent.toml")


def test_defaults(tmp_path: Path) -> None:
    s = load(tmp_path)
    assert s.listen == (ListenAddress("0.0.0.0", 80), ListenAddress("::", 80))
    assert s.state_dir == Path("/var/lib/appliance")
    assert s.control_plane_url == "http://10.0.2.2:8443"
    assert s.local_api_socket == Path("/run/appliance/api.sock")
    assert (s.control_plane_host, s.control_plane_port) == ("10.0.2.2", 8443)
    assert s.config_file is None


def test_default_file_is_read_when_present(tmp_path: Path) -> None:
    default = tmp_path / "default.toml"
    default.write_text('state_dir = "/srv/state"\n')
    s = config.load(None, {}, default_file=default)
    assert s.state_dir == Path("/srv/state") and s.config_file == default


def test_file_then_flags(tmp_path: Path) -> None:
    toml = (
        'listen = ["127.0.0.1:8080", "[::1]:8080"]\n'
        'state_dir = "/tmp/x"\n'
        'control_plane_url = "http://127.0.0.1:8443/"\n'
        'local_api_socket = "/tmp/x.sock"\n'
    )
    s = load(tmp_path, toml)
    assert [str(a) for a in s.listen] == ["127.0.0.1:8080", "[::1]:8080"]
    assert s.control_plane_url == "http://127.0.0.1:8443"
    s = load(tmp_path, toml, state_dir="/tmp/y", listen=None)
    assert s.state_dir == Path("/tmp/y")  # the flag wins
    assert len(s.listen) == 2  # None means "not given": the file's value stays


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('colour = "x"\n', "unknown setting 'colour'"),
        ('listen = "1.2.3.4"\n', "listen"),
        ("listen = []\n", "listen"),
        ('listen = ["::1:80"]\n', "[ADDR]:PORT"),
        ('listen = ["example.com:80"]\n', "not an IP address"),
        ('listen = ["127.0.0.1:0"]\n', "1-65535"),
        ("listen = [80]\n", "listen"),
        ('control_plane_url = "10.0.2.2:8443"\n', "control_plane_url"),
        ('control_plane_url = "http://h:99999"\n', "control_plane_url"),
        ('control_plane_url = "http://h/path"\n', "no path"),
        ("state_dir = 5\n", "state_dir"),
        ('local_api_socket = ""\n', "local_api_socket"),
        ("link_retry_max = 0\n", "link_retry_max"),
        ("link_retry_max = true\n", "link_retry_max"),
        ("state_dir = \n", "not valid TOML"),
    ],
)
def test_bad_values_name_the_setting(tmp_path: Path, toml: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, toml)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_config_file_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        config.load(tmp_path / "nope.toml", {})


def test_hypervisor_ca_file(tmp_path: Path) -> None:
    """Unset by default (the system CA store); from the file, and the flag wins over it."""
    assert load(tmp_path).hypervisor_ca_file is None
    s = load(tmp_path, 'hypervisor_ca_file = "/etc/appliance/vcenter-ca.pem"\n')
    assert s.hypervisor_ca_file == Path("/etc/appliance/vcenter-ca.pem")
    s = load(tmp_path, 'hypervisor_ca_file = "/a.pem"\n', hypervisor_ca_file="/b.pem")
    assert s.hypervisor_ca_file == Path("/b.pem")
    with pytest.raises(ConfigError, match="hypervisor_ca_file"):
        load(tmp_path, "hypervisor_ca_file = 3\n")
