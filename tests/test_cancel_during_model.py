"""A cancel stops a run waiting for the model at once, and a run whose cancel was requested never
ends `succeeded`: in one process, through the claim protocol, and with a real `runworker`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from kernel.agent import run_agent
from kernel.context import Cancelled, RunControl, ToolContext
from kernel.permissions import CapabilitySet
from schedules import claims, lifecycle
from schedules.claims import Outcome
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Job
from tests.worker_support import Workers, due_job, wait_until

S = ExecutionStatus
HELD_SECS = 60  # the scripted server's hold limit: every bound below is far under it


@pytest.mark.django_db
def test_a_cancel_stops_the_wait_for_a_held_model_answer(model_server, make_user) -> None:
    control = RunControl.with_timeout(120)
    context = ToolContext(user=make_user(), capabilities=CapabilitySet(), control=control)
    answer = threading.Event()
    model_server.add({"hold": answer, "content": "late"})
    timer = threading.Timer(0.5, control.cancel, args=("cancelled by the owner",))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(Cancelled):
            run_agent("hi", context)
        assert time.monotonic() - started < HELD_SECS / 3
        assert not answer.is_set()  # the answer never came: the cancel ended the wait
    finally:
        timer.cancel()
        answer.set()


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


@pytest.fixture
def workers(tmp_path: Path, model_server: Any) -> Iterator[Callable[..., Workers]]:
    made: list[Workers] = []

    def make(**scheduler: Any) -> Workers:
        made.append(Workers(tmp_path, model_server.base_url, **scheduler))
        return made[-1]

    yield make
    for group in made:
        group.stop_all()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_real_worker_cancels_a_run_waiting_for_a_slow_model_answer(
    make_user, workers, model_server
) -> None:
    answer = threading.Event()
    model_server.add({"hold": answer, "content": "this answer must not win"})
    job = due_job(make_user(), timeout_secs=600)
    workers().start(worker_id="w-cancel")
    try:
        wait_until(lambda: len(model_server.requests) >= 1, 30, "the run to reach the model")
        assert lifecycle.request_cancel(job) is not None
        final = wait_until(
            lambda: Execution.objects.filter(job=job).exclude(status=S.RUNNING).first(),
            HELD_SECS / 2,
            "the cancelled run to end while its answer is still held",
        )
        assert not answer.is_set()
    finally:
        answer.set()
    assert final.status == S.CANCELLED, (final.status, final.error)
