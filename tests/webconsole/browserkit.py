"""Helpers of the browser tests: starting headless Chromium, waiting for a page state,
screenshots. Debian's chromium and chromium-driver, driven by selenium."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# The screenshots docs/webconsole.md shows: every run of the browser tests takes them anew,
# so they stay true to the pages.
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "webconsole"
WAIT = 15.0
HAVE_BROWSER = Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


@contextmanager
def chromium() -> Iterator[WebDriver]:
    """Headless Chromium at 1280x800 with a fresh profile and no background networking
    (this machine's closed network refuses it), stopped and removed at the end."""
    profile = tempfile.mkdtemp(prefix="chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1280,800", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def until(driver: WebDriver, predicate: Callable[[WebDriver], Any], what: str,
          timeout: float = WAIT) -> Any:
    """`predicate` once it holds; on a timeout the failure shows the page it was on.

    An element the page re-rendered between finding and reading it is tried again: as a
    stale reference, or as chromedriver's "Node with given id does not belong to the
    document", which it reports as a bare WebDriverException when the swap lands inside
    its own call."""

    def attempt(d: WebDriver) -> Any:
        try:
            return predicate(d)
        except WebDriverException as exc:
            if "does not belong to the document" in (exc.msg or ""):
                return False
            raise

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05, ignored_exceptions=(
            NoSuchElementException, StaleElementReferenceException)).until(attempt)
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what} at {driver.current_url}: "
                             f"{driver.find_element(By.TAG_NAME, 'main').text}") from None


def shot(driver: WebDriver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def error_beside(driver: WebDriver, field_id: str) -> str:
    return str(driver.find_element(By.ID, f"{field_id}-err").text)


def sign_in(driver: WebDriver, base: str, password: str) -> None:
    driver.get(f"{base}/console/signin")
    driver.find_element(By.ID, "f-password").send_keys(password, Keys.ENTER)
    until(driver, lambda d: d.current_url.endswith("/console/gateways"), "signing in")


def switch_region(driver: WebDriver, region: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "region")).select_by_value(region)
    driver.find_element(By.CSS_SELECTOR, "form.region button").click()
    until(driver, lambda d: d.find_element(By.ID, "region").get_attribute("value") == region,
          "the region switch")
