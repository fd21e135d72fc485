"""The JSON API driven by the real AWS CLI against a control plane on a loopback port."""

from __future__ import annotations

import http.client
import json

import pytest

from tests.controlplane.cpharness import REGION, Server, aws_env

pytestmark = pytest.mark.slow


def create(server: Server, name: str = "gw-one", region: str = REGION) -> str:
    key = server.link().key(region)
    out = server.ok("create-gateway", "--activation-key", key, "--gateway-display-name", name,
                    "--gateway-type", "BACKUP_VM", region=region)
    return str(out["GatewayArn"])


def test_gateway_lifecycle(server: Server) -> None:
    link = server.link()
    key = link.key()
    assert len(key) == 29 and key.count("-") == 4
    created = server.ok(
        "create-gateway", "--activation-key", key, "--gateway-display-name", "site-a",
        "--gateway-type", "BACKUP_VM", "--tags", "Key=team,Value=ops",
    )
    arn = created["GatewayArn"]
    assert arn.startswith(f"arn:aws:backup-gateway:{REGION}:")
    assert ":gateway/bgw-" in arn
    account = arn.split(":")[4]
    assert len(account) == 12 and account.isdigit()

    got = server.ok("get-gateway", "--gateway-arn", arn)["Gateway"]
    assert got["GatewayDisplayName"] == "site-a"
    assert got["GatewayType"] == "BACKUP_VM"
    assert got["SoftwareVersion"] == "0-1-0"  # the model's pattern allows no dots
    assert "LastSeenTime" in got

    server.ok("update-gateway-information", "--gateway-arn", arn,
              "--gateway-display-name", "site-b")
    assert server.ok("get-gateway", "--gateway-arn", arn)["Gateway"]["GatewayDisplayName"] == (
        "site-b"
    )
    assert link.poll().body["gatewayName"] == "site-b"

    before = link.poll().body["softwareUpdateRequest"]
    server.ok("update-gateway-software-now", "--gateway-arn", arn)
    assert link.poll().body["softwareUpdateRequest"] == before + 1

    server.ok("put-maintenance-start-time", "--gateway-arn", arn, "--hour-of-day", "3",
              "--minute-of-hour", "15", "--day-of-week", "2")
    got = server.ok("get-gateway", "--gateway-arn", arn)["Gateway"]
    assert got["MaintenanceStartTime"] == {"HourOfDay": 3, "MinuteOfHour": 15, "DayOfWeek": 2}

    # Tags: the two spellings of the ARN member, as in the model.
    server.ok("tag-resource", "--resource-arn", arn, "--tags", "Key=env,Value=prod")
    tags = server.ok("list-tags-for-resource", "--resource-arn", arn)["Tags"]
    assert tags == [{"Key": "env", "Value": "prod"}, {"Key": "team", "Value": "ops"}]
    server.ok("untag-resource", "--resource-arn", arn, "--tag-keys", "team")
    tags = server.ok("list-tags-for-resource", "--resource-arn", arn)["Tags"]
    assert tags == [{"Key": "env", "Value": "prod"}]

    server.ok("delete-gateway", "--gateway-arn", arn)
    res = server.aws("get-gateway", "--gateway-arn", arn)
    assert res.rc != 0 and "ResourceNotFoundException" in res.err
    assert link.poll().body["state"] == "deleted"
    again = link.request_key()
    assert again.status == 410 and again.body["error"] == "GatewayDeleted"


def test_list_gateways_pagination(server: Server) -> None:
    arns = [create(server, f"gw-{i}") for i in range(5)]
    create(server, "elsewhere", region="eu-west-1")  # other regions are not listed
    # The CLI follows NextToken by itself: page size 2 means three calls.
    listed = server.ok("list-gateways", "--page-size", "2")["Gateways"]
    assert [g["GatewayArn"] for g in listed] == arns
    first = server.ok("list-gateways", "--max-items", "3")
    assert [g["GatewayArn"] for g in first["Gateways"]] == arns[:3]
    rest = server.ok("list-gateways", "--starting-token", first["NextToken"])
    assert [g["GatewayArn"] for g in rest["Gateways"]] == arns[3:]
    bad = server.aws("list-gateways", "--no-paginate", "--next-token", "bm9wZQ==")
    assert bad.rc != 0 and "ValidationException" in bad.err and "NextToken" in bad.err


def test_bandwidth_schedule_shorthand_and_json(server: Server) -> None:
    arn = create(server)
    got = server.ok("get-bandwidth-rate-limit-schedule", "--gateway-arn", arn)
    assert got["BandwidthRateLimitIntervals"] == []
    server.ok(
        "put-bandwidth-rate-limit-schedule", "--gateway-arn", arn,
        "--bandwidth-rate-limit-intervals",
        "StartHourOfDay=8,StartMinuteOfHour=0,EndHourOfDay=17,EndMinuteOfHour=59,"
        "DaysOfWeek=1,2,3,4,5,AverageUploadRateLimitInBitsPerSec=104857600",
    )
    got = server.ok("get-bandwidth-rate-limit-schedule", "--gateway-arn", arn)
    assert got["BandwidthRateLimitIntervals"] == [{
        "AverageUploadRateLimitInBitsPerSec": 104857600, "StartHourOfDay": 8,
        "StartMinuteOfHour": 0, "EndHourOfDay": 17, "EndMinuteOfHour": 59,
        "DaysOfWeek": [1, 2, 3, 4, 5],
    }]
    intervals = [
        {"StartHourOfDay": 0, "StartMinuteOfHour": 0, "EndHourOfDay": 7,
         "EndMinuteOfHour": 59, "DaysOfWeek": [0, 6]},
        {"StartHourOfDay": 8, "StartMinuteOfHour": 0, "EndHourOfDay": 23,
         "EndMinuteOfHour": 59, "DaysOfWeek": [0, 6], "AverageUploadRateLimitInBitsPerSec": 51200},
    ]
    server.ok("put-bandwidth-rate-limit-schedule", "--gateway-arn", arn,
              "--bandwidth-rate-limit-intervals", json.dumps(intervals))
    got = server.ok("get-bandwidth-rate-limit-schedule", "--gateway-arn", arn)
    assert got["BandwidthRateLimitIntervals"][0] == intervals[0]  # no rate member: left out
    assert got["BandwidthRateLimitIntervals"][1]["AverageUploadRateLimitInBitsPerSec"] == 51200
    # Overlapping intervals are refused by the shared schedule model, naming the position.
    overlap = [intervals[0], {**intervals[1], "StartHourOfDay": 7}]
    res = server.aws("put-bandwidth-rate-limit-schedule", "--gateway-arn", arn,
                     "--bandwidth-rate-limit-intervals", json.dumps(overlap))
    assert res.rc != 0 and "ValidationException" in res.err
    assert "BandwidthRateLimitIntervals[1]" in res.err and "overlaps" in res.err
    res = server.aws("put-bandwidth-rate-limit-schedule", "--gateway-arn", arn,
                     "--bandwidth-rate-limit-intervals", json.dumps([{**intervals[0],
                                                                      "EndHourOfDay": 24}]))
    assert res.rc != 0 and "EndHourOfDay" in res.err and "23" in res.err
    # The refused puts left the schedule as it was; an empty list clears it.
    got = server.ok("get-bandwidth-rate-limit-schedule", "--gateway-arn", arn)
    assert len(got["BandwidthRateLimitIntervals"]) == 2
    server.ok("put-bandwidth-rate-limit-schedule", "--gateway-arn", arn,
              "--bandwidth-rate-limit-intervals", "[]")
    got = server.ok("get-bandwidth-rate-limit-schedule", "--gateway-arn", arn)
    assert got["BandwidthRateLimitIntervals"] == []


def test_activation_key_rules(server: Server) -> None:
    link = server.link()
    key = link.key()
    # Wrong region: the key is bound to the region the gateway asked for.
    res = server.aws("create-gateway", "--activation-key", key, "--gateway-display-name", "x",
                     "--gateway-type", "BACKUP_VM", region="eu-central-1")
    assert res.rc != 0 and "ValidationException" in res.err and "us-west-2" in res.err
    # Expired: the injected clock moves past the 30 minutes.
    server.clock.advance(31 * 60)
    res = server.aws("create-gateway", "--activation-key", key, "--gateway-display-name", "x",
                     "--gateway-type", "BACKUP_VM")
    assert res.rc != 0 and "ValidationException" in res.err and "expired" in res.err
    # A fresh key works once; the second use is refused.
    key = link.key()
    server.ok("create-gateway", "--activation-key", key, "--gateway-display-name", "x",
              "--gateway-type", "BACKUP_VM")
    res = server.aws("create-gateway", "--activation-key", key, "--gateway-display-name", "y",
                     "--gateway-type", "BACKUP_VM")
    assert res.rc != 0 and "ValidationException" in res.err and "already used" in res.err
    res = server.aws("create-gateway", "--activation-key", "AAAAA-BBBBB-CCCCC-DDDDD-EEEEE",
                     "--gateway-display-name", "z", "--gateway-type", "BACKUP_VM")
    assert res.rc != 0 and "not issued" in res.err
    # Once activated, the gateway gets no new key.
    again = link.request_key()
    assert again.status == 409 and again.body["error"] == "AlreadyActivated"


def test_validation_errors_name_the_member(server: Server) -> None:
    key = server.link().key()
    cases = [
        (["--gateway-display-name", "x" * 101], "GatewayDisplayName", "100"),
        (["--gateway-display-name", "bad name!"], "GatewayDisplayName", "pattern"),
    ]
    for extra, member, detail in cases:
        res = server.aws("create-gateway", "--activation-key", key, "--gateway-type",
                         "BACKUP_VM", *extra)
        assert res.rc != 0, extra
        assert "ValidationException" in res.err and member in res.err and detail in res.err
    res = server.aws("create-gateway", "--activation-key", "bad_key!", "--gateway-type",
                     "BACKUP_VM", "--gateway-display-name", "ok")
    assert "ValidationException" in res.err and "ActivationKey" in res.err
    res = server.aws("get-gateway", "--gateway-arn", "arn:aws:backup-gateway:" + "x" * 200)
    assert "ValidationException" in res.err and "GatewayArn" in res.err
    res = server.aws("tag-resource", "--resource-arn",
                     "arn:aws:backup-gateway:us-west-2:123456789012:gateway/bgw-00000000",
                     "--tags", "Key=a$b,Value=v")
    assert "ValidationException" in res.err and "Tags[0].Key" in res.err
    res = server.aws("put-maintenance-start-time", "--gateway-arn",
                     "arn:aws:backup-gateway:us-west-2:123456789012:gateway/bgw-00000000",
                     "--hour-of-day", "24", "--minute-of-hour", "0")
    assert "ValidationException" in res.err and "HourOfDay" in res.err
    res = server.aws("get-gateway", "--gateway-arn",
                     "arn:aws:backup-gateway:us-west-2:123456789012:gateway/bgw-00000000")
    assert "ResourceNotFoundException" in res.err


def test_bad_signature_and_unknown_key(server: Server) -> None:
    env = aws_env(server.plane.access_key_id, "wrong" + server.plane.secret_access_key[5:],
                  server.home)
    res = server.aws("list-gateways", env=env)
    assert res.rc != 0 and "InvalidSignatureException" in res.err
    env = aws_env("AKIAUNKNOWNUNKNOWN00", server.plane.secret_access_key, server.home)
    res = server.aws("list-gateways", env=env)
    assert res.rc != 0 and "UnrecognizedClientException" in res.err


def test_unknown_operation_is_named(server: Server) -> None:
    """Every operation of the model is served now, so an invented one, signed as botocore
    signs: the answer names it and lists the served ones."""
    from tests.controlplane.test_hostile_api import signed_headers

    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.request("POST", "/", body=b"{}", headers=signed_headers(server, "ListVaults",
                                                                      b"{}"))
        resp = conn.getresponse()
        doc = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 400 and doc["__type"].endswith("UnknownOperationException"), doc
    assert "ListVaults" in doc["message"]
    assert "ListHypervisors" in doc["message"] and "CreateGateway" in doc["message"]
