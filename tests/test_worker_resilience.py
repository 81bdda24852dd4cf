"""A transient database error costs the worker a tick, never its loop or its running runs."""

from __future__ import annotations

import select
import signal
import threading
import time
from datetime import timedelta

import pytest
from django.db import DatabaseError, OperationalError, connection, transaction

from schedules import claims, lifecycle
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Job
from schedules.worker import Worker
from tests.worker_support import Workers, due_job, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize(
    "fault",
    [
        OperationalError("database is locked"),
        # Not the database's: CI and the soak saw a worker end with exit code 1 on a closed
        # socket waited on, its running runs undrained. Logged at ERROR and survived.
        RuntimeError("a bug"),
        OSError(9, "Bad file descriptor"),
    ],
)
def test_an_error_in_the_loop_is_survived_and_the_due_run_still_happens(
    make_user, model_server, monkeypatch, picobot_config, restore_signals, caplog, fault
) -> None:
    picobot_config("scheduler", tick_secs=0.05)
    model_server.reply_always("done")
    job = due_job(make_user())
    real_recover = claims.recover_expired
    failures = {"left": 2}

    def flaky_recover(*args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise fault
        return real_recover(*args, **kwargs)

    monkeypatch.setattr(claims, "recover_expired", flaky_recover)
    with caplog.at_level("ERROR", logger="picobot.worker"):
        assert Worker(worker_id="resilient", concurrency=1, once=True).run() == 0
    assert failures["left"] == 0
    [execution] = Execution.objects.filter(job=job)
    assert execution.status == ExecutionStatus.SUCCEEDED
    unexpected = [r for r in caplog.records if "unexpected error in the loop" in r.getMessage()]
    assert len(unexpected) == (0 if isinstance(fault, OperationalError) else 2)
    assert all(r.exc_info for r in unexpected)


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


def test_a_result_met_by_a_database_error_is_recorded_once_the_database_answers(
    make_user, model_server, monkeypatch, picobot_config, restore_signals
) -> None:
    # A server restart or a dropped connection just as the run finishes: the result is written
    # when the database answers again, not lost to an expired lease and run a second time.
    picobot_config("scheduler", tick_secs=0.05, lease_secs=30)
    model_server.reply_always("done")
    job = due_job(make_user())
    real_complete = claims.complete_many
    failures = {"left": 2}

    def flaky_complete(*args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise OperationalError("server closed the connection unexpectedly")
        return real_complete(*args, **kwargs)

    monkeypatch.setattr(claims, "complete_many", flaky_complete)
    assert Worker(worker_id="steady", concurrency=1, once=True).run() == 0
    assert failures["left"] == 0
    assert list(Execution.objects.filter(job=job).values_list("status", "attempt")) == [
        (ExecutionStatus.SUCCEEDED, 1)
    ]
    assert len(model_server.requests) == 1


def _terminate_other_backends() -> int:
    """Cut every other connection to this test database (as a server restart would)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


def _listeners() -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute(
            # `idle`: the LISTEN has finished (its text shows while it still runs, when a NOTIFY
            # sent at once could still be missed).
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND query = %s AND state = 'idle'",
            [f"LISTEN {claims.WAKE_CHANNEL}"],
        )
        return [row[0] for row in cursor.fetchall()]


@pytest.mark.slow
@pytest.mark.skipif(connection.vendor != "postgresql", reason="a PostgreSQL connection fault")
def test_a_run_finishing_across_dropped_connections_is_recorded_once(
    make_user, model_server, tmp_path
) -> None:
    release = threading.Event()
    model_server.add(
        {"tool_calls": [{"name": "shell", "arguments": {"command": "echo", "args": ["hi"]}}]},
        {"content": "done", "hold": release},
    )
    owner = make_user(grant=["shell:echo"])
    # The tool call gives the run's slot a database connection of its own to lose.
    job = due_job(owner, capabilities=["shell:echo"])
    workers = Workers(tmp_path, model_server.base_url, lease_secs=10)
    try:
        process = workers.start(worker_id="steady")
        wait_until(lambda: len(model_server.requests) >= 2, 60, "the run's second model turn")
        assert _terminate_other_backends() >= 1
        release.set()
        wait_until(
            lambda: (
                not Execution.objects.filter(job=job, status=ExecutionStatus.RUNNING).exists()
                and Execution.objects.filter(job=job).exists()
            ),
            60,
            "the run to end",
        )
        assert list(Execution.objects.filter(job=job).values_list("status", "attempt")) == [
            (ExecutionStatus.SUCCEEDED, 1)
        ]
        assert len(model_server.requests) == 2
        assert process.poll() is None
    finally:
        release.set()
        workers.stop_all()


@pytest.mark.slow
@pytest.mark.skipif(connection.vendor != "postgresql", reason="LISTEN/NOTIFY is PostgreSQL's")
def test_a_worker_whose_listen_connection_is_dropped_listens_again(
    make_user, model_server, tmp_path
) -> None:
    model_server.reply_always("done")
    owner = make_user(grant=["schedule:*"])
    workers = Workers(tmp_path, model_server.base_url, tick_secs=60)
    try:
        process = workers.start(worker_id="listener")
        [first] = wait_until(_listeners, 60, "the worker's LISTEN connection")
        # As in a restart, the listening socket is closed under the worker (only that one here:
        # a lost main connection costs the loop a tick, which is 60 s in this test).
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [first])
        wait_until(lambda: _listeners() and _listeners() != [first], 30, "a new LISTEN")
        run_at = (db_now() + timedelta(seconds=3)).isoformat()
        job = lifecycle.create_job(
            owner, {"prompt": "p", "schedule_type": "once", "run_at": run_at}
        )
        # Only the NOTIFY on the new connection can wake it before its 60 s tick.
        wait_until(
            lambda: Execution.objects.filter(job=job, status=ExecutionStatus.SUCCEEDED).exists(),
            timeout=30,
            what="the new schedule to run",
        )
        assert process.poll() is None
    finally:
        workers.stop_all()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="LISTEN/NOTIFY is PostgreSQL's")
@pytest.mark.parametrize("drains_before", [0, 1, 2])
def test_an_idle_worker_whose_listener_died_between_sleeps_listens_again(
    picobot_config, drains_before
) -> None:
    # Found by CI and the soak: a listener found broken just before the sleep was closed, and
    # the sleep then waited on its closed socket (EBADF), ending the worker with exit code 1.
    # psycopg notices a lost connection on the second read of its socket, so the drains after
    # earlier sleeps decide which read finds it.
    picobot_config("scheduler", tick_secs=0.2)
    worker = Worker(worker_id="relisten", concurrency=1)
    worker._listen()
    try:
        [first] = wait_until(_listeners, 10, "the LISTEN connection")
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [first])
        wait_until(lambda: first not in _listeners(), 10, "the listener to be gone")
        readable, _, _ = select.select([worker._listener.fileno()], [], [], 10)
        assert readable, "the server's close to reach the listener's socket"
        for _ in range(drains_before):
            worker._drain_notifies()
        for _ in range(3):
            worker.idle()
        assert worker._listener is not None and not worker._listener.closed
        [second] = wait_until(_listeners, 10, "a new LISTEN connection")
        assert second != first
    finally:
        worker._unlisten()
        worker._waker.close()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="LISTEN/NOTIFY is PostgreSQL's")
def test_a_wake_up_psycopg_read_with_another_reply_is_not_slept_through() -> None:
    # A NOTIFY that arrives while the listener waits on another reply is read with it into
    # psycopg's buffer: the socket is then quiet, and only draining the buffer finds it.
    worker = Worker(worker_id="buffered", concurrency=1)
    worker._listen()
    try:
        assert worker._listen_fds() == ([worker._listener.fileno()], False)
        with connection.cursor() as cursor:
            cursor.execute(f"NOTIFY {claims.WAKE_CHANNEL}")
        worker._listener.execute("SELECT pg_sleep(0.2)")
        fds, woken = worker._listen_fds()
        assert woken and fds == [worker._listener.fileno()]
        assert worker._listen_fds() == (fds, False)
    finally:
        worker._unlisten()
        worker._waker.close()


def test_a_worker_starting_while_the_database_is_unreachable_waits_for_it(monkeypatch) -> None:
    # Found by the soak: a worker started during a PostgreSQL restart exited with 1 when its
    # start-up heartbeat load could not connect.
    from django.db import OperationalError

    from schedules.management.commands import runworker

    attempts = []

    def load(stdout: object) -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise OperationalError("connection failed: Connection refused")

    monkeypatch.setattr(runworker, "load_and_report", load)
    monkeypatch.setattr(runworker, "STARTUP_RETRY_SECS", 0.0)
    runworker.Command().load_heartbeats()
    assert len(attempts) == 3


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the claim lock is PostgreSQL's")
def test_a_claimer_stalled_while_it_holds_the_claim_lock_does_not_stop_the_others(
    make_user,
) -> None:
    # Found by the soak: a worker SIGSTOPped while it held the claim lock (it had been waiting
    # for it) stopped every other worker's claims until it was resumed. The server ends the
    # stalled session after CLAIM_IDLE_LIMIT_MS, so the lock (and its claim) goes with it.
    stall_secs = 12.0
    job = due_job(make_user())
    holding = threading.Event()
    outcome: dict[str, str] = {}

    def stalled_claimer() -> None:
        try:
            with transaction.atomic():
                with connection.cursor() as cursor:
                    cursor.execute(*claims._lock_statement())
                holding.set()
                time.sleep(stall_secs)  # sends nothing, as a stopped process
                Job.objects.count()
            outcome["error"] = ""
        except DatabaseError as exc:  # InternalError: 25P03, idle_in_transaction_session_timeout
            outcome["error"] = str(exc)
        finally:
            connection.close()

    stalled = threading.Thread(target=stalled_claimer)
    stalled.start()
    try:
        assert holding.wait(10)
        began = time.monotonic()
        result = claims.claim_due("other", 1)
        waited = time.monotonic() - began
    finally:
        stalled.join()
    assert [claim.job_id for claim in result.claims] == [job.pk]
    assert waited < stall_secs / 2, f"the claim waited {waited:.1f} s for the stalled claimer"
    assert "idle-in-transaction" in outcome["error"]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL settings")
def test_a_claim_inside_a_callers_transaction_leaves_its_settings_alone(make_user) -> None:
    # The claim's own settings (the idle limit above, JIT off) would last to the end of
    # the outermost transaction, and end a caller's session that paused for 2 s after it.
    due_job(make_user())

    def current() -> tuple[str, str, str]:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT current_setting('idle_in_transaction_session_timeout'), "
                "current_setting('plan_cache_mode'), current_setting('jit')"
            )
            return cursor.fetchone()

    with transaction.atomic():
        before = current()
        assert len(claims.claim_due("nested", 1).claims) == 1
        assert current() == before
