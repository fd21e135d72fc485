"""Jobs, recovery points and restore in a real headless Chromium.

The control plane runs in-process (tests/controlplane/test_job_link.py's harness) and a
gateway is played over the real signed job link, so the test decides when the job
advances: the browser must show each step of the progress without a reload (console.js
polls /console/jobs/live), a job is stopped from the page, and a restore is started from
the form the console builds from the point's restore metadata.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select

from controlplane.webconsole import auth
from tests.controlplane.test_job_link import (
    DISK,
    ROLE,
    A,
    B,
    BackupPlane,
    Setup,
    backup_plane,
    manifest_doc,
    one_gateway,
)
from tests.webconsole import browserkit
from tests.webconsole.browserkit import error_beside, shot, until

PASSWORD = "jobs page password"
MiB = 1 << 20
pytestmark = [pytest.mark.browser, pytest.mark.timeout(90)]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    with backup_plane(tmp_path / "state") as bp:
        auth.write_password_file(bp.plane.state_dir / auth.PASSWORD_FILE, PASSWORD)
        yield one_gateway(bp)


def progress_of(driver: WebDriver, job_id: str) -> tuple[str, str]:
    row = driver.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{job_id}"]')
    return (row.find_element(By.CSS_SELECTOR, "td.state").text,
            row.find_element(By.TAG_NAME, "progress").get_attribute("value") or "")


def start_backup(driver: WebDriver, bp: BackupPlane, vm: str) -> str:
    driver.get(f"{bp.url}/console/jobs")
    Select(driver.find_element(By.ID, "f-ResourceArn")).select_by_visible_text(vm)
    Select(driver.find_element(By.ID, "f-BackupVaultName")).select_by_value("vault1")
    role = driver.find_element(By.ID, "f-IamRoleArn")
    role.clear()
    role.send_keys(ROLE, Keys.ENTER)
    flash = until(driver, lambda d: d.find_element(By.CSS_SELECTOR, "p.flash"), "the flash")
    return str(flash.text.split()[2])  # "Backup job ID was started."


def test_backup_progress_stop_and_restore(browser: WebDriver, setup: Setup) -> None:
    bp, gw = setup.bp, setup.gw
    browserkit.sign_in(browser, bp.url, PASSWORD)
    browserkit.switch_region(browser, "us-west-2")

    # A refusal of StartBackupJob is shown beside its field, in the API's words.
    browser.get(f"{bp.url}/console/jobs")
    browser.find_element(By.ID, "f-IamRoleArn").send_keys("not-a-role", Keys.ENTER)
    until(browser, lambda d: d.find_elements(By.ID, "f-IamRoleArn-err"), "the role error")
    assert "IamRoleArn" in error_beside(browser, "f-IamRoleArn")

    job_id = start_backup(browser, bp, "web")
    assert bp.state(job_id)["State"] == "RUNNING"
    browser.execute_script("window.notReloaded = true")
    assert gw.link.job(job_id, "started", incremental=False, note="",
                       backupSizeInBytes=DISK).status == 200
    for percent in (30.0, 60.0):
        assert gw.link.job(job_id, "progress", bytesTransferred=int(DISK * percent / 100),
                           backupSizeInBytes=DISK, percentDone=percent).body == {"abort": False}
        until(browser, lambda d, p=percent: progress_of(d, job_id) == ("RUNNING", f"{p:g}"),
              f"the bar at {percent:g}%")
    assert browser.execute_script("return window.notReloaded") is True  # live, no reload
    shot(browser, "jobs")
    absent = gw.link.job(job_id, "missing", chunks=[A[0], B[0]]).body["missing"]
    for cid, data in (A, B):
        if cid in absent:
            assert gw.link.put_chunk(job_id, data).status == 201
    done = gw.link.job(job_id, "complete", incremental=False, checkpoint="cp-1",
                       manifest=manifest_doc([[0, 65536, A[0], 0], [4 * MiB, 65536, B[0], 0]]))
    assert done.status == 200, done.body
    until(browser, lambda d: progress_of(d, job_id) == ("COMPLETED", "100"), "completion")

    # Stop a second job from the page; the gateway confirms, the page follows.
    second = start_backup(browser, bp, "db")
    browser.find_element(By.CSS_SELECTOR, f"button[aria-label='Stop job {second}']").click()
    until(browser, lambda d: progress_of(d, second)[0] == "ABORTING", "the stopping job")
    assert bp.state(second)["State"] == "ABORTING"
    assert gw.link.job(second, "failed", message="stopped as asked", aborted=True).status == 200
    until(browser, lambda d: progress_of(d, second)[0] == "ABORTED", "the stopped job")

    # Restore the first point from the form built from its restore metadata.
    browser.get(f"{bp.url}/console/recovery-points?vault=vault1")
    browser.find_element(By.LINK_TEXT, "Restore…").click()
    name = until(browser, lambda d: d.find_element(By.ID, "f-meta-vmName"), "the restore form")
    assert name.get_attribute("value") == "web"  # the source's name: taken
    name.send_keys(Keys.ENTER)
    until(browser, lambda d: d.find_elements(By.ID, "f-meta-vmName-err"), "the name error")
    assert "already exists" in error_beside(browser, "f-meta-vmName")
    shot(browser, "restore")
    name = browser.find_element(By.ID, "f-meta-vmName")
    name.clear()
    name.send_keys("web-restored", Keys.ENTER)
    until(browser, lambda d: d.find_elements(By.ID, "restore-jobs"), "the jobs page")
    restores = bp.backup.list_restore_jobs()["RestoreJobs"]
    assert len(restores) == 1
    assert restores[0]["RestoreJobId"] in browser.find_element(By.ID, "restore-jobs").text
    jobs = gw.link.jobs()
    assert [j["restore"]["name"] for j in jobs if j["type"] == "RESTORE"] == ["web-restored"]
