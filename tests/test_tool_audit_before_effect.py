"""An allowed call's audit row is written before the tool runs; tool processes die with their
worker (or web process), and recovery marks the calls it interrupted and reaps what is left of
their processes: a run's when its lease is recovered, a chat turn's at the next chat turn once no
live turn can be that old."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from kernel import processes, turns
from kernel.context import Cancelled, RunControl, ToolContext
from kernel.kernel import kernel
from kernel.models import ChatSession, ToolCall, ToolCallStatus
from kernel.permissions import CapabilitySet
from kernel.tools import Tool, register, shell, unregister
from kernel.views import CHAT_TIMEOUT_SECS
from schedules import claims
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Job
from tests.worker_support import (
    ROOT,
    Workers,
    alive,
    database_url,
    due_job,
    sleep_child,
    wait_until,
)


class PeekTool(Tool):
    """Reports what the audit log says about this very call while it runs."""

    name = "test_peek"
    description = "test"
    parameters = {"type": "object", "properties": {}, "additionalProperties": False}

    def required_permissions(self, args: dict[str, Any], context: ToolContext) -> list[Any]:
        return []

    def run(self, args: dict[str, Any], context: ToolContext) -> str:
        row = ToolCall.objects.get(pk=context.audit_id)
        return f"{row.status} {row.decision} {row.tool}"


@pytest.fixture
def peek_tool() -> Iterator[None]:
    register(PeekTool)
    yield
    unregister("test_peek")


def context_for(user: Any, grant: list[str], control: RunControl | None = None) -> ToolContext:
    return ToolContext(
        user=user, capabilities=CapabilitySet(grant), control=control or RunControl()
    )


@pytest.mark.django_db
def test_the_row_exists_before_the_tool_runs_and_is_completed_after(make_user, peek_tool) -> None:
    result = kernel.invoke("test_peek", {}, context_for(make_user(), []))
    assert "started allowed test_peek" in result.content
    row = ToolCall.objects.get(pk=result.audit_id)
    assert (row.status, row.decision) == (ToolCallStatus.FINISHED, "allowed")
    assert ToolCall.objects.count() == 1  # completed in place, not a second row


@pytest.mark.django_db
def test_refused_calls_are_written_once_as_finished(make_user) -> None:
    user = make_user()
    for tool, args in (("shell", {"command": "ls"}), ("shell", {"nope": 1}), ("missing", {})):
        result = kernel.invoke(tool, args, context_for(user, []))
        assert result.decision in ("denied", "invalid")
    assert set(ToolCall.objects.values_list("status", flat=True)) == {ToolCallStatus.FINISHED}
    assert ToolCall.objects.count() == 3


@pytest.mark.django_db
def test_a_shell_call_records_its_process_group_and_a_stop_completes_the_row(
    make_user, monkeypatch
) -> None:
    control = RunControl.with_timeout(60)
    seen: list[tuple[str, int | None]] = []
    record = shell.record_process

    def record_then_cancel(audit_id: int | None, pid: int) -> None:
        record(audit_id, pid)
        row = ToolCall.objects.get(pk=audit_id)
        seen.append((row.status, row.process_group))
        control.cancel("cancelled by the owner")

    monkeypatch.setattr(shell, "record_process", record_then_cancel)
    context = context_for(make_user(), ["shell:sleep"], control)
    with pytest.raises(Cancelled):
        kernel.invoke("shell", {"command": "sleep", "args": ["30"]}, context)
    [(status, group)] = seen
    assert status == ToolCallStatus.STARTED and group and group > 0
    row = ToolCall.objects.get()
    assert row.status == ToolCallStatus.FINISHED and "stopped" in row.error
    assert row.process_host == processes.host_id()
    assert not processes.group_members(group, row.process_started_ticks)


# --- reaping recorded process groups -------------------------------------------------------------


def own_group_sleep(seconds: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", seconds], start_new_session=True)


@pytest.mark.django_db
def test_recovery_reaps_a_recorded_group_on_this_host(make_user) -> None:
    execution = _execution(make_user())
    survivor = own_group_sleep("41.5")
    try:
        row = _started_row(execution, survivor.pid, processes.start_ticks(survivor.pid))
        assert processes.interrupt_calls(execution.pk) == 1
        survivor.wait(timeout=10)
        assert survivor.returncode == -signal.SIGKILL
        row.refresh_from_db()
        assert row.status == ToolCallStatus.INTERRUPTED and "killed 1" in row.error
    finally:
        survivor.kill()


@pytest.mark.django_db
def test_a_reused_process_id_or_another_host_is_never_killed(make_user) -> None:
    execution = _execution(make_user())
    bystander = own_group_sleep("42.5")
    try:
        ticks = processes.start_ticks(bystander.pid)
        _started_row(execution, bystander.pid, ticks - 1)  # the id now names another process
        _started_row(execution, bystander.pid, ticks, host="elsewhere/other-boot")
        assert processes.interrupt_calls(execution.pk) == 2
        assert bystander.poll() is None
        assert set(ToolCall.objects.values_list("status", flat=True)) == {"interrupted"}
    finally:
        bystander.kill()
        bystander.wait()


def _execution(owner: Any) -> Execution:
    job = due_job(owner)
    return Execution.objects.create(
        job=job, scheduled_for=db_now(), status=ExecutionStatus.RUNNING, attempt=1
    )


def _started_row(execution: Execution, group: int, ticks: int | None, host: str = "") -> ToolCall:
    return ToolCall.objects.create(
        execution=execution,
        tool="shell",
        decision="allowed",
        status=ToolCallStatus.STARTED,
        process_group=group,
        process_started_ticks=ticks,
        process_host=host or processes.host_id(),
    )


# --- a real worker killed during `shell sleep` ---------------------------------------------------


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
def test_a_killed_worker_leaves_a_row_and_no_process_and_recovery_marks_it(
    make_user, workers, model_server
) -> None:
    owner = make_user(grant=["shell:sleep"])
    model_server.add(
        {"tool_calls": [{"name": "shell", "arguments": {"command": "sleep", "args": ["33.5"]}}]}
    )
    model_server.reply_always("never reached")
    job = due_job(owner, capabilities=["shell:sleep"])
    worker = workers(lease_secs=3).start(worker_id="doomed")
    sleeper = wait_until(lambda: sleep_child(worker.pid, "33.5"), 30, "the shell subprocess")
    row = wait_until(
        lambda: ToolCall.objects.filter(execution__job=job, process_group__isnull=False).first(),
        30,
        "the audit row to record the process",
    )
    assert row.status == ToolCallStatus.STARTED and row.decision == "allowed"
    worker.kill()
    worker.wait()
    # Before any recovery: the sleep died with its worker (it was not left to a reaper).
    wait_until(lambda: not alive(sleeper), 10, "the sleep to die with its worker")
    assert not alive(row.process_group)
    wait_until(lambda: Job.objects.get(pk=job.pk).lease_expires_at < db_now(), 30, "the lease")
    assert claims.recover_expired() == 1
    row.refresh_from_db()
    assert row.status == ToolCallStatus.INTERRUPTED and "worker stopped" in row.error
    assert Execution.objects.get(job=job).status == ExecutionStatus.LOST


# --- chat calls left `started` by a web process that died ---------------------------------------

CHAT_CALL_SCRIPT = """
import sys
import django
django.setup()
from kernel.context import RunControl, ToolContext
from kernel.kernel import kernel
from kernel.models import User
from kernel.permissions import CapabilitySet
user = User.objects.get(pk=int(sys.argv[1]))
context = ToolContext(user=user, capabilities=CapabilitySet(["shell:sleep"]),
                      control=RunControl.with_timeout(300), session_id=int(sys.argv[2]))
kernel.invoke("shell", {"command": "sleep", "args": [sys.argv[3]]}, context)
"""


def _chat_row(session: ChatSession, age_secs: float, **fields: Any) -> ToolCall:
    row = ToolCall.objects.create(
        session=session, tool="shell", decision="allowed", status=ToolCallStatus.STARTED, **fields
    )
    ToolCall.objects.filter(pk=row.pk).update(
        created_at=timezone.now() - timedelta(seconds=age_secs)
    )
    row.refresh_from_db()
    return row


@pytest.mark.django_db
def test_chat_calls_started_longer_ago_than_any_turn_lasts_are_interrupted_and_reaped(
    make_user,
) -> None:
    owner = make_user()
    session = ChatSession.objects.create(owner=owner)
    survivor = own_group_sleep("43.5")
    try:
        abandoned = _chat_row(
            session,
            turns.TURN_LEASE_SECS + 1,
            process_group=survivor.pid,
            process_started_ticks=processes.start_ticks(survivor.pid),
            process_host=processes.host_id(),
        )
        live = _chat_row(session, CHAT_TIMEOUT_SECS)  # a turn at its deadline
        scheduled = _started_row(_execution(owner), 0, None)  # recovery of runs handles these
        ToolCall.objects.filter(pk=scheduled.pk).update(created_at=abandoned.created_at)
        assert processes.interrupt_abandoned_chat_calls(turns.TURN_LEASE_SECS) == 1
        survivor.wait(timeout=10)
        assert survivor.returncode == -signal.SIGKILL
    finally:
        survivor.kill()
    statuses = dict(ToolCall.objects.values_list("pk", "status"))
    assert statuses == {abandoned.pk: "interrupted", live.pk: "started", scheduled.pk: "started"}
    abandoned.refresh_from_db()
    assert "web process stopped" in abandoned.error and "killed 1" in abandoned.error


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_killed_web_process_leaves_a_row_that_the_next_chat_turn_marks(
    make_user, api_client_for, model_server, monkeypatch
) -> None:
    owner = make_user(grant=["shell:sleep"])
    session = ChatSession.objects.create(owner=owner, capabilities=["shell:sleep"])
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": database_url()}
    seconds = f"44.{os.getpid()}"
    web = subprocess.Popen(
        [sys.executable, "-c", CHAT_CALL_SCRIPT, str(owner.pk), str(session.pk), seconds],
        cwd=ROOT,
        env=env,
    )
    try:
        sleeper = wait_until(lambda: sleep_child(web.pid, seconds), 30, "the shell subprocess")
        row = wait_until(
            lambda: ToolCall.objects.filter(session=session, process_group__isnull=False).first(),
            30,
            "the audit row to record the process",
        )
        web.kill()
        web.wait()
    finally:
        if web.poll() is None:
            web.kill()
    wait_until(lambda: not alive(sleeper), 10, "the sleep to die with its process")
    # Time passes beyond any turn's length (moved explicitly, not slept on).
    ToolCall.objects.filter(pk=row.pk).update(
        created_at=timezone.now() - timedelta(seconds=turns.TURN_LEASE_SECS + 1)
    )
    row.refresh_from_db()
    assert row.status == ToolCallStatus.STARTED
    monkeypatch.setattr(turns, "_next_look", 0.0)  # this process has not looked yet
    model_server.reply_always("hello")
    response = api_client_for(owner).post("/api/v1/chat", {"message": "hi"}, format="json")
    assert response.status_code == 200, response.content
    row.refresh_from_db()
    assert row.status == ToolCallStatus.INTERRUPTED and "web process stopped" in row.error


def test_the_workers_hourly_purge_marks_abandoned_chat_calls_too(make_user) -> None:
    # Without any chat turn: the worker's purge round looks as well.
    from schedules.worker import Worker

    session = ChatSession.objects.create(owner=make_user())
    abandoned = _chat_row(session, turns.TURN_LEASE_SECS + 1)
    assert Worker(worker_id="w1").handle_one_purge()
    abandoned.refresh_from_db()
    assert abandoned.status == "interrupted"


def test_a_database_error_while_looking_for_abandoned_calls_does_not_fail_the_turn(
    make_user, monkeypatch
) -> None:
    from django.db import DatabaseError

    def broken(*args: object, **kwargs: object) -> int:
        raise DatabaseError("the server went away")

    monkeypatch.setattr(processes, "interrupt_abandoned_chat_calls", broken)
    monkeypatch.setattr(turns, "_next_look", 0.0)
    user = make_user()
    assert turns.begin(user.pk) is not None
