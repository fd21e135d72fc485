"""gatewaycore.rules and gatewaycore.utctime on their own: what each rule accepts, what it
returns, and that a refusal names the field and what is accepted. Plus the checks that the
rules stay written once: no appliance, shared or image-side module defines its own copy."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from appliance import upload
from gatewaycore import regions, rules, schedule, utctime
from gatewaycore.rules import RuleError

REPO = Path(__file__).resolve().parents[2]


def refusal(rule, value, field: str) -> RuleError:  # type: ignore[no-untyped-def]
    with pytest.raises(RuleError) as info:
        rule(value, field)
    return info.value


def test_rule_error_is_structured() -> None:
    exc = refusal(rules.endpoint_type, "FIPS", "endpointType")
    assert exc.field == "endpointType"
    assert exc.message == "'FIPS' is not accepted; accepted: STANDARD, DUALSTACK"
    assert str(exc) == f"endpointType: {exc.message}"
    assert isinstance(exc, ValueError)  # the console's re-prompt catches ValueError


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("vpce-0123abcd-xyz.backup-gateway.us-west-2.vpce.amazonaws.com",
         "vpce-0123abcd-xyz.backup-gateway.us-west-2.vpce.amazonaws.com"),
        ("A.B.", "a.b"),  # the root's dot dropped, DNS is case-blind
        (" vpce-1.example.com ", "vpce-1.example.com"),
        ("1a.example.com", "1a.example.com"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
        (".".join(["a" * 62] * 4) + ".c", ".".join(["a" * 62] * 4) + ".c"),  # 253 characters
    ],
)
def test_dns_name_accepts(value: str, expected: str) -> None:
    assert rules.dns_name(value) == expected


@pytest.mark.parametrize(
    "value",
    ["", ".", "localhost", "a..b", "-a.b", "a-.b", "a b.c", "under_score.example.com",
     "x" * 64 + ".com", ".".join(["a" * 62] * 4) + ".cc", "https://vpce.example/",
     "vpce.example/path", "caf\u00e9.example"],
)
def test_dns_name_refuses(value: object) -> None:
    exc = refusal(rules.dns_name, value, "vpcEndpoint")
    assert exc.field == "vpcEndpoint" and "accepted" in exc.message


@pytest.mark.parametrize(
    "rule", [rules.dns_name, rules.host_name, rules.server_name, rules.control_plane_url,
             rules.region_code, rules.upload_name, rules.software_version],
)
@pytest.mark.parametrize("value", [None, 5, b"a.b", ["a.b"]])
def test_text_rules_refuse_other_types(rule, value: object) -> None:  # type: ignore[no-untyped-def]
    exc = refusal(rule, value, "f")
    assert exc.field == "f" and exc.message.startswith("must be ")
    assert type(value).__name__ in exc.message


def test_dns_name_says_what_to_leave_out_of_a_url() -> None:
    assert "DNS name only" in refusal(rules.dns_name, "https://vpce.example/", "f").message


@pytest.mark.parametrize(
    ("value", "expected"),
    [("gw01", "gw01"), ("gw01.lab.example", "gw01.lab.example"), ("gw01.", "gw01"),
     ("GW-01", "GW-01"), ("123", "123"), ("a" * 63, "a" * 63),
     ("a" * 31 + "." + "b" * 32, "a" * 31 + "." + "b" * 32)],  # 64 in all
)
def test_host_name_accepts(value: str, expected: str) -> None:
    assert rules.host_name(value) == expected


@pytest.mark.parametrize(
    "value",
    ["", "-gw", "gw-", "gw_01", "gw 01", "bad_host!", "a" * 64, "a" * 32 + "." + "b" * 32,
     "gw..lab", "gw.lab.example/"],
)
def test_host_name_refuses(value: object) -> None:
    exc = refusal(rules.host_name, value, "hostname")
    assert exc.field == "hostname" and "valid hostname" in exc.message
    assert "accepted" in exc.message


def test_server_name_allows_one_label_and_long_names() -> None:
    assert rules.server_name("ntp") == "ntp"
    long_name = ".".join(["a" * 40] * 3)  # 122 characters: no host name, but a server's
    assert rules.server_name(long_name) == long_name
    with pytest.raises(RuleError):
        rules.host_name(long_name)
    for bad in ("ntp server", "-ntp", "a" * 64, ""):
        with pytest.raises(RuleError):
            rules.server_name(bad)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("http://cp", "http://cp"), ("http://cp:8443/", "http://cp:8443"),
     ("https://[::1]:8443", "https://[::1]:8443"), ("http://10.0.2.2:8443", "http://10.0.2.2:8443"),
     ("https://cp.example.test:1/", "https://cp.example.test:1"),
     ("http://cp:65535", "http://cp:65535"), (" http://cp ", "http://cp")],
)
def test_control_plane_url_accepts(value: str, expected: str) -> None:
    assert rules.control_plane_url(value) == expected


@pytest.mark.parametrize(
    ("value", "says"),
    [("http://cp:99999", "bad host or port"), ("http://cp:0", "bad host or port"),
     ("http://cp:65536", "bad host or port"), ("http://cp:", "bad host or port"),
     ("http://cp:0080", "bad host or port"), ("http://u:p@cp", "bad host or port"),
     ("http://a b", "bad host or port"), ("http://1.2.3.4.5", "bad host or port"),
     ("http://[::1", "bad host or port"), ("http://[fe80::1%eth0]:80", "bad host or port"),
     ("http://-cp", "bad host or port"), ("http://", "bad host or port"),
     ("ftp://x", "http:// or https://"), ("HTTP://cp", "http:// or https://"),
     ("10.0.2.2:8443", "http:// or https://"), ("http://cp/path", "no path"),
     ("http://cp:8443//", "no path"), ("http://cp?", "no path"), ("http://cp#f", "no path"),
     (8443, "must be")],
)
def test_control_plane_url_refuses(value: object, says: str) -> None:
    exc = refusal(rules.control_plane_url, value, "control_plane_url")
    assert exc.field == "control_plane_url" and says in exc.message
    assert "HOST[:PORT]" in exc.message or "must be" in exc.message


def test_region_code_shape_and_every_known_region() -> None:
    for code in regions.all_regions():  # the console never refuses a region the service knows
        assert rules.region_code(code) == code
    for bad in ("us-east", "US-EAST-1", "useast1", "us-east-123", "not a region!", ""):
        exc = refusal(rules.region_code, bad, "activationRegion")
        assert "is not a region code" in exc.message and "us-east-1" in exc.message


def test_endpoint_types_are_the_regions_data() -> None:
    for region in regions.all_regions().values():
        assert sorted(region.endpoints) == sorted(rules.ENDPOINT_TYPES), region.code


@pytest.mark.parametrize(
    ("rule", "good", "bad"),
    [(rules.endpoint_type, "DUALSTACK", "dualstack"), (rules.ip_version, "ipv6", "IPv6"),
     (rules.gateway_type, "BACKUP_VM", "FILE_S3"),
     (rules.software_version, "1.2.3+dev_4", "1 2"), (rules.upload_name, "a.b_c-1", "..")],
)
def test_allow_lists(rule, good: str, bad: str) -> None:  # type: ignore[no-untyped-def]
    assert rule(good, "f") == good
    exc = refusal(rule, bad, "f")
    assert exc.field == "f" and "accepted" in exc.message


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a" * 201, "sp ace", "\u00e9"])
def test_upload_client_uses_the_name_rule(name: str) -> None:
    with pytest.raises(upload.UploadError) as info:
        upload.check_name(name)
    assert info.value.code == "ValidationError"
    assert info.value.message.startswith("name: ") and "accepted" in info.value.message
    assert upload.check_name("backup-2026.tar") == "backup-2026.tar"


def test_utctime_round_trip_and_callers() -> None:
    moment = datetime(2026, 11, 26, 14, 5, 0, tzinfo=UTC)
    assert utctime.format_utc(moment) == "2026-11-26T14:05:00Z"
    assert utctime.format_utc(moment.timestamp()) == "2026-11-26T14:05:00Z"
    east = moment.astimezone(timezone(timedelta(hours=5)))
    assert utctime.format_utc(east) == "2026-11-26T14:05:00Z"
    assert utctime.format_utc(moment.replace(tzinfo=None)) == "2026-11-26T14:05:00Z"
    assert utctime.parse_utc("2026-11-26T14:05:00Z") == moment
    for bad in ("2026-11-26T14:05:00", "2026-11-26 14:05:00Z", "2026-11-26T14:05:00+00:00"):
        with pytest.raises(ValueError):
            utctime.parse_utc(bad)
    assert schedule.iso_utc(east) == "2026-11-26T14:05:00Z"
    stamp = utctime.parse_utc(utctime.format_utc())  # now, as the link stamps its contact
    assert abs((stamp - datetime.now(UTC)).total_seconds()) < 5


# --- written once: no module outside gatewaycore keeps its own copy -------------------------

# The definitions and literals that were copied before; each may appear only in its home.
_COPIES = {
    r"^\s*ENDPOINT_TYPES\s*=": "gatewaycore/rules.py",
    r"^\s*IP_VERSIONS\s*=": "gatewaycore/rules.py",
    r"^\s*GATEWAY_TYPES\s*=": "gatewaycore/rules.py",
    r"%Y-%m-%dT%H:%M:%SZ": "gatewaycore/utctime.py",
    r"\[A-Za-z0-9\._-\]\{1,200\}": "gatewaycore/rules.py",
    r"HOSTNAME_RE|_HOSTNAME_LABEL|_DNS_LABEL|_REGION_SYNTAX": "gatewaycore/rules.py",
}
# The control plane is switched to gatewaycore.rules separately; its tree is checked once it is.
_SCANNED = ("appliance", "gatewaycore", "tools")


def test_no_copies_of_the_shared_rules() -> None:
    found = []
    for top in _SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            text = path.read_text(encoding="utf-8")
            for pattern, home in _COPIES.items():
                if rel != home and re.search(pattern, text, re.MULTILINE):
                    found.append(f"{rel}: {pattern}")
    assert found == []


# -- a hypervisor's Host: one rule for the control plane's import and the gateway's connect --

HYPERVISOR_HOSTS_OK = [
    ("qemu:///system", "libvirt", "", None),
    ("qemu+tcp://10.0.2.101:16509/system", "libvirt", "10.0.2.101", 16509),
    ("qemu+tcp://[::1]:16509/system", "libvirt", "::1", 16509),
    ("qemu+ssh://root@KVM1.example/system", "libvirt", "kvm1.example", None),
    ("qemu+tls://kvm1/session", "libvirt", "kvm1", None),
    ("vcenter.example.com", "vsphere", "vcenter.example.com", None),
    ("192.0.2.10:443", "vsphere", "192.0.2.10", 443),
    ("[2001:db8::10]:8443", "vsphere", "2001:db8::10", 8443),
    ("2001:db8::10", "vsphere", "2001:db8::10", None),
    ("esx1", "vsphere", "esx1", None),
]
HYPERVISOR_HOSTS_BAD = [
    "qemu+tcp://u:p@h/system",  # a password in the URI
    "qemu+tcp://h/system?command=/bin/sh",  # libvirt parameters name local programs
    "qemu+tcp://h/", "esx://h/system", "qemu+tcp://u@h/system", "qemu://h/system",
    "qemu+tcp:///system", "h:0", "h:99999", "h:", "[::1", "[fe80::1%eth0]", "999.1.1.1",
    "a b", "http://x", "h/x", "qemu+tcp://[::1]:/system", "-bad", "x" * 129, "",
    "qemu+tcp://h:65536/system", "h:080",
]


@pytest.mark.parametrize(("text", "kind", "host", "port"), HYPERVISOR_HOSTS_OK)
def test_hypervisor_hosts_accepted(text: str, kind: str, host: str, port: int | None) -> None:
    parsed = rules.hypervisor_host(text)
    assert (parsed.kind, parsed.host, parsed.port) == (kind, host, port)


@pytest.mark.parametrize("text", HYPERVISOR_HOSTS_BAD)
def test_hypervisor_hosts_refused_naming_the_field(text: str) -> None:
    with pytest.raises(rules.RuleError) as caught:
        rules.hypervisor_host(text)
    assert caught.value.field == "Host" and "accepted:" in caught.value.message
    assert "u:p@" not in caught.value.message  # a password in the URI is not repeated


@pytest.mark.parametrize(("text", "kept"), [
    ("http://cp:8443/console", "http://cp:8443/console"),
    ("https://[2001:db8::1]:8443/console/", "https://[2001:db8::1]:8443/console"),
    ("http://192.0.2.7", "http://192.0.2.7"),
    ("https://ops.example.com/backup-console/v1", "https://ops.example.com/backup-console/v1"),
])
def test_console_urls_accepted(text: str, kept: str) -> None:
    assert rules.console_url(text) == kept


@pytest.mark.parametrize("text", [
    "javascript:alert(1)", "http://cp/console?x=1", "http://cp/console#f", "http://u@cp/c",
    'http://cp/c"onload', "http://cp/c<script>", "http://a b/c", "ftp://cp/c", "http://cp:0/",
    "http://cp/%2e%2e", "//cp/console", "", "http://cp/a//b",
])
def test_console_urls_refused_naming_the_field(text: str) -> None:
    with pytest.raises(rules.RuleError) as caught:
        rules.console_url(text, "--console-url")
    assert caught.value.field == "--console-url" and "accepted:" in caught.value.message
