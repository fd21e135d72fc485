"""Our table of the AWS Backup API (controlplane/backupmodel.py) must equal botocore's `backup`
model, and the restJson1 wire (controlplane/restjson.py) must be able to bind what it lists.

The server carries its own copy so it needs no SDK at run time; this test catches drift when
botocore (the model the AWS CLI and boto3 use) changes a route, a limit or a member.
"""

from __future__ import annotations

import re
from typing import Any

import botocore.session
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from controlplane import backupmodel
from controlplane.errors import BACKUP_ERROR_STATUS, ApiError, backup_status
from controlplane.protocol import JsonApi
from controlplane.restjson import ROUTES, RestJsonApi, parse_time
from controlplane.validation import compile_pattern

CHECKED_KEYS = ("type", "min", "max", "pattern", "enum", "sensitive", "timestampFormat")
MEMBER_KEYS = ("shape", "location", "locationName", "timestampFormat", "idempotencyToken")
QUERY_TYPES = {"string", "integer", "long", "boolean", "timestamp"}


@pytest.fixture(scope="module")
def model() -> dict[str, Any]:
    loader = botocore.session.get_session().get_component("data_loader")
    return loader.load_service_model("backup", "service-2", backupmodel.API_VERSION)


def test_metadata(model: dict[str, Any]) -> None:
    meta = model["metadata"]
    assert meta["protocol"] == "rest-json" and meta["apiVersion"] == backupmodel.API_VERSION
    assert meta.get("signingName", meta["endpointPrefix"]) == backupmodel.SIGNING_NAME


@pytest.mark.parametrize("op", sorted(backupmodel.OPERATIONS))
def test_operation_matches_model(model: dict[str, Any], op: str) -> None:
    ours = backupmodel.OPERATIONS[op]
    theirs = model["operations"][op]
    assert ours["method"] == theirs["http"]["method"]
    assert ours["uri"] == theirs["http"]["requestUri"]
    assert ours["status"] == theirs["http"].get("responseCode", 200)
    assert ours["input"] == theirs["input"]["shape"]
    assert ours["output"] == theirs.get("output", {}).get("shape")
    assert ours["errors"] == [e["shape"] for e in theirs.get("errors", [])]


@pytest.mark.parametrize("name", sorted(backupmodel.SHAPES))
def test_shape_matches_model(model: dict[str, Any], name: str) -> None:
    ours = backupmodel.SHAPES[name]
    theirs = model["shapes"][name]
    for key in CHECKED_KEYS:
        assert ours.get(key) == theirs.get(key), f"{name}.{key}"
    assert ours.get("required", []) == theirs.get("required", []), name
    if theirs["type"] == "structure":
        assert ours["members"] == {
            m: {k: v[k] for k in MEMBER_KEYS if k in v} for m, v in theirs["members"].items()
        }, name
    if theirs["type"] == "list":
        assert ours["member"] == theirs["member"]["shape"], name
    if theirs["type"] == "map":
        assert (ours["key"], ours["value"]) == (theirs["key"]["shape"],
                                                theirs["value"]["shape"]), name


def test_every_referenced_shape_is_in_the_table() -> None:
    for name, shape in backupmodel.SHAPES.items():
        members = [m["shape"] for m in shape.get("members", {}).values()]
        for ref in [*members, shape.get("member"), shape.get("key"), shape.get("value")]:
            assert ref is None or ref in backupmodel.SHAPES, f"{name} -> {ref}"
    for op in backupmodel.OPERATIONS.values():
        assert op["input"] in backupmodel.SHAPES


def test_service_prefixes_cover_every_uri_of_the_service(model: dict[str, Any]) -> None:
    firsts = {o["http"]["requestUri"].split("?")[0].split("/")[1]
              for o in model["operations"].values()}
    assert sorted(backupmodel.SERVICE_PREFIXES) == sorted(firsts)


def test_error_statuses_match_model(model: dict[str, Any]) -> None:
    theirs = {
        name: s.get("error", {}).get("httpStatusCode", 500 if s.get("fault") else 400)
        for name, s in model["shapes"].items() if s.get("exception")
    }
    assert theirs == BACKUP_ERROR_STATUS
    for name, shape in model["shapes"].items():
        if shape.get("exception"):
            assert {"Code", "Message"} <= set(shape["members"]), name


def test_backup_statuses_leave_backup_gateway_alone() -> None:
    err = ApiError("ResourceNotFoundException", "x")
    assert err.status == 404 and backup_status(err) == 400  # backup-gateway's is unchanged
    assert backup_status(ApiError("ThrottlingException", "x")) == 429
    assert backup_status(ApiError("InternalServerException", "x")) == 500


def test_routes_are_unique_and_bind_every_label() -> None:
    assert len({(r.method, r.template) for r in ROUTES}) == len(ROUTES)
    for route in ROUTES:
        assert "?" not in route.template, route.op
        labels = set(re.findall(r"\{(\w+)\+?\}", route.template))
        members = backupmodel.SHAPES[route.input]["members"].values()
        assert labels == {m["locationName"] for m in members if m.get("location") == "uri"}
        for member in members:
            assert member.get("location") in (None, "uri", "querystring"), route.op
            if member.get("location") == "querystring":
                assert backupmodel.SHAPES[member["shape"]]["type"] in QUERY_TYPES, route.op


def test_read_only_operations() -> None:
    assert "StartBackupJob" not in backupmodel.READ_ONLY
    assert "DeleteRecoveryPoint" not in backupmodel.READ_ONLY
    assert {"ListBackupJobs", "DescribeRecoveryPoint", "GetRecoveryPointRestoreMetadata"} <= \
        backupmodel.READ_ONLY
    assert "UpdateRecoveryPointLifecycle" not in backupmodel.READ_ONLY


def test_stricter_limits_only_add_where_the_model_has_none(model: dict[str, Any]) -> None:
    for name, extra in backupmodel.STRICTER.items():
        for key in extra:
            assert key not in model["shapes"][name], f"{name}.{key} is the model's"
    role = compile_pattern(backupmodel.STRICTER["IAMRoleArn"]["pattern"])
    assert role.fullmatch("arn:aws:iam::123456789012:role/service-role/AWSBackupDefault")
    assert not role.fullmatch("arn:aws:iam::123456789012:user/alice")
    assert not role.fullmatch("role/backup")


def test_every_pattern_compiles() -> None:
    for shape in backupmodel.SHAPES.values():
        if "pattern" in shape:
            assert isinstance(compile_pattern(shape["pattern"]), re.Pattern)
    vault = compile_pattern(backupmodel.SHAPES["BackupVaultName"]["pattern"])
    assert vault.fullmatch("vault_1-a") and not vault.fullmatch("a") \
        and not vault.fullmatch("ab\n")


@pytest.mark.parametrize(("text", "fmt", "epoch"), [
    ("2024-05-01T12:00:00Z", "iso8601", 1714564800.0),
    ("2024-05-01T12:00:00.5Z", "iso8601", 1714564800.5),
    ("2024-05-01T14:00:00+02:00", "iso8601", 1714564800.0),
    ("2024-05-01T12:00:00", "iso8601", 1714564800.0),  # no zone: UTC
    ("1714564800.25", "unixTimestamp", 1714564800.25),
    ("Wed, 01 May 2024 12:00:00 GMT", "rfc822", 1714564800.0),
    ("yesterday", "iso8601", None),
    ("nan", "unixTimestamp", None),
])
def test_parse_time(text: str, fmt: str, epoch: float | None) -> None:
    assert parse_time(text, fmt) == epoch


async def test_routes_live_beside_the_json_api() -> None:
    """One app with both APIs: `POST /` stays the JSON API's, the `backup` paths are ours,
    and an unmodelled path under the service's prefixes reaches our 404 handler."""
    rest = RestJsonApi(type("Api", (), {"operations": {}})(), {}.get)
    json_api = JsonApi(type("Api", (), {"operations": {}})(), {}.get)
    app = web.Application()
    app.router.add_routes(json_api.routes())
    app.router.add_routes(rest.routes())

    async def handler(method: str, path: str) -> Any:
        match = await app.router.resolve(make_mocked_request(method, path, app=app))
        return match.handler

    assert (await handler("POST", "/")) == json_api.handle
    assert (await handler("PATCH", "/backup-vaults/v")) == rest.handle_unknown
    assert (await handler("GET", "/backup/plans/")) == rest.handle_unknown
    assert (await handler("GET", "/backup-vaults/v")) not in (rest.handle_unknown,
                                                              json_api.handle)
