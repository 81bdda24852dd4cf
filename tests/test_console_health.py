"""The dashboard's numbers: lag percentiles and the hourly chart, computed by the database."""

from __future__ import annotations

from datetime import UTC, timedelta

import pytest

from schedules import health
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Job

S = ExecutionStatus
pytestmark = pytest.mark.django_db


@pytest.fixture
def job(make_user) -> Job:
    return Job.objects.create(
        owner=make_user(),
        name="hourly",
        prompt="say hi",
        schedule_type="interval",
        interval_secs=3600,
        next_run_at=db_now() + timedelta(hours=1),
    )


def started(job: Job, due_ago: timedelta, lag_secs: float, status: str = S.SUCCEEDED, **extra):
    due = db_now() - due_ago
    return Execution.objects.create(
        job=job,
        scheduled_for=due,
        started_at=due + timedelta(seconds=lag_secs),
        status=status,
        **extra,
    )


def test_lag_percentiles_interpolate_between_ranks_of_the_last_hours_first_attempts(job) -> None:
    for minutes, lag in enumerate([1.5, 2.0, 3.0, 4.0, 10.0], start=1):
        started(job, timedelta(minutes=minutes * 5), lag)
    started(job, timedelta(minutes=40), 500.0, attempt=2)  # a retry is not lag
    started(job, timedelta(minutes=45), 900.0, status=S.SKIPPED)  # no run, no lag
    started(job, timedelta(hours=3), 700.0)  # older than the hour

    p50, p95 = health.lag_percentiles(db_now())

    assert p50 == pytest.approx(3.0, abs=0.01)
    assert p95 == pytest.approx(4.0 + (10.0 - 4.0) * 0.8, abs=0.01)


def test_lag_percentiles_are_none_without_runs(job) -> None:
    assert health.lag_percentiles(db_now()) == (None, None)


def test_the_hourly_chart_counts_each_hour_and_status(job) -> None:
    now = db_now()
    this_hour = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    # Seconds after the hour's start, so each row stays in its hour whatever the minute now is.
    groups = [(0, S.SUCCEEDED, 2), (2, S.FAILED, 3), (2, S.SUCCEEDED, 1)]
    for group, (hours_ago, status, count) in enumerate(groups):
        hour = this_hour - timedelta(hours=hours_ago)
        for n in range(count):
            Execution.objects.create(
                job=job,
                scheduled_for=hour + timedelta(seconds=10 * group + n),
                started_at=hour + timedelta(seconds=10 * group + n + 1),
                status=status,
            )
    Execution.objects.create(  # outside the 24 hours charted
        job=job,
        scheduled_for=this_hour - timedelta(hours=30),
        started_at=this_hour - timedelta(hours=30),
        status=S.FAILED,
    )

    chart = health.hourly_chart(now)

    assert chart.hours[-1] == this_hour and len(chart.hours) == health.CHART_HOURS
    assert chart.counts[this_hour] == {"succeeded": 2}
    assert chart.counts[this_hour - timedelta(hours=2)] == {"failed": 3, "succeeded": 1}
    assert chart.total(health.FAILURES) == 3
    assert chart.peak == 4


def test_the_queue_state_counts_dead_notifications_only(job) -> None:
    from notifications.models import Notification

    for n, status in enumerate(["dead", "dead", "sent", "pending", "sending"]):
        Notification.objects.create(
            owner=job.owner,
            channel="console",
            kind="result",
            body="hello",
            status=status,
            next_attempt_at=db_now(),
            idempotency_key=f"key-{n}",
        )

    assert health.queue_state().dead_notifications == 2
