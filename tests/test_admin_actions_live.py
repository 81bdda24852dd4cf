"""The console's actions against a real `runworker`: run now, cancel, disable; and the registry."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from kernel.models import User
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Job, Worker
from tests.worker_support import Workers, due_job, sleep_child, wait_until

S = ExecutionStatus
pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]
PASSWORD = "a long operator password"


@pytest.fixture
def operator(client: Any) -> Any:
    User.objects.create_superuser("operator", password=PASSWORD)
    client.login(username="operator", password=PASSWORD)
    return client


@pytest.fixture
def worker(tmp_path: Path, model_server: Any) -> Iterator[Any]:
    group = Workers(tmp_path, model_server.base_url, tick_secs=0.5)
    try:
        process = group.start(worker_id="console-w")
        wait_until(lambda: Worker.objects.filter(worker_id="console-w").exists(), 60, "registry")
        yield process
    finally:
        group.stop_all()


def act(operator: Any, action: str, job: Job) -> None:
    response = operator.post(
        "/admin/schedules/job/", {"action": action, "_selected_action": [str(job.pk)]}
    )
    assert response.status_code == 302


def test_run_now_in_the_admin_runs_the_job_at_once_and_the_worker_is_on_the_dashboard(
    operator, make_user, model_server, worker
) -> None:
    model_server.reply_always("done")
    job = due_job(make_user(), next_run_at=db_now() + timedelta(hours=5))
    act(operator, "run_now", job)
    execution = wait_until(
        lambda: Execution.objects.filter(job=job, status=S.SUCCEEDED).first(), 30, "the run"
    )
    assert execution.output == "done"
    # It ran the occurrence "now", and the job went back to its schedule afterwards.
    assert abs((execution.started_at - execution.scheduled_for).total_seconds()) < 10
    job.refresh_from_db()
    assert job.next_run_at > db_now()
    registered = Worker.objects.get(worker_id="console-w")
    assert registered.pid == worker.pid and registered.is_alive(db_now())
    page = operator.get("/admin/dashboard/").content.decode()
    assert "console-w" in page and 'id="workers-alive">1<' in page


def test_cancel_in_the_admin_stops_a_real_run(operator, make_user, model_server, worker) -> None:
    seconds = "39.25"
    model_server.add(
        {"tool_calls": [{"name": "shell", "arguments": {"command": "sleep", "args": [seconds]}}]}
    )
    model_server.reply_always("should not be asked")
    job = due_job(make_user(grant=["shell:sleep"]), capabilities=["shell:sleep"])
    wait_until(lambda: sleep_child(worker.pid, seconds), 30, "the shell subprocess")
    act(operator, "cancel", job)
    execution = wait_until(
        lambda: Execution.objects.filter(job=job, status=S.CANCELLED).first(), 30, "the cancel"
    )
    assert (execution.finished_at - execution.cancel_requested_at).total_seconds() < 15


def test_a_job_disabled_in_the_admin_does_not_run(
    operator, make_user, model_server, worker
) -> None:
    model_server.reply_always("done")
    job = due_job(make_user(), next_run_at=db_now() + timedelta(seconds=3))
    act(operator, "disabled", job)
    witness = due_job(make_user(), name="witness", next_run_at=db_now() + timedelta(seconds=4))
    wait_until(lambda: Execution.objects.filter(job=witness).exists(), 30, "the witness run")
    assert not Execution.objects.filter(job=job).exists()
