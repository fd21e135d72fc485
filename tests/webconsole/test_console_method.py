"""The console method's plumbing, without a browser: the control plane names its console
with each key, and the appliance's 302 goes there in the AWS console's URL format (the
real round trip through a browser is in test_console_browser.py)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.activation import console_location, parse_query
from appliance.identity import Identity
from appliance.link import console_url_of
from controlplane.server import ControlPlane
from controlplane.webconsole import auth

pytestmark = pytest.mark.timeout(30)
KEY = "AAAAA-BBBBB-CCCCC-DDDDD-EEEEE"


def test_the_redirect_keeps_the_aws_format_on_the_console_address() -> None:
    req = parse_query("activationRegion=eu-west-1&gatewayType=BACKUP_VM")
    location = console_location(req, KEY, "http://cp.lab:8443/console")
    assert location == ("http://cp.lab:8443/console/backup/home?region=eu-west-1&activationKey="
                        f"{KEY}&activationRegion=eu-west-1#/gateways/create")
    assert parse_qs(urlsplit(location).query)["activationKey"] == [KEY]
    aws = urlsplit(console_location(req, KEY))  # no console named: the AWS console
    assert aws.hostname == "eu-west-1.console.aws.amazon.com"


@pytest.mark.parametrize(("given", "used"), [
    ("http://127.0.0.1:8443/console", "http://127.0.0.1:8443/console"),
    ("https://cp.example.net/console/", "https://cp.example.net/console"),
    ("javascript:alert(1)", None), ("ftp://cp/console", None), ("http://cp/?q=1", None),
    ("http://cp/#x", None), ("http://cp/a b", None), ('http://cp/"', None),
    ("http://cp/\r\nSet-Cookie: x", None), (None, None), (42, None), ("http://", None),
])
def test_the_appliance_only_takes_a_plain_url(given: object, used: str | None) -> None:
    assert console_url_of(given) == used


async def test_each_key_names_the_console(tmp_path: Path) -> None:
    plane = ControlPlane(tmp_path / "a")
    try:
        _, port = await plane.start("127.0.0.1", 0)

        def key_answer() -> dict[str, object]:
            identity = Identity(Ed25519PrivateKey.generate())
            return plane.link_ops.issue_key(identity.key_id, identity.public_raw, "us-west-2",
                                            "STANDARD", None, None, "0.1.0")

        # No password yet: no one can use the console, the gateway keeps the AWS console.
        assert "consoleUrl" not in key_answer()
        auth.write_password_file(plane.state_dir / auth.PASSWORD_FILE, "long enough now")
        assert key_answer()["consoleUrl"] == f"http://127.0.0.1:{port}/console"
    finally:
        await plane.stop()
    plane = ControlPlane(tmp_path / "b", console_url="https://cp.example.net/console")
    try:
        await plane.start("127.0.0.1", 0)  # named with --console-url: always sent
        assert plane.link_ops.console_url() == "https://cp.example.net/console"
    finally:
        await plane.stop()
