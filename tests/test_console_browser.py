"""The console in a real browser (Debian's chromium + chromium-driver, through Selenium):
log in, read the dashboard, filter executions, run a schedule now and watch its run appear.

Without chromium and chromedriver the test is skipped (with CI=true it fails: `.ci/run` installs
them). `PICOBOT_SCREENSHOTS=docs` also refreshes the screenshots the README shows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from kernel.models import ToolCall, User
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Job
from schedules.timing import first_run, spec_of
from tests.worker_support import ROOT, Workers, wait_until

S = ExecutionStatus
HOW_TO_INSTALL = (
    "the browser test needs Debian's chromium and chromium-driver: "
    "sudo apt-get install chromium chromium-driver"
)
PASSWORD = "a long operator password"
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def _browser_paths() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.fixture
def browser() -> Iterator[Any]:
    paths = _browser_paths()
    if paths is None:
        if os.environ.get("CI") == "true":
            pytest.fail(HOW_TO_INSTALL)
        pytest.skip(HOW_TO_INSTALL)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="picobot-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(paths[1]), options=options)
    driver.implicitly_wait(5)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    if os.environ.get("PICOBOT_SCREENSHOTS") == "docs":
        shutil.copy(path, ROOT / "docs" / name)


def history(job: Job, owner: User) -> None:
    """A day of runs, so the dashboard's chart has something to draw."""
    now = db_now()
    statuses = [S.SUCCEEDED] * 8 + [S.FAILED, S.SKIPPED, S.TIMED_OUT]
    rows = []
    for n in range(240):
        due = now - timedelta(minutes=6 * n + 3)
        status = statuses[(n * 7) % len(statuses)] if n % 13 else S.LOST
        rows.append(
            Execution(
                job=job,
                scheduled_for=due,
                started_at=due + timedelta(milliseconds=40 + n % 300),
                finished_at=due + timedelta(seconds=4),
                status=status,
                worker_id="web-1:4242",
                output="Nothing new." if status == S.SUCCEEDED else "",
                error="" if status == S.SUCCEEDED else f"the run ended {status}",
            )
        )
    Execution.objects.bulk_create(rows)


def test_an_operator_logs_in_reads_the_dashboard_filters_and_runs_a_job_now(
    browser, live_server, tmp_path, model_server, make_user
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    User.objects.create_superuser("operator", password=PASSWORD)
    owner = make_user("alice", grant=["shell:ls", "net:api.example.com"])
    job = Job.objects.create(
        owner=owner,
        name="Morning inbox summary",
        prompt="Summarise what arrived overnight.",
        schedule_type="cron",
        cron="30 7 * * 1-5",
        timezone="Europe/Paris",
        capabilities=["net:api.example.com", "shell:ls"],
    )
    job.next_run_at = first_run(spec_of(job), db_now())
    job.save()
    history(
        Job.objects.create(
            owner=owner,
            name="Hourly check",
            prompt="p",
            schedule_type="interval",
            interval_secs=360,
            next_run_at=db_now() + timedelta(minutes=3),
        ),
        owner,
    )
    model_server.reply_always("Two new messages, nothing urgent.")
    workers = Workers(tmp_path, model_server.base_url, tick_secs=0.5)
    try:
        workers.start(worker_id="web-1:4242")
        wait_until(lambda: workers_alive(), 60, "the worker to report")
        browser.get(f"{live_server.url}/admin/login/")
        browser.find_element(By.NAME, "username").send_keys("operator")
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
        # A click that submits a form returns before the next page: wait for it.
        wait_until(lambda: "/login/" not in browser.current_url, 30, "the login")
        assert "PicoBot operator console" in browser.page_source

        browser.find_element(By.LINK_TEXT, "Queue health dashboard").click()
        wait_until(lambda: browser.find_elements(By.ID, "workers-alive"), 30, "the dashboard")
        assert browser.find_element(By.ID, "workers-alive").text == "1"
        assert int(browser.find_element(By.ID, "failures").text) > 0
        assert browser.find_elements(By.CSS_SELECTOR, "svg.picobot-chart rect[fill]")
        screenshot(browser, tmp_path, "dashboard.png")

        browser.get(f"{live_server.url}/admin/schedules/execution/")
        browser.find_element(By.LINK_TEXT, "Failed").click()
        wait_until(lambda: "status__exact=failed" in browser.current_url, 30, "the filter")
        statuses = {e.text for e in browser.find_elements(By.CSS_SELECTOR, "td.field-status")}
        assert statuses == {"Failed"}

        # Long unbroken text (a path, a denied permission) wraps: no sideways scroll at 1400 px.
        long_text = "/srv/" + "x" * 600
        for execution in Execution.objects.all()[:3]:
            ToolCall.objects.create(
                execution=execution,
                user=owner,
                tool="filesystem_read",
                decision="denied",
                missing_permission=f"filesystem:read:{long_text}",
                arguments={"path": long_text},
                error=long_text,
            )
        for page in ("/admin/kernel/toolcall/", "/admin/schedules/execution/"):
            browser.get(live_server.url + page)
            overflow = browser.execute_script(
                "return document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 0, (page, overflow)

        browser.get(f"{live_server.url}/admin/schedules/job/")
        browser.find_element(By.LINK_TEXT, "Morning inbox summary").click()
        wait_until(lambda: "Next five runs" in browser.page_source, 30, "the schedule's page")
        assert "Europe/Paris" in browser.page_source and "T07:30:00+0" in browser.page_source
        browser.set_window_size(1400, 1500)
        screenshot(browser, tmp_path, "schedule.png")
        browser.set_window_size(1400, 1000)

        browser.get(f"{live_server.url}/admin/schedules/job/")
        row = browser.find_element(By.XPATH, "//tr[.//a[text()='Morning inbox summary']]")
        row.find_element(By.CSS_SELECTOR, "input.action-select").click()
        Select(browser.find_element(By.NAME, "action")).select_by_value("run_now")
        browser.find_element(By.NAME, "index").click()
        wait_until(
            lambda: "Run now: Morning inbox summary" in browser.page_source, 30, "the action"
        )

        def appeared() -> bool:
            browser.get(f"{live_server.url}/admin/schedules/execution/?job__id__exact={job.pk}")
            return "Two new messages" not in browser.page_source and bool(
                browser.find_elements(
                    By.XPATH, "//td[contains(@class,'field-status')][text()='Succeeded']"
                )
            )

        wait_until(appeared, 30, "the run to appear in the executions list")
        browser.find_element(By.CSS_SELECTOR, "th.field-id a").click()
        wait_until(
            lambda: "Two new messages, nothing urgent." in browser.page_source, 30, "the output"
        )
    finally:
        workers.stop_all()


def workers_alive() -> bool:
    from schedules.workers import alive

    return bool(alive())
