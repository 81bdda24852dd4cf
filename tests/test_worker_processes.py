"""The claim protocol with real `runworker` processes: no duplicate, no loss, limits held."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.db.models import Count

from schedules import claims
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Job
from tests.worker_support import (
    Workers,
    alive,
    due_job,
    max_overlap,
    sleep_child,
    wait_until,
)

S = ExecutionStatus
pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def workers(tmp_path: Path, model_server: Any) -> Iterator[Callable[..., Workers]]:
    made: list[Workers] = []

    def make(**scheduler: Any) -> Workers:
        made.append(Workers(tmp_path, model_server.base_url, **scheduler))
        return made[-1]

    yield make
    for group in made:
        group.stop_all()


def history(job: Job) -> list[tuple[str, int, str]]:
    return list(
        Execution.objects.filter(job=job)
        .order_by("attempt")
        .values_list("status", "attempt", "worker_id")
    )


def running(job: Job) -> bool:
    return Execution.objects.filter(job=job, status=S.RUNNING).exists()


def asked_model(server: Any, count: int = 1) -> Callable[[], bool]:
    """The run has reached the model (the scripted turn is taken), not merely been claimed."""
    return lambda: len(server.requests) >= count


def test_an_expired_claim_is_reclaimed(make_user, workers, model_server):
    model_server.reply_always("rescued")
    job = due_job(make_user())
    # A worker that claimed the job and vanished: its lease has run out.
    [ghost] = claims.claim_due("ghost", 1).claims
    Job.objects.filter(pk=job.pk).update(lease_expires_at=db_now() - timedelta(seconds=1))
    group = workers(backoff_base_secs=1, backoff_max_secs=1)
    group.start(worker_id="rescuer")
    wait_until(lambda: Execution.objects.filter(job=job, status=S.SUCCEEDED).exists(), 30)
    assert history(job) == [(S.LOST, 1, "ghost"), (S.SUCCEEDED, 2, "rescuer")]
    assert set(Execution.objects.filter(job=job).values_list("scheduled_for", flat=True)) == {
        ghost.scheduled_for
    }


def test_no_occurrence_runs_twice_across_restarts(make_user, workers, model_server):
    model_server.reply_always("once only")
    job = due_job(make_user())
    group = workers()
    assert group.run_once(worker_id="first") == 0
    assert group.run_once(worker_id="second") == 0
    restarted = group.start(worker_id="third")
    wait_until(lambda: "worker third started" in group.logs(), 30, "the third worker")
    restarted.send_signal(signal.SIGTERM)
    assert restarted.wait(timeout=30) == 0
    assert history(job) == [(S.SUCCEEDED, 1, "first")]
    assert len(model_server.requests) == 1


def test_four_workers_run_each_of_1000_occurrences_exactly_once_within_the_limits(
    make_user, workers, model_server, record_property
):
    model_server.reply_always("done", delay=0.02)
    users = [make_user() for _ in range(20)]
    now = db_now()
    Job.objects.bulk_create(
        Job(
            owner=users[i % 20],
            name=f"job {i}",
            prompt="p",
            schedule_type="once",
            run_at=now,
            next_run_at=now - timedelta(milliseconds=i),
        )
        for i in range(1000)
    )
    limits = {"max_concurrent": 6, "max_concurrent_per_user": 2}
    group = workers(lease_secs=20, max_runs_per_window=1000, **limits)
    procs = [group.start("--concurrency", "3", worker_id=f"w{i}") for i in range(4)]
    wait_until(
        lambda: (
            not Execution.objects.filter(status=S.RUNNING).exists()
            and Execution.objects.count() >= 1000
        ),
        240,
        "1000 executions",
    )
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        assert proc.wait(timeout=60) == 0

    assert Counter(Execution.objects.values_list("status", flat=True)) == {S.SUCCEEDED: 1000}
    per_job = Counter(
        Execution.objects.values("job").annotate(n=Count("id")).values_list("n", flat=True)
    )
    assert per_job == {1: 1000}
    assert not Job.objects.filter(enabled=True).exists()

    rows = list(Execution.objects.values_list("started_at", "finished_at", "job__owner_id"))
    overall = max_overlap([(s, f) for s, f, _ in rows])
    per_user = max(
        max_overlap([(s, f) for s, f, o in rows if o == owner]) for owner in {r[2] for r in rows}
    )
    used = set(Execution.objects.values_list("worker_id", flat=True))
    record_property("max_concurrent_observed", overall)
    record_property("max_concurrent_per_user_observed", per_user)
    print(f"max observed concurrency: {overall} overall, {per_user} per user, workers {used}")
    assert 2 <= overall <= limits["max_concurrent"]
    assert per_user <= limits["max_concurrent_per_user"]
    assert len(used) >= 2


def test_a_worker_killed_mid_run_loses_its_occurrence_to_another_worker(
    make_user, workers, model_server
):
    model_server.add({"content": "never delivered", "delay": 60})
    model_server.reply_always("second time lucky")
    job = due_job(make_user())
    # A lease long enough that a loaded machine cannot stall the doomed worker's renewals past
    # it before the kill (it would then recover its own run and the history would differ).
    group = workers(lease_secs=6, backoff_base_secs=1, backoff_max_secs=1)
    doomed = group.start(worker_id="doomed")
    wait_until(asked_model(model_server), 30, "the run to reach the model")
    doomed.kill()
    doomed.wait()
    group.start(worker_id="survivor")
    wait_until(lambda: Execution.objects.filter(job=job, status=S.SUCCEEDED).exists(), 30)
    assert history(job) == [(S.LOST, 1, "doomed"), (S.SUCCEEDED, 2, "survivor")]
    [lost, won] = Execution.objects.filter(job=job).order_by("attempt")
    assert lost.scheduled_for == won.scheduled_for
    job.refresh_from_db()
    assert job.claim_token is None and job.execution_count == 1


def test_a_paused_worker_resumed_after_its_lease_records_superseded_and_changes_nothing(
    make_user, workers, model_server
):
    answer = threading.Event()
    model_server.add({"content": "stale answer", "hold": answer})
    model_server.reply_always("fresh answer")
    job = due_job(make_user())
    group = workers(lease_secs=2, backoff_base_secs=1, backoff_max_secs=1)
    paused = group.start(worker_id="paused")
    try:
        # Its answer is held until it has been paused and resumed: it cannot finish first.
        wait_until(asked_model(model_server), 30, "the run to reach the model")
        pause_outside_a_write(paused)
        other = group.start(worker_id="other")
        wait_until(lambda: Execution.objects.filter(job=job, status=S.SUCCEEDED).exists(), 30)
        other.send_signal(signal.SIGTERM)
        assert other.wait(timeout=30) == 0
        before = Job.objects.filter(pk=job.pk).values().get()

        os.kill(paused.pid, signal.SIGCONT)
        answer.set()
        wait_until(
            lambda: Execution.objects.filter(job=job, status=S.SUPERSEDED).exists(),
            30,
            "superseded",
        )
    finally:
        answer.set()
    assert Job.objects.filter(pk=job.pk).values().get() == before
    assert history(job) == [(S.SUPERSEDED, 1, "paused"), (S.SUCCEEDED, 2, "other")]
    won = Execution.objects.get(job=job, status=S.SUCCEEDED)
    assert won.output == "fresh answer"


def pause_outside_a_write(process: subprocess.Popen[bytes]) -> None:
    """SIGSTOP `process` at a moment it holds no SQLite write lock: a process stopped inside a
    write transaction would hold the file's lock and stall every process (SQLite, not the
    protocol). PostgreSQL runs each of a running worker's writes as one statement, which the
    server finishes whether or not the client is stopped."""

    def paused() -> bool:
        os.kill(process.pid, signal.SIGSTOP)
        wait_until(lambda: _all_threads_stopped(process.pid), 30, "the process to stop")
        if connection.vendor != "sqlite" or _sqlite_writable():
            return True
        os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.05)
        return False

    wait_until(paused, 30, "a moment the worker holds no write lock")


def _all_threads_stopped(pid: int) -> bool:
    states = subprocess.run(
        ["ps", "-L", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True
    ).stdout.split()
    return bool(states) and all(state.startswith(("T", "t")) for state in states)


def _sqlite_writable() -> bool:
    probe = sqlite3.connect(connection.settings_dict["NAME"], timeout=0, isolation_level=None)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        probe.close()


def test_sigterm_lets_a_running_execution_finish(make_user, workers, model_server):
    model_server.add({"content": "finished in time", "delay": 1.5})
    job = due_job(make_user())
    group = workers()
    worker = group.start(worker_id="draining")
    wait_until(asked_model(model_server), 30, "the run to reach the model")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    execution = Execution.objects.get(job=job)
    assert execution.status == S.SUCCEEDED and execution.output == "finished in time"
    job.refresh_from_db()
    assert job.claim_token is None


def test_after_the_grace_period_a_run_is_interrupted_and_another_worker_takes_it_at_once(
    make_user, workers, model_server
):
    owner = make_user(grant=["shell:sleep"])
    model_server.add(
        {"tool_calls": [{"name": "shell", "arguments": {"command": "sleep", "args": ["29.5"]}}]}
    )
    model_server.reply_always("done later")
    job = due_job(owner, capabilities=["shell:sleep"])
    due = job.next_run_at
    group = workers()
    worker = group.start("--grace-secs", "0.5", worker_id="leaving")
    # The second request would carry the shell result: while it has not come, sleep is running.
    wait_until(asked_model(model_server), 30, "the run to reach the model")
    sleeper = wait_until(lambda: sleep_child(worker.pid, "29.5"), 30, "the shell subprocess")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    [execution] = Execution.objects.filter(job=job)
    assert execution.status == S.INTERRUPTED
    job.refresh_from_db()
    assert job.claim_token is None and job.next_run_at == due and job.consecutive_failures == 0
    group.start(worker_id="next")
    wait_until(lambda: Execution.objects.filter(job=job, status=S.SUCCEEDED).exists(), 30)
    assert history(job) == [(S.INTERRUPTED, 1, "leaving"), (S.SUCCEEDED, 2, "next")]
    assert not alive(sleeper)


def test_a_second_signal_exits_at_once(make_user, workers, model_server):
    model_server.add({"content": "slow", "delay": 60})
    due_job(make_user())
    group = workers()
    worker = group.start(worker_id="impatient")
    wait_until(asked_model(model_server), 30, "the run to reach the model")
    worker.send_signal(signal.SIGTERM)
    # Two signals sent at once would be delivered as one: wait for the first to be seen.
    wait_until(lambda: "impatient stopping" in group.logs(), 30, "the first signal")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 128 + signal.SIGTERM
