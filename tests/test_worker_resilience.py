"""A transient database error costs the worker a tick, never its loop or its running runs."""

from __future__ import annotations

import signal
import time
from datetime import timedelta

import pytest
from django.db import OperationalError, connection

from schedules import claims, lifecycle
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus
from schedules.worker import Worker
from tests.worker_support import Workers, due_job, wait_until

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


@pytest.mark.slow
@pytest.mark.skipif(connection.vendor != "postgresql", reason="LISTEN/NOTIFY is PostgreSQL's")
def test_a_new_schedule_wakes_an_idle_postgresql_worker_before_its_tick(
    make_user, model_server, tmp_path
) -> None:
    model_server.reply_always("done")
    owner = make_user(grant=["schedule:*"])
    workers = Workers(tmp_path, model_server.base_url, tick_secs=60)
    try:
        workers.start(worker_id="sleeper")
        wait_until(lambda: "started:" in workers.logs(), what="the worker to start")
        time.sleep(0.5)  # let it settle into its (60 s) idle sleep
        # A few seconds ahead, so that it is still in the future when validated on a slow machine.
        run_at = (db_now() + timedelta(seconds=3)).isoformat()
        job = lifecycle.create_job(
            owner, {"prompt": "p", "schedule_type": "once", "run_at": run_at}
        )
        # Without the wake-up the worker would sleep out its 60 s tick first.
        wait_until(
            lambda: Execution.objects.filter(job=job, status=ExecutionStatus.SUCCEEDED).exists(),
            timeout=30,
            what="the new schedule to run",
        )
    finally:
        workers.stop_all()
