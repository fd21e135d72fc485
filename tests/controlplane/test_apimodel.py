"""Our constraint table (controlplane/apimodel.py) must equal botocore's backup-gateway model.

The server carries its own copy so it needs no SDK at run time; this test catches drift when
botocore (the model the AWS CLI uses) changes a limit, a pattern or a member.
"""

from __future__ import annotations

from typing import Any

import botocore.session
import pytest

from controlplane import apimodel
from controlplane.errors import ApiError
from controlplane.validation import compile_pattern, validate_input

CHECKED_KEYS = ("type", "min", "max", "pattern", "enum", "sensitive")


@pytest.fixture(scope="module")
def model() -> dict[str, Any]:
    loader = botocore.session.get_session().get_component("data_loader")
    return loader.load_service_model("backup-gateway", "service-2", apimodel.API_VERSION)


def test_metadata(model: dict[str, Any]) -> None:
    assert model["metadata"]["targetPrefix"] == apimodel.TARGET_PREFIX
    assert model["metadata"]["signingName"] == apimodel.SIGNING_NAME
    assert model["metadata"]["jsonVersion"] == "1.0"


@pytest.mark.parametrize("name", sorted(apimodel.SHAPES))
def test_shape_matches_model(model: dict[str, Any], name: str) -> None:
    ours = apimodel.SHAPES[name]
    theirs = model["shapes"][name]
    for key in CHECKED_KEYS:
        assert ours.get(key) == theirs.get(key), f"{name}.{key}"
    assert sorted(ours.get("required", [])) == sorted(theirs.get("required", [])), name
    if theirs["type"] == "structure":
        assert ours["members"] == {m: v["shape"] for m, v in theirs["members"].items()}, name
    if theirs["type"] == "list":
        assert ours["member"] == theirs["member"]["shape"], name


@pytest.mark.parametrize("op", sorted(apimodel.OPERATIONS))
def test_operation_matches_model(model: dict[str, Any], op: str) -> None:
    input_shape, errors = apimodel.OPERATIONS[op]
    theirs = model["operations"][op]
    assert theirs["input"]["shape"] == input_shape
    assert sorted(errors) == sorted(e["shape"] for e in theirs.get("errors", []))


def test_every_operation_of_the_model_is_served(model: dict[str, Any]) -> None:
    """All 25 operations, the hypervisor and VM ones included: none is left out."""
    assert sorted(apimodel.OPERATIONS) == sorted(model["operations"])


def test_hypervisor_patterns_compile_and_match() -> None:
    """The new shapes' patterns (anchored alternations, bracketed ranges) as Python reads
    them: the values the model's own examples use pass, the near misses do not."""
    username = compile_pattern(apimodel.SHAPES["Username"]["pattern"])
    assert username.fullmatch("administrator@vsphere.local")
    assert not username.fullmatch("   ") and not username.fullmatch("dom\\user")
    kms = compile_pattern(apimodel.SHAPES["KmsKeyArn"]["pattern"])
    assert kms.fullmatch("arn:aws:kms:us-west-2:123456789012:key/1234abcd-12ab-34cd-56ef-12345")
    assert not kms.fullmatch("arn:aws:s3:::bucket-name-that-is-long-enough-to-pass-min")
    log_group = compile_pattern(apimodel.SHAPES["LogGroupArn"]["pattern"])
    assert log_group.fullmatch("")
    assert log_group.fullmatch("arn:aws:logs:us-west-2:123456789012:log-group:/bgw/x:*")
    role = compile_pattern(apimodel.SHAPES["IamRoleArn"]["pattern"])
    assert role.fullmatch("arn:aws:iam::123456789012:role/tagger")
    password = compile_pattern(apimodel.SHAPES["Password"]["pattern"])
    assert password.fullmatch("s3cret! ~") and not password.fullmatch("tab\there")


def test_every_referenced_shape_is_in_the_table() -> None:
    for name, shape in apimodel.SHAPES.items():
        for ref in [*shape.get("members", {}).values(), shape.get("member")]:
            assert ref is None or ref in apimodel.SHAPES, f"{name} -> {ref}"


def test_error_status_codes(model: dict[str, Any]) -> None:
    for name, status in apimodel.ERROR_STATUS.items():
        assert model["shapes"][name]["error"]["httpStatusCode"] == status, name


def test_unicode_pattern_translation() -> None:
    tag_key = compile_pattern(apimodel.SHAPES["TagKey"]["pattern"])
    assert tag_key.fullmatch("Ünïcode name 42_.:/=+-@")
    assert not tag_key.fullmatch("semi;colon")


def test_validation_lists_every_problem() -> None:
    with pytest.raises(ApiError) as err:
        validate_input({"GatewayDisplayName": "x" * 101, "GatewayType": "OTHER"},
                       "CreateGatewayInput")
    assert err.value.code == "ValidationException" and err.value.status == 400
    text = err.value.message
    assert text.startswith("3 validation errors detected")
    assert "'ActivationKey'" in text and "'GatewayDisplayName'" in text and "BACKUP_VM" in text
