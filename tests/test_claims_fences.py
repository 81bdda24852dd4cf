"""Each fence of completion, tried alone with a stale claim token; and the worker's deadline
monitor, the backstop for a run that does not stop by itself."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.db import transaction

from kernel.context import RunControl
from kernel.models import User
from schedules import claims, executor
from schedules.claims import ClaimLost, Outcome
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Job
from schedules.worker import STUCK_AFTER_DEADLINE_SECS, Running, Worker

S = ExecutionStatus
pytestmark = pytest.mark.django_db


@pytest.fixture
def claimed(make_user: Callable[..., User]) -> tuple[Job, claims.Claim]:
    job = Job.objects.create(
        owner=make_user(),
        name="job",
        prompt="say hi",
        schedule_type="interval",
        interval_secs=3600,
        next_run_at=db_now() - timedelta(seconds=1),
    )
    [claim] = claims.claim_due("w1", 1).claims
    job.refresh_from_db()
    return job, claim


def _job_fields(job_id: int) -> dict[str, Any]:
    return Job.objects.filter(pk=job_id).values().get()


def _execution_fields(execution_id: int) -> dict[str, Any]:
    return Execution.objects.filter(pk=execution_id).values().get()


def _complete_alone(claim: claims.Claim) -> tuple[dict[str, Any], dict[str, Any]]:
    """Complete `claim` through `complete_many`, asserting it is reported lost; returns the job
    and execution rows as they were before."""
    before = _job_fields(claim.job_id), _execution_fields(claim.execution_id)
    assert claims.complete_many([(claim, Outcome(S.SUCCEEDED, output="late"))]) == [S.SUPERSEDED]
    return before


def test_the_job_lock_is_fenced_on_the_token(claimed) -> None:
    job, claim = claimed
    # Another worker took the job over; the execution row still carries this claim's token, so
    # only the job lock's fence keeps this completion out.
    Job.objects.filter(pk=job.pk).update(claim_token=uuid.uuid4())
    before_job, _ = _complete_alone(claim)
    assert _job_fields(job.pk) == before_job
    assert Execution.objects.get(pk=claim.execution_id).status == S.SUPERSEDED


def test_the_execution_update_is_fenced_on_the_token(claimed) -> None:
    job, claim = claimed
    # The job is still held under this token, but the execution row carries another one: only
    # the set-based UPDATE's token fence keeps it (and so the job) unchanged.
    Execution.objects.filter(pk=claim.execution_id).update(claim_token=uuid.uuid4())
    before_job, before_execution = _complete_alone(claim)
    assert _job_fields(job.pk) == before_job
    assert _execution_fields(claim.execution_id) == before_execution


def test_the_execution_update_is_fenced_on_running(claimed) -> None:
    job, claim = claimed
    # Same token, job held, but the execution row is already final.
    Execution.objects.filter(pk=claim.execution_id).update(status=S.FAILED, error="first")
    before_job, before_execution = _complete_alone(claim)
    assert _job_fields(job.pk) == before_job
    assert _execution_fields(claim.execution_id) == before_execution


def test_the_job_update_is_fenced_on_the_token(claimed) -> None:
    job, claim = claimed
    # `complete_many` reaches the job update only with the job locked under this token, so this
    # fence is tried on its own: moving the job on under a stale token raises and writes nothing.
    Job.objects.filter(pk=job.pk).update(claim_token=uuid.uuid4())
    before_job = _job_fields(job.pk)
    with pytest.raises(ClaimLost), transaction.atomic():
        claims.move_on(
            job, claims._execution_of(claim), claim.token, Outcome(S.SUCCEEDED), db_now()
        )
    assert _job_fields(job.pk) == before_job


def test_a_stale_claim_in_a_batch_leaves_the_others_completed(claimed, make_user) -> None:
    job, stale = claimed
    Job.objects.create(
        owner=make_user(),
        name="held",
        prompt="p",
        schedule_type="interval",
        interval_secs=3600,
        next_run_at=db_now() - timedelta(seconds=1),
    )
    [held] = claims.claim_due("w1", 1).claims
    Job.objects.filter(pk=job.pk).update(claim_token=uuid.uuid4())
    before_job = _job_fields(job.pk)
    statuses = claims.complete_many([(stale, Outcome(S.SUCCEEDED)), (held, Outcome(S.SUCCEEDED))])
    assert statuses == [S.SUPERSEDED, S.SUCCEEDED]
    assert _job_fields(job.pk) == before_job
    assert Job.objects.get(pk=held.job_id).claim_token is None


def _watched(worker: Worker, claim: claims.Claim, deadline: float | None) -> RunControl:
    control = RunControl(deadline)
    worker.running[claim.execution_id] = Running(claim, control, time.monotonic())
    return control


def test_the_monitor_cancels_a_run_past_its_deadline_with_the_timeout_reason(claimed) -> None:
    _, claim = claimed
    worker = Worker(worker_id="monitor-test")
    control = _watched(worker, claim, time.monotonic() - 0.01)
    assert worker.handle_one_watch()
    assert control.cancelled and control.reason == executor.DEADLINE
    outcome = executor._stopped(claim, control, control.reason or "")
    assert outcome.status == S.TIMED_OUT


def test_the_monitor_leaves_a_run_within_its_deadline_alone(claimed) -> None:
    _, claim = claimed
    worker = Worker(worker_id="monitor-test")
    control = _watched(worker, claim, time.monotonic() + 60)
    assert not worker.handle_one_watch()
    assert not control.cancelled


def test_the_lease_of_a_run_stuck_past_its_deadline_is_no_longer_renewed(
    claimed, make_user
) -> None:
    _, stuck = claimed
    Job.objects.create(
        owner=make_user(),
        name="live",
        prompt="p",
        schedule_type="interval",
        interval_secs=3600,
        next_run_at=db_now() - timedelta(seconds=1),
    )
    [live] = claims.claim_due("w1", 1).claims
    short = db_now() + timedelta(seconds=5)
    Job.objects.filter(pk__in=[stuck.job_id, live.job_id]).update(lease_expires_at=short)
    worker = Worker(worker_id="monitor-test")
    _watched(worker, stuck, time.monotonic() - STUCK_AFTER_DEADLINE_SECS - 1)
    _watched(worker, live, time.monotonic() + 60)
    worker.handle_one_renewal()
    assert Job.objects.get(pk=stuck.job_id).lease_expires_at == short
    assert Job.objects.get(pk=live.job_id).lease_expires_at > short


@pytest.mark.parametrize("finished", [False, True])
def test_a_renewal_that_meets_a_run_just_recorded_does_not_call_it_lost(
    claimed, caplog, finished
) -> None:
    # Seen under load: the completer wrote a batch (releasing its claims) while the lease
    # monitor was renewing the runs it had listed just before; each was logged "lost its
    # claim". A run whose outcome is with the completer has nothing left to lose.
    _, claim = claimed
    worker = Worker(worker_id="monitor-test")
    control = _watched(worker, claim, time.monotonic() + 60)
    worker.running[claim.execution_id].finished = finished
    claims.complete(claim, claims.Outcome(status=S.SUCCEEDED, output="ok"))
    with caplog.at_level("WARNING", logger="picobot.worker"):
        all_held = worker.handle_one_renewal()
    lost = [r for r in caplog.records if "lost its claim" in r.getMessage()]
    if finished:
        assert all_held and not lost and not control.cancelled
    else:  # a run still going whose claim is gone is stopped, as before
        assert not all_held and len(lost) == 1 and control.reason == executor.CLAIM_LOST
