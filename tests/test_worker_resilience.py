"""A transient database error costs the worker a tick, never its loop or its running runs."""

from __future__ import annotations

import signal

import pytest
from django.db import OperationalError

from schedules import claims
from schedules.models import Execution, ExecutionStatus
from schedules.worker import Worker
from tests.worker_support import due_job

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_database_error_in_the_loop_is_survived_and_the_due_run_still_happens(
    make_user, model_server, monkeypatch, picobot_config, restore_signals
) -> None:
    picobot_config("scheduler", tick_secs=0.05)
    model_server.reply_always("done")
    job = due_job(make_user())
    real_recover = claims.recover_expired
    failures = {"left": 2}

    def flaky_recover(*args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise OperationalError("database is locked")
        return real_recover(*args, **kwargs)

    monkeypatch.setattr(claims, "recover_expired", flaky_recover)
    assert Worker(worker_id="resilient", concurrency=1, once=True).run() == 0
    assert failures["left"] == 0
    [execution] = Execution.objects.filter(job=job)
    assert execution.status == ExecutionStatus.SUCCEEDED
