"""The hypervisor part of the gateway link (docs/link-protocol.md, "Hypervisors") against an
in-process control plane: the gateway side is cpharness's LinkClient, speaking the real
signed link; the API side is boto3.

The gateway tests and inventories; the control plane asks (poll answer: `hypervisor`,
`tests`) and records (test results, inventories), and hands passwords over only sealed.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.conftest import wait_until
from tests.controlplane.cpharness import LinkClient, Server, running_server
from tests.controlplane.test_hypervisors_api import PASSWORD, client, fails

pytestmark = pytest.mark.slow

ROLE = "arn:aws:iam::123456789012:role/backup-tagger"


def gateway(server: Server, name: str = "gw") -> tuple[LinkClient, str]:
    """An activated gateway: its link client and its ARN."""
    link = server.link()
    key = link.key()
    arn = client(server).create_gateway(ActivationKey=key, GatewayDisplayName=name,
                                        GatewayType="BACKUP_VM")["GatewayArn"]
    return link, str(arn)


def vm(uuid: str, name: str, tags: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"uuid": uuid, "name": name, "path": f"/dc1/vm/{name}", "hostName": "esx1.lab",
            "tags": tags or []}


def setup_hypervisor(server: Server, bgw: Any, link: LinkClient, gw_arn: str,
                     host: str = "esx1.lab") -> str:
    hv = bgw.import_hypervisor_configuration(Name="hv", Host=host, Username="root",
                                             Password=PASSWORD)["HypervisorArn"]
    bgw.associate_gateway_to_server(GatewayArn=gw_arn, ServerArn=hv)
    return str(hv)


def test_poll_carries_the_hypervisor_sealed(server: Server) -> None:
    bgw = client(server)
    link, gw_arn = gateway(server)
    before = link.poll().body
    assert before["hypervisor"] is None and before["tests"] == []
    hv = setup_hypervisor(server, bgw, link, gw_arn)

    # No sealing key yet: the password is held back.
    got = link.poll().body
    assert got["version"] > before["version"]
    assert got["hypervisor"] == {
        "hypervisorArn": hv, "host": "esx1.lab", "username": "root", "password": None,
        "passwordPending": True, "syncRequest": 1,
    }
    # The first poll with a key gets the password at once (the version moved), sealed.
    sealed = link.poll(after=got["version"], wait=5, seal=True).body
    assert sealed["version"] > got["version"]
    box = sealed["hypervisor"]["password"]
    assert set(box) == {"alg", "epk", "nonce", "ct"} and PASSWORD not in json.dumps(sealed)
    assert link.unseal(box) == PASSWORD
    assert sealed["hypervisor"]["passwordPending"] is False
    # Another gateway's key does not open it.
    with pytest.raises(ValueError):
        server.link().unseal(box)

    # A metadata sync request wakes a waiting poll with syncRequest + 1.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(link.poll, sealed["version"], 20, "0.1.0", True)
        wait_until(lambda: server.waiting_polls(link.identity.key_id) == 1, 5)
        started = time.monotonic()
        bgw.start_virtual_machines_metadata_sync(HypervisorArn=hv)
        woke = waiting.result(10).body
        assert time.monotonic() - started < 2
    assert woke["hypervisor"]["syncRequest"] == 2
    # The same password comes in the same box poll after poll: the gateway keeps the box in
    # its state file, which a fresh seal each time would rewrite at every poll.
    assert woke["hypervisor"]["password"] == box
    got = bgw.get_hypervisor(HypervisorArn=hv)["Hypervisor"]
    assert got["LatestMetadataSyncStatus"] == "CREATED" and got["State"] == "PENDING"

    # A new password reaches the gateway; disassociation takes the hypervisor away.
    bgw.update_hypervisor(HypervisorArn=hv, Password="changed-pw")
    got = link.poll(after=woke["version"], seal=True).body
    assert got["hypervisor"]["password"] != box
    assert link.unseal(got["hypervisor"]["password"]) == "changed-pw"
    assert got["hypervisor"]["syncRequest"] == 3
    bgw.disassociate_gateway_from_server(GatewayArn=gw_arn)
    assert link.poll(after=got["version"]).body["hypervisor"] is None

    bad = link.post("/gateway/poll", {"after": 0, "wait": 0, "sealKey": "not-a-key"})
    assert bad.status == 400 and bad.body["message"].startswith("sealKey:")


def run_test(server: Server, link: LinkClient, gw_arn: str, answer: dict[str, Any] | None,
             **params: Any) -> tuple[Any, dict[str, Any] | None]:
    """TestHypervisorConfiguration in a thread; the gateway finds it in its poll and posts
    `answer` (None: never answers). Returns the API's answer or its ClientError, and the
    test as the poll listed it."""
    bgw = client(server)
    if answer is not None:
        server.plane.api.test_timeout = 20.0  # the harness's is short: no gateway answers
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(bgw.test_hypervisor_configuration, GatewayArn=gw_arn, **params)
        listed: dict[str, Any] | None = None
        deadline = time.monotonic() + 10
        while listed is None and time.monotonic() < deadline and not call.done():
            tests = link.poll(seal=True).body["tests"]
            listed = tests[0] if tests else None
            time.sleep(0.02)
        if listed is not None and answer is not None:
            resp = link.test_result(listed["testId"], **answer)
            assert resp.status == 200, resp.body
        try:
            return call.result(30), listed
        except ClientError as exc:
            return exc, listed


def test_hypervisor_test_results(server: Server) -> None:
    link, gw_arn = gateway(server)
    params = {"Host": "esx1.lab", "Username": "root", "Password": PASSWORD}
    answer, listed = run_test(server, link, gw_arn, {"ok": True}, **params)
    assert answer["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert listed is not None and listed["host"] == "esx1.lab" and listed["username"] == "root"
    assert link.unseal(listed["password"]) == PASSWORD

    messages = set()
    for i, code in enumerate(("AuthenticationFailed", "HostUnreachable", "CertificateError",
                              "InvalidHost", "HypervisorError")):
        # Each call differs (a host each): the same signed change twice in one second is
        # refused as a replay.
        err, _ = run_test(server, link, gw_arn,
                          {"ok": False, "error_code": code, "message": f"detail of {code}"},
                          **{**params, "Host": f"failing{i}.lab"})
        assert isinstance(err, ClientError), err
        assert err.response["Error"]["Code"] == "ValidationException"
        message = err.response["Error"]["Message"]
        assert code in message and f"detail of {code}" in message and gw_arn in message
        assert PASSWORD not in message
        messages.add(message)
    assert len(messages) == 5
    # The test is gone once answered.
    assert link.poll().body["tests"] == []


def test_hypervisor_test_unanswered(server: Server) -> None:
    """A gateway that never answers: a clear ConflictException naming it, after the
    (configurable) wait; the test is no longer listed."""
    server.plane.api.test_timeout = 1.0
    link, gw_arn = gateway(server)
    started = time.monotonic()
    err, listed = run_test(server, link, gw_arn, None, Host="esx1.lab")
    assert 0.9 < time.monotonic() - started < 5
    assert isinstance(err, ClientError)
    assert err.response["Error"]["Code"] == "ConflictException"
    assert "unreachable" in err.response["Error"]["Message"] and gw_arn in str(err)
    assert listed is not None and listed["password"] is None
    assert link.poll().body["tests"] == []
    late = link.test_result(listed["testId"], True)
    assert late.status == 404 and late.body["error"] == "UnknownTest"
    # Unknown gateway: ResourceNotFoundException, no waiting.
    fails(client(server).test_hypervisor_configuration, "ResourceNotFoundException",
          GatewayArn=gw_arn[:-8] + "00000000", Host="esx1.lab")


def test_test_result_is_validated(server: Server) -> None:
    link, _ = gateway(server)
    cases = [
        ({"testId": "nope", "ok": True}, "testId:"),
        ({"testId": "0" * 32, "ok": "yes"}, "ok:"),
        ({"testId": "0" * 32, "ok": False, "errorCode": "Sad"}, "errorCode:"),
        ({"testId": "0" * 32, "ok": True, "errorCode": "HostUnreachable"}, "errorCode:"),
        ({"testId": "0" * 32, "ok": True, "message": "m" * 2000}, "message:"),
    ]
    for body, field in cases:
        resp = link.post("/gateway/hypervisor/test-result", body)
        assert resp.status == 400 and resp.body["error"] == "ValidationError", resp.body
        assert resp.body["message"].startswith(field), resp.body
    resp = link.test_result("0" * 32, True)
    assert resp.status == 404 and resp.body["error"] == "UnknownTest"
    # Unsigned, or signed by a stranger: refused before anything is looked at.
    stranger = server.link()
    resp = stranger.test_result("0" * 32, True)
    assert resp.status == 401


def test_inventory_replaces_vms_with_stable_arns(server: Server) -> None:
    bgw = client(server)
    link, gw_arn = gateway(server)
    hv = setup_hypervisor(server, bgw, link, gw_arn)
    hv_id = hv.rsplit("/", 1)[1]
    tier = [{"key": "Tier", "value": "Gold", "description": "the best"}]
    resp = link.inventory(hv, 1, [vm("u-a", "alpha", tier), vm("u-b", "beta")])
    assert resp.status == 200 and resp.body == {"vms": 2}
    first = {v["Name"]: v for v in bgw.list_virtual_machines()["VirtualMachines"]}
    assert set(first) == {"alpha", "beta"}
    alpha_arn = first["alpha"]["ResourceArn"]
    assert alpha_arn.startswith(hv.split(":hypervisor/")[0] + ":vm/vm-")
    assert len(alpha_arn.rsplit("/vm-", 1)[1]) == 17
    details = bgw.get_virtual_machine(ResourceArn=alpha_arn)
    assert details["VirtualMachine"] == {
        "HostName": "esx1.lab", "HypervisorId": hv_id, "Name": "alpha",
        "Path": "/dc1/vm/alpha", "ResourceArn": alpha_arn,
        "VmwareTags": [{"VmwareCategory": "Tier", "VmwareTagName": "Gold",
                        "VmwareTagDescription": "the best"}],
    }
    got = bgw.get_hypervisor(HypervisorArn=hv)["Hypervisor"]
    assert (got["State"], got["LatestMetadataSyncStatus"]) == ("ONLINE", "SUCCEEDED")
    assert "LastSuccessfulMetadataSyncTime" in got

    # Tags on the VM, and the mapped ones from its VMware tags.
    bgw.tag_resource(ResourceARN=alpha_arn, Tags=[{"Key": "owner", "Value": "ops"}])
    bgw.put_hypervisor_property_mappings(
        HypervisorArn=hv, IamRoleArn=ROLE, VmwareToAwsTagMappings=[
            {"VmwareCategory": "Tier", "VmwareTagName": "Gold", "AwsTagKey": "tier",
             "AwsTagValue": "gold"},
            {"VmwareCategory": "Tier", "VmwareTagName": "Lead", "AwsTagKey": "tier",
             "AwsTagValue": "lead"}])
    assert bgw.list_tags_for_resource(ResourceArn=alpha_arn)["Tags"] == [
        {"Key": "owner", "Value": "ops"}, {"Key": "tier", "Value": "gold"}]
    beta_arn = first["beta"]["ResourceArn"]
    bgw.tag_resource(ResourceARN=beta_arn, Tags=[{"Key": "doomed", "Value": "yes"}])

    # Second sync: alpha renamed (same uuid: same ARN, tags kept), beta gone, gamma new.
    link.inventory(hv, 1, [vm("u-a", "alpha2", tier), vm("u-c", "gamma")])
    second = {v["Name"]: v for v in bgw.list_virtual_machines(HypervisorArn=hv)
              ["VirtualMachines"]}
    assert set(second) == {"alpha2", "gamma"}
    assert second["alpha2"]["ResourceArn"] == alpha_arn
    assert {"Key": "owner", "Value": "ops"} in bgw.list_tags_for_resource(
        ResourceArn=alpha_arn)["Tags"]
    fails(bgw.get_virtual_machine, "ResourceNotFoundException", ResourceArn=beta_arn)
    assert server.plane.store.tags(beta_arn) == []

    # A failed sync keeps the VMs and says why; an unreachable host is OFFLINE.
    resp = link.inventory(hv, 1, [], ok=False, error_code="HostUnreachable",
                          message="no route to host")
    assert resp.status == 200 and resp.body == {"vms": 2}
    got = bgw.get_hypervisor(HypervisorArn=hv)["Hypervisor"]
    assert (got["State"], got["LatestMetadataSyncStatus"]) == ("OFFLINE", "FAILED")
    assert got["LatestMetadataSyncStatusMessage"] == "HostUnreachable: no route to host"
    link.inventory(hv, 1, [], ok=False, error_code="AuthenticationFailed")
    assert bgw.get_hypervisor(HypervisorArn=hv)["Hypervisor"]["State"] == "ERROR"

    # Pagination over 3 pages, with and without the filter; paginators follow NextToken.
    link.inventory(hv, 1, [vm(f"u-{i}", f"vm{i}") for i in range(7)])
    for kwargs in ({}, {"HypervisorArn": hv}):
        pages = list(bgw.get_paginator("list_virtual_machines").paginate(
            PaginationConfig={"PageSize": 3}, **kwargs))
        assert [len(p["VirtualMachines"]) for p in pages] == [3, 3, 1]
        assert sorted(v["Name"] for p in pages for v in p["VirtualMachines"]) == [
            f"vm{i}" for i in range(7)]
    listed = server.ok("list-virtual-machines", "--page-size", "2")["VirtualMachines"]
    assert len(listed) == 7

    # Deleting the hypervisor (once no gateway uses it) removes its VMs and their tags.
    bgw.disassociate_gateway_from_server(GatewayArn=gw_arn)
    bgw.delete_hypervisor(HypervisorArn=hv)
    assert bgw.list_virtual_machines()["VirtualMachines"] == []
    assert server.plane.store.tags(alpha_arn) == []


def test_inventory_is_validated(server: Server) -> None:
    bgw = client(server)
    link, gw_arn = gateway(server)
    hv = setup_hypervisor(server, bgw, link, gw_arn)
    other = bgw.import_hypervisor_configuration(Name="o", Host="esx9.lab")["HypervisorArn"]
    resp = link.inventory(other, 1, [])
    assert resp.status == 403 and resp.body["error"] == "NotAssociated"
    cases = [
        ({"syncRequest": 99}, "syncRequest:"),
        ({"syncRequest": -1}, "syncRequest:"),
        ({"hypervisorArn": 5}, "hypervisorArn:"),
        ({"vms": "many"}, "vms:"),
        ({"vms": [vm("u a", "x")]}, "vms[0].uuid:"),
        ({"vms": [vm("u", "x"), vm("u", "y")]}, "vms[1].uuid:"),
        ({"vms": [{**vm("u", "x"), "name": ""}]}, "vms[0].name:"),
        ({"vms": [{**vm("u", "x"), "path": "a\x00b"}]}, "vms[0].path:"),
        ({"vms": [{**vm("u", "x"), "hostName": 7}]}, "vms[0].hostName:"),
        ({"vms": [vm("u", "x", [{"key": "k" * 81, "value": "v"}])]}, "vms[0].tags[0].key:"),
        ({"vms": [vm("u", "x", [{"key": "k"}])]}, "vms[0].tags[0].value:"),
        ({"ok": False, "errorCode": "Bad"}, "errorCode:"),
    ]
    base = {"hypervisorArn": hv, "syncRequest": 1, "ok": True, "errorCode": None,
            "message": None, "vms": []}
    for change, field in cases:
        resp = link.post("/gateway/hypervisor/inventory", {**base, **change})
        assert resp.status == 400 and resp.body["message"].startswith(field), (field, resp.body)
    # The body bound: 8 MiB.
    big = {**base, "vms": [vm(f"u{i}", "x" * 100, []) | {"path": "/" + "p" * 4000}
                           for i in range(2200)]}
    resp = link.post("/gateway/hypervisor/inventory", big)
    assert resp.status == 413 and resp.body["message"].startswith("body:")
    # A gateway that is not activated.
    pending = server.link()
    pending.key()
    resp = pending.inventory(hv, 1, [])
    assert resp.status == 403 and resp.body["error"] == "NotActivated"


def test_two_gateways_one_hypervisor(server: Server) -> None:
    bgw = client(server)
    (one, one_arn), (two, two_arn) = gateway(server, "one"), gateway(server, "two")
    hv = setup_hypervisor(server, bgw, one, one_arn)
    bgw.associate_gateway_to_server(GatewayArn=two_arn, ServerArn=hv)
    for link in (one, two):
        got = link.poll(seal=True).body
        got = link.poll(after=got["version"] - 1, seal=True).body
        assert got["hypervisor"]["hypervisorArn"] == hv
        assert link.unseal(got["hypervisor"]["password"]) == PASSWORD
    one.inventory(hv, 2, [vm("u-1", "web"), vm("u-2", "db")])
    arns = sorted(v["ResourceArn"] for v in bgw.list_virtual_machines()["VirtualMachines"])
    two.inventory(hv, 2, [vm("u-2", "db"), vm("u-1", "web")])
    assert sorted(v["ResourceArn"] for v in bgw.list_virtual_machines()
                  ["VirtualMachines"]) == arns
    # Both gateways are woken by one sync request.
    before = [link.poll().body["version"] for link in (one, two)]
    bgw.start_virtual_machines_metadata_sync(HypervisorArn=hv)
    after = [link.poll().body for link in (one, two)]
    assert [a["version"] for a in after] > before
    assert all(a["version"] > b for a, b in zip(after, before, strict=True))
    assert {a["hypervisor"]["syncRequest"] for a in after} == {3}
    # One gateway reports request 3; the other's report of request 2 arrives late and
    # must not put back the older list.
    one.inventory(hv, 3, [vm("u-1", "web"), vm("u-3", "cache")])
    assert two.inventory(hv, 2, [vm("u-1", "web"), vm("u-2", "db")]).status == 200
    names = sorted(v["Name"] for v in bgw.list_virtual_machines()["VirtualMachines"])
    assert names == ["cache", "web"]


def test_restart_keeps_everything(tmp_path: Path) -> None:
    state, home = tmp_path / "state", tmp_path / "home"
    with running_server(state, home) as server:
        bgw = client(server)
        link, gw_arn = gateway(server)
        hv = setup_hypervisor(server, bgw, link, gw_arn)
        bgw.tag_resource(ResourceARN=hv, Tags=[{"Key": "k", "Value": "v"}])
        link.poll(seal=True)
        link.inventory(hv, 1, [vm("u-1", "web")])
        vm_arn = bgw.list_virtual_machines()["VirtualMachines"][0]["ResourceArn"]
        bgw.tag_resource(ResourceARN=vm_arn, Tags=[{"Key": "app", "Value": "web"}])
        before = bgw.get_hypervisor(HypervisorArn=hv)["Hypervisor"]
    with running_server(state, home) as server:
        bgw = client(server)
        assert bgw.get_hypervisor(HypervisorArn=hv)["Hypervisor"] == before
        assert bgw.get_gateway(GatewayArn=gw_arn)["Gateway"]["HypervisorId"] == hv.rsplit(
            "/", 1)[1]
        assert bgw.list_tags_for_resource(ResourceArn=hv)["Tags"] == [
            {"Key": "k", "Value": "v"}]
        assert bgw.get_virtual_machine(ResourceArn=vm_arn)["VirtualMachine"]["Name"] == "web"
        assert bgw.list_tags_for_resource(ResourceArn=vm_arn)["Tags"] == [
            {"Key": "app", "Value": "web"}]
        # The password survived (decrypted with the kept key) and the sealing key too.
        link.port = server.port
        got = link.poll(after=0).body
        assert link.unseal(got["hypervisor"]["password"]) == PASSWORD

