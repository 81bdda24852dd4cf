"""Heartbeats at run time: active hours, the system principal's limits, workers starting at once,
and an occurrence a clock change brought closer than the minimum."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import transaction

from kernel.models import system_principal
from picobot_site.config import parse_config
from schedules import claims
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Job
from schedules.timing import next_after, spec_of
from tests.worker_support import ROOT, Workers, due_job, wait_until

S = ExecutionStatus

SEED = """
[heartbeats]
enabled = true
default_interval_secs = 300

[[heartbeats.prompts]]
name = "health_check"
prompt = "Check system health and report issues"
interval_secs = 60

[[heartbeats.prompts]]
name = "daily_summary"
prompt = "Generate daily summary"
cron = "0 0 18 * * *"
timezone = "America/New_York"
"""


@pytest.fixture
def heartbeats_file() -> Iterator[Callable[[str], None]]:
    original = settings.PICOBOT

    def use(text: str) -> None:
        heartbeats = parse_config(tomllib.loads(text)).heartbeats
        settings.PICOBOT = dataclasses.replace(settings.PICOBOT, heartbeats=heartbeats)

    yield use
    settings.PICOBOT = original


@pytest.fixture
def workers(tmp_path: Path, model_server: Any) -> Iterator[Callable[..., Workers]]:
    made: list[Workers] = []

    def make(**options: Any) -> Workers:
        made.append(Workers(tmp_path, model_server.base_url, **options))
        return made[-1]

    yield make
    for group in made:
        group.stop_all()


def hhmm(when: datetime) -> str:
    return f"{when:%H:%M}"


def make_due(*names: str) -> None:
    Job.objects.filter(heartbeat_name__in=names).update(
        next_run_at=db_now() - timedelta(milliseconds=10)
    )


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_outside_active_hours_the_occurrence_is_skipped_without_a_model_call(
    heartbeats_file, workers, model_server
):
    model_server.reply_always("all well")
    now = db_now()
    zone = "Asia/Kathmandu"  # a +05:45 zone: the window is in the prompt's zone, not UTC
    local = now.astimezone(ZoneInfo(zone))
    outside = f"{hhmm(local + timedelta(hours=2))}-{hhmm(local + timedelta(hours=3))}"
    inside = f"{hhmm(local - timedelta(hours=1))}-{hhmm(local + timedelta(hours=2))}"
    text = f"""
[heartbeats]
enabled = true

[[heartbeats.prompts]]
name = "asleep"
prompt = "Check the night shift"
interval_secs = 600
timezone = "{zone}"
active_hours = "{outside}"

[[heartbeats.prompts]]
name = "awake"
prompt = "Check the day shift"
interval_secs = 600
timezone = "{zone}"
active_hours = "{inside}"
"""
    heartbeats_file(text)
    call_command("loadheartbeats")
    make_due("asleep", "awake")
    asleep = Job.objects.get(heartbeat_name="asleep")
    group = workers(sections=text)
    assert group.run_once() == 0
    skipped = Execution.objects.get(job=asleep)
    assert skipped.status == S.SKIPPED
    assert f"outside active hours {outside} ({zone})" in skipped.error
    assert skipped.started_at is not None and skipped.finished_at is not None
    moved = Job.objects.get(pk=asleep.pk)
    assert moved.next_run_at == asleep.next_run_at + timedelta(seconds=600)
    assert moved.claim_token is None and moved.enabled
    awake = Execution.objects.get(job__heartbeat_name="awake")
    assert (awake.status, awake.output) == (S.SUCCEEDED, "all well")
    # One model call: the job inside its hours. The prompt it carried says which.
    assert len(model_server.requests) == 1
    assert "Check the day shift" in str(model_server.requests[0])


@pytest.mark.django_db
def test_active_hours_wrap_past_midnight_in_the_prompts_zone(make_user):
    owner = make_user()
    zone = "America/New_York"
    job = due_job(owner, active_hours="22:00-06:00", timezone=zone)
    spec = spec_of(job)
    for local_hour, runs in [
        (23, True),
        (2, True),
        (5, True),
        (6, False),
        (12, False),
        (21, False),
    ]:
        when = datetime(2027, 1, 15, local_hour, 30, tzinfo=ZoneInfo(zone))
        plan = claims.plan_due(spec, when, when, job.misfire)
        assert (claims.skip_reason(job, spec, plan) == "") is runs, local_hour


@pytest.mark.django_db
def test_the_system_principal_is_exempt_from_quotas_but_not_from_max_concurrent(
    make_user, picobot_config
):
    picobot_config("scheduler", max_runs_per_window=1, max_concurrent=2, max_jobs_per_user=1)
    system = system_principal()
    user = make_user()
    # Over every per-user quota: more jobs held than allowed, and a run already in the window.
    beats = [due_job(system, name=f"beat {i}") for i in range(3)]
    Execution.objects.create(
        job=beats[0], scheduled_for=db_now() - timedelta(hours=2), started_at=db_now(),
        status=S.SUCCEEDED, finished_at=db_now(),
    )  # fmt: skip
    first = claims.claim_due("w", 5)
    assert len(first.claims) == 2 and first.deferred == 0  # the global limit, not a quota
    assert {c.owner_id for c in first.claims} == {system.pk}
    users_job = due_job(user)
    assert claims.claim_due("w", 5).claims == []  # max_concurrent is full: nobody else runs
    for claim in first.claims:
        claims.complete(claim, claims.Outcome(S.SUCCEEDED))
    picobot_config("scheduler", max_concurrent=4)
    later = claims.claim_due("w", 5)
    assert {c.job_id for c in later.claims} == {beats[2].pk, users_job.pk}


@pytest.mark.django_db
def test_an_occurrence_a_clock_change_brought_closer_than_the_minimum_is_recorded_skipped(
    make_user, picobot_config
):
    picobot_config("scheduler", min_interval_secs=3600)
    job = due_job(make_user(), schedule_type="cron", cron="1 2,3 * * *", interval_secs=None,
                  timezone="America/New_York")  # fmt: skip
    # 2027-03-14: 02:01 does not exist and runs at 03:00 EDT; 03:01 follows 60 s later.
    close = datetime(2027, 3, 14, 7, 1, tzinfo=UTC)
    token = "7f3c8a52-0d4e-4f7b-9a51-4d1d8c1e2b3a"
    Job.objects.filter(pk=job.pk).update(next_run_at=close, claim_token=token)
    held = Job.objects.select_related("owner").get(pk=job.pk)
    now = close + timedelta(seconds=1)
    with transaction.atomic():
        started = claims._start(held, now)
    assert started is None
    [skipped] = Execution.objects.filter(job=job)
    assert (skipped.status, skipped.scheduled_for) == (S.SKIPPED, close)
    assert "only 60 s after the occurrence at 2027-03-14T07:00:00+00:00" in skipped.error
    moved = Job.objects.get(pk=job.pk)
    assert moved.next_run_at == next_after(spec_of(job), close)
    assert moved.claim_token is None
    # The earlier of the two (03:00 EDT) runs.
    earlier = close - timedelta(seconds=60)
    Job.objects.filter(pk=job.pk).update(next_run_at=earlier, claim_token=token)
    held = Job.objects.select_related("owner").get(pk=job.pk)
    with transaction.atomic():
        claim = claims._start(held, earlier)
    assert claim is not None and claim.scheduled_for == earlier


# Each process loads the heartbeats when a file appears, so the loads start together.
RACING_LOAD = """
import sys, time
from pathlib import Path
import django
django.setup()
from django.core.management import call_command
from django.db import connection
connection.ensure_connection()
print("ready", flush=True)
while not Path(sys.argv[1]).exists():
    time.sleep(0.002)
call_command("loadheartbeats")
"""


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_loads_racing_in_several_processes_end_with_one_job_per_name_and_no_error(
    workers, tmp_path
):
    group = workers(sections=SEED)
    go = tmp_path / "go"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACING_LOAD, str(go)],
            cwd=ROOT,
            env=group.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    for racer in racers:
        assert racer.stdout is not None and racer.stdout.readline().strip() == "ready"
    go.touch()
    outputs = [racer.communicate(timeout=60)[0] for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0, 0, 0], outputs
    names = list(Job.objects.values_list("heartbeat_name", flat=True).order_by("heartbeat_name"))
    assert names == ["daily_summary", "health_check"]
    created = [out for out in outputs if "heartbeats: create health_check" in out]
    assert len(created) == 1
    assert all("heartbeats: unchanged health_check" in out for out in outputs if out not in created)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_two_workers_starting_at_once_load_one_job_per_heartbeat_and_both_come_up(workers):
    group = workers(sections=SEED)
    processes = [group.start(worker_id=f"w{i}") for i in range(2)]
    for i in range(2):
        wait_until(lambda i=i: f"worker w{i} started" in group.logs(), 60, f"worker w{i}")
    names = list(Job.objects.values_list("heartbeat_name", flat=True).order_by("heartbeat_name"))
    assert names == ["daily_summary", "health_check"]
    assert all(p.poll() is None for p in processes)
    for process in processes:
        process.send_signal(signal.SIGTERM)
    assert [p.wait(timeout=30) for p in processes] == [0, 0]
    logs = group.logs()
    assert "Traceback" not in logs
    assert logs.count("heartbeats: create health_check") == 1
    assert logs.count("heartbeats: unchanged health_check") == 1
