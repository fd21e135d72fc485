"""The region data file: every partition present, endpoint names as section 5 gives them."""

from __future__ import annotations

import re

from gatewaycore import regions


def test_partitions_and_well_known_codes() -> None:
    all_ = regions.all_regions()
    assert {r.partition for r in all_.values()} == {"aws", "aws-cn", "aws-us-gov"}
    for code in ("us-east-1", "us-west-2", "eu-central-1", "ap-southeast-2", "sa-east-1",
                 "cn-north-1", "cn-northwest-1", "us-gov-west-1", "us-gov-east-1"):
        assert code in all_
    assert all(re.fullmatch(r"[a-z]{2}(-gov)?-[a-z]+-\d", code) for code in all_)


def test_resolve_falls_back_to_us_east_1() -> None:
    assert regions.resolve("us-west-2")[0].code == "us-west-2"
    assert regions.resolve("us-west-2")[1] is False
    for bad in (None, "", "US-WEST-2", "us-wset-2", "mars-1"):
        region, fallback = regions.resolve(bad)
        assert (region.code, fallback) == ("us-east-1", True)


def test_endpoint_names() -> None:
    std = regions.get("us-west-2").endpoint_hosts("STANDARD")
    assert set(std.values()) == {
        f"{n}.backup-gateway.us-west-2.amazonaws.com"
        for n in ("anon-cp", "client-cp", "proxy-app", "dp-1")
    }
    dual = regions.get("us-west-2").endpoint_hosts("DUALSTACK")
    assert set(dual.values()) == {
        f"{n}-backup-gateway.us-west-2.api.aws"
        for n in ("activation", "controlplane", "proxy", "dataplane")
    }
    assert regions.get("cn-north-1").endpoint_hosts("STANDARD")["anon-cp"].endswith(
        ".amazonaws.com.cn"
    )
    assert "anon-cp.backup-gateway.eu-west-1.amazonaws.com" in regions.all_endpoint_hosts()


def test_console_urls_per_partition() -> None:
    assert regions.get("us-west-2").console_url == "https://us-west-2.console.aws.amazon.com"
    assert regions.get("cn-north-1").console_url == "https://console.amazonaws.cn"
    assert regions.get("us-gov-west-1").console_url == "https://console.amazonaws-us-gov.com"
