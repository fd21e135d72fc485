"""The web console in a real headless Chromium (Debian's chromium + chromium-driver, driven
by selenium), against a real control plane process and a real appliance daemon.

One control plane and one browser for the module; the tests run in file order and build on
each other the way an operator would: sign in, create a gateway by the console method (the
browser follows the appliance's real 302 from its port 80 back to the console), rename it,
tag it, edit its bandwidth schedule in the week view (read back with the AWS CLI), watch a
CSRF attempt from another origin fail, and delete it. Screenshots of the main pages are
written to docs/webconsole/ by the run, so they show what the console looks like today.
"""

from __future__ import annotations

import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from tests.conftest import PYTHON, Appliance, ControlPlane, child_env, free_port
from tests.webconsole.browserkit import error_beside, shot, until

PASSWORD = "a long browser password"
REGION = "us-east-1"  # the console's default region

pytestmark = [pytest.mark.browser, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A control plane process whose console password was set with the CLI."""
    state = tmp_path_factory.mktemp("webconsole") / "cp"
    done = subprocess.run(
        [PYTHON, "-m", "controlplane", "console-password", "--state-dir", str(state)],
        input=PASSWORD + "\n", capture_output=True, text=True, env=child_env(), timeout=30,
        check=False)
    assert done.returncode == 0, done.stderr
    assert (state / "console-password").stat().st_mode & 0o777 == 0o600
    plane = ControlPlane(state, free_port()).start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="module")
def appliance(cp: ControlPlane, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Appliance]:
    tmp = tmp_path_factory.mktemp("appliance")
    app = Appliance(state_dir=tmp / "state", socket_path=Path(f"/tmp/wc-{free_port()}/api.sock"),
                    port=free_port(), control_plane_url=cp.url)
    try:
        app.start()
        yield app
    finally:
        app.stop()
        shutil.rmtree(app.socket_path.parent, ignore_errors=True)


class State:
    arn: str = ""


def test_sign_in_wrong_then_right_by_keyboard(browser: WebDriver, cp: ControlPlane) -> None:
    browser.get(f"{cp.url}/console/gateways")
    until(browser, lambda d: "/console/signin" in d.current_url, "the sign-in page")
    shot(browser, "signin")
    # The password field has the focus: type and press Enter, no mouse.
    assert browser.switch_to.active_element.get_attribute("id") == "f-password", \
        browser.page_source
    browser.switch_to.active_element.send_keys("wrong password", Keys.ENTER)
    until(browser, lambda d: d.find_elements(By.ID, "f-password-err"), "the error")
    assert error_beside(browser, "f-password").startswith("Wrong password.")
    browser.switch_to.active_element.send_keys(PASSWORD, Keys.ENTER)
    until(browser, lambda d: d.current_url.endswith("/console/gateways"), "the gateways page")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Gateways"
    cookie = browser.get_cookie("cp_console")
    assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict"


def test_create_gateway_by_the_console_method(browser: WebDriver, cp: ControlPlane,
                                              appliance: Appliance) -> None:
    browser.get(f"{cp.url}/console/gateways/create")
    shot(browser, "create-gateway")
    ip = browser.find_element(By.ID, "f-ip")
    ip.send_keys(f"127.0.0.1:{appliance.port}", Keys.ENTER)
    # console -> the appliance's port 80 -> its 302 with the key -> this console
    until(browser, lambda d: "/console/backup/home?" in d.current_url, "the gateway's redirect")
    assert "activationKey=" in browser.current_url
    key = browser.find_element(By.ID, "f-ActivationKey").get_attribute("value")
    assert key and len(key) == 29
    name = browser.switch_to.active_element  # the name field has the focus
    assert name.get_attribute("id") == "f-GatewayDisplayName"
    name.send_keys("browser-gw", Keys.ENTER)
    until(browser, lambda d: "/console/gateway?arn=" in d.current_url, "the gateway page")
    listed = cp.aws("list-gateways", region=REGION)["Gateways"]
    assert [g["GatewayDisplayName"] for g in listed] == ["browser-gw"]
    State.arn = listed[0]["GatewayArn"]
    assert State.arn in browser.page_source
    until(browser, lambda d: appliance.status().get("gatewayArn") == State.arn,
          "the daemon to learn its activation")


def test_rename(browser: WebDriver, cp: ControlPlane) -> None:
    assert State.arn
    browser.get(f"{cp.url}/console/gateway?arn={State.arn}")
    field = browser.find_element(By.ID, "f-GatewayDisplayName")
    field.clear()
    field.send_keys("bad/name?", Keys.ENTER)  # '?' is outside the model's pattern
    until(browser, lambda d: d.find_elements(By.ID, "f-GatewayDisplayName-err"), "the error")
    assert "GatewayDisplayName" in error_beside(browser, "f-GatewayDisplayName")
    field = browser.find_element(By.ID, "f-GatewayDisplayName")
    field.clear()
    field.send_keys("renamed-gw", Keys.ENTER)
    until(browser, lambda d: d.find_element(By.ID, "gw-name").text == "renamed-gw", "rename")
    got = cp.aws("get-gateway", "--gateway-arn", State.arn, region=REGION)
    assert got["Gateway"]["GatewayDisplayName"] == "renamed-gw"
    browser.find_element(By.ID, "f-Key").send_keys("team")
    browser.find_element(By.ID, "f-Value").send_keys("backup", Keys.ENTER)
    until(browser, lambda d: d.find_elements(By.ID, "tags"), "the tag table")
    tags = cp.aws("list-tags-for-resource", "--resource-arn", State.arn, region=REGION)
    assert tags["Tags"] == [{"Key": "team", "Value": "backup"}]
    shot(browser, "gateway")
    browser.get(f"{cp.url}/console/gateways")
    assert "renamed-gw" in browser.find_element(By.TAG_NAME, "table").text
    shot(browser, "gateways")


def test_schedule_in_the_week_view(browser: WebDriver, cp: ControlPlane) -> None:
    assert State.arn
    browser.get(f"{cp.url}/console/gateway/schedule?arn={State.arn}")
    assert browser.find_element(By.ID, "limit-now").text == "no limit"

    def fill(rate: str) -> None:
        for day in browser.find_elements(By.NAME, "DaysOfWeek"):
            if day.get_attribute("value") in ("1", "3") and not day.is_selected():
                day.click()
        for fid, value in (("StartHourOfDay", "9"), ("StartMinuteOfHour", "0"),
                           ("EndHourOfDay", "17"), ("EndMinuteOfHour", "59"),
                           ("AverageUploadRateLimitInBitsPerSec", rate)):
            box = browser.find_element(By.ID, f"f-{fid}")
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "f-AverageUploadRateLimitInBitsPerSec").send_keys(Keys.ENTER)

    fill("1000")
    until(browser, lambda d: d.find_elements(By.ID, "f-AverageUploadRateLimitInBitsPerSec-err"),
          "the rate error")
    assert error_beside(browser, "f-AverageUploadRateLimitInBitsPerSec") == (
        "BandwidthRateLimitIntervals[0].AverageUploadRateLimitInBitsPerSec: must be from "
        "51,200 to 8,000,000,000,000, got 1,000")
    fill("100000000")
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "table#intervals"), "the list")
    got = cp.aws("get-bandwidth-rate-limit-schedule", "--gateway-arn", State.arn,
                 region=REGION)["BandwidthRateLimitIntervals"]
    assert got == [{"AverageUploadRateLimitInBitsPerSec": 100_000_000, "StartHourOfDay": 9,
                    "StartMinuteOfHour": 0, "EndHourOfDay": 17, "EndMinuteOfHour": 59,
                    "DaysOfWeek": [1, 3]}]
    week = browser.find_element(By.ID, "week")
    limited = week.find_elements(By.CSS_SELECTOR, "td.lim")
    assert len(limited) == 2 * 9  # Mon and Wed, 09:00-17:59
    assert browser.find_element(By.ID, "next-change").text != ""
    shot(browser, "schedule")
    # Edit it: end at 12:59, read back.
    browser.find_element(By.CSS_SELECTOR, "#intervals a[href*='edit=0']").click()
    end = until(browser, lambda d: d.find_element(By.ID, "f-EndHourOfDay"), "the edit form")
    end.clear()
    end.send_keys("12", Keys.ENTER)
    until(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "td.lim")) == 2 * 4,
          "the edited week")
    got = cp.aws("get-bandwidth-rate-limit-schedule", "--gateway-arn", State.arn,
                 region=REGION)["BandwidthRateLimitIntervals"]
    assert got[0]["EndHourOfDay"] == 12
    # Phone width: the page itself does not scroll sideways (the week table does, inside).
    browser.set_window_size(390, 844)
    try:
        wide = browser.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth")
        assert wide <= 0, browser.execute_script(
            "return [...document.querySelectorAll('body *')].filter(e => "
            "!e.closest('.table-wrap') && "
            "e.getBoundingClientRect().right > window.innerWidth + 1).slice(0, 8)"
            ".map(e => e.tagName + '.' + e.className + '#' + e.id)")
        shot(browser, "schedule-phone")
    finally:
        browser.set_window_size(1280, 800)
    browser.find_element(By.CSS_SELECTOR, "button[aria-label='Remove interval 1']").click()
    until(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, "td.lim"), "removal")
    assert cp.aws("get-bandwidth-rate-limit-schedule", "--gateway-arn", State.arn,
                  region=REGION)["BandwidthRateLimitIntervals"] == []


def test_import_a_hypervisor_and_connect_the_gateway(browser: WebDriver,
                                                    cp: ControlPlane) -> None:
    assert State.arn
    browser.get(f"{cp.url}/console/hypervisors")
    browser.find_element(By.ID, "f-Name").send_keys("lab-esx")
    browser.find_element(By.ID, "f-Host").send_keys("192.0.2.30")
    browser.find_element(By.ID, "f-Username").send_keys("backup")
    browser.find_element(By.ID, "f-Password").send_keys("secret", Keys.ENTER)
    until(browser, lambda d: "/console/hypervisor?arn=" in d.current_url, "the hypervisor page")
    listed = cp.aws("list-hypervisors", region=REGION)["Hypervisors"]
    assert [(h["Name"], h["Host"]) for h in listed] == [("lab-esx", "192.0.2.30")]
    shot(browser, "hypervisor")
    browser.get(f"{cp.url}/console/gateway?arn={State.arn}")
    browser.find_element(By.CSS_SELECTOR, "#hypervisor button[type=submit]").click()
    until(browser, lambda d: "Connected to lab-esx" in d.find_element(By.ID, "hypervisor").text,
          "the connected hypervisor")
    got = cp.aws("get-gateway", "--gateway-arn", State.arn, region=REGION)["Gateway"]
    assert listed[0]["HypervisorArn"].endswith("/" + got["HypervisorId"])
    browser.find_element(By.CSS_SELECTOR, "#hypervisor button[type=submit]").click()  # off
    until(browser, lambda d: "Connected to" not in d.find_element(By.ID, "hypervisor").text,
          "the disconnection")


def test_csrf_from_another_origin_is_refused(browser: WebDriver, cp: ControlPlane) -> None:
    """A page on another port of the same host (so the SameSite cookie IS sent) posts a
    rename to the console: only the missing CSRF token stops it."""
    assert State.arn
    attack = (
        "<!doctype html><form id=f method=post action='" + cp.url + "/console/gateway/rename'>"
        "<input name=arn value='" + State.arn + "'><input name=GatewayDisplayName value=pwned>"
        "</form><script>document.getElementById('f').submit()</script>").encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(attack)))
            self.end_headers()
            self.wfile.write(attack)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
        until(browser, lambda d: "/console/gateway/rename" in d.current_url, "the forged post")
        assert "CSRF check failed" in browser.page_source
    finally:
        server.shutdown()
        server.server_close()
    got = cp.aws("get-gateway", "--gateway-arn", State.arn, region=REGION)
    assert got["Gateway"]["GatewayDisplayName"] == "renamed-gw"


def test_delete_with_the_warning_and_confirmation(browser: WebDriver, cp: ControlPlane,
                                                  appliance: Appliance) -> None:
    assert State.arn
    browser.get(f"{cp.url}/console/gateway?arn={State.arn}")
    browser.find_element(By.LINK_TEXT, "Delete…").click()
    warning = until(browser, lambda d: d.find_element(By.CSS_SELECTOR, "p.warning"), "warning")
    assert "You cannot reactivate a deleted gateway" in warning.text
    button = browser.find_element(By.CSS_SELECTOR, "button.danger")
    button.click()  # not confirmed: the browser's required checkbox stops it
    assert "/gateway/delete" in browser.current_url
    assert cp.aws("list-gateways", region=REGION)["Gateways"]
    browser.find_element(By.ID, "f-confirm").send_keys(Keys.SPACE)  # keyboard tick
    browser.find_element(By.CSS_SELECTOR, "button.danger").click()
    until(browser, lambda d: d.current_url.endswith("/console/gateways"), "the list")
    assert "was deleted" in browser.find_element(By.CSS_SELECTOR, "p.flash").text
    assert cp.aws("list-gateways", region=REGION)["Gateways"] == []
