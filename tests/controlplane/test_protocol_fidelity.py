"""Error bodies and outputs as botocore's `backup-gateway` model describes them.

botocore parses a modelled error's body against its shape (members `ErrorCode`, `Message`)
and merges those members into `e.response`; it reads `__type` and `message`/`Message` for
`e.response['Error']`. These tests check the model facts the server relies on, then what
boto3 sees for modelled and protocol-level errors over AWS JSON 1.0.
"""

from __future__ import annotations

import http.client
import json
from typing import Any

import boto3
import botocore.session
import pytest
from botocore.config import Config

from controlplane.apimodel import ERROR_STATUS, OPERATIONS, TARGET_PREFIX
from controlplane.errors import MODELED_ERRORS, PROTOCOL_ERROR_STATUS, ApiError
from controlplane.protocol import (
    CBOR_CONTENT_TYPE,
    CONTENT_TYPE,
    TIMESTAMP_MEMBERS,
    error_body,
    error_for_path,
)
from controlplane.throttle import Throttle
from tests.controlplane.cpharness import REGION, Server

SERVICE = "backup-gateway"
ARN = "arn:aws:backup-gateway:us-west-2:123456789012:gateway/bgw-00000000"


def model() -> Any:
    return botocore.session.get_session().get_service_model(SERVICE)


def client(server: Server, secret: str | None = None) -> Any:
    return boto3.client(
        SERVICE, region_name=REGION, endpoint_url=server.url,
        aws_access_key_id=server.plane.access_key_id,
        aws_secret_access_key=secret or server.plane.secret_access_key,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )


# -- the model ----------------------------------------------------------------------------


def test_every_modelled_error_has_error_code_and_message() -> None:
    m = model()
    modelled = {s.name for op in m.operation_names for s in m.operation_model(op).error_shapes}
    assert MODELED_ERRORS == modelled == set(ERROR_STATUS)
    for name in MODELED_ERRORS:
        shape = m.shape_for(name)
        assert set(shape.members) == {"ErrorCode", "Message"}, name
        assert set(shape.required_members) <= {"ErrorCode"}, name
        assert shape.metadata["error"]["httpStatusCode"] == ERROR_STATUS[name]
    assert not set(PROTOCOL_ERROR_STATUS) & MODELED_ERRORS


def test_timestamp_members_are_the_models() -> None:
    """rpcv2Cbor tags a number as a time by its member name; sound only while every
    timestamp member's name is used by timestamps alone."""
    m = model()
    times: set[str] = set()
    others: set[str] = set()
    for name in m.shape_names:
        shape = m.shape_for(name)
        if shape.type_name == "structure":
            for member, target in shape.members.items():
                (times if target.type_name == "timestamp" else others).add(member)
    assert times == TIMESTAMP_MEMBERS
    assert not times & others


def test_software_version_pattern_is_known() -> None:
    """GetGateway's SoftwareVersion targets the shape `Name` (pattern [a-zA-Z0-9-]*): a
    version such as 0.1.0 has dots, so operations.model_version shows it as 0-1-0."""
    gateway = model().operation_model("GetGateway").output_shape.members["Gateway"]
    version = gateway.members["SoftwareVersion"]
    assert version.name == "Name" and version.metadata["pattern"] == "[a-zA-Z0-9-]*"


# -- bodies -------------------------------------------------------------------------------


def test_error_bodies_carry_the_models_members() -> None:
    for code in sorted(MODELED_ERRORS):
        doc = json.loads(error_body(ApiError(code, "why")))
        assert doc == {"__type": code, "message": "why", "Message": "why", "ErrorCode": code}
    doc = json.loads(error_body(ApiError("ConflictException", "busy", "GatewayBusy")))
    assert doc["ErrorCode"] == "GatewayBusy"
    for code in sorted(PROTOCOL_ERROR_STATUS):
        doc = json.loads(error_body(ApiError(code, "why")))
        assert doc == {"__type": code, "message": "why", "Message": "why"}


def test_raw_answers_follow_the_path_protocol() -> None:
    err = ApiError("RequestHeaderFieldsTooLargeException", "big")
    assert error_for_path(b"/", err)[0] == CONTENT_TYPE
    ctype, body, extra = error_for_path(b"/service/X/operation/Y", err)
    assert ctype == CBOR_CONTENT_TYPE and extra == {"smithy-protocol": "rpc-v2-cbor"}
    assert body.startswith(b"\xa3")  # __type, message, Message


# -- what boto3 sees ----------------------------------------------------------------------


def test_boto3_sees_modelled_members(server: Server) -> None:
    api = client(server)
    with pytest.raises(api.exceptions.ResourceNotFoundException) as missing:
        api.get_gateway(GatewayArn=ARN)
    resp = missing.value.response
    assert resp["Error"]["Code"] == "ResourceNotFoundException"
    assert "was not found" in resp["Error"]["Message"]
    assert resp["ErrorCode"] == "ResourceNotFoundException"
    assert resp["Message"] == resp["Error"]["Message"]

    with pytest.raises(api.exceptions.ValidationException) as invalid:
        api.create_gateway(ActivationKey="NOPE-NOPE", GatewayDisplayName="x",
                           GatewayType="BACKUP_VM")
    assert invalid.value.response["ErrorCode"] == "ValidationException"
    assert invalid.value.response["Message"]

    server.plane.json_api.throttle = Throttle(rate=0.001, burst=1)
    api.list_gateways()
    with pytest.raises(api.exceptions.ThrottlingException) as throttled:
        api.list_gateways()
    assert throttled.value.response["ErrorCode"] == "RateExceeded"  # required by the model
    assert "Rate exceeded" in throttled.value.response["Error"]["Message"]


def test_protocol_errors_keep_working(server: Server) -> None:
    with pytest.raises(Exception) as wrong:
        client(server, secret="wrong").list_gateways()
    resp = wrong.value.response  # type: ignore[attr-defined]
    assert resp["Error"]["Code"] == "InvalidSignatureException"
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 403

    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.request("POST", "/", body=b"{}", headers={
            "Content-Type": CONTENT_TYPE, "X-Amz-Target": f"{TARGET_PREFIX}.ListGateways"})
        resp = conn.getresponse()
        doc = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 403
    assert doc["__type"] == "MissingAuthenticationTokenException"
    assert doc["message"] == doc["Message"] and "ErrorCode" not in doc


def test_unknown_operation_names_the_operations(server: Server) -> None:
    from tests.controlplane.test_hostile_api import post, signed_headers

    status, _, doc = post(server, signed_headers(server, "Nope", b"{}"), b"{}")
    assert status == 400 and doc["__type"] == "UnknownOperationException"
    assert all(op in doc["message"] for op in OPERATIONS)
    assert doc["Message"] == doc["message"]


def test_software_version_follows_the_models_pattern() -> None:
    """GetGateway's SoftwareVersion is a `Name` in the model: letters, digits and '-'."""
    import re

    import botocore.session

    from controlplane.operations import model_version

    model = botocore.session.get_session().get_service_model("backup-gateway")
    shape = model.shape_for("GatewayDetails").members["SoftwareVersion"]
    pattern = shape.metadata["pattern"]
    for version in ("0.1.0", "1.2.3+deb12u1", "2026.11_rc-1"):
        shown = model_version(version)
        assert re.fullmatch(pattern, shown), (version, shown)
    assert model_version("0.1.0") == "0-1-0"
