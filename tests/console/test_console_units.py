"""The console's pieces on their own: password store, input checks, networkd files, restricted
prompt parsing, ncport, resource levels and NTP offsets (against the local responder)."""

from __future__ import annotations

import ipaddress
import socket
import stat
from pathlib import Path

import pytest

from appliance.console.auth import PasswordStore, Throttle, check_new_password
from appliance.system import resources, restricted
from appliance.system.networkd import (
    AdapterConfig,
    NetworkConfigError,
    NetworkdStore,
    parse_config,
    parse_gateway,
    parse_hostname,
    parse_interface,
)
from appliance.system.timesync import TimeSync, parse_server


def test_password_default_then_hashed_file(tmp_path: Path) -> None:
    store = PasswordStore(tmp_path / "etc" / "console-password")
    assert store.is_default()
    assert store.verify("admin", "password")
    assert not store.verify("root", "password")
    store.set("correct horse")
    assert not store.is_default()
    assert not store.verify("admin", "password")
    assert store.verify("admin", "correct horse")
    text = store.path.read_text()
    assert "correct horse" not in text and '"scrypt"' in text
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("candidate", "problem"),
    [("short", "6 to 512"), ("x" * 513, "6 to 512"), ("password", "default"),
     ("tab\there", "printable ASCII"), ("caf\u00e9-ok", "printable ASCII")],
)
def test_new_password_rules(candidate: str, problem: str) -> None:
    message = check_new_password(candidate)
    assert message is not None and problem in message
    assert check_new_password("six ch") is None


def test_throttle_grows_and_resets() -> None:
    throttle = Throttle(cap=30)
    delays = [throttle.failed() for _ in range(8)]
    assert delays[0] == 0 and delays[1:4] == [1, 2, 4]
    assert delays == sorted(delays) and max(delays) == 30
    throttle.succeeded()
    assert throttle.failed() == 0


def test_address_checks_name_the_problem() -> None:
    assert parse_interface("192.168.1.20/24", 4) == ipaddress.ip_interface("192.168.1.20/24")
    with pytest.raises(ValueError, match="prefix length"):
        parse_interface("192.168.1.20", 4)
    with pytest.raises(ValueError, match="not an IPv4"):
        parse_interface("300.1.1.1/24", 4)
    with pytest.raises(ValueError, match="broadcast"):
        parse_interface("192.168.1.255/24", 4)
    with pytest.raises(ValueError, match="not an IPv6"):
        parse_interface("10.0.0.1/8", 6)
    iface = parse_interface("192.168.1.20/24", 4)
    with pytest.raises(ValueError, match="not in the adapter's subnet"):
        parse_gateway("10.0.0.1", iface)
    assert str(parse_gateway("192.168.1.1", iface)) == "192.168.1.1"
    with pytest.raises(ValueError, match="valid hostname"):
        parse_hostname("bad_name!")
    assert parse_server("127.0.0.1") == "127.0.0.1"
    with pytest.raises(ValueError, match="hostname or an IP"):
        parse_server("ntp server")


def test_networkd_file_round_trip(tmp_path: Path) -> None:
    cfg = AdapterConfig(
        "eth0", ipv4_dhcp=False, ipv4_address=ipaddress.IPv4Interface("10.9.8.7/24"),
        ipv4_gateway=ipaddress.IPv4Address("10.9.8.1"),
        dns=[ipaddress.ip_address("10.9.8.53"), ipaddress.ip_address("2001:db8::53")],
    )
    store = NetworkdStore(tmp_path / "network", apply=False)
    messages = store.save(cfg)
    text = store.path_for("eth0").read_text()
    assert "Name=eth0" in text and "DHCP=ipv6" in text and "Address=10.9.8.7/24" in text
    assert "Gateway=10.9.8.1" in text and "DNS=2001:db8::53" in text
    assert any("--no-apply" in m for m in messages)
    assert parse_config(text) == cfg
    store.reset_all(["eth0", "eth1"])
    assert "DHCP=yes" in store.path_for("eth0").read_text()
    assert "Address" not in store.path_for("eth0").read_text()
    assert store.path_for("eth1").exists()


def test_networkd_refuses_unwritable_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = NetworkdStore(blocker / "network", apply=False)
    assert store.refusal() is not None
    with pytest.raises(NetworkConfigError, match="not writable"):
        store.save(AdapterConfig("eth0"))


@pytest.mark.parametrize(
    ("line", "reason"),
    [("bash", "Unknown command 'bash'"), ("ping 127.0.0.1; bash", "not a shell"),
     ("echo $(id)", "not a shell"), ("ip a | sh", "not a shell"),
     ("ip netns exec x bash", "not available"), ("dig 'unterminated", "Cannot read")],
)
def test_restricted_prompt_refusals(line: str, reason: str) -> None:
    with pytest.raises(restricted.CommandRefused, match=reason):
        restricted.parse(line)


def test_restricted_prompt_accepts_listed_commands() -> None:
    cmd = restricted.parse("ping -c 1 '127.0.0.1'")
    assert cmd is not None and cmd.name == "ping" and cmd.args == ["-c", "1", "127.0.0.1"]
    assert restricted.parse("   ") is None
    assert "ncport" in restricted.help_text()


def test_ncport_real_listener() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert "succeeded" in restricted.ncport(["127.0.0.1", str(port)])
    assert "failed" in restricted.ncport(["127.0.0.1", str(port), "2"])
    assert "1 to 65535" in restricted.ncport(["127.0.0.1", "99999"])


def test_resource_levels_from_data() -> None:
    results = resources.check({"vcpus": 4, "memory": 7.7, "disk": 30})
    assert [r.level for r in results] == ["OK", "OK", "FAIL"]
    assert resources.error_count(results) == 1
    results = resources.check({"vcpus": 2, "memory": 16, "disk": 100})
    assert results[0].level == "WARNING" and "[WARNING]" in results[0].line()


def test_ntp_offset_measured_against_local_responder(ntp, tmp_path: Path) -> None:
    ntp.offset = 600.0
    sync = TimeSync(tmp_path / "timesyncd.conf.d" / "appliance.conf", port=ntp.port,
                    timeout=2, apply=False)
    assert sync.servers() == []
    sync.save_servers(["127.0.0.1"])
    assert sync.servers() == ["127.0.0.1"]
    assert "NTP=127.0.0.1" in sync.dropin.read_text()
    probe = sync.probe("127.0.0.1")
    assert probe.ok and probe.offset is not None and 590 < probe.offset < 610
    assert ntp.requests == 1
    assert "not stepped" in sync.synchronise()[0]
