"""A run whose cancel was requested never ends `succeeded`, even when its answer arrived first."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from schedules import claims
from schedules.claims import Outcome
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Job

S = ExecutionStatus
HELD_SECS = 60  # the scripted server's hold limit: every bound below is far under it


@pytest.fixture
def claimed(make_user: Callable[..., Any]) -> claims.Claim:
    Job.objects.create(
        owner=make_user(),
        name="job",
        prompt="say hi",
        schedule_type="interval",
        interval_secs=3600,
        next_run_at=db_now() - timedelta(seconds=1),
    )
    [claim] = claims.claim_due("w1", 1).claims
    return claim


@pytest.mark.django_db
def test_a_success_completed_after_a_cancel_request_is_recorded_cancelled(claimed) -> None:
    Execution.objects.filter(pk=claimed.execution_id).update(cancel_requested_at=db_now())
    status = claims.complete(claimed, Outcome(S.SUCCEEDED, output="the answer came first"))
    assert status == S.CANCELLED
    execution = Execution.objects.get(pk=claimed.execution_id)
    assert (execution.status, execution.error) == (S.CANCELLED, "cancelled on request")
    job = Job.objects.get(pk=claimed.job_id)
    assert job.claim_token is None and job.consecutive_failures == 0


@pytest.mark.django_db
@pytest.mark.parametrize("status", [S.FAILED, S.TIMED_OUT])
def test_other_endings_are_kept_when_a_cancel_was_requested(claimed, status: str) -> None:
    Execution.objects.filter(pk=claimed.execution_id).update(cancel_requested_at=db_now())
    assert claims.complete(claimed, Outcome(status, error="it went wrong")) == status


@pytest.mark.django_db
def test_in_a_batch_only_the_run_whose_cancel_was_requested_becomes_cancelled(
    claimed, make_user
) -> None:
    Job.objects.create(
        owner=make_user(),
        name="other",
        prompt="p",
        schedule_type="interval",
        interval_secs=3600,
        next_run_at=db_now() - timedelta(seconds=1),
    )
    [other] = claims.claim_due("w1", 1).claims
    Execution.objects.filter(pk=claimed.execution_id).update(cancel_requested_at=db_now())
    done = [(claimed, Outcome(S.SUCCEEDED, output="a")), (other, Outcome(S.SUCCEEDED, output="b"))]
    assert claims.complete_many(done) == [S.CANCELLED, S.SUCCEEDED]
    assert Execution.objects.get(pk=claimed.execution_id).status == S.CANCELLED
    assert Execution.objects.get(pk=other.execution_id).status == S.SUCCEEDED
