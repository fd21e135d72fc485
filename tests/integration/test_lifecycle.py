"""A gateway's life as the daemon sees it: activation, rename, schedule, update request,
restarts of both processes, deletion. Real processes, the real AWS CLI."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import activate

pytestmark = pytest.mark.slow

SCHEDULE = [
    {
        "AverageUploadRateLimitInBitsPerSec": 104857600,
        "StartHourOfDay": 0, "StartMinuteOfHour": 0,
        "EndHourOfDay": 23, "EndMinuteOfHour": 59,
        "DaysOfWeek": [0, 1, 2, 3, 4, 5, 6],
    }
]



def test_rename_schedule_update_restart_delete(
    control_plane: Any, appliance: Any, wait_until: Any
) -> None:
    cp, app = control_plane, appliance
    arn = activate(cp, app)
    app.proc.wait_for_line(r"event=activated .*name=demo")

    # The heartbeat carries the software version: GetGateway shows it.
    gw = cp.aws("get-gateway", "--gateway-arn", arn)["Gateway"]
    # (shown in the model's pattern for the shape `Name`: letters, digits and '-')
    assert gw["SoftwareVersion"] == app.status()["softwareVersion"].replace(".", "-")

    cp.aws("update-gateway-information", "--gateway-arn", arn,
           "--gateway-display-name", "renamed-1")
    wait_until(lambda: app.status()["gatewayName"] == "renamed-1", what="rename")
    app.proc.wait_for_line(r"event=renamed .*new=renamed-1")

    cp.aws("put-bandwidth-rate-limit-schedule", "--gateway-arn", arn,
           "--bandwidth-rate-limit-intervals", json.dumps(SCHEDULE))
    wait_until(lambda: app.api("GET", "/v1/schedule")[1]["intervals"] == SCHEDULE,
               what="schedule applied")
    code, shaping = app.api("GET", "/v1/shaping")
    assert code == 200 and shaping["limitBitsPerSec"] == 104857600

    cp.aws("update-gateway-software-now", "--gateway-arn", arn)
    wait_until(lambda: app.status()["softwareUpdate"]["requests"] == 1, what="update request")
    app.proc.wait_for_line(r"event=software_update_requested request=1")

    # Both processes restarted keep their state.
    app.stop()
    cp.stop()
    cp.start()
    app.start()
    doc = app.status()
    assert (doc["activated"], doc["gatewayArn"], doc["gatewayName"]) == (True, arn, "renamed-1")
    assert doc["shaping"]["limitBitsPerSec"] == 104857600  # applied at start, from the state
    assert app.get("/?no_redirect")[0] == 409
    # The link comes back by itself and still learns of changes.
    cp.aws("update-gateway-information", "--gateway-arn", arn,
           "--gateway-display-name", "renamed-2")
    wait_until(lambda: app.status()["gatewayName"] == "renamed-2", what="rename after restart")
    # The update request seen before the restart is not reported again.
    assert app.status()["softwareUpdate"]["requests"] == 1
    assert "event=software_update_requested" not in app.proc.output()

    cp.aws("delete-gateway", "--gateway-arn", arn)
    wait_until(lambda: app.status()["deleted"], what="deletion seen by the daemon")
    doc = app.status()
    assert doc["activated"] is False
    assert doc["gatewayArn"] is None and doc["gatewayName"] is None
    assert doc["deletedGatewayArn"] == arn
    status, _, body = app.get("/?activationRegion=us-west-2&no_redirect")
    assert status == 410
    assert arn in body
    code, err = app.api("POST", "/v1/activation-key", {"activationRegion": "us-west-2"})
    assert code == 410 and err["error"] == "GatewayDeleted"

    # Still deleted after a restart.
    app.stop()
    app.start()
    assert app.status()["deleted"] is True
    assert app.get("/?no_redirect")[0] == 410


def test_deleted_identity_refused_by_control_plane_even_with_lost_state(
    control_plane: Any, appliance: Any, wait_until: Any
) -> None:
    """If the daemon's state file is lost but its identity kept, the control plane still
    refuses it: the page answers 410 and the daemon records the deletion."""
    cp, app = control_plane, appliance
    arn = activate(cp, app)
    app.stop()
    cp.aws("delete-gateway", "--gateway-arn", arn)
    (app.state_dir / "state.json").unlink()
    app.start()
    status, _, body = app.get("/?activationRegion=us-west-2&no_redirect")
    assert status == 410, body
    assert app.status()["deleted"] is True


def test_local_api_activation_key_and_errors(
    control_plane: Any, appliance: Any, wait_until: Any
) -> None:
    app = appliance
    code, doc = app.api("POST", "/v1/activation-key", {"activationRegion": "nowhere-1"})
    assert code == 200
    assert doc["region"] == "us-east-1" and doc["regionFallback"] is True
    assert doc["expiresAt"]
    code, doc = app.api("POST", "/v1/activation-key",
                        {"activationRegion": "eu-west-1", "endpointType": "DUALSTACK",
                         "ipVersion": "ipv6"})
    assert code == 200 and doc["region"] == "eu-west-1" and doc["regionFallback"] is False
    code, err = app.api("POST", "/v1/activation-key", {"endpointType": "FIPS"})
    assert code == 400
    assert err["error"] == "ValidationError" and err["field"] == "endpointType"
    assert "DUALSTACK" in err["message"]
    code, err = app.api("GET", "/v1/activation-key")
    assert code == 405 and err["error"] == "MethodNotAllowed"
    code, err = app.api("GET", "/v1/nothing")
    assert code == 404 and err["error"] == "NotFound"

    arn = activate(control_plane, app)
    code, err = app.api("POST", "/v1/activation-key", {})
    assert code == 409 and arn in err["message"]


def test_connectivity_test_probes_only_the_control_plane(appliance: Any) -> None:
    code, doc = appliance.api("POST", "/v1/connectivity-test",
                              {"region": "us-west-2", "endpointType": "DUALSTACK"})
    assert code == 200
    by_name = {r["name"]: r for r in doc["results"]}
    assert by_name["control plane DNS"]["passed"] is True
    assert by_name["control plane TCP"]["passed"] is True
    aws = [r for r in doc["results"] if r["target"].endswith(".api.aws:443")]
    assert len(aws) == 4
    assert all(r["probed"] is False and "not probed" in r["detail"] for r in aws)
    code, err = appliance.api("POST", "/v1/connectivity-test", {"region": "mars-1"})
    assert code == 400 and err["field"] == "region"


def test_status_command_prints_readably(appliance: Any) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "appliance", "status", "--socket", str(appliance.socket_path)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Activated" in done.stdout and "no" in done.stdout
    assert appliance.status()["keyId"] in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "status", "--socket", "/nonexistent/api.sock"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "/nonexistent/api.sock" in done.stderr
