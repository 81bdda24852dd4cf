"""A database error under a run (a server restart, a dropped connection) is not the run's
failure: the run ends `interrupted` and its occurrence runs again at once, without counting
against max_retries or max_consecutive_failures, and a tool call whose result could not be
written is closed with the run rather than left `started`. Found by the soak, where 396 runs
were recorded `failed` with "internal error" for connections the fault injector cut."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import OperationalError, connection

from kernel.context import ToolContext
from kernel.models import ToolCall, ToolCallStatus
from kernel.tools import Tool, register, unregister
from schedules import executor
from schedules.models import Execution, ExecutionStatus, Job
from schedules.worker import Worker
from tests.worker_support import Workers, due_job, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

S = ExecutionStatus


class DatabaseGoneTool(Tool):
    """Meets a dropped database connection `failures` times (as a tool that writes does when
    the server restarts under it), then answers."""

    name = "test_database_gone"
    description = "test"
    parameters = {"type": "object", "properties": {}, "additionalProperties": False}
    failures = 0

    def required_permissions(self, args: dict[str, Any], context: ToolContext) -> list[Any]:
        return []

    def run(self, args: dict[str, Any], context: ToolContext) -> str:
        if DatabaseGoneTool.failures:
            DatabaseGoneTool.failures -= 1
            raise OperationalError("server closed the connection unexpectedly")
        return "written"


@pytest.fixture
def database_gone_tool() -> Iterator[type[DatabaseGoneTool]]:
    register(DatabaseGoneTool)
    yield DatabaseGoneTool
    DatabaseGoneTool.failures = 0
    unregister(DatabaseGoneTool.name)


@pytest.fixture
def restore_signals() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


CALL = {"tool_calls": [{"name": DatabaseGoneTool.name, "arguments": {}}]}


def _history(job: Job) -> list[tuple[str, int]]:
    return list(
        Execution.objects.filter(job=job).order_by("attempt").values_list("status", "attempt")
    )


def _tool_messages(request: dict[str, Any]) -> list[str]:
    return [m.get("content") or "" for m in request["messages"] if m.get("role") == "tool"]


@pytest.mark.parametrize("max_retries", [0, 3])
def test_a_database_error_in_a_tool_interrupts_the_run_which_runs_again(
    make_user, model_server, picobot_config, database_gone_tool, restore_signals, max_retries
) -> None:
    # max_retries 0: were the error a failure, the occurrence would end there.
    picobot_config("scheduler", tick_secs=0.05, max_retries=max_retries)
    database_gone_tool.failures = 1
    model_server.add(CALL, CALL)
    model_server.reply_always("done")
    job = due_job(make_user())

    assert Worker(worker_id="steady", concurrency=1, once=True).run() == 0

    assert _history(job) == [(S.INTERRUPTED, 1), (S.SUCCEEDED, 2)]
    first = Execution.objects.get(job=job, attempt=1)
    assert "the database failed during the run" in first.error
    assert "OperationalError" in first.error
    job.refresh_from_db()
    assert (job.consecutive_failures, job.execution_count, job.last_error) == (0, 1, "")
    # The model never saw the database's failure as the tool's: the first attempt ended at the
    # error, and the second attempt's call answered.
    assert len(model_server.requests) == 3
    assert not any(
        "failed unexpectedly" in m for r in model_server.requests for m in _tool_messages(r)
    )
    assert _tool_messages(model_server.requests[2])[-1].count("written") == 1
    # The interrupted call's row was closed with its run; the second attempt's finished.
    rows = {r.execution.attempt: r.status for r in ToolCall.objects.filter(execution__job=job)}
    assert rows == {1: ToolCallStatus.INTERRUPTED, 2: ToolCallStatus.FINISHED}


def test_an_occurrence_that_keeps_meeting_database_errors_fails_at_last(
    make_user, model_server, picobot_config, database_gone_tool, restore_signals
) -> None:
    # No hot loop of instant retries for a fault that is particular to one run.
    picobot_config("scheduler", tick_secs=0.05, max_retries=0)
    database_gone_tool.failures = 1_000
    model_server.reply_always(**CALL)
    job = due_job(make_user())

    assert Worker(worker_id="steady", concurrency=1, once=True).run() == 0

    limit = executor.DATABASE_ERROR_ATTEMPTS
    assert _history(job) == [(S.INTERRUPTED, n) for n in range(1, limit)] + [(S.FAILED, limit)]
    assert (
        "internal error: the database failed" in Execution.objects.get(job=job, attempt=limit).error
    )
    job.refresh_from_db()
    assert job.consecutive_failures == 1
    assert not ToolCall.objects.filter(status=ToolCallStatus.STARTED).exists()


@pytest.mark.slow
@pytest.mark.skipif(connection.vendor != "postgresql", reason="a PostgreSQL connection fault")
def test_a_connection_cut_while_a_tool_runs_interrupts_the_run_in_a_real_worker(
    make_user, model_server, tmp_path
) -> None:
    # The connection that wrote the call's `started` row is cut while `sleep` runs, so the
    # row's result cannot be written: the run is interrupted, not failed, and runs again.
    sleep = {"tool_calls": [{"name": "shell", "arguments": {"command": "sleep", "args": ["1.5"]}}]}
    model_server.add(sleep)
    model_server.reply_always("done")
    owner = make_user(grant=["shell:sleep"])
    job = due_job(owner, capabilities=["shell:sleep"])
    workers = Workers(tmp_path, model_server.base_url, lease_secs=10, max_retries=0)
    try:
        process = workers.start(worker_id="steady")
        wait_until(
            lambda: ToolCall.objects.filter(
                execution__job=job, status=ToolCallStatus.STARTED
            ).exists(),
            60,
            "the sleep to start",
        )
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        wait_until(
            lambda: Execution.objects.filter(job=job, status=S.SUCCEEDED).exists(),
            60,
            "the occurrence to run again",
        )
        assert _history(job) == [(S.INTERRUPTED, 1), (S.SUCCEEDED, 2)]
        [row] = ToolCall.objects.filter(execution__job=job)
        assert row.status == ToolCallStatus.INTERRUPTED
        job.refresh_from_db()
        assert job.consecutive_failures == 0
        assert process.poll() is None
    finally:
        workers.stop_all()


def test_a_run_that_succeeded_keeps_its_calls_as_they_were(
    make_user, model_server, picobot_config, database_gone_tool, restore_signals
) -> None:
    # Closing unrecorded calls is for runs that did not succeed: a finished row is never touched.
    picobot_config("scheduler", tick_secs=0.05)
    model_server.add(CALL)
    model_server.reply_always("done")
    job = due_job(make_user())
    assert Worker(worker_id="steady", concurrency=1, once=True).run() == 0
    assert _history(job) == [(S.SUCCEEDED, 1)]
    assert [r.status for r in ToolCall.objects.filter(execution__job=job)] == [
        ToolCallStatus.FINISHED
    ]


@pytest.mark.django_db
def test_a_chat_turn_that_meets_a_database_error_is_a_503_not_the_tools_failure(
    make_user, model_server, api_client_for, database_gone_tool
) -> None:
    # In a chat turn the error is the caller's to retry: a clear 503, and the model is not told
    # that its tool failed.
    database_gone_tool.failures = 1
    model_server.add(CALL)
    model_server.reply_always("done")
    client = api_client_for(make_user())
    response = client.post(
        "/api/v1/chat", json.dumps({"message": "write it"}), content_type="application/json"
    )
    assert response.status_code == 503, response.content
    assert response.json() == {"detail": "The database failed during the turn; send it again."}
    assert len(model_server.requests) == 1
