"""Smithy RPC v2 CBOR: the codec (controlplane/cbor.py) and the protocol end to end.

The end-to-end tests drive the server with the real botocore forced onto its rpcv2Cbor
serializer and parser: the model is loaded, its `protocols` narrowed to
`smithy-rpc-v2-cbor`, and written to a data directory put first on the session's loader
search path. That is botocore's own mechanism for custom models (AWS_DATA_PATH), so the
client is built exactly as for any service, and the AWS CLI takes the same directory.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import random
import struct
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import botocore.loaders
import botocore.session
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from botocore.parsers import RpcV2CBORParser
from botocore.serialize import RpcV2CBORSerializer

from controlplane import cbor
from controlplane.apimodel import OPERATIONS, TARGET_PREFIX
from controlplane.protocol import RPCV2_PATH
from controlplane.server import ControlPlane
from controlplane.throttle import Throttle
from tests.controlplane.cpharness import REGION, Server
from tests.controlplane.test_hostile_api import generate

SERVICE = "backup-gateway"
CBOR_TYPE = "application/cbor"
ARN = "arn:aws:backup-gateway:us-west-2:123456789012:gateway/bgw-00000000"


def service_model() -> Any:
    return botocore.session.get_session().get_service_model(SERVICE)


# -- the codec ----------------------------------------------------------------------------

# RFC 8949 Appendix A: (hex, value) pairs within what this decoder accepts.
RFC_EXAMPLES: list[tuple[str, Any]] = [
    ("00", 0), ("17", 23), ("1818", 24), ("1903e8", 1000), ("1a000f4240", 1000000),
    ("1b000000e8d4a51000", 1000000000000), ("1bffffffffffffffff", 18446744073709551615),
    ("20", -1), ("3863", -100), ("3bffffffffffffffff", -18446744073709551616),
    ("f90000", 0.0), ("f93c00", 1.0), ("f97bff", 65504.0), ("fa47c35000", 100000.0),
    ("fb3ff199999999999a", 1.1), ("f90001", 5.960464477539063e-08), ("f97c00", math.inf),
    ("f4", False), ("f5", True), ("f6", None), ("f7", None),
    ("c11a514b67b0", 1363896240), ("c1fb41d452d9ec200000", 1363896240.5),
    ("40", b""), ("4401020304", b"\x01\x02\x03\x04"), ("60", ""), ("6449455446", "IETF"),
    ("62c3bc", "\u00fc"), ("64f0908591", "\U00010151"),
    ("80", []), ("83010203", [1, 2, 3]), ("a0", {}),
    ("a26161016162820203", {"a": 1, "b": [2, 3]}),
    ("5f42010243030405ff", b"\x01\x02\x03\x04\x05"),
    ("7f657374726561646d696e67ff", "streaming"),
    ("9f018202039f0405ffff", [1, [2, 3], [4, 5]]),
    ("bf61610161629f0203ffff", {"a": 1, "b": [2, 3]}),
    ("bf6346756ef563416d7421ff", {"Fun": True, "Amt": -2}),
]


@pytest.mark.parametrize(("hexed", "value"), RFC_EXAMPLES)
def test_decodes_the_rfc_examples(hexed: str, value: Any) -> None:
    assert cbor.loads(bytes.fromhex(hexed)) == value


def test_decodes_half_precision_nan() -> None:
    assert math.isnan(cbor.loads(bytes.fromhex("f97e00")))


REFUSED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "empty body"),
    ("truncated int", bytes.fromhex("1a0001"), "truncated"),
    ("truncated string", bytes.fromhex("6549455446"), "only 4 left"),
    ("truncated map", bytes.fromhex("a16161"), "truncated"),
    ("unterminated indefinite", bytes.fromhex("9f0102"), "truncated"),
    ("huge array", bytes.fromhex("9bffffffffffffffff00"), "array of 18446744073709551615"),
    ("huge map", bytes.fromhex("bb7fffffffffffffff"), "map of"),
    ("huge string", bytes.fromhex("7affffffff61"), "string of 4294967295 bytes"),
    ("huge chunk", bytes.fromhex("5f5bffffffffffffffff00ff"), "string of"),
    ("trailing", bytes.fromhex("a0a0"), "bytes after the end"),
    ("reserved info", bytes.fromhex("1c"), "reserved"),
    ("reserved length", bytes.fromhex("7d"), "reserved"),
    ("stray break", bytes.fromhex("ff"), "break"),
    ("break as value", bytes.fromhex("bf6161ffff"), "break"),
    ("indefinite int", bytes.fromhex("1f"), "indefinite"),
    ("indefinite tag", bytes.fromhex("df00"), "indefinite"),
    ("mixed chunks", bytes.fromhex("5f6161ff"), "same type"),
    ("nested indefinite chunk", bytes.fromhex("7f7f6161ffff"), "same type"),
    ("bad utf-8", bytes.fromhex("62c328"), "UTF-8"),
    ("surrogate", bytes.fromhex("63eda080"), "UTF-8"),
    ("split utf-8 chunks", bytes.fromhex("7f61c361bcff"), "UTF-8"),
    ("int key", bytes.fromhex("a10101"), "map key must be a text string"),
    ("array key", bytes.fromhex("a18001"), "map key"),
    ("duplicate key", bytes.fromhex("a2616101616102"), "duplicate map key"),
    ("bignum tag", bytes.fromhex("c249010000000000000000"), "tag 2"),
    ("tag in tag", bytes.fromhex("c1c100"), "tag 1"),
    ("string time", bytes.fromhex("c16161"), "tag 1"),
    ("bool time", bytes.fromhex("c1f5"), "tag 1"),
    ("infinite time", bytes.fromhex("c1f97c00"), "finite"),
    ("simple 16", bytes.fromhex("f0"), "simple value 16"),
    ("one-byte simple", bytes.fromhex("f820"), "simple value 24"),
]


@pytest.mark.parametrize(("name", "data", "reason"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refuses_malformed_or_unsupported(name: str, data: bytes, reason: str) -> None:
    with pytest.raises(cbor.CborError, match="invalid CBOR at byte") as info:
        cbor.loads(data)
    assert reason in str(info.value)


@pytest.mark.parametrize("opener", [b"\x81", b"\x9f", b"\xa1\x61a", b"\xbf\x61a"])
def test_nesting_is_bounded(opener: bytes) -> None:
    closer = b"\xff" if opener in (b"\x9f", b"\xbf\x61a") else b""
    for depth, ok in ((cbor.MAX_DEPTH, True), (cbor.MAX_DEPTH + 1, False),
                      (200_000, False)):
        data = opener * depth + b"\x00" + closer * depth
        if ok:
            cbor.loads(data)
        else:
            with pytest.raises(cbor.CborError, match="nested deeper than 32"):
                cbor.loads(data)


def test_a_huge_declared_length_is_refused_at_once() -> None:
    started = time.monotonic()
    for data in (b"\x9b" + b"\xff" * 8, b"\x5b" + b"\x7f" * 8, b"\xbb" + b"\x7f" * 8):
        with pytest.raises(cbor.CborError):
            cbor.loads(data + b"\x00" * 1000)
    assert time.monotonic() - started < 0.5


def test_encodes_in_the_shortest_form() -> None:
    for value, hexed in [(0, "00"), (23, "17"), (24, "1818"), (255, "18ff"), (256, "190100"),
                         (65536, "1a00010000"), (1 << 32, "1b0000000100000000"),
                         (-1, "20"), (-25, "3818"), (1.5, "fa3fc00000"),
                         (1.1, "fb3ff199999999999a"), ("a", "6161"), (b"\x01", "4101"),
                         ([], "80"), ({}, "a0"), (True, "f5"), (False, "f4"), (None, "f6")]:
        assert cbor.dumps(value).hex() == hexed, value


def test_encodes_timestamps_as_tag_1() -> None:
    keys = {"LastSeenTime"}
    assert cbor.dumps({"LastSeenTime": 1363896240}, keys).hex() == \
        "a16c4c6173745365656e54696d65c11a514b67b0"
    assert cbor.dumps({"LastSeenTime": 1363896240.0}, keys) == \
        cbor.dumps({"LastSeenTime": 1363896240}, keys)
    half = cbor.dumps({"LastSeenTime": 1363896240.5}, keys)
    assert half.endswith(bytes.fromhex("c1fb41d452d9ec200000"))
    moment = datetime.fromtimestamp(1363896240.5, UTC)
    assert cbor.dumps(moment).hex() == "c1fb41d452d9ec200000"
    assert cbor.dumps({"Other": 5}, keys).hex() == "a1654f7468657205"  # not a time: plain


def test_encoding_omits_nulls_and_refuses_the_unencodable() -> None:
    assert cbor.dumps({"a": None, "b": 1}) == cbor.dumps({"b": 1})
    for bad in ({1: 2}, {1.5}, object(), 1 << 64, -(1 << 64) - 1):
        with pytest.raises(ValueError):
            cbor.dumps(bad)


def test_round_trip_and_botocore_agree() -> None:
    """Our bytes parse with botocore's parser; botocore's serializer's bytes with ours."""
    model = service_model()
    value = {"Gateway": {"GatewayArn": ARN, "GatewayDisplayName": "gw-1",
                         "GatewayType": "BACKUP_VM", "LastSeenTime": 1700000000.25,
                         "MaintenanceStartTime": {"HourOfDay": 3, "MinuteOfHour": 30,
                                                  "DayOfWeek": 6}}}
    data = cbor.dumps(value, {"LastSeenTime"})
    parsed = RpcV2CBORParser().parse(
        {"body": data, "headers": {}, "status_code": 200},
        model.operation_model("GetGateway").output_shape,
    )
    assert parsed["Gateway"]["LastSeenTime"].timestamp() == 1700000000.25
    assert parsed["Gateway"]["MaintenanceStartTime"]["DayOfWeek"] == 6
    assert cbor.loads(data) == value
    params = {"GatewayArn": ARN, "BandwidthRateLimitIntervals": [{
        "StartHourOfDay": 0, "EndHourOfDay": 23, "StartMinuteOfHour": 0,
        "EndMinuteOfHour": 59, "DaysOfWeek": [0, 6],
        "AverageUploadRateLimitInBitsPerSec": 8_000_000_000_000}]}
    request = RpcV2CBORSerializer().serialize_to_request(
        params, model.operation_model("PutBandwidthRateLimitSchedule"))
    assert cbor.loads(request["body"]) == params


def test_random_values_round_trip() -> None:
    rng = random.Random(8949)

    def value(depth: int) -> Any:
        kind = rng.randrange(8 if depth < 6 else 5)
        if kind == 0:
            return rng.choice([0, 23, 24, 255, 256, 65535, 65536, 2**32, 2**64 - 1, -2**64])
        if kind == 1:
            return rng.choice([0.5, -1.25, 1e300, 3.4e38, 1.1])
        if kind == 2:
            return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(40)))
        if kind == 3:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        if kind == 4:
            return rng.choice([True, False])
        if kind == 5:
            return [value(depth + 1) for _ in range(rng.randrange(5))]
        return {f"k{i}": value(depth + 1) for i in range(rng.randrange(5))}

    for _ in range(300):
        item = value(0)
        assert cbor.loads(cbor.dumps(item)) == item


# -- the protocol, with botocore's own rpcv2Cbor client ------------------------------------


@pytest.fixture(scope="module")
def cbor_data_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A botocore data directory whose backup-gateway model speaks only rpcv2Cbor."""
    root = tmp_path_factory.mktemp("cbor-model")
    model = botocore.loaders.Loader().load_service_model(SERVICE, "service-2")
    model["metadata"]["protocols"] = ["smithy-rpc-v2-cbor"]
    model["metadata"]["protocol"] = "smithy-rpc-v2-cbor"
    where = root / SERVICE / model["metadata"]["apiVersion"]
    where.mkdir(parents=True)
    (where / "service-2.json").write_text(json.dumps(model))
    return root


@pytest.fixture
def srv(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Server:
    """The `server` fixture with the rpcv2Cbor route in its app: added here only while
    server.py's make_app does not add JsonApi.routes() itself."""
    original = ControlPlane.make_app

    def make_app(self: ControlPlane) -> Any:
        app = original(self)
        routed = {getattr(r.resource, "canonical", None) for r in app.router.routes()}
        if RPCV2_PATH not in routed:
            app.router.add_post(RPCV2_PATH, self.json_api.handle_cbor)
        return app

    monkeypatch.setattr(ControlPlane, "make_app", make_app)
    server: Server = request.getfixturevalue("server")
    return server


@pytest.fixture
def sent() -> list[AWSRequest]:
    return []


@pytest.fixture
def cbor_client(srv: Server, cbor_data_path: Path, sent: list[AWSRequest]) -> Any:
    session = botocore.session.get_session()
    session.get_component("data_loader").search_paths.insert(0, str(cbor_data_path))
    client = boto3.Session(botocore_session=session).client(
        SERVICE, region_name=REGION, endpoint_url=srv.url,
        aws_access_key_id=srv.plane.access_key_id,
        aws_secret_access_key=srv.plane.secret_access_key,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )
    assert client.meta.service_model.resolved_protocol == "smithy-rpc-v2-cbor"
    client.meta.events.register("before-send", lambda request, **kw: sent.append(request))
    return client


def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert "Traceback" not in caplog.text
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


def test_botocore_drives_the_api_over_cbor(srv: Server, cbor_client: Any,
                                           sent: list[AWSRequest]) -> None:
    key = srv.link().key()
    arn = cbor_client.create_gateway(ActivationKey=key, GatewayDisplayName="cbor-gw",
                                     GatewayType="BACKUP_VM",
                                     Tags=[{"Key": "team", "Value": "ops"}])["GatewayArn"]
    assert sent[-1].url.endswith(f"/service/{TARGET_PREFIX}/operation/CreateGateway")
    assert sent[-1].headers["Content-Type"] in (CBOR_TYPE, CBOR_TYPE.encode())
    assert sent[-1].headers["smithy-protocol"] in ("rpc-v2-cbor", b"rpc-v2-cbor")
    assert "X-Amz-Target" not in sent[-1].headers

    out = cbor_client.get_gateway(GatewayArn=arn)
    headers = out["ResponseMetadata"]["HTTPHeaders"]
    assert headers["content-type"] == CBOR_TYPE and headers["smithy-protocol"] == "rpc-v2-cbor"
    gateway = out["Gateway"]
    assert gateway["GatewayDisplayName"] == "cbor-gw" and gateway["GatewayArn"] == arn
    assert isinstance(gateway["LastSeenTime"], datetime)  # tag 1 parsed as a timestamp
    assert abs(gateway["LastSeenTime"].timestamp() - srv.clock.now()) < 5

    cbor_client.update_gateway_information(GatewayArn=arn, GatewayDisplayName="renamed")
    cbor_client.put_maintenance_start_time(GatewayArn=arn, HourOfDay=2, MinuteOfHour=15,
                                           DayOfWeek=3)
    gateway = cbor_client.get_gateway(GatewayArn=arn)["Gateway"]
    assert gateway["GatewayDisplayName"] == "renamed"
    assert gateway["MaintenanceStartTime"]["HourOfDay"] == 2

    interval = {"StartHourOfDay": 0, "EndHourOfDay": 23, "StartMinuteOfHour": 0,
                "EndMinuteOfHour": 59, "DaysOfWeek": [0, 1, 2, 3, 4, 5, 6],
                "AverageUploadRateLimitInBitsPerSec": 104857600}
    cbor_client.put_bandwidth_rate_limit_schedule(GatewayArn=arn,
                                                  BandwidthRateLimitIntervals=[interval])
    got = cbor_client.get_bandwidth_rate_limit_schedule(GatewayArn=arn)
    assert got["BandwidthRateLimitIntervals"] == [interval]

    cbor_client.tag_resource(ResourceARN=arn, Tags=[{"Key": "env", "Value": "lab"}])
    tags = cbor_client.list_tags_for_resource(ResourceArn=arn)["Tags"]
    assert {t["Key"]: t["Value"] for t in tags} == {"team": "ops", "env": "lab"}
    cbor_client.untag_resource(ResourceARN=arn, TagKeys=["team"])
    assert [t["Key"] for t in cbor_client.list_tags_for_resource(ResourceArn=arn)["Tags"]] \
        == ["env"]

    cbor_client.delete_gateway(GatewayArn=arn)
    with pytest.raises(cbor_client.exceptions.ResourceNotFoundException):
        cbor_client.get_gateway(GatewayArn=arn)


def test_list_gateways_paginates_over_cbor(srv: Server, cbor_client: Any) -> None:
    arns = set()
    for i in range(5):
        arns.add(cbor_client.create_gateway(
            ActivationKey=srv.link().key(), GatewayDisplayName=f"gw-{i}",
            GatewayType="BACKUP_VM")["GatewayArn"])
    pages = list(cbor_client.get_paginator("list_gateways").paginate(
        PaginationConfig={"PageSize": 2}))
    assert [len(p["Gateways"]) for p in pages] == [2, 2, 1]
    assert {g["GatewayArn"] for p in pages for g in p["Gateways"]} == arns
    assert all(isinstance(g["LastSeenTime"], datetime) for p in pages for g in p["Gateways"])
    assert cbor_client.list_gateways()["Gateways"]  # no input: an empty map


def test_errors_parse_into_the_modelled_classes(srv: Server, cbor_client: Any) -> None:
    with pytest.raises(cbor_client.exceptions.ResourceNotFoundException) as info:
        cbor_client.get_gateway(GatewayArn=ARN)
    resp = info.value.response
    assert resp["Error"]["Code"] == "ResourceNotFoundException"
    assert "was not found" in resp["Error"]["Message"]
    assert resp["ErrorCode"] == "ResourceNotFoundException"
    assert resp["Message"] == resp["Error"]["Message"]
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 404

    with pytest.raises(cbor_client.exceptions.ValidationException) as invalid:
        cbor_client.create_gateway(ActivationKey="NOPE-NOPE", GatewayDisplayName="x",
                                   GatewayType="BACKUP_VM")
    assert invalid.value.response["ErrorCode"] == "ValidationException"

    srv.plane.json_api.throttle = Throttle(rate=0.001, burst=1)
    cbor_client.list_gateways()
    with pytest.raises(cbor_client.exceptions.ThrottlingException) as throttled:
        cbor_client.list_gateways()
    assert throttled.value.response["ErrorCode"] == "RateExceeded"


def test_a_wrong_secret_is_refused_in_cbor(srv: Server, cbor_data_path: Path) -> None:
    session = botocore.session.get_session()
    session.get_component("data_loader").search_paths.insert(0, str(cbor_data_path))
    client = session.create_client(
        SERVICE, region_name=REGION, endpoint_url=srv.url,
        aws_access_key_id=srv.plane.access_key_id, aws_secret_access_key="wrong",
        config=Config(retries={"max_attempts": 1}))
    with pytest.raises(ClientError) as info:
        client.list_gateways()
    assert info.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


@pytest.mark.slow
def test_the_aws_cli_speaks_cbor_with_a_cbor_model(srv: Server, cbor_data_path: Path) -> None:
    env = {**srv.env, "AWS_DATA_PATH": str(cbor_data_path)}
    key = srv.link().key()
    created = srv.aws("create-gateway", "--activation-key", key, "--gateway-display-name",
                      "cli-cbor", "--gateway-type", "BACKUP_VM", env=env)
    assert created.rc == 0, created.err
    listed = srv.aws("list-gateways", env=env)
    assert listed.rc == 0, listed.err
    assert [g["GatewayDisplayName"] for g in listed.out["Gateways"]] == ["cli-cbor"]
    missing = srv.aws("get-gateway", "--gateway-arn", ARN, env=env)
    assert missing.rc != 0 and "ResourceNotFoundException" in missing.err


# -- raw signed requests -------------------------------------------------------------------


def signed(srv: Server, op: str, body: bytes, headers: dict[str, str] | None = None,
           path: str | None = None, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """Headers of an rpcv2Cbor call signed as botocore signs it: `headers` added, `drop`
    left out before signing."""
    url = srv.url + (path or f"/service/{TARGET_PREFIX}/operation/{op}")
    base = {"Content-Type": CBOR_TYPE, "smithy-protocol": "rpc-v2-cbor",
            "Accept": CBOR_TYPE, **(headers or {})}
    req = AWSRequest(method="POST", url=url, data=body,
                     headers={k: v for k, v in base.items() if k not in drop})
    creds = Credentials(srv.plane.access_key_id, srv.plane.secret_access_key)
    SigV4Auth(creds, SERVICE, REGION).add_auth(req)
    return {k: v for k, v in req.headers.items() if v is not None}


def post(srv: Server, op: str, body: bytes, headers: dict[str, str],
         path: str | None = None) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    try:
        conn.request("POST", path or f"/service/{TARGET_PREFIX}/operation/{op}", body=body,
                     headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, cbor.loads(data)


def cbor_error(result: tuple[int, dict[str, str], Any], status: int, code: str) -> str:
    got_status, headers, doc = result
    assert got_status == status, (got_status, doc)
    assert headers["content-type"] == CBOR_TYPE
    assert headers["smithy-protocol"] == "rpc-v2-cbor"
    assert doc["__type"].rsplit("#", 1)[1] == code, doc
    assert "#" in doc["__type"]  # an absolute shape id
    assert doc["message"] == doc["Message"]
    return str(doc["message"])


MALFORMED = [
    ("truncated", b"\xa1\x6aGatewayArn\x78\x42arn"),
    ("deep", b"\x81" * 5000 + b"\x00"),
    ("deep indefinite", b"\x9f" * 5000),
    ("huge array", b"\xa1\x61a\x9b" + b"\xff" * 8),
    ("huge string", b"\xa1\x61a\x7b" + b"\x7f" * 8),
    ("not a map", b"\x83\x01\x02\x03"),
    ("bad utf-8", b"\xa1\x62\xc3\x28\x00"),
    ("unknown tag", b"\xa1\x61a\xd8\x20\x61x"),
    ("trailing", b"\xa0\x00"),
    ("json", b'{"GatewayArn": "x"}'),
]


@pytest.mark.parametrize(("name", "body"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_bodies_get_a_cbor_400(srv: Server, caplog: pytest.LogCaptureFixture,
                                         name: str, body: bytes) -> None:
    caplog.set_level(logging.INFO)
    message = cbor_error(post(srv, "GetGateway", body, signed(srv, "GetGateway", body)),
                         400, "SerializationException")
    assert "\n" not in message
    no_traceback(caplog)


def test_headers_the_protocol_requires_or_forbids(srv: Server) -> None:
    body = cbor.dumps({"GatewayArn": ARN})
    for extra, code, status, needle in [
        ({"Content-Type": "application/x-amz-json-1.0"}, "SerializationException", 400,
         "Content-Type must be application/cbor"),
        ({"smithy-protocol": "rpc-v2-json"}, "SerializationException", 400, "smithy-protocol"),
        ({"X-Amz-Target": f"{TARGET_PREFIX}.DeleteGateway"}, "SerializationException", 400,
         "X-Amz-Target"),
        ({"X-Amzn-Target": "x"}, "SerializationException", 400, "X-Amzn-Target"),
        ({"Accept": "application/json"}, "NotAcceptableException", 406, "Accept"),
    ]:
        message = cbor_error(post(srv, "GetGateway", body, signed(srv, "GetGateway", body,
                                                                  extra)), status, code)
        assert needle in message, (extra, message)
    headers = signed(srv, "GetGateway", body, drop=("smithy-protocol",))
    assert "smithy-protocol" in cbor_error(post(srv, "GetGateway", body, headers), 400,
                                           "SerializationException")
    headers = signed(srv, "GetGateway", body, drop=("Accept",))  # optional: defaults to CBOR
    assert post(srv, "GetGateway", body, headers)[0] == 404


def test_no_input_may_be_an_empty_body(srv: Server) -> None:
    headers = signed(srv, "ListGateways", b"", drop=("Content-Type",))
    status, hdrs, doc = post(srv, "ListGateways", b"", headers)
    assert status == 200 and doc == {"Gateways": []}
    assert hdrs["smithy-protocol"] == "rpc-v2-cbor"
    status, _, doc = post(srv, "ListGateways", b"\xbf\xff",
                          signed(srv, "ListGateways", b"\xbf\xff"))
    assert status == 200 and doc == {"Gateways": []}


def test_the_path_names_service_and_operation(srv: Server) -> None:
    body = b"\xa0"
    message = cbor_error(post(srv, "Nope", body, signed(srv, "Nope", body)), 400,
                         "UnknownOperationException")
    assert "ListGateways" in message
    other = "/service/SomeOtherService/operation/ListGateways"
    cbor_error(post(srv, "", body, signed(srv, "", body, path=other), path=other), 400,
               "UnknownOperationException")
    absolute = f"/service/com.amazonaws.backupgateway.{TARGET_PREFIX}/operation/ListGateways"
    status, _, doc = post(srv, "", body, signed(srv, "", body, path=absolute), path=absolute)
    assert status == 200 and doc == {"Gateways": []}


def test_unsigned_and_tampered_requests(srv: Server) -> None:
    body = cbor.dumps({"GatewayArn": ARN})
    plain = {"Content-Type": CBOR_TYPE, "smithy-protocol": "rpc-v2-cbor"}
    cbor_error(post(srv, "GetGateway", body, plain), 403, "MissingAuthenticationTokenException")
    # A GetGateway signature replayed against DeleteGateway's path: the path is signed.
    headers = signed(srv, "GetGateway", body)
    cbor_error(post(srv, "DeleteGateway", body, headers), 403, "InvalidSignatureException")


def test_a_change_is_accepted_once(srv: Server) -> None:
    arn = boto3.client(
        SERVICE, region_name=REGION, endpoint_url=srv.url,
        aws_access_key_id=srv.plane.access_key_id,
        aws_secret_access_key=srv.plane.secret_access_key,
    ).create_gateway(ActivationKey=srv.link().key(), GatewayDisplayName="once",
                     GatewayType="BACKUP_VM")["GatewayArn"]
    body = cbor.dumps({"GatewayArn": arn, "GatewayDisplayName": "again"})
    headers = signed(srv, "UpdateGatewayInformation", body)
    assert post(srv, "UpdateGatewayInformation", body, headers)[0] == 200
    assert "already used" in cbor_error(post(srv, "UpdateGatewayInformation", body, headers),
                                        403, "InvalidSignatureException")


# -- a seeded fuzz of signed CBOR bodies ---------------------------------------------------

FUZZ_SEED = 20210101
FUZZ_CASES = 500


def mutate(rng: random.Random, body: bytes) -> bytes:
    pick = rng.randrange(7)
    if pick == 0 and body:
        return body[: rng.randrange(len(body))]
    if pick == 1 and body:
        i = rng.randrange(len(body))
        return body[:i] + bytes([rng.randrange(256)]) + body[i + 1:]
    if pick == 2:
        return body + bytes([rng.randrange(256)])
    if pick == 3:
        depth = rng.choice([31, 33, 5000])
        return b"\xa1\x61a" + rng.choice([b"\x81", b"\x9f", b"\xbf\x61k"]) * depth + b"\x00"
    if pick == 4:
        head = rng.choice([0x5B, 0x7B, 0x9B, 0xBB, 0x1B, 0xDB, 0xFB])
        return b"\xa1\x61a" + bytes([head]) + struct.pack(">Q", rng.getrandbits(64))
    if pick == 5:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    return rng.choice([b"\xf6", b"\x80", b"\xc1\x00", b"\xa1\x00\x00", b"\xf7", b"\x60"])


def encodable(value: Any) -> Any:
    """The JSON fuzz's values as CBOR can carry them: lone surrogates replaced (UTF-8 has
    none; the server's refusal of such bytes is tested above), integers clamped to 64 bits
    (the largest, 2**64-1, still overflows every member of the model)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return max(-(1 << 64), min(value, (1 << 64) - 1))
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if isinstance(value, list):
        return [encodable(v) for v in value]
    if isinstance(value, dict):
        return {encodable(k): encodable(v) for k, v in value.items()}
    return value


def fuzzable(arn: str) -> list[str]:
    """The operations whose inputs the JSON fuzz's generator (test_hostile_api) can make:
    it needs a sample for each string shape, which a newly modelled one may not have yet."""
    ops = []
    for op in sorted(OPERATIONS):
        try:
            for seed in range(20):  # optional members are drawn at random: try a few
                generate(random.Random(seed), OPERATIONS[op][0], arn)
        except KeyError:
            continue
        ops.append(op)
    return ops


def fuzz_cases(rng: random.Random, arn: str) -> Iterator[tuple[str, bytes]]:
    ops = fuzzable(arn)
    for i in range(FUZZ_CASES):
        op = ops[i % len(ops)]
        target = arn[:-4] + "0000" if op == "DeleteGateway" else arn
        body = cbor.dumps(encodable(generate(rng, OPERATIONS[op][0], target)))
        yield op, mutate(rng, body) if rng.random() < 0.5 else body


@pytest.mark.timeout(60)
def test_fuzzed_cbor_bodies_never_get_a_5xx(srv: Server,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    srv.plane.json_api.throttle = Throttle(rate=1e9, burst=1e9)
    arn = boto3.client(
        SERVICE, region_name=REGION, endpoint_url=srv.url,
        aws_access_key_id=srv.plane.access_key_id,
        aws_secret_access_key=srv.plane.secret_access_key,
    ).create_gateway(ActivationKey=srv.link().key(), GatewayDisplayName="target",
                     GatewayType="BACKUP_VM")["GatewayArn"]
    assert {"CreateGateway", "GetGateway", "ListGateways", "DeleteGateway",
            "PutBandwidthRateLimitSchedule", "TagResource"} <= set(fuzzable(arn))
    rng = random.Random(FUZZ_SEED)
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    started = time.monotonic()
    statuses: dict[int, int] = {}
    try:
        for op, body in fuzz_cases(rng, arn):
            conn.request("POST", f"/service/{TARGET_PREFIX}/operation/{op}", body=body,
                         headers=signed(srv, op, body))
            resp = conn.getresponse()
            data = resp.read()
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
            assert resp.status < 500, (op, body[:300].hex(), data[:300])
            doc = cbor.loads(data)
            if resp.status != 200:
                assert "__type" in doc and "Message" in doc, (op, body[:300].hex(), doc)
    finally:
        conn.close()
    assert time.monotonic() - started < 10
    assert statuses.get(200, 0) > 20 and statuses.get(400, 0) > 100, statuses
    no_traceback(caplog)
