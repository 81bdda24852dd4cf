"""The per-API-key throttle counts in the database: one rate for the whole service, whatever the
number of web processes, exact under concurrent requests, kept across restarts, with one row per
key and scope (a new window overwrites the old one)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kernel.models import ApiKey, ThrottleWindow
from kernel.rest import ApiKeyThrottle, count_request
from tests.worker_support import ROOT, database_url

URL = "/api/v1/schedules"


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The throttle's clock: set `clock[0]` to the Unix time the next request is made at."""
    now = [60.0 * 29_000_000 + 10]  # 10 s into a minute
    monkeypatch.setattr(ApiKeyThrottle, "timer", staticmethod(lambda: now[0]))
    yield now


@pytest.fixture
def rate(settings: Any) -> Any:
    def set_rate(value: str) -> None:
        settings.REST_FRAMEWORK = {
            **settings.REST_FRAMEWORK,
            "DEFAULT_THROTTLE_RATES": {"api_key": value},
        }

    return set_rate


@pytest.mark.django_db
def test_the_429_says_when_the_window_ends_and_the_next_window_counts_afresh(
    make_user, api_client_for, clock, rate
) -> None:
    rate("2/minute")
    client = api_client_for(make_user(grant=["schedule:*"]))
    assert [client.get(URL).status_code for _ in range(2)] == [200, 200]
    for _ in range(3):
        throttled = client.get(URL)
        assert throttled.status_code == 429
        assert "detail" in throttled.json()
        assert throttled.headers["Retry-After"] == "50"
    clock[0] += 49.5
    assert client.get(URL).headers["Retry-After"] == "1"
    clock[0] += 0.5  # the next minute
    assert [client.get(URL).status_code for _ in range(3)] == [200, 200, 429]
    # One row for the key, overwritten by each window; refused requests are not counted.
    (row,) = ThrottleWindow.objects.all()
    assert (row.scope, row.window_start_secs, row.hits) == ("api_key", clock[0], 2)


@pytest.mark.django_db
def test_a_host_whose_clock_lags_counts_in_the_current_window(
    make_user, api_client_for, clock, rate
) -> None:
    rate("2/minute")
    client = api_client_for(make_user(grant=["schedule:*"]))
    assert [client.get(URL).status_code for _ in range(2)] == [200, 200]
    clock[0] -= 60  # another web host, a minute behind, must not start the window again
    assert client.get(URL).status_code == 429
    assert ThrottleWindow.objects.get().hits == 2


@pytest.mark.django_db
def test_keys_and_scopes_count_separately(make_user) -> None:
    user = make_user()
    first, _ = ApiKey.issue(user)
    second, _ = ApiKey.issue(user)
    assert count_request(first.pk, "chat", 600, 1)
    assert not count_request(first.pk, "chat", 600, 1)
    assert count_request(first.pk, "api_key", 600, 1)
    assert count_request(second.pk, "chat", 600, 1)
    assert not count_request(second.pk, "chat", 600, 0)
    user.delete()  # the rows go with the keys
    assert ThrottleWindow.objects.count() == 0


CLIENT = """
import sys, time
import django
django.setup()
from django.conf import settings
from django.test import Client, override_settings
from django.test.utils import setup_test_environment
from django.urls import resolve
setup_test_environment()
secret, rate, count, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
rates = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"api_key": rate}}
override_settings(REST_FRAMEWORK=rates).enable()
client = Client(HTTP_AUTHORIZATION="Bearer " + secret)
resolve("/api/v1/schedules")  # imports the views before the start
time.sleep(max(0.0, go - time.time()))
for _ in range(count):
    response = client.get("/api/v1/schedules")
    print(response.status_code, response.headers.get("Retry-After", "-"), flush=True)
"""

PROCESSES = 4
REQUESTS_EACH = 4
RATE = 6  # per hour: more than any one process makes, fewer than all of them together


def run_clients(secret: str, count: int, processes: int, start_in_secs: float) -> list[str]:
    """Each process's `count` requests as "status retry-after" lines, all processes starting
    their requests at the same instant."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": database_url()}  # fmt: skip
    go = time.time() + start_in_secs
    args = [secret, f"{RATE}/hour", str(count), str(go)]
    running = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    results = [process.communicate(timeout=120) for process in running]
    lines = [line for out, _ in results for line in out.split()[::2]]
    retry_afters = [line for out, _ in results for line in out.split()[1::2]]
    assert len(lines) == count * processes, results
    return [f"{code} {wait}" for code, wait in zip(lines, retry_afters, strict=True)]


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_rate_holds_across_processes_requesting_at_once_and_across_restarts(
    make_user,
) -> None:
    user = make_user(grant=["schedule:*"])
    for _ in range(2):  # again if the hour ended during the run (its window started afresh)
        hour = time.time() // 3600
        _, secret = ApiKey.issue(user)
        answers = run_clients(secret, REQUESTS_EACH, PROCESSES, start_in_secs=4.0)
        # A process started afresh (a restart) finds the key's window full.
        (again,) = run_clients(secret, 1, 1, start_in_secs=0.0)
        if time.time() // 3600 == hour:
            break
    codes = [answer.split()[0] for answer in answers]
    assert sorted(set(codes)) == ["200", "429"], answers
    assert codes.count("200") == RATE, answers
    assert all(int(a.split()[1]) > 0 for a in answers if a.startswith("429")), answers
    assert again.startswith("429 ") and int(again.split()[1]) > 0, again
    assert ThrottleWindow.objects.filter(api_key__user=user).count() <= 2
