"""The README's activation flow, exactly as printed, against real processes on loopback."""

from __future__ import annotations

import re
from typing import Any

import pytest

pytestmark = pytest.mark.slow

KEY_RE = re.compile(r"^[A-Z0-9]{5}(-[A-Z0-9]{5}){4}$")


def test_curl_key_then_aws_cli_create_gateway(
    control_plane: Any, appliance: Any, wait_until: Any
) -> None:
    status, headers, body = appliance.get(
        "/?activationRegion=us-west-2&gatewayType=BACKUP_VM&endpointType=DUALSTACK"
        "&ipVersion=ipv4&no_redirect"
    )
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain")
    key = body.splitlines()[0]
    assert KEY_RE.match(key), body

    out = control_plane.aws(
        "create-gateway", "--activation-key", key, "--gateway-display-name", "demo",
        "--gateway-type", "BACKUP_VM", region="us-west-2",
    )
    arn = out["GatewayArn"]
    assert arn.startswith("arn:aws:backup-gateway:us-west-2:")

    doc = wait_until(lambda: (s := appliance.status())["activated"] and s, what="activation")
    assert doc["gatewayArn"] == arn
    assert doc["gatewayName"] == "demo"
    assert doc["region"] == "us-west-2"
    assert doc["controlPlane"]["reachable"] is True

    # Once activated, the page refuses with 409 naming the ARN.
    status, _, body = appliance.get("/?activationRegion=us-west-2&no_redirect")
    assert status == 409
    assert arn in body
