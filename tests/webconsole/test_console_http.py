"""The web console over plain HTTP (no browser): sign-in, sessions, CSRF, the sign-in
throttle, escaping, the security headers, and the pages calling the real operations.

One in-process control plane per test on aiohttp's test server; a password hash is written
with a cheap scrypt cost so these stay fast (the CLI writes the real one).
"""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.identity import Identity
from controlplane.server import ControlPlane
from controlplane.webconsole import auth

PASSWORD = "correct horse battery"
REGION = "us-west-2"
pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def cheap_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """scrypt at a tiny cost: the hash format records it, verification reads it back."""
    monkeypatch.setattr(auth, "SCRYPT_N", 2**8)


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    cp = ControlPlane(tmp_path / "state")
    try:
        yield cp
    finally:
        await cp.stop()


@pytest.fixture
async def client(plane: ControlPlane) -> AsyncIterator[TestClient]:
    auth.write_password_file(plane.state_dir / auth.PASSWORD_FILE, PASSWORD)
    async with TestClient(TestServer(plane.make_app())) as c:
        yield c


def csrf_of(html: str) -> str:
    found = re.search(r'<input type="hidden" name="csrf" value="([^"]+)">', html)
    assert found, html[:2000]
    return found.group(1)


async def sign_in(client: TestClient, password: str = PASSWORD, status: int = 303,
                  page: str = "/console/signin") -> Any:
    form = await (await client.get(page)).text()
    token = csrf_of(form)
    nxt = re.search(r'name="next" value="([^"]*)"', form)
    assert nxt
    resp = await client.post("/console/signin", data={"csrf": token, "password": password,
                                                      "next": html.unescape(nxt.group(1))},
                             allow_redirects=False)
    assert resp.status == status, await resp.text()
    return resp


async def page_csrf(client: TestClient, path: str = "/console/gateways") -> str:
    resp = await client.get(path)
    assert resp.status == 200, await resp.text()
    return csrf_of(await resp.text())


def new_gateway(plane: ControlPlane, name: str, client_region: str = REGION) -> str:
    identity = Identity(Ed25519PrivateKey.generate())
    answer = plane.link_ops.issue_key(identity.key_id, identity.public_raw, client_region,
                                      "STANDARD", None, None, "0.1.0")
    from controlplane.sigv4 import Caller
    out = plane.api.create_gateway(Caller(plane.access_key_id, client_region), {
        "ActivationKey": answer["activationKey"], "GatewayDisplayName": name,
        "GatewayType": "BACKUP_VM"})
    return str(out["GatewayArn"])


async def test_pages_need_a_session_and_sign_in_works(client: TestClient) -> None:
    resp = await client.get("/console/gateways", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"].startswith("/console/signin?next=")
    resp = await sign_in(client)
    cookie = resp.headers["Set-Cookie"]
    assert "cp_console=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Path=/console" in cookie
    resp = await client.get("/console/gateways")
    assert resp.status == 200
    assert "No gateways in this region yet" in await resp.text()


async def test_wrong_password_is_refused_and_then_throttled(client: TestClient) -> None:
    resp = await sign_in(client, "not the password", status=401)
    text = await resp.text()
    assert "Wrong password." in text and "4 more tries" in text
    for _ in range(4):
        await sign_in(client, "still wrong", status=401)
    resp = await sign_in(client, PASSWORD, status=429)  # even the right one, for a while
    assert "Too many failed sign-ins from your address" in await resp.text()
    resp = await client.get("/console/gateways", allow_redirects=False)
    assert resp.status == 303  # no session was made


async def test_sign_in_form_needs_its_own_token(client: TestClient) -> None:
    resp = await client.post("/console/signin", data={"password": PASSWORD},
                             allow_redirects=False)
    assert resp.status == 403
    assert "cp_console=" not in resp.headers.get("Set-Cookie", "")


async def test_no_password_set_says_how_to_set_one(plane: ControlPlane) -> None:
    async with TestClient(TestServer(plane.make_app())) as c:
        resp = await c.get("/console/signin")
        assert resp.status == 503
        assert "python -m controlplane console-password --state-dir" in await resp.text()
    assert plane.console.warn_if_no_password("D") is False


async def test_a_change_without_the_csrf_token_is_refused(client: TestClient,
                                                          plane: ControlPlane) -> None:
    arn = new_gateway(plane, "before")
    await sign_in(client)
    resp = await client.post("/console/gateway/rename", data={
        "arn": arn, "GatewayDisplayName": "after", "csrf": "forged"})
    assert resp.status == 403
    assert "CSRF check failed" in await resp.text()
    assert plane.store.gateway(arn).name == "before"
    token = await page_csrf(client)
    resp = await client.post("/console/gateway/rename", data={
        "arn": arn, "GatewayDisplayName": "after", "csrf": token}, allow_redirects=False)
    assert resp.status == 303
    assert plane.store.gateway(arn).name == "after"


async def test_security_headers(client: TestClient) -> None:
    for path in ("/console/signin", "/console/static/console.css", "/console/nothing"):
        resp = await client.get(path)
        csp = resp.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert "script-src 'self'" in csp
        assert resp.headers["X-Frame-Options"] == "DENY"
    resp = await client.get("/console/signin")
    assert resp.headers["Cache-Control"] == "no-store"


async def test_user_text_is_escaped(client: TestClient, plane: ControlPlane) -> None:
    arn = new_gateway(plane, "gw")
    await sign_in(client)
    token = await page_csrf(client)
    evil = '<script>alert(1)</script>"'
    resp = await client.post("/console/gateway/tags/add", data={
        "arn": arn, "Key": "k", "Value": evil, "csrf": token})
    text = await resp.text()
    assert resp.status == 200
    assert "<script>alert(1)" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;" in text
    # An operation's refusal that quotes the input is escaped too, beside its field.
    resp = await client.post("/console/gateway/rename", data={
        "arn": arn, "GatewayDisplayName": "<b>x</b>", "csrf": token})
    text = await resp.text()
    assert resp.status == 400
    assert "<b>x</b>" not in text
    assert re.search(r'id="f-GatewayDisplayName-err">[^<]*&lt;b&gt;x&lt;/b&gt;', text)


async def test_create_gateway_with_a_key_and_the_api_message_beside_the_field(
        client: TestClient, plane: ControlPlane) -> None:
    await sign_in(client)
    token = await page_csrf(client)
    resp = await client.post("/console/gateways/create", data={
        "csrf": token, "region": REGION, "ActivationKey": "NOPE1-NOPE2-NOPE3-NOPE4-NOPE5",
        "GatewayDisplayName": "new"})
    assert resp.status == 400
    text = await resp.text()
    assert 'id="f-ActivationKey-err"' in text
    identity = Identity(Ed25519PrivateKey.generate())
    key = plane.link_ops.issue_key(identity.key_id, identity.public_raw, REGION, "STANDARD",
                                   None, None, "0.1.0")["activationKey"]
    resp = await client.post("/console/gateways/create", data={
        "csrf": token, "region": REGION, "ActivationKey": key, "GatewayDisplayName": "new"},
        allow_redirects=False)
    assert resp.status == 303, await resp.text()
    assert resp.headers["Location"].startswith("/console/gateway?arn=arn")
    assert [g.name for g in plane.store.list_gateways(REGION, 0, 10)] == ["new"]


async def test_the_landing_page_of_the_console_method(client: TestClient) -> None:
    target = ("/console/backup/home?region=us-west-2&activationKey=ABCDE-12345-FGHIJ-67890-"
              "KLMNO&activationRegion=us-west-2")
    resp = await client.get(target, allow_redirects=False)
    assert resp.status == 303  # signed out: to sign-in, and back here after it
    resp = await sign_in(client, page=resp.headers["Location"])
    assert resp.headers["Location"] == target
    # Arriving from the gateway (another site), the session cookie is held back by
    # SameSite=Strict: the page reloads itself from here rather than asking to sign in.
    client.session.cookie_jar.clear()
    resp = await client.get(target, headers={"Sec-Fetch-Site": "cross-site"},
                            allow_redirects=False)
    assert resp.status == 200
    assert 'http-equiv="refresh"' in await resp.text()
    await sign_in(client)
    text = await (await client.get(target)).text()
    assert 'value="ABCDE-12345-FGHIJ-67890-KLMNO"' in text
    assert 'name="region" value="us-west-2"' in text


async def test_console_method_refuses_ipv6_and_sends_ipv4_to_port_80(
        client: TestClient) -> None:
    await sign_in(client)
    resp = await client.get("/console/gateways/connect?ip=2001:db8::1")
    assert resp.status == 400
    assert "IPv4 gateways only" in await resp.text()
    resp = await client.get("/console/gateways/connect?ip=192.0.2.10")
    text = await resp.text()
    assert 'content="0; url=http://192.0.2.10/?activationRegion=us-east-1&amp;gatewayType=' \
           'BACKUP_VM"' in text


async def test_schedule_errors_are_the_apis_beside_the_field(client: TestClient,
                                                            plane: ControlPlane) -> None:
    arn = new_gateway(plane, "gw")
    await sign_in(client)
    token = await page_csrf(client)
    interval = {"csrf": token, "arn": arn, "index": "", "DaysOfWeek": "1",
                "StartHourOfDay": "8", "StartMinuteOfHour": "0", "EndHourOfDay": "17",
                "EndMinuteOfHour": "59", "AverageUploadRateLimitInBitsPerSec": "1000"}
    resp = await client.post("/console/gateway/schedule/save", data=interval)
    assert resp.status == 400
    text = await resp.text()
    assert re.search(r'id="f-AverageUploadRateLimitInBitsPerSec-err">BandwidthRateLimit'
                     r"Intervals\[0\].AverageUploadRateLimitInBitsPerSec: must be from "
                     r"51,200 to 8,000,000,000,000, got 1,000", text), text
    interval["AverageUploadRateLimitInBitsPerSec"] = "100,000,000"
    resp = await client.post("/console/gateway/schedule/save", data=interval,
                             allow_redirects=False)
    assert resp.status == 303
    assert plane.store.gateway(arn).schedule == [{
        "AverageUploadRateLimitInBitsPerSec": 100_000_000, "StartHourOfDay": 8,
        "StartMinuteOfHour": 0, "EndHourOfDay": 17, "EndMinuteOfHour": 59, "DaysOfWeek": [1]}]
    interval["StartHourOfDay"] = "17"  # overlaps the first at 17:00 (end minute included)
    resp = await client.post("/console/gateway/schedule/save", data=interval)
    assert resp.status == 400
    assert "overlaps BandwidthRateLimitIntervals[0] on Mon at 17:00" in await resp.text()


def test_password_file_is_atomic_0600_and_verifies(tmp_path: Path) -> None:
    target = tmp_path / "s" / auth.PASSWORD_FILE
    auth.write_password_file(target, PASSWORD)
    assert target.stat().st_mode & 0o777 == 0o600
    stored = auth.read_password_file(target)
    assert stored and PASSWORD not in stored
    assert auth.verify_password(PASSWORD, stored)
    assert not auth.verify_password(PASSWORD + "x", stored)
    with pytest.raises(auth.PasswordError):
        auth.write_password_file(target, "short")
    assert list(target.parent.iterdir()) == [target]


async def test_hypervisor_import_mappings_and_delete(client: TestClient,
                                                     plane: ControlPlane) -> None:
    await sign_in(client)
    token = await page_csrf(client, "/console/hypervisors")
    resp = await client.post("/console/hypervisors/import", data={
        "csrf": token, "Name": "esx", "Host": "not a host!", "Username": "u", "Password": "p"})
    assert resp.status == 400
    text = await resp.text()
    assert 'id="f-Host-err"' in text and 'value="p"' not in text  # the password is not echoed
    resp = await client.post("/console/hypervisors/import", data={
        "csrf": token, "Name": "esx", "Host": "192.0.2.20", "Username": "u", "Password": "p"},
        allow_redirects=False)
    assert resp.status == 303, await resp.text()
    arn = plane.store.list_hypervisors("us-east-1", 0, 10)[0].arn
    resp = await client.post("/console/hypervisor/mappings/add", data={
        "csrf": token, "arn": arn, "VmwareCategory": "env", "VmwareTagName": "prod",
        "AwsTagKey": "aws:env", "AwsTagValue": "prod",
        "IamRoleArn": "arn:aws:iam::123456789012:role/r"})
    assert resp.status == 400
    assert re.search(r'id="f-AwsTagKey-err">VmwareToAwsTagMappings\[0\].AwsTagKey: keys '
                     r"starting with &#x27;aws:&#x27; are reserved", await resp.text())
    resp = await client.post("/console/hypervisor/mappings/add", data={
        "csrf": token, "arn": arn, "VmwareCategory": "env", "VmwareTagName": "prod",
        "AwsTagKey": "env", "AwsTagValue": "prod",
        "IamRoleArn": "arn:aws:iam::123456789012:role/r"}, allow_redirects=False)
    assert resp.status == 303, await resp.text()
    assert plane.store.hypervisor(arn).mappings == [{
        "VmwareCategory": "env", "VmwareTagName": "prod", "AwsTagKey": "env",
        "AwsTagValue": "prod"}]
    text = await (await client.get("/console/vms")).text()
    assert "No virtual machines match." in text and ">esx</option>" in text
    resp = await client.post("/console/hypervisor/delete", data={
        "csrf": token, "arn": arn, "confirm": "yes"}, allow_redirects=False)
    assert resp.status == 303
    assert plane.store.hypervisor(arn) is None


async def test_jobs_pages_without_vms_and_the_live_feed(client: TestClient) -> None:
    resp = await client.get("/console/jobs/live", allow_redirects=False)
    assert resp.status == 303  # the feed needs a session like every page
    await sign_in(client)
    text = await (await client.get("/console/jobs")).text()
    assert "A backup needs a virtual machine" in text and 'data-active="no"' in text
    resp = await client.get("/console/jobs/live")
    assert resp.status == 200
    assert await resp.json() == {"jobs": [], "active": False}
    text = await (await client.get("/console/recovery-points")).text()
    assert "Show recovery points" in text


async def test_the_gateway_page_shows_a_published_update(
        client: TestClient, plane: ControlPlane, tmp_path: Path) -> None:
    """A gateway at 0.1.0 with 0.2.0 published: the page says when it installs (the next
    maintenance window, docs/updates.md); once it runs 0.2.0, that it is up to date."""
    from gatewaycore import bundle

    arn = new_gateway(plane, "gw")
    await sign_in(client)
    page = f"/console/gateway?arn={arn}"
    assert "<dd>up to date</dd>" in await (await client.get(page)).text()
    private, _ = bundle.new_key()
    source = tmp_path / "u.bundle"
    source.write_bytes(bundle.build([("appliance/version.py", b'__version__ = "0"\n')],
                                    "0.2.0", private, "t"))
    plane.updates.publish(source)
    text = await (await client.get(page)).text()
    assert "a newer version installs from <time" in text
    gateway = plane.store.gateway(arn)
    assert gateway is not None
    plane.store.heartbeat(gateway.key_id, "0.2.0", 1.0)
    plane.store.flush_heartbeats()
    assert "<dd>up to date</dd>" in await (await client.get(page)).text()
