"""Per-user quotas: schedules held, schedules created per window, executions per window."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from django.utils import timezone

from kernel.models import User, system_principal
from schedules.models import Execution, ExecutionStatus, Job
from schedules.quotas import (
    QuotaExceeded,
    can_run,
    check_can_create,
    check_can_run,
    runs_in_window,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def small_quotas(picobot_config: Callable[..., None]) -> None:
    picobot_config(
        "scheduler",
        max_jobs_per_user=2,
        max_created_per_window=3,
        max_runs_per_window=2,
        window_secs=3600,
    )


def make_job(owner: User, **extra: object) -> Job:
    return Job.objects.create(
        owner=owner,
        name="job",
        prompt="hello",
        schedule_type="interval",
        interval_secs=3600,
        **extra,
    )


def start(job: Job, started_at: object, status: str = ExecutionStatus.SUCCEEDED) -> Execution:
    return Execution.objects.create(
        job=job, scheduled_for=started_at, started_at=started_at, status=status
    )


def test_a_user_may_not_hold_more_than_max_jobs(
    make_user: Callable[..., User], small_quotas: None
) -> None:
    owner = make_user()
    now = timezone.now()
    check_can_create(owner, now)
    make_job(owner)
    make_job(owner)
    with pytest.raises(QuotaExceeded) as caught:
        check_can_create(owner, now)
    assert caught.value.quota == "max_jobs_per_user"
    assert "max_jobs_per_user" in str(caught.value)


def test_deleted_jobs_are_not_held_but_count_as_created(
    make_user: Callable[..., User], small_quotas: None
) -> None:
    owner = make_user()
    now = timezone.now()
    make_job(owner, deleted_at=now)
    make_job(owner, deleted_at=now)
    check_can_create(owner, now)  # none held
    make_job(owner)
    Job.objects.filter(owner=owner).update(deleted_at=now)
    with pytest.raises(QuotaExceeded) as caught:
        check_can_create(owner, now)
    assert caught.value.quota == "max_created_per_window"


def test_the_creation_window_rolls(make_user: Callable[..., User], small_quotas: None) -> None:
    owner = make_user()
    now = timezone.now()
    for _ in range(3):
        make_job(owner, deleted_at=now)
    with pytest.raises(QuotaExceeded):
        check_can_create(owner, now)
    Job.objects.filter(owner=owner).update(created_at=now - timedelta(seconds=3601))
    check_can_create(owner, now)


def test_quotas_are_per_user(make_user: Callable[..., User], small_quotas: None) -> None:
    busy, other = make_user(), make_user()
    make_job(busy)
    make_job(busy)
    check_can_create(other, timezone.now())


def test_the_system_principal_is_exempt(small_quotas: None, db: None) -> None:
    system = system_principal()
    now = timezone.now()
    jobs = [make_job(system) for _ in range(5)]
    check_can_create(system, now)
    for i, job in enumerate(jobs):
        start(job, now - timedelta(seconds=i))
    assert can_run(system.pk, now)
    assert can_run(system.pk, now, is_system=True)


def test_runs_are_counted_in_a_rolling_window_at_claim(
    make_user: Callable[..., User], small_quotas: None
) -> None:
    owner = make_user()
    job = make_job(owner)
    now = timezone.now()
    start(job, now - timedelta(seconds=4000))  # outside the window
    start(job, now - timedelta(seconds=10), ExecutionStatus.SKIPPED)  # never ran
    assert runs_in_window(owner.pk, now) == 0
    start(job, now - timedelta(seconds=100), ExecutionStatus.FAILED)
    assert can_run(owner.pk, now)
    start(job, now - timedelta(seconds=50), ExecutionStatus.RUNNING)
    assert runs_in_window(owner.pk, now) == 2
    assert not can_run(owner.pk, now)
    assert not can_run(owner.pk, now, is_system=False)
    with pytest.raises(QuotaExceeded) as caught:
        check_can_run(owner.pk, now)
    assert caught.value.quota == "max_runs_per_window"
    # An hour later the window has rolled past them.
    assert can_run(owner.pk, now + timedelta(seconds=3600))


def test_runs_of_deleted_jobs_still_count(
    make_user: Callable[..., User], small_quotas: None
) -> None:
    owner = make_user()
    now = timezone.now()
    job = make_job(owner, deleted_at=now)
    start(job, now - timedelta(seconds=5))
    start(job, now - timedelta(seconds=4))
    assert not can_run(owner.pk, now)
    assert can_run(make_user().pk, now)
