"""The parameter rules of `GET /` (gateway-behaviour.md section 1), without a server."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from appliance.activation import ParamError, console_location, is_dns_name, parse_query


def test_documented_call() -> None:
    req = parse_query(
        "activationRegion=us-west-2&gatewayType=BACKUP_VM&endpointType=DUALSTACK"
        "&ipVersion=ipv6&no_redirect"
    )
    assert (req.region, req.region_fallback, req.endpoint_type, req.ip_version) == (
        "us-west-2", False, "DUALSTACK", "ipv6"
    )
    assert req.no_redirect is True and req.gateway_type == "BACKUP_VM"


def test_defaults_and_fallback() -> None:
    req = parse_query("")
    assert (req.region, req.region_fallback, req.endpoint_type, req.ip_version) == (
        "us-east-1", True, "STANDARD", None
    )
    assert req.no_redirect is False
    assert parse_query("endpointType=DUALSTACK").ip_version == "ipv4"
    assert parse_query("activationRegion=us-west-2&activationRegion=eu-west-1").region == (
        "us-west-2"
    )


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("gatewayType=FILE_S3", "gatewayType"),
        ("endpointType=FIPS_DUALSTACK", "endpointType"),
        ("ipVersion=ipv6", "ipVersion"),
        ("endpointType=DUALSTACK&ipVersion=v6", "ipVersion"),
        ("vpcEndpoint=under_score.example.com", "vpcEndpoint"),
    ],
)
def test_bad_values(query: str, param: str) -> None:
    with pytest.raises(ParamError) as info:
        parse_query(query)
    assert info.value.param == param
    assert param in str(info.value) and "accepted" in str(info.value)


def test_dns_names() -> None:
    assert is_dns_name("vpce-050f9048-iep0e8vq.backup-gateway.us-west-2.vpce.amazonaws.com")
    assert is_dns_name("a.b.")
    for bad in ("", "localhost", "a..b", "-a.b", "a-.b", "a b.c", "x" * 64 + ".com",
                ".".join(["abcdefghi"] * 26)):
        assert not is_dns_name(bad)


def test_location_keeps_key_in_query() -> None:
    vpce = "vpce-1.backup-gateway.eu-west-1.vpce.amazonaws.com"
    req = parse_query(f"activationRegion=eu-west-1&vpcEndpoint={vpce}")
    url = urlsplit(console_location(req, "AAAAA-BBBBB-CCCCC-DDDDD-EEEEE"))
    assert url.hostname == "eu-west-1.console.aws.amazon.com"
    params = parse_qs(url.query)
    assert params["activationKey"] == ["AAAAA-BBBBB-CCCCC-DDDDD-EEEEE"]
    assert params["activationRegion"] == ["eu-west-1"]
    assert params["vpcEndpoint"] == [vpce]
