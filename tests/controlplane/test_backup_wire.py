"""The AWS Backup API's restJson1 wire (controlplane/restjson.py) driven by the real boto3 and
the real AWS CLI against a real socket.

The server is RestJsonApi over a small recording `api` (one function per operation that
notes what it was called with and answers in the model's shape), so what is tested is the
wire alone: routing, label/query/body binding and types, SigV4 with the `backup` scope, the
replay cache, validation messages, and errors as botocore parses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import boto3
import pytest
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from controlplane.backupmodel import OPERATIONS
from controlplane.errors import ApiError
from controlplane.restjson import RestJsonApi
from controlplane.sigv4 import Caller
from controlplane.throttle import Throttle
from tests.controlplane.cpharness import AWS, REGION, aws_env

KEY = "AKIARESTJSONTEST0001"
SECRET = "restjson-test-secret-key-0123456789abcdef"
ACCOUNT = "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/backup-role"
VM_ARN = f"arn:aws:backup-gateway:us-west-2:{ACCOUNT}:vm/vm-0123456789abcdef0"
RP_ARN = f"arn:aws:backup:us-west-2:{ACCOUNT}:recovery-point:rp/0123-4567"
T0 = 1714564800.0  # 2024-05-01T12:00:00Z
T0_DT = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)

# Model-shaped answers, timestamps as the operations give them (float epoch seconds).
ANSWERS: dict[str, dict[str, Any]] = {
    "CreateBackupVault": {"BackupVaultName": "v", "CreationDate": T0},
    "DescribeBackupVault": {"BackupVaultName": "v", "CreationDate": T0 + 0.25,
                            "NumberOfRecoveryPoints": 3},
    "ListBackupVaults": {"BackupVaultList": [{"BackupVaultName": "v", "CreationDate": T0}]},
    "StartBackupJob": {"BackupJobId": "job-1", "RecoveryPointArn": RP_ARN,
                       "CreationDate": T0, "IsParent": False},
    "DescribeBackupJob": {"BackupJobId": "job-1", "State": "RUNNING", "CreationDate": T0,
                          "BackupSizeInBytes": 5 * 2**40},
    "ListBackupJobs": {"BackupJobs": [{"BackupJobId": "job-1", "CreationDate": T0}]},
    "ListRecoveryPointsByBackupVault": {"RecoveryPoints": [{"RecoveryPointArn": RP_ARN,
                                                            "CreationDate": T0}]},
    "ListRecoveryPointsByResource": {"RecoveryPoints": [{"RecoveryPointArn": RP_ARN}]},
    "DescribeRecoveryPoint": {"RecoveryPointArn": RP_ARN, "Status": "COMPLETED",
                              "CreationDate": T0_DT},  # a datetime is encoded too
    "GetRecoveryPointRestoreMetadata": {"RecoveryPointArn": RP_ARN,
                                        "RestoreMetadata": {"VmName": "web"}},
    "ListProtectedResources": {"Results": [{"ResourceArn": VM_ARN, "LastBackupTime": T0}]},
    "DescribeProtectedResource": {"ResourceArn": VM_ARN, "LastBackupTime": T0},
    "StartRestoreJob": {"RestoreJobId": "restore-1"},
    "DescribeRestoreJob": {"RestoreJobId": "restore-1", "Status": "PENDING",
                           "CreationDate": T0},
    "ListRestoreJobs": {"RestoreJobs": [{"RestoreJobId": "restore-1", "CreationDate": T0}]},
    "UpdateRecoveryPointLifecycle": {"RecoveryPointArn": RP_ARN,
                                     "Lifecycle": {"DeleteAfterDays": 30}},
}


@dataclass
class RecordingApi:
    """BackupApi's shape: `operations[op](caller, params)`, here noting each call; an op in
    `failures` raises instead; ListBackupJobs answers asynchronously (an awaitable)."""

    calls: list[tuple[str, Caller, dict[str, Any]]] = field(default_factory=list)
    failures: dict[str, Exception] = field(default_factory=dict)
    operations: dict[str, Callable[[Caller, dict[str, Any]], Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.operations = {op: self._op(op) for op in OPERATIONS}

    def _op(self, op: str) -> Callable[[Caller, dict[str, Any]], Any]:
        def call(caller: Caller, params: dict[str, Any]) -> Any:
            self.calls.append((op, caller, params))
            if op in self.failures:
                raise self.failures[op]
            answer = ANSWERS.get(op, {})
            if op == "ListBackupJobs":  # a second page, when asked for the first
                return _later({**answer, "NextToken": "n2"} if "NextToken" not in params
                              else answer)
            return answer
        return call

    def last(self, op: str) -> dict[str, Any]:
        assert self.calls, "no operation was called"
        name, caller, params = self.calls[-1]
        assert name == op and caller.access_key_id == KEY and caller.region == REGION
        return params


async def _later(answer: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(0)
    return answer


@dataclass
class Wire:
    api: RecordingApi
    url: str
    host: str
    port: int



def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


@contextlib.contextmanager
def serving(throttle: Throttle | None = None) -> Iterator[Wire]:
    """RestJsonApi over a RecordingApi on 127.0.0.1:<free port>, its loop in a thread."""
    api = RecordingApi()
    rest = RestJsonApi(api, {KEY: SECRET}.get, throttle=throttle)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=_run_loop, args=(loop,), daemon=True)
    thread.start()

    async def start() -> tuple[web.AppRunner, int]:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_routes(rest.routes())
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, runner.addresses[0][1]

    runner, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield Wire(api, f"http://127.0.0.1:{port}", "127.0.0.1", port)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def module_wire() -> Iterator[Wire]:
    with serving() as wire:
        yield wire


@pytest.fixture
def wire(module_wire: Wire) -> Wire:
    module_wire.api.calls.clear()
    module_wire.api.failures.clear()
    return module_wire


def boto(wire: Wire, secret: str = SECRET, validate: bool = True) -> Any:
    return boto3.client(
        "backup", endpoint_url=wire.url, region_name=REGION, aws_access_key_id=KEY,
        aws_secret_access_key=secret,
        config=Config(retries={"total_max_attempts": 1, "mode": "standard"},
                      parameter_validation=validate),
    )


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]


def send(wire: Wire, method: str, path: str, body: bytes = b"",
         headers: dict[str, str] | None = None, service: str = "backup",
         sign: bool = True) -> Answer:
    """A raw request (`path` already percent-encoded, query included), signed as botocore
    signs (for `service`'s scope) unless `sign` is False."""
    headers = dict(headers or {})
    if sign:
        req = AWSRequest(method=method, url=wire.url + path, data=body, headers=headers)
        SigV4Auth(Credentials(KEY, SECRET), service, REGION).add_auth(req)
        headers = dict(req.headers.items())
    return send_raw(wire, method, path, body, headers)


def send_raw(wire: Wire, method: str, path: str, body: bytes,
             headers: dict[str, str]) -> Answer:
    conn = http.client.HTTPConnection(wire.host, wire.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return Answer(resp.status, dict(resp.getheaders()), json.loads(data) if data else {})


def client_error(call: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    with pytest.raises(ClientError) as err:
        call(**kwargs)
    return err.value.response


# -- every operation, bound as the model says ----------------------------------------------

ODD_NAME = "my vault/ü?#%&+=;"  # DescribeBackupVault's label has no pattern in the model
ROUTED: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("CreateBackupVault",
     {"BackupVaultName": "vault_1-a", "BackupVaultTags": {"team": "ops"},
      "EncryptionKeyArn": "arn:aws:kms:us-west-2:123456789012:key/k", "CreatorRequestId": "c1"},
     {"BackupVaultName": "vault_1-a", "BackupVaultTags": {"team": "ops"},
      "EncryptionKeyArn": "arn:aws:kms:us-west-2:123456789012:key/k", "CreatorRequestId": "c1"}),
    ("DescribeBackupVault",
     {"BackupVaultName": ODD_NAME, "BackupVaultAccountId": ACCOUNT},
     {"BackupVaultName": ODD_NAME, "BackupVaultAccountId": ACCOUNT}),
    ("ListBackupVaults",
     {"ByVaultType": "BACKUP_VAULT", "ByShared": True, "MaxResults": 10, "NextToken": "a b/+="},
     {"ByVaultType": "BACKUP_VAULT", "ByShared": True, "MaxResults": 10, "NextToken": "a b/+="}),
    ("DeleteBackupVault", {"BackupVaultName": "gone %2F vault"},
     {"BackupVaultName": "gone %2F vault"}),
    ("StartBackupJob",
     {"BackupVaultName": "vault-1", "ResourceArn": VM_ARN, "IamRoleArn": ROLE,
      "IdempotencyToken": "t1", "StartWindowMinutes": 60, "CompleteWindowMinutes": 600,
      "Lifecycle": {"DeleteAfterDays": 100, "OptInToArchiveForSupportedResources": False},
      "RecoveryPointTags": {"k": "v"}, "BackupOptions": {"WindowsVSS": "enabled"},
      "Index": "DISABLED"},
     {"BackupVaultName": "vault-1", "ResourceArn": VM_ARN, "IamRoleArn": ROLE,
      "IdempotencyToken": "t1", "StartWindowMinutes": 60, "CompleteWindowMinutes": 600,
      "Lifecycle": {"DeleteAfterDays": 100, "OptInToArchiveForSupportedResources": False},
      "RecoveryPointTags": {"k": "v"}, "BackupOptions": {"WindowsVSS": "enabled"},
      "Index": "DISABLED"}),
    ("DescribeBackupJob", {"BackupJobId": "job-1"}, {"BackupJobId": "job-1"}),
    ("ListBackupJobs",
     {"ByState": "RUNNING", "ByCreatedAfter": T0_DT, "MaxResults": 10, "ByResourceArn": VM_ARN,
      "ByCreatedBefore": datetime(2024, 5, 2, 0, 0, 0, 500000, tzinfo=UTC),
      "ByBackupVaultName": "vault-1", "ByAccountId": ACCOUNT},
     {"ByState": "RUNNING", "ByCreatedAfter": T0, "MaxResults": 10, "ByResourceArn": VM_ARN,
      "ByCreatedBefore": T0 + 12 * 3600 + 0.5, "ByBackupVaultName": "vault-1",
      "ByAccountId": ACCOUNT}),
    ("StopBackupJob", {"BackupJobId": "job-2"}, {"BackupJobId": "job-2"}),
    ("ListRecoveryPointsByBackupVault",
     {"BackupVaultName": "vault-1", "ByResourceType": "VirtualMachine",
      "ByCreatedAfter": T0_DT, "MaxResults": 5},
     {"BackupVaultName": "vault-1", "ByResourceType": "VirtualMachine",
      "ByCreatedAfter": T0, "MaxResults": 5}),
    ("ListRecoveryPointsByResource",
     {"ResourceArn": VM_ARN, "ManagedByAWSBackupOnly": False, "MaxResults": 1000},
     {"ResourceArn": VM_ARN, "ManagedByAWSBackupOnly": False, "MaxResults": 1000}),
    ("DescribeRecoveryPoint", {"BackupVaultName": "vault-1", "RecoveryPointArn": RP_ARN},
     {"BackupVaultName": "vault-1", "RecoveryPointArn": RP_ARN}),
    ("DeleteRecoveryPoint", {"BackupVaultName": "vault-2", "RecoveryPointArn": RP_ARN},
     {"BackupVaultName": "vault-2", "RecoveryPointArn": RP_ARN}),
    ("GetRecoveryPointRestoreMetadata",
     {"BackupVaultName": "vault-1", "RecoveryPointArn": RP_ARN, "BackupVaultAccountId": ACCOUNT},
     {"BackupVaultName": "vault-1", "RecoveryPointArn": RP_ARN, "BackupVaultAccountId": ACCOUNT}),
    ("ListProtectedResources", {"MaxResults": 7}, {"MaxResults": 7}),
    ("DescribeProtectedResource", {"ResourceArn": VM_ARN}, {"ResourceArn": VM_ARN}),
    ("StartRestoreJob",
     {"RecoveryPointArn": RP_ARN, "Metadata": {"VmName": "restored", "x": "é"},
      "IamRoleArn": ROLE, "IdempotencyToken": "r1", "ResourceType": "VirtualMachine",
      "CopySourceTagsToRestoredResource": True},
     {"RecoveryPointArn": RP_ARN, "Metadata": {"VmName": "restored", "x": "é"},
      "IamRoleArn": ROLE, "IdempotencyToken": "r1", "ResourceType": "VirtualMachine",
      "CopySourceTagsToRestoredResource": True}),
    ("DescribeRestoreJob", {"RestoreJobId": "restore-1"}, {"RestoreJobId": "restore-1"}),
    ("ListRestoreJobs",
     {"ByStatus": "COMPLETED", "ByCompleteAfter": T0_DT, "ByAccountId": ACCOUNT},
     {"ByStatus": "COMPLETED", "ByCompleteAfter": T0, "ByAccountId": ACCOUNT}),
    ("UpdateRecoveryPointLifecycle",
     {"BackupVaultName": "vault-1", "RecoveryPointArn": RP_ARN,
      "Lifecycle": {"MoveToColdStorageAfterDays": 10, "DeleteAfterDays": 100}},
     {"BackupVaultName": "vault-1", "RecoveryPointArn": RP_ARN,
      "Lifecycle": {"MoveToColdStorageAfterDays": 10, "DeleteAfterDays": 100}}),
]


def test_every_modelled_operation_is_routed_here() -> None:
    assert sorted(op for op, _, _ in ROUTED) == sorted(OPERATIONS)


def _snake(op: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in op).lstrip("_")


@pytest.mark.parametrize(("op", "kwargs", "expected"), ROUTED, ids=[r[0] for r in ROUTED])
def test_operation_gets_its_bound_params(wire: Wire, op: str, kwargs: dict[str, Any],
                                         expected: dict[str, Any]) -> None:
    out = getattr(boto(wire), _snake(op))(**kwargs)
    assert wire.api.last(op) == expected
    assert out["ResponseMetadata"]["HTTPStatusCode"] == OPERATIONS[op]["status"]
    out.pop("ResponseMetadata")
    out.pop("NextToken", None)
    assert _epochs(out) == _epochs(ANSWERS.get(op, {}))  # timestamps as the same instants


def _epochs(value: Any) -> Any:
    """`value` with every datetime as float epoch seconds, to compare answers."""
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, dict):
        return {k: _epochs(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_epochs(v) for v in value]
    return value


def test_timestamps_round_trip_as_the_model_says(wire: Wire) -> None:
    """Query timestamps arrive as float epoch seconds; answers' floats and datetimes
    come back to boto3 as the same instants."""
    c = boto(wire)
    jobs = c.list_backup_jobs(ByCreatedAfter=T0_DT)
    assert wire.api.last("ListBackupJobs") == {"ByCreatedAfter": T0}
    assert jobs["BackupJobs"][0]["CreationDate"] == T0_DT
    vault = c.describe_backup_vault(BackupVaultName="v")
    assert vault["CreationDate"].timestamp() == T0 + 0.25
    point = c.describe_recovery_point(BackupVaultName="vault-1", RecoveryPointArn=RP_ARN)
    assert point["CreationDate"] == T0_DT


def test_answers_are_json_with_a_request_id(wire: Wire) -> None:
    got = send(wire, "GET", "/backup-vaults/")
    assert got.status == 200 and got.headers["Content-Type"] == "application/json"
    assert got.body == ANSWERS["ListBackupVaults"] and got.headers["x-amzn-RequestId"]
    gone = send(wire, "DELETE", "/backup-vaults/vault-9")
    assert gone.status == 200 and gone.body == {}


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "status"), [
    ("ResourceNotFoundException", 400),
    ("AlreadyExistsException", 400),
    ("InvalidRequestException", 400),
    ("ServiceUnavailableException", 500),
    ("ThrottlingException", 429),
])
def test_operation_errors_reach_boto3_with_code_and_status(wire: Wire, code: str,
                                                           status: int) -> None:
    wire.api.failures["DescribeBackupVault"] = ApiError(code, f"vault v: {code} here")
    resp = client_error(boto(wire).describe_backup_vault, BackupVaultName="v")
    assert resp["Error"]["Code"] == code
    assert resp["Error"]["Message"] == f"vault v: {code} here"
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == status
    assert resp["ResponseMetadata"]["RequestId"]


def test_modelled_error_members_are_parsed(wire: Wire) -> None:
    wire.api.failures["CreateBackupVault"] = ApiError("AlreadyExistsException", "exists",
                                                      "VaultExists")
    resp = client_error(boto(wire).create_backup_vault, BackupVaultName="vault-x")
    assert resp["Error"]["Code"] == "AlreadyExistsException"
    assert resp["Code"] == "VaultExists" and resp["Message"] == "exists"


def test_internal_error_is_a_500_logged_once(wire: Wire,
                                             caplog: pytest.LogCaptureFixture) -> None:
    wire.api.failures["DescribeBackupJob"] = KeyError("secret detail")
    with caplog.at_level(logging.INFO, logger="controlplane.api"):
        resp = client_error(boto(wire).describe_backup_job, BackupJobId="job-1")
    assert resp["Error"]["Code"] == "InternalServerException"
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert "secret detail" not in resp["Error"]["Message"]
    request_id = resp["ResponseMetadata"]["RequestId"]
    assert request_id in resp["Error"]["Message"]
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1 and request_id in logged[0].getMessage()


def test_one_log_line_per_call(wire: Wire, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="controlplane.api"):
        boto(wire).list_protected_resources()
        client_error(boto(wire).list_backup_jobs, MaxResults=5000)
    lines = [r.getMessage() for r in caplog.records if r.name == "controlplane.api"]
    assert len(lines) == 2
    assert lines[0].startswith("event=api service=backup op=ListProtectedResources status=200 ")
    assert lines[1].startswith("event=api service=backup op=ListBackupJobs status=400 "
                               "error=InvalidParameterValueException ")
    assert all("request_id=" in line for line in lines)


# -- validation ----------------------------------------------------------------------------


def test_out_of_range_and_enum_values_name_the_member(wire: Wire) -> None:
    c = boto(wire)
    resp = client_error(c.list_backup_jobs, MaxResults=5000, ByState="NOPE")
    assert resp["Error"]["Code"] == "InvalidParameterValueException"
    text = resp["Error"]["Message"]
    assert text.startswith("2 validation errors detected")
    assert "'MaxResults'" in text and "less than or equal to 1000" in text
    assert "'ByState'" in text and "[CREATED, PENDING, RUNNING," in text
    resp = client_error(c.start_backup_job, BackupVaultName="bad name!", ResourceArn=VM_ARN,
                        IamRoleArn="role-without-arn")
    text = resp["Error"]["Message"]
    assert "'BackupVaultName'" in text and "'IamRoleArn'" in text and "arn:" in text
    assert not wire.api.calls


def test_missing_and_wrongly_typed_members(wire: Wire) -> None:
    c = boto(wire, validate=False)  # let through what botocore would refuse itself
    resp = client_error(c.start_backup_job, BackupVaultName="vault-1", ResourceArn=VM_ARN)
    assert resp["Error"]["Code"] == "MissingParameterValueException"
    assert "'IamRoleArn'" in resp["Error"]["Message"]
    resp = client_error(c.start_restore_job, RecoveryPointArn=RP_ARN, Metadata={"a": "b"},
                        CopySourceTagsToRestoredResource="yes")
    assert resp["Error"]["Code"] == "InvalidRequestException"
    assert "'CopySourceTagsToRestoredResource' must be a boolean" in resp["Error"]["Message"]
    resp = client_error(c.update_recovery_point_lifecycle, BackupVaultName="vault-1",
                        RecoveryPointArn=RP_ARN, Lifecycle={"DeleteAfterDays": "ninety"})
    assert "'Lifecycle.DeleteAfterDays' must be an integer" in resp["Error"]["Message"]
    assert not wire.api.calls


def test_sensitive_values_are_not_echoed(wire: Wire) -> None:
    body = json.dumps({"RecoveryPointArn": RP_ARN, "Metadata": {"k": 12345}}).encode()
    got = send(wire, "PUT", "/restore-jobs", body, {"Content-Type": "application/json"})
    assert got.status == 400 and got.headers["x-amzn-ErrorType"] == "InvalidRequestException"
    assert "Metadata" in got.body["Message"] and "12345" not in got.body["Message"]


@pytest.mark.parametrize(("query", "member", "says"), [
    ("maxResults=ten", "MaxResults", "must be an integer"),
    ("createdAfter=yesterday", "ByCreatedAfter", "ISO 8601"),
    ("state=RUNNING&state=FAILED", "ByState", "given 2 times"),
])
def test_query_values_must_convert(wire: Wire, query: str, member: str, says: str) -> None:
    got = send(wire, "GET", f"/backup-jobs/?{query}")
    assert got.status == 400 and got.headers["x-amzn-ErrorType"] == "InvalidRequestException"
    assert f"'{member}'" in got.body["Message"] and says in got.body["Message"]
    assert got.body["Code"] == "InvalidRequestException"


def test_unknown_and_null_body_members(wire: Wire) -> None:
    body = json.dumps({"RecoveryPointArn": RP_ARN, "Metadata": {}, "Surprise": 1,
                       "IamRoleArn": None}).encode()
    got = send(wire, "PUT", "/restore-jobs", body, {"Content-Type": "application/json"})
    assert got.status == 400 and got.body["Code"] == "InvalidRequestException"
    assert "'Surprise'" in got.body["Message"] and "RecoveryPointArn, Metadata" in \
        got.body["Message"]
    body = json.dumps({"BackupJobId": "job-3"}).encode()  # a label is not a body member
    got = send(wire, "POST", "/backup-jobs/job-3", body, {"Content-Type": "application/json"})
    assert got.status == 400 and "has no body" in got.body["Message"]
    assert not wire.api.calls


def test_many_problems_make_one_short_message(wire: Wire) -> None:
    tags = {f"k{i}": i for i in range(5000)}
    body = json.dumps({"BackupVaultTags": tags}).encode()
    got = send(wire, "PUT", "/backup-vaults/many", body, {"Content-Type": "application/json"})
    assert got.status == 400 and got.body["Message"].startswith("5000 validation errors")
    assert got.body["Message"].endswith("; and 4990 more") and len(got.body["Message"]) < 2000


@pytest.mark.parametrize(("body", "says"), [
    (b"{not json", "not valid JSON"),
    (b"[" * 100 + b"]" * 100, "nested deeper"),
    (b'["a list"]', "JSON object"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_bad_bodies_are_clear_400s(wire: Wire, body: bytes, says: str) -> None:
    got = send(wire, "PUT", "/backup-jobs", body, {"Content-Type": "application/json"})
    assert got.status == 400 and got.headers["x-amzn-ErrorType"] == "SerializationException"
    assert says in got.body["Message"]


def test_too_large_body_and_wrong_content_type(wire: Wire) -> None:
    big = b'{"BackupVaultName": "' + b"x" * (1 << 20) + b'"}'
    got = send(wire, "PUT", "/backup-jobs", big, {"Content-Type": "application/json"})
    assert got.status == 400 and "1 MiB" in got.body["Message"]
    got = send(wire, "PUT", "/backup-jobs", b"{}", {"Content-Type": "text/plain"})
    assert got.status == 415 and "application/json" in got.body["Message"]


# -- routing -------------------------------------------------------------------------------


def test_unmodelled_operations_and_paths_are_restjson_404s(wire: Wire) -> None:
    resp = client_error(boto(wire).list_backup_plans)  # a real `backup` op not served here
    assert resp["Error"]["Code"] == "UnknownOperationException"
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert "ListBackupVaults" in resp["Error"]["Message"]
    got = send(wire, "PATCH", "/backup-vaults/v")
    assert got.status == 404 and got.headers["x-amzn-ErrorType"] == "UnknownOperationException"
    assert "DELETE, GET, PUT" in got.body["Message"]
    unsigned = send(wire, "GET", "/backup-vaults/v/nothing-here", sign=False)
    assert unsigned.status == 403  # who may not call learns nothing of the paths


def test_percent_encoded_labels_keep_slashes_and_colons(wire: Wire) -> None:
    path = f"/resources/{quote(VM_ARN, safe='')}/recovery-points/"
    assert "%2F" in path and "%3A" in path
    got = send(wire, "GET", path)
    assert got.status == 200 and wire.api.last("ListRecoveryPointsByResource") == {
        "ResourceArn": VM_ARN}


# -- authentication, replays, throttling ---------------------------------------------------


def test_bad_signatures_and_scopes_are_refused_403(wire: Wire) -> None:
    resp = client_error(boto(wire, secret="wrong" + SECRET).list_backup_vaults)
    assert resp["Error"]["Code"] == "InvalidSignatureException"
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 403
    other = send(wire, "GET", "/backup-vaults/", service="backup-gateway")
    assert other.status == 403 and other.headers["x-amzn-ErrorType"] == \
        "InvalidSignatureException"
    assert "'backup'" in other.body["Message"]
    unsigned = send(wire, "GET", "/backup-vaults/", sign=False)
    assert unsigned.status == 403
    assert unsigned.body["Code"] == "MissingAuthenticationTokenException"
    assert not wire.api.calls


def test_content_type_must_be_signed(wire: Wire) -> None:
    body = json.dumps({"RecoveryPointArn": RP_ARN, "Metadata": {}}).encode()
    req = AWSRequest(method="PUT", url=wire.url + "/restore-jobs", data=body)
    SigV4Auth(Credentials(KEY, SECRET), "backup", REGION).add_auth(req)
    headers = {**dict(req.headers.items()), "Content-Type": "application/json"}
    got = send_raw(wire, "PUT", "/restore-jobs", body, headers)
    assert got.status == 403 and "'content-type'" in got.body["Message"]


def test_a_replayed_change_is_refused_and_a_replayed_read_is_not(wire: Wire) -> None:
    body = json.dumps({"BackupVaultTags": {"a": "b"}}).encode()
    req = AWSRequest(method="PUT", url=wire.url + "/backup-vaults/replayed", data=body,
                     headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials(KEY, SECRET), "backup", REGION).add_auth(req)
    headers = dict(req.headers.items())
    assert send_raw(wire, "PUT", "/backup-vaults/replayed", body, headers).status == 200
    again = send_raw(wire, "PUT", "/backup-vaults/replayed", body, headers)
    assert again.status == 403 and "replay" in again.body["Message"]
    read = AWSRequest(method="GET", url=wire.url + "/backup-vaults/replayed")
    SigV4Auth(Credentials(KEY, SECRET), "backup", REGION).add_auth(read)
    read_headers = dict(read.headers.items())
    for _ in range(2):
        assert send_raw(wire, "GET", "/backup-vaults/replayed", b"", read_headers).status == 200
    assert [op for op, _, _ in wire.api.calls] == ["CreateBackupVault", "DescribeBackupVault",
                                                   "DescribeBackupVault"]


def test_throttled_per_access_key() -> None:
    with serving(Throttle(rate=0.001, burst=1)) as wire:
        assert send(wire, "GET", "/resources/").status == 200
        got = send(wire, "GET", "/resources/")
        assert got.status == 429 and got.headers["x-amzn-ErrorType"] == "ThrottlingException"


# -- the real AWS CLI ------------------------------------------------------------------------


@pytest.mark.slow
def test_the_aws_cli(wire: Wire, tmp_path: Path) -> None:
    env = aws_env(KEY, SECRET, tmp_path)

    def aws(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([AWS, "backup", *args, "--endpoint-url", wire.url, "--region",
                               REGION, "--output", "json"], env=env, capture_output=True,
                              text=True, timeout=60)

    listed = aws("list-backup-vaults")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["BackupVaultList"][0]["BackupVaultName"] == "v"
    jobs = aws("list-backup-jobs", "--by-state", "RUNNING", "--by-created-after",
               "2024-05-01T12:00:00Z")
    assert jobs.returncode == 0, jobs.stderr
    assert len(json.loads(jobs.stdout)["BackupJobs"]) == 2  # the CLI followed NextToken
    assert wire.api.last("ListBackupJobs") == {"ByState": "RUNNING", "ByCreatedAfter": T0,
                                               "NextToken": "n2"}
    wire.api.failures["DescribeBackupVault"] = ApiError("ResourceNotFoundException",
                                                        "no vault named 'nope'")
    missing = aws("describe-backup-vault", "--backup-vault-name", "nope")
    assert missing.returncode != 0
    assert "(ResourceNotFoundException)" in missing.stderr and "no vault named" in \
        missing.stderr
