"""The hypervisor and VM operations of the `backup-gateway` API, driven by boto3 (its
paginators included) and the real AWS CLI against an in-process control plane.

What the gateway does (tests, inventories) is driven through the signed link in
test_hypervisor_link.py; here are the operations on their own: every one valid and invalid,
errors of the model's types naming the member, pagination, association rules.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.session
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.controlplane.cpharness import REGION, Server

pytestmark = pytest.mark.slow

PASSWORD = "Pa55-w0rd!~secret"
KMS = "arn:aws:kms:us-west-2:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
ROLE = "arn:aws:iam::123456789012:role/backup-tagger"


def client(server: Server, validate: bool = True, region: str = REGION) -> Any:
    """boto3's client; `validate=False` lets through what botocore would refuse itself,
    so the server's own checks are what is tested."""
    return boto3.session.Session().client(
        "backup-gateway", endpoint_url=server.url, region_name=region,
        aws_access_key_id=server.plane.access_key_id,
        aws_secret_access_key=server.plane.secret_access_key,
        config=Config(retries={"max_attempts": 1}, parameter_validation=validate),
    )


@pytest.fixture
def bgw(server: Server) -> Any:
    return client(server)


@pytest.fixture
def raw(server: Server) -> Any:
    return client(server, validate=False)


def activate(server: Server, name: str = "gw") -> str:
    key = server.link().key()
    return str(client(server).create_gateway(
        ActivationKey=key, GatewayDisplayName=name, GatewayType="BACKUP_VM")["GatewayArn"])


def next_second() -> None:
    """Wait into the next second: SigV4 dates have one-second resolution, and the replay
    cache refuses the same signed change twice (docs/controlplane.md)."""
    time.sleep(1.0 - time.time() % 1.0 + 0.01)


def fails(call: Any, code: str, *words: str, **kwargs: Any) -> str:
    """Call; it must fail with `code`, its message holding each of `words`."""
    with pytest.raises(ClientError) as err:
        call(**kwargs)
    assert err.value.response["Error"]["Code"] == code, err.value.response
    message = err.value.response["Error"]["Message"]
    for word in words:
        assert word in message, message
    return message


_MODEL = botocore.session.get_session().get_service_model("backup-gateway")


def check_output(op: str, answer: dict[str, Any]) -> None:
    """Every member we answered exists in the model's output shape (boto3 would drop an
    unknown one silently, so a misspelt member would go unnoticed)."""
    def walk(value: Any, shape: Any, where: str) -> None:
        if shape.type_name == "structure":
            assert isinstance(value, dict), where
            for key, item in value.items():
                assert key in shape.members, f"{where}.{key} is not in the model"
                walk(item, shape.members[key], f"{where}.{key}")
        elif shape.type_name == "list":
            for i, item in enumerate(value):
                walk(item, shape.member, f"{where}[{i}]")

    body = {k: v for k, v in answer.items() if k != "ResponseMetadata"}
    walk(body, _MODEL.operation_model(op).output_shape, op)


def test_import_get_update_delete(server: Server, bgw: Any) -> None:
    arn = bgw.import_hypervisor_configuration(
        Name="vcenter-a", Host="vcenter.example.com", Username="administrator@vsphere.local",
        Password=PASSWORD, KmsKeyArn=KMS, Tags=[{"Key": "site", "Value": "lyon"}],
    )["HypervisorArn"]
    assert arn.startswith(f"arn:aws:backup-gateway:{REGION}:") and ":hypervisor/hype-" in arn

    got = bgw.get_hypervisor(HypervisorArn=arn)
    check_output("GetHypervisor", got)
    assert got["Hypervisor"] == {
        "Host": "vcenter.example.com", "HypervisorArn": arn, "KmsKeyArn": KMS,
        "Name": "vcenter-a", "State": "PENDING",
    }
    assert bgw.list_tags_for_resource(ResourceArn=arn)["Tags"] == [
        {"Key": "site", "Value": "lyon"}]

    log_group = f"arn:aws:logs:{REGION}:123456789012:log-group:/backup/gw:*"
    bgw.update_hypervisor(HypervisorArn=arn, Name="vcenter-b", Host="10.0.0.9:443",
                          LogGroupArn=log_group, Password="another-one")
    got = bgw.get_hypervisor(HypervisorArn=arn)["Hypervisor"]
    assert (got["Name"], got["Host"], got["LogGroupArn"]) == ("vcenter-b", "10.0.0.9:443",
                                                              log_group)
    bgw.update_hypervisor(HypervisorArn=arn, LogGroupArn="")  # "" clears it
    assert "LogGroupArn" not in bgw.get_hypervisor(HypervisorArn=arn)["Hypervisor"]

    assert bgw.delete_hypervisor(HypervisorArn=arn)["HypervisorArn"] == arn
    fails(bgw.get_hypervisor, "ResourceNotFoundException", arn, HypervisorArn=arn)
    fails(bgw.update_hypervisor, "ResourceNotFoundException", arn, HypervisorArn=arn, Name="x")
    fails(bgw.list_tags_for_resource, "ResourceNotFoundException", ResourceArn=arn)


def test_invalid_inputs_name_the_member(server: Server, raw: Any) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"Name": "ok", "Host": "ab"}, "'Host'"),
        ({"Name": "under_score", "Host": "esx1.lab"}, "'Name'"),
        ({"Name": "ok", "Host": "h" * 129}, "'Host'"),
        ({"Name": "ok", "Host": "esx1.lab", "Password": "pässword"}, "'Password'"),
        ({"Name": "ok", "Host": "esx1.lab", "Username": "   "}, "'Username'"),
        ({"Name": "ok", "Host": "esx1.lab", "KmsKeyArn": "arn:aws:s3:::" + "b" * 40},
         "'KmsKeyArn'"),
        ({"Host": "esx1.lab"}, "'Name'"),
        ({"Name": "ok", "Host": "esx1.lab", "Tags": [{"Key": "aws:x", "Value": "v"}]},
         "Tags[0].Key"),
    ]
    for params, member in cases:
        fails(raw.import_hypervisor_configuration, "ValidationException", member, **params)
    bad_arn = "arn:aws:backup-gateway:us-west-2:123456789012:hypervisor/not_valid!"
    fails(raw.get_hypervisor, "ValidationException", "'HypervisorArn'", HypervisorArn=bad_arn)
    fails(raw.get_virtual_machine, "ValidationException", "'ResourceArn'", ResourceArn="x")
    fails(raw.list_hypervisors, "ValidationException", "'MaxResults'", MaxResults=0)


def test_host_forms(server: Server, bgw: Any, raw: Any) -> None:
    """Host names, addresses with ports, and libvirt URIs are accepted; what no gateway
    could use is refused, naming Host."""
    accepted = ["vcenter.example.com", "10.0.0.5", "10.0.0.6:443", "[fd00::1]:443", "fd00::2",
                "esx-3", "qemu+ssh://root@kvm1.example.com/system", "qemu:///system",
                "qemu+tls://10.0.0.7:16514/system"]
    for i, host in enumerate(accepted):
        bgw.import_hypervisor_configuration(Name=f"h{i}", Host=host)
    # refused too: what the gateway would refuse to connect to (gatewaycore.rules, one rule
    # for both): libvirt URI parameters (they name local programs and files), other drivers
    refused = ["999.1.1.1", "a b.example", "10.0.0.8:0", "10.0.0.8:70000", "host:",
               "http://[zz]/", "-bad-.example", "[fd00::1", "Qemu://kvm/system",
               "qemu+tls://10.0.0.7:16514/system?no_verify=1", "esx://root@esx9.lab/"]
    for host in refused:
        fails(raw.import_hypervisor_configuration, "ValidationException", "Host:",
              Name="x", Host=host)
    message = fails(raw.import_hypervisor_configuration, "ValidationException", "Password",
                    Name="x", Host="esx://root:hunter22@esx.lab/")
    assert "hunter22" not in message


def test_one_record_per_host(server: Server, bgw: Any) -> None:
    first = bgw.import_hypervisor_configuration(Name="a", Host="esx1.lab")["HypervisorArn"]
    fails(bgw.import_hypervisor_configuration, "ConflictException", first, Name="b",
          Host="ESX1.lab")
    second = bgw.import_hypervisor_configuration(Name="b", Host="esx2.lab")["HypervisorArn"]
    fails(bgw.update_hypervisor, "ConflictException", first, HypervisorArn=second,
          Host="esx1.lab")
    # Regional: the same host may be imported in another region.
    client(server, region="eu-west-1").import_hypervisor_configuration(Name="c", Host="esx1.lab")


def test_list_hypervisors_paginates(server: Server, bgw: Any, raw: Any) -> None:
    arns = [bgw.import_hypervisor_configuration(Name=f"hv{i}", Host=f"esx{i}.lab")
            ["HypervisorArn"] for i in range(7)]
    client(server, region="eu-west-1").import_hypervisor_configuration(Name="x", Host="e.lab")
    pages = list(bgw.get_paginator("list_hypervisors").paginate(
        PaginationConfig={"PageSize": 3}))
    assert [len(p["Hypervisors"]) for p in pages] == [3, 3, 1]
    assert [h["HypervisorArn"] for p in pages for h in p["Hypervisors"]] == arns
    check_output("ListHypervisors", pages[0])
    assert pages[0]["Hypervisors"][0] == {"Host": "esx0.lab", "HypervisorArn": arns[0],
                                          "Name": "hv0", "State": "PENDING"}
    # The CLI follows NextToken by itself.
    listed = server.ok("list-hypervisors", "--page-size", "2")["Hypervisors"]
    assert [h["HypervisorArn"] for h in listed] == arns
    # A token of another list, or none of ours, is refused naming NextToken.
    for _ in range(2):
        activate(server)
    gw_token = bgw.list_gateways(MaxResults=1)["NextToken"]
    fails(raw.list_hypervisors, "ValidationException", "NextToken", "ListHypervisors",
          NextToken=gw_token)
    fails(raw.list_virtual_machines, "ValidationException", "NextToken",
          NextToken=pages[0]["NextToken"])
    fails(raw.list_hypervisors, "ValidationException", "NextToken", NextToken="garbage")


def test_association_rules(server: Server, bgw: Any) -> None:
    one, two = activate(server, "one"), activate(server, "two")
    hv = bgw.import_hypervisor_configuration(Name="a", Host="esx1.lab")["HypervisorArn"]
    other = bgw.import_hypervisor_configuration(Name="b", Host="esx2.lab")["HypervisorArn"]
    hv_id = hv.rsplit("/", 1)[1]
    assert "HypervisorId" not in bgw.get_gateway(GatewayArn=one)["Gateway"]

    # Many gateways per hypervisor.
    for gw in (one, two):
        assert bgw.associate_gateway_to_server(GatewayArn=gw, ServerArn=hv)["GatewayArn"] == gw
        got = bgw.get_gateway(GatewayArn=gw)
        check_output("GetGateway", got)
        assert got["Gateway"]["HypervisorId"] == hv_id
    next_second()
    bgw.associate_gateway_to_server(GatewayArn=one, ServerArn=hv)  # again: a new sync
    # One hypervisor per gateway.
    fails(bgw.associate_gateway_to_server, "ConflictException", one, hv,
          "DisassociateGatewayFromServer", GatewayArn=one, ServerArn=other)
    # Unknown resources: the model lists no ResourceNotFoundException for this operation.
    gone = hv[:-8] + "00000000"
    fails(bgw.associate_gateway_to_server, "ValidationException", gone, GatewayArn=one,
          ServerArn=gone)
    fails(bgw.associate_gateway_to_server, "ValidationException", "ServerArn",
          GatewayArn=one, ServerArn=one)
    fails(bgw.associate_gateway_to_server, "ValidationException", "Gateway",
          GatewayArn=one[:-8] + "00000000", ServerArn=hv)
    # No deletion while in use; it names the gateways.
    fails(bgw.delete_hypervisor, "ConflictException", one, two, HypervisorArn=hv)
    for gw in (one, two):
        bgw.disassociate_gateway_from_server(GatewayArn=gw)
        assert "HypervisorId" not in bgw.get_gateway(GatewayArn=gw)["Gateway"]
    next_second()
    fails(bgw.disassociate_gateway_from_server, "ConflictException", "not associated",
          GatewayArn=one)
    fails(bgw.disassociate_gateway_from_server, "ResourceNotFoundException",
          GatewayArn=one[:-8] + "00000000")
    fails(bgw.start_virtual_machines_metadata_sync, "ValidationException",
          "AssociateGatewayToServer", HypervisorArn=hv)
    bgw.delete_hypervisor(HypervisorArn=hv)
    # A deleted gateway lets go of its hypervisor.
    bgw.associate_gateway_to_server(GatewayArn=two, ServerArn=other)
    bgw.delete_gateway(GatewayArn=two)
    bgw.delete_hypervisor(HypervisorArn=other)


def test_property_mappings(server: Server, bgw: Any, raw: Any) -> None:
    hv = bgw.import_hypervisor_configuration(Name="a", Host="esx1.lab")["HypervisorArn"]
    got = bgw.get_hypervisor_property_mappings(HypervisorArn=hv)
    assert got["VmwareToAwsTagMappings"] == [] and "IamRoleArn" not in got
    mappings = [{"VmwareCategory": "Tier", "VmwareTagName": "Gold", "AwsTagKey": "tier",
                 "AwsTagValue": "gold"}]
    bgw.put_hypervisor_property_mappings(HypervisorArn=hv, VmwareToAwsTagMappings=mappings,
                                         IamRoleArn=ROLE)
    got = bgw.get_hypervisor_property_mappings(HypervisorArn=hv)
    check_output("GetHypervisorPropertyMappings", got)
    assert (got["VmwareToAwsTagMappings"], got["IamRoleArn"]) == (mappings, ROLE)
    fails(raw.put_hypervisor_property_mappings, "ValidationException", "'IamRoleArn'",
          HypervisorArn=hv, VmwareToAwsTagMappings=mappings, IamRoleArn="arn:aws:iam::1:user/x")
    fails(raw.put_hypervisor_property_mappings, "ValidationException", "AwsTagKey",
          HypervisorArn=hv, IamRoleArn=ROLE,
          VmwareToAwsTagMappings=[{**mappings[0], "AwsTagKey": "aws:tier"}])
    fails(raw.put_hypervisor_property_mappings, "ValidationException", "VmwareCategory",
          HypervisorArn=hv, IamRoleArn=ROLE,
          VmwareToAwsTagMappings=[{**mappings[0], "VmwareCategory": "c" * 81}])
    fails(raw.put_hypervisor_property_mappings, "ValidationException", "second time",
          HypervisorArn=hv, IamRoleArn=ROLE, VmwareToAwsTagMappings=mappings * 2)
    fails(bgw.get_hypervisor_property_mappings, "ResourceNotFoundException",
          HypervisorArn=hv[:-8] + "00000000")


def test_virtual_machine_lookups(server: Server, bgw: Any, raw: Any) -> None:
    assert bgw.list_virtual_machines()["VirtualMachines"] == []
    missing = f"arn:aws:backup-gateway:{REGION}:{server.plane.api.account}:vm/vm-0123456789abcdef0"
    fails(bgw.get_virtual_machine, "ResourceNotFoundException", missing, ResourceArn=missing)
    fails(bgw.tag_resource, "ResourceNotFoundException", ResourceARN=missing,
          Tags=[{"Key": "a", "Value": "b"}])
    hv_gone = f"arn:aws:backup-gateway:{REGION}:{server.plane.api.account}:hypervisor/hype-00"
    fails(bgw.list_virtual_machines, "ValidationException", "Hypervisor", HypervisorArn=hv_gone)


def test_cli_round_trip(server: Server) -> None:
    """The real AWS CLI: import (password given, never shown), get, list, delete."""
    out = server.ok("import-hypervisor-configuration", "--name", "cli", "--host",
                    "qemu+ssh://root@kvm.lab/system", "--username", "root",
                    "--password", PASSWORD)
    arn = out["HypervisorArn"]
    got = server.ok("get-hypervisor", "--hypervisor-arn", arn)
    assert got["Hypervisor"]["Host"] == "qemu+ssh://root@kvm.lab/system"
    assert PASSWORD not in json.dumps(got)
    res = server.aws("delete-hypervisor", "--hypervisor-arn", arn[:-8] + "00000000")
    assert res.rc != 0 and "ResourceNotFoundException" in res.err
    server.ok("delete-hypervisor", "--hypervisor-arn", arn)


def iter_answers(bgw: Any, hv: str) -> Iterator[dict[str, Any]]:
    yield bgw.get_hypervisor(HypervisorArn=hv)
    yield bgw.list_hypervisors()
    yield bgw.get_hypervisor_property_mappings(HypervisorArn=hv)
    yield bgw.list_tags_for_resource(ResourceArn=hv)


def test_password_is_never_answered_and_encrypted_at_rest(server: Server, bgw: Any,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    caplog.set_level("DEBUG", logger="controlplane")
    caplog.set_level("DEBUG", logger="aiohttp")
    hv = bgw.import_hypervisor_configuration(Name="a", Host="esx1.lab", Username="root",
                                             Password=PASSWORD)["HypervisorArn"]
    bgw.update_hypervisor(HypervisorArn=hv, Password=PASSWORD + "2")
    for answer in iter_answers(bgw, hv):
        assert PASSWORD not in json.dumps(answer, default=str)
    server_lines = [r.getMessage() for r in caplog.records
                    if r.name.startswith(("controlplane", "aiohttp"))]
    assert any("event=hypervisor_imported" in line for line in server_lines)
    assert not [line for line in server_lines if PASSWORD in line]  # botocore's own may
    state = server.plane.state_dir
    for path in state.iterdir():
        if path.name.startswith("controlplane.sqlite3"):
            assert PASSWORD.encode() not in path.read_bytes(), path
    key = state / "secrets.key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    # The stored blob is bound to its hypervisor: it does not decrypt as another one's.
    stored = server.plane.store.hypervisor(hv)
    assert stored is not None and stored.password is not None
    assert server.plane.secrets.decrypt(stored.password, hv) == PASSWORD + "2"
    with pytest.raises(ValueError):
        server.plane.secrets.decrypt(stored.password, hv[:-1] + ("1" if hv.endswith("0") else "0"))


def test_a_bad_password_is_not_echoed_in_the_error() -> None:
    """A password that breaks the model's constraints is refused without being repeated."""
    from controlplane.errors import ApiError
    from controlplane.validation import validate_input

    secret = "\u00e4" * 200  # over the model's maximum length
    with pytest.raises(ApiError) as caught:
        validate_input({"Host": "qemu:///system", "Name": "hv", "Username": "u",
                        "Password": secret}, "ImportHypervisorConfigurationInput")
    assert "Password" in caught.value.message and secret[:20] not in caught.value.message
