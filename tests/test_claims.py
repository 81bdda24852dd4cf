"""The claim protocol in one process: claims, limits, fairness, fencing, completion, recovery."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest
from django.db import DataError, OperationalError, connection
from django.test.utils import CaptureQueriesContext

from kernel.models import User
from schedules import claims
from schedules.claims import Outcome
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Job

S = ExecutionStatus
# Transactional: a claim in a transaction of its own takes the path workers take (on PostgreSQL,
# planned without the lock and claimed in one round trip), not the one inside a caller's.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def uncontended(monkeypatch: Any) -> None:
    # Each test starts as a worker that has not seen a claim come short.
    monkeypatch.setattr(claims, "_contended_until", 0.0)


@pytest.fixture
def make_job(make_user: Callable[..., User]) -> Callable[..., Job]:
    default_owner: list[User] = []

    def make(owner: User | None = None, **fields: Any) -> Job:
        if owner is None:
            if not default_owner:
                default_owner.append(make_user())
            owner = default_owner[0]
        values: dict[str, Any] = {
            "name": "job",
            "prompt": "say hi",
            "schedule_type": "interval",
            "interval_secs": 3600,
            "next_run_at": db_now() - timedelta(seconds=1),
            "capabilities": ["shell:echo"],
        }
        values.update(fields)
        return Job.objects.create(owner=owner, **values)

    return make


def claim(limit: int = 10, worker: str = "w1") -> list[claims.Claim]:
    return claims.claim_due(worker, limit).claims


def test_it_claims_a_due_job_with_a_token_a_lease_and_a_running_execution(make_job):
    job = make_job()
    due = job.next_run_at
    [c] = claim(worker="w-test")
    job.refresh_from_db()
    assert job.claim_token == c.token and job.claimed_by == "w-test"
    assert job.lease_expires_at > db_now()
    execution = Execution.objects.get(pk=c.execution_id)
    assert execution.status == S.RUNNING and execution.claim_token == c.token
    assert execution.scheduled_for == due and execution.attempt == 1
    assert execution.prompt == "say hi" and execution.capabilities == ["shell:echo"]
    assert execution.worker_id == "w-test"


def test_it_claims_nothing_that_is_not_due(make_job):
    make_job(next_run_at=db_now() + timedelta(minutes=5))
    make_job(enabled=False)
    make_job(deleted_at=db_now())
    make_job(next_run_at=None)
    assert claim() == []


def test_a_claimed_job_is_not_claimed_again(make_job):
    make_job()
    assert len(claim(worker="a")) == 1
    assert claim(worker="b") == []
    assert Execution.objects.count() == 1


def test_each_claim_gets_a_fresh_token(make_job):
    make_job()
    make_job()
    tokens = {c.token for c in claim()}
    assert len(tokens) == 2


def test_the_global_limit_holds_across_claims(make_job, picobot_config, make_user):
    picobot_config("scheduler", max_concurrent=3, max_concurrent_per_user=10)
    for _ in range(5):
        make_job(owner=make_user())
    assert len(claim(worker="a")) == 3
    assert claim(worker="b") == []


def test_the_per_user_limit_holds_and_one_users_backlog_does_not_starve_another(
    make_job, make_user, picobot_config
):
    picobot_config("scheduler", max_concurrent=4, max_concurrent_per_user=2)
    busy, quiet = make_user(), make_user()
    old = db_now() - timedelta(hours=1)
    for i in range(20):
        make_job(owner=busy, next_run_at=old + timedelta(seconds=i))
    make_job(owner=quiet)  # due later than all of busy's backlog
    got = claim(limit=3)
    owners = [c.owner_id for c in got]
    assert owners.count(quiet.pk) == 1
    assert owners.count(busy.pk) == 2
    assert claim() == []  # busy is at its limit, quiet has nothing else


@pytest.mark.parametrize("page", [1, 3, 200])
def test_fairness_and_the_limits_hold_whatever_the_candidate_page_size(
    make_job, make_user, picobot_config, monkeypatch, page
):
    # Candidates are read a page at a time from the due index; a backlog longer than a page
    # (an owner at its limit, or over its quota) must not hide the owners due after it.
    monkeypatch.setattr(claims, "CANDIDATE_PAGE", page)
    picobot_config("scheduler", max_concurrent=10, max_concurrent_per_user=2, max_runs_per_window=3)
    busy, capped, quiet = make_user(), make_user(), make_user()
    old = db_now() - timedelta(hours=1)
    for i in range(3):
        Execution.objects.create(
            job=make_job(owner=capped, next_run_at=None), scheduled_for=old, attempt=i + 1
        )
    Execution.objects.filter(job__owner=capped).update(status=S.SUCCEEDED, started_at=db_now())
    for i in range(8):
        make_job(owner=capped, next_run_at=old + timedelta(seconds=i))
        make_job(owner=busy, next_run_at=old + timedelta(seconds=10 + i))
    make_job(owner=quiet)
    result = claims.claim_due("w", 10)
    owners = [c.owner_id for c in result.claims]
    assert sorted(owners) == sorted([busy.pk, busy.pk, quiet.pk])
    assert result.deferred >= 1
    assert claim() == []


def test_an_over_quota_occurrence_is_deferred_and_keeps_its_scheduled_time(
    make_job, picobot_config
):
    picobot_config("scheduler", max_runs_per_window=1, window_secs=3600)
    first = make_job()
    [c] = claim()
    claims.complete(c, Outcome(S.SUCCEEDED, output="done"))
    late = make_job(schedule_type="once", interval_secs=None, run_at=db_now())
    due = Job.objects.get(pk=late.pk).next_run_at
    result = claims.claim_due("w", 10)
    assert result.claims == [] and result.deferred == 1
    # The window slides on: the earlier run falls out of it and the deferred one runs as planned.
    Execution.objects.filter(job=first).update(started_at=db_now() - timedelta(hours=2))
    [c] = claim()
    assert c.job_id == late.pk and c.scheduled_for == due


def test_an_owner_first_reached_on_a_later_page_has_their_runs_counted(
    make_job, make_user, picobot_config, monkeypatch
):
    # The first page's owners are counted in the claim's first statement, later pages' owners
    # by a query of their own: an owner at the quota only on page two is held back too, and
    # one just below it gets exactly one more run.
    monkeypatch.setattr(claims, "CANDIDATE_PAGE", 2)
    picobot_config("scheduler", max_runs_per_window=2, max_concurrent_per_user=5)
    early, at_limit, below = make_user(), make_user(), make_user()
    for owner in (at_limit, below):
        done = make_job(owner, next_run_at=db_now() - timedelta(hours=2))
        [c] = claim()
        claims.complete(c, Outcome(S.SUCCEEDED, output="done"))
        if owner is at_limit:
            done.refresh_from_db()
            done.next_run_at = db_now() - timedelta(hours=2)
            done.save(update_fields=["next_run_at"])
            [c] = claim()
            claims.complete(c, Outcome(S.SUCCEEDED, output="done"))
        Job.objects.filter(pk=done.pk).update(enabled=False)  # its runs count; it is not due
    oldest = db_now() - timedelta(minutes=30)
    for _ in range(2):
        make_job(early, next_run_at=oldest)
    blocked = [make_job(at_limit, next_run_at=oldest + timedelta(minutes=1)) for _ in range(2)]
    allowed = [make_job(below, next_run_at=oldest + timedelta(minutes=2)) for _ in range(2)]
    result = claims.claim_due("w", 10)
    taken = {c.job_id for c in result.claims}
    assert not taken & {job.pk for job in blocked}
    assert len(taken & {job.pk for job in allowed}) == 1
    assert result.deferred >= 2


def test_the_system_principal_is_exempt_from_the_runs_quota(make_job, make_user, picobot_config):
    picobot_config("scheduler", max_runs_per_window=1)
    system = make_user(is_system=True)
    make_job(owner=system)
    make_job(owner=system)
    assert len(claim()) == 2


def test_misfire_skip_records_a_skipped_execution_and_moves_on(make_job):
    now = db_now()
    job = make_job(interval_secs=60, next_run_at=now - timedelta(seconds=150), misfire="skip")
    result = claims.claim_due("w", 10)
    assert result.claims == [] and result.skipped == 1
    job.refresh_from_db()
    skipped = Execution.objects.get(job=job)
    assert skipped.status == S.SKIPPED and skipped.missed_count == 2
    assert job.claim_token is None and job.next_run_at > now


def test_run_once_runs_the_latest_missed_occurrence_and_counts_the_rest(make_job):
    now = db_now()
    start = now - timedelta(seconds=150)
    make_job(interval_secs=60, next_run_at=start)
    [c] = claim()
    execution = Execution.objects.get(pk=c.execution_id)
    assert execution.scheduled_for == start + timedelta(seconds=120)
    assert execution.missed_count == 2


def test_success_reschedules_from_the_scheduled_time_and_releases_the_claim(make_job):
    job = make_job(interval_secs=600)
    [c] = claim()
    assert claims.complete(c, Outcome(S.SUCCEEDED, output="fine")) == S.SUCCEEDED
    job.refresh_from_db()
    assert job.next_run_at == c.scheduled_for + timedelta(seconds=600)
    assert job.claim_token is None and job.lease_expires_at is None and job.claimed_by == ""
    assert job.execution_count == 1 and job.last_run_at == c.started_at
    execution = Execution.objects.get(pk=c.execution_id)
    assert execution.status == S.SUCCEEDED and execution.output == "fine"
    assert execution.finished_at is not None


def test_a_once_job_is_disabled_after_its_run(make_job):
    job = make_job(schedule_type="once", interval_secs=None, run_at=db_now())
    [c] = claim()
    claims.complete(c, Outcome(S.SUCCEEDED))
    job.refresh_from_db()
    assert not job.enabled and job.next_run_at is None


def test_a_cancelled_once_job_is_disabled(make_job):
    job = make_job(schedule_type="once", interval_secs=None, run_at=db_now())
    [c] = claim()
    claims.complete(c, Outcome(S.CANCELLED))
    job.refresh_from_db()
    assert not job.enabled and job.consecutive_failures == 0


def test_max_executions_counts_occurrences_not_attempts(make_job, picobot_config):
    picobot_config("scheduler", max_retries=1, backoff_base_secs=1, backoff_max_secs=1)
    job = make_job(max_executions=2, interval_secs=60)
    [c] = claim()
    claims.complete(c, Outcome(S.FAILED, error="boom"))  # retried: not counted yet
    job.refresh_from_db()
    assert job.execution_count == 0 and job.pending_attempt == 2
    Job.objects.filter(pk=job.pk).update(next_run_at=db_now())
    [c] = claim()
    assert c.attempt == 2 and c.scheduled_for == Execution.objects.get(attempt=1).scheduled_for
    claims.complete(c, Outcome(S.SUCCEEDED))
    job.refresh_from_db()
    assert job.execution_count == 1 and job.enabled and job.pending_scheduled_for is None
    Job.objects.filter(pk=job.pk).update(next_run_at=db_now())
    [c] = claim()
    claims.complete(c, Outcome(S.SUCCEEDED))
    job.refresh_from_db()
    assert job.execution_count == 2 and not job.enabled and job.next_run_at is None


def test_a_failure_is_retried_with_backoff_before_the_next_occurrence(make_job, picobot_config):
    picobot_config("scheduler", max_retries=3, backoff_base_secs=10, backoff_max_secs=3600)
    job = make_job(interval_secs=3600)
    [c] = claim()
    before = db_now()
    claims.complete(c, Outcome(S.FAILED, error="boom"))
    job.refresh_from_db()
    delay = (job.next_run_at - before).total_seconds()
    assert 4 <= delay <= 11
    assert job.pending_scheduled_for == c.scheduled_for and job.pending_attempt == 2
    assert job.last_error == "boom" and job.consecutive_failures == 0


def test_a_retry_that_would_reach_the_next_occurrence_is_given_up(make_job, picobot_config):
    # Equal jitter: the delay is at least half of 200 s, past the next occurrence (60 s).
    picobot_config("scheduler", max_retries=3, backoff_base_secs=200, backoff_max_secs=3600)
    job = make_job(interval_secs=60)
    [c] = claim()
    claims.complete(c, Outcome(S.TIMED_OUT, error="too slow"))
    job.refresh_from_db()
    assert job.next_run_at == c.scheduled_for + timedelta(seconds=60)
    assert job.pending_scheduled_for is None and job.consecutive_failures == 1
    assert job.execution_count == 1


def test_repeated_failed_occurrences_disable_the_job_saying_so(make_job, picobot_config):
    picobot_config("scheduler", max_retries=0, max_consecutive_failures=3)
    job = make_job(interval_secs=60)
    for _ in range(3):
        Job.objects.filter(pk=job.pk).update(next_run_at=db_now())
        [c] = claim()
        claims.complete(c, Outcome(S.FAILED, error="the model said no"))
    job.refresh_from_db()
    assert not job.enabled and job.consecutive_failures == 3
    assert "Disabled after 3 consecutive failed runs" in job.last_error
    assert "the model said no" in job.last_error


def test_a_success_resets_the_failure_count(make_job, picobot_config):
    picobot_config("scheduler", max_retries=0)
    job = make_job(interval_secs=60)
    [c] = claim()
    claims.complete(c, Outcome(S.FAILED, error="x"))
    Job.objects.filter(pk=job.pk).update(next_run_at=db_now())
    [c] = claim()
    claims.complete(c, Outcome(S.SUCCEEDED))
    job.refresh_from_db()
    assert job.consecutive_failures == 0 and job.last_error == ""


def test_a_patch_during_the_run_keeps_its_next_run_and_its_fields(make_job):
    job = make_job(interval_secs=600)
    [c] = claim()
    patched_next = db_now() + timedelta(days=2)
    # What lifecycle.update_job does: a conditional UPDATE of the changed fields only.
    Job.objects.filter(pk=job.pk).update(
        prompt="new prompt", schedule_version=job.schedule_version + 1, next_run_at=patched_next
    )
    claims.complete(c, Outcome(S.SUCCEEDED))
    job.refresh_from_db()
    assert job.next_run_at == patched_next and job.prompt == "new prompt"
    assert job.claim_token is None and job.execution_count == 1


def test_a_cancel_or_delete_made_during_the_run_is_not_undone(make_job):
    job = make_job()
    [c] = claim()
    deleted_at = db_now()
    Job.objects.filter(pk=job.pk).update(deleted_at=deleted_at, enabled=False)
    claims.complete(c, Outcome(S.SUCCEEDED))
    job.refresh_from_db()
    assert job.deleted_at == deleted_at and not job.enabled and job.claim_token is None


def expire_lease(job_id: int) -> None:
    Job.objects.filter(pk=job_id).update(lease_expires_at=db_now() - timedelta(seconds=1))


def test_an_expired_lease_is_recovered_as_lost_and_retried(make_job, picobot_config):
    picobot_config("scheduler", max_retries=2, backoff_base_secs=1, backoff_max_secs=1)
    job = make_job()
    [c] = claim(worker="dead")
    assert claims.recover_expired() == 0  # the lease is live
    expire_lease(job.pk)
    assert claims.recover_expired() == 1
    execution = Execution.objects.get(pk=c.execution_id)
    assert execution.status == S.LOST and "dead" in execution.error
    job.refresh_from_db()
    assert job.claim_token is None and job.pending_attempt == 2
    Job.objects.filter(pk=job.pk).update(next_run_at=db_now())
    [retry] = claim(worker="alive")
    assert retry.scheduled_for == c.scheduled_for and retry.attempt == 2


def test_an_expired_lease_with_a_cancel_request_is_recovered_as_cancelled(make_job):
    job = make_job()
    [c] = claim()
    Execution.objects.filter(pk=c.execution_id).update(cancel_requested_at=db_now())
    expire_lease(job.pk)
    claims.recover_expired()
    assert Execution.objects.get(pk=c.execution_id).status == S.CANCELLED


def test_a_late_finisher_records_superseded_and_changes_nothing(make_job):
    job = make_job()
    [c] = claim(worker="slow")
    expire_lease(job.pk)
    claims.recover_expired()
    Job.objects.filter(pk=job.pk).update(next_run_at=db_now())
    [c2] = claim(worker="fast")
    before = Job.objects.filter(pk=job.pk).values().get()
    assert claims.complete(c, Outcome(S.SUCCEEDED, output="late")) == S.SUPERSEDED
    assert Job.objects.filter(pk=job.pk).values().get() == before
    slow = Execution.objects.get(pk=c.execution_id)
    assert slow.status == S.SUPERSEDED and slow.output == "late"
    assert Execution.objects.get(pk=c2.execution_id).status == S.RUNNING


def test_a_lost_attempt_later_superseded_still_counts_against_max_retries(make_job, picobot_config):
    picobot_config("scheduler", max_retries=1, backoff_base_secs=1, backoff_max_secs=1)
    job = make_job()
    [first] = claim(worker="paused")
    expire_lease(job.pk)
    claims.recover_expired()  # attempt 1: lost, retried
    # The paused worker comes back and records its run: `lost` becomes `superseded`.
    assert claims.complete(first, Outcome(S.SUCCEEDED)) == S.SUPERSEDED
    Job.objects.filter(pk=job.pk).update(next_run_at=db_now())
    [second] = claim(worker="alive")
    assert second.attempt == 2
    claims.complete(second, Outcome(S.FAILED, error="boom"))
    # Two failed attempts with max_retries = 1: the occurrence is given up, not tried a third time.
    job.refresh_from_db()
    assert job.pending_scheduled_for is None and job.pending_attempt == 1
    assert job.next_run_at == first.scheduled_for + timedelta(seconds=3600)
    statuses = list(Execution.objects.filter(job=job).order_by("attempt").values_list("status"))
    assert statuses == [(S.SUPERSEDED,), (S.FAILED,)]


def test_a_batch_of_completions_records_each_and_changes_nothing_for_a_lost_claim(
    make_job, make_user
):
    jobs = [make_job(owner=make_user()) for _ in range(4)]
    batch = {c.job_id: c for c in claim(worker="slow")}
    kept, taken, recovered, failed = (batch[job.pk] for job in jobs)
    # One job changed hands (another worker holds it now); one execution was already finalised.
    Job.objects.filter(pk=taken.job_id).update(claim_token=uuid4())
    Execution.objects.filter(pk=recovered.execution_id).update(status=S.LOST)
    before = Job.objects.filter(pk=taken.job_id).values().get()
    statuses = claims.complete_many(
        [
            (kept, Outcome(S.SUCCEEDED, output="one")),
            (taken, Outcome(S.SUCCEEDED, output="two")),
            (recovered, Outcome(S.SUCCEEDED, output="three")),
            (failed, Outcome(S.FAILED, error="boom")),
        ]
    )
    assert statuses == [S.SUCCEEDED, S.SUPERSEDED, S.SUPERSEDED, S.FAILED]
    assert Job.objects.filter(pk=taken.job_id).values().get() == before
    rows = Execution.objects.in_bulk([c.execution_id for c in batch.values()])
    assert (rows[kept.execution_id].status, rows[kept.execution_id].output) == (S.SUCCEEDED, "one")
    assert rows[taken.execution_id].status == S.SUPERSEDED
    assert rows[recovered.execution_id].status == S.SUPERSEDED
    assert (rows[failed.execution_id].status, rows[failed.execution_id].error) == (S.FAILED, "boom")
    kept_job, failed_job = Job.objects.get(pk=kept.job_id), Job.objects.get(pk=failed.job_id)
    assert kept_job.claim_token is None and kept_job.last_run_at == kept.started_at
    assert failed_job.claim_token is None and failed_job.pending_attempt == 2
    # The job whose execution was already final stays held: recovery releases it, not us.
    assert Job.objects.get(pk=recovered.job_id).claim_token == recovered.token


def test_a_renewal_fails_once_the_claim_is_lost(make_job):
    job = make_job()
    [c] = claim()
    assert claims.renew_lease(c.job_id, c.token)
    assert claims.holds_claim(c.job_id, c.token)
    expire_lease(job.pk)
    claims.recover_expired()
    assert not claims.renew_lease(c.job_id, c.token)
    assert not claims.holds_claim(c.job_id, c.token)


def test_an_interrupted_run_is_released_due_now_with_a_new_attempt_number(make_job):
    job = make_job()
    due = job.next_run_at
    [c] = claim()
    claims.complete(c, Outcome(S.INTERRUPTED))
    job.refresh_from_db()
    assert job.claim_token is None and job.next_run_at == due
    assert job.consecutive_failures == 0 and job.execution_count == 0
    [again] = claim()
    assert again.scheduled_for == c.scheduled_for and again.attempt == 2


def test_cancel_requests_are_read_for_running_executions(make_job):
    make_job()
    make_job()
    a, b = claim()
    Execution.objects.filter(pk=b.execution_id).update(cancel_requested_at=db_now())
    assert claims.cancel_requested([a.execution_id, b.execution_id]) == {b.execution_id}


def test_next_wakeup_is_the_earliest_due_time_or_lease(make_job):
    soon = db_now() + timedelta(seconds=30)
    make_job(next_run_at=soon)
    make_job(next_run_at=soon + timedelta(seconds=10))
    assert claims.next_wakeup() == soon


def test_retention_purges_old_executions_and_deleted_jobs(make_job, picobot_config):
    picobot_config("scheduler", history_days=30)
    old = db_now() - timedelta(days=31)
    kept_job = make_job()
    gone_job = make_job(deleted_at=old)
    Execution.objects.create(job=kept_job, scheduled_for=old, status=S.SUCCEEDED, finished_at=old)
    recent = Execution.objects.create(
        job=kept_job, scheduled_for=db_now(), status=S.SUCCEEDED, finished_at=db_now()
    )
    assert claims.purge_history() == (1, 1)
    assert list(Execution.objects.values_list("pk", flat=True)) == [recent.pk]
    assert not Job.objects.filter(pk=gone_job.pk).exists()


def test_a_claim_never_starts_an_attempt_that_already_started(make_job):
    job = make_job(interval_secs=600)
    due = job.next_run_at
    Execution.objects.create(job=job, scheduled_for=due, attempt=1, status=S.SUCCEEDED)
    assert claim() == []
    job.refresh_from_db()
    assert job.next_run_at == due + timedelta(seconds=600) and job.claim_token is None
    assert Execution.objects.count() == 1


def test_a_fault_moving_past_a_started_occurrence_loses_no_claim_committed_with_it(
    make_job, make_user, monkeypatch
):
    # The claim committed both jobs; moving the conflicting one past its occurrence fails (the
    # database went away a moment): the other claim must still be run, not left to recovery.
    started = make_job(interval_secs=600, owner=make_user())
    fresh = make_job(interval_secs=600, owner=make_user())
    Execution.objects.create(job=started, scheduled_for=started.next_run_at, attempt=1)
    Execution.objects.filter(job=started).update(status=S.SUCCEEDED)

    def fails(*args: Any) -> None:
        raise OperationalError("the connection was lost")

    monkeypatch.setattr(claims, "_already_started", fails)
    if connection.vendor != "postgresql":
        # The general path moves past it inside the claim's transaction: all or nothing.
        with pytest.raises(OperationalError):
            claim()
        return
    [claimed] = claim()
    assert claimed.job_id == fresh.pk
    assert Execution.objects.get(pk=claimed.execution_id).status == S.RUNNING


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a\x00b", "ab"),
        ("lone \ud800 surrogate", "lone \ufffd surrogate"),
        ("emoji 🎉 and 中文", "emoji 🎉 and 中文"),
    ],
)
def test_recorded_text_is_storable_whatever_unicode_it_holds(text, expected):
    assert claims.clean_text(text, 100) == expected


def test_recorded_text_is_bounded():
    assert len(claims.clean_text("x" * 50, 10)) == 10


def test_db_now_is_used_for_leases_not_the_host_clock(make_job):
    make_job()
    [c] = claim()
    assert abs((c.started_at - datetime.now(UTC)).total_seconds()) < 60


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the one-statement claim")
def test_a_claim_sends_the_same_statements_however_many_it_claims(
    make_job, make_user, picobot_config
):
    # Every moment the claim lock is held costs each waiting worker: the look is read without
    # it, and the lock, the claim with its executions (one statement, for 1 job or 8) and the
    # commit are sent together.
    picobot_config("scheduler", max_concurrent=16)
    counts = []
    for n in (1, 8):
        for _ in range(n):
            make_job(owner=make_user())
        with CaptureQueriesContext(connection) as captured:
            assert len(claim(limit=n)) == n
        counts.append([q["sql"].split()[0] for q in captured.captured_queries])
        assert "pg_advisory_xact_lock" in captured.captured_queries[2]["sql"]
    assert counts[0] == counts[1]
    assert counts[0] == [
        "WITH",  # the look, without the lock
        "BEGIN",  # then in one round trip:
        "SELECT",  # the claim lock
        "WITH",  # the claim and its executions, the limits counted again
        "COMMIT",  # (the owners came with the claim: no query after it)
    ]


def test_a_claim_gives_each_run_its_owner_as_the_orm_loads_it(make_job, make_user):
    owner = make_user(grant=["shell:echo", "net:*.example.com"], is_system=False)
    make_job(owner=owner)
    [claimed] = claim()
    stored = User.objects.get(pk=owner.pk)
    assert claimed.owner is not None and claimed.owner.pk == owner.pk
    for f in User._meta.concrete_fields:
        assert getattr(claimed.owner, f.attname) == getattr(stored, f.attname), f.name
    assert claimed.owner.grant == ["shell:echo", "net:*.example.com"]
    assert not claimed.owner._state.adding


@pytest.mark.parametrize(
    "change",
    [
        {"schedule_version": 2},
        {"misfire": "skip"},
        {"pending_scheduled_for": datetime(2026, 1, 1, tzinfo=UTC), "pending_attempt": 2},
        {"next_run_at_shift": -30},
    ],
)
def test_a_job_changed_after_the_look_is_not_claimed_as_planned(make_job, monkeypatch, change):
    # The occurrence is planned from the look; a PATCH (or a retry written) after it would make
    # that plan stale, so the job is not claimed as planned: the claimer looks again and plans
    # afresh.
    job = make_job(interval_secs=60, next_run_at=db_now() - timedelta(seconds=150))
    real_look = claims._look
    changed: list[Job] = []

    def look_then_change(*args: Any, **kwargs: Any) -> Any:
        look = real_look(*args, **kwargs)
        if changed:
            return look
        fields = dict(change)
        if "next_run_at_shift" in fields:
            fields = {
                "next_run_at": job.next_run_at + timedelta(seconds=fields.pop("next_run_at_shift"))
            }
        Job.objects.filter(pk=job.pk).update(**fields)
        changed.append(Job.objects.get(pk=job.pk))
        return look

    monkeypatch.setattr(claims, "_look", look_then_change)
    result = claims.claim_due("w1", 10)
    expected, _, _ = claims._plan_start(changed[0], db_now())
    if expected is None:  # the changed job's occurrence is skipped (misfire "skip")
        assert result.claims == [] and result.skipped == 1
        assert Execution.objects.get(job=job).status == S.SKIPPED
        return
    [claimed] = result.claims
    assert (claimed.scheduled_for, claimed.attempt) == (expected.scheduled_for, expected.attempt)
    assert claimed.schedule_version == changed[0].schedule_version
    assert Execution.objects.filter(job=job).count() == 1


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the claim planned without the lock")
@pytest.mark.parametrize(
    "limit", ["max_concurrent_per_user", "max_concurrent", "max_runs_per_window"]
)
def test_the_limits_are_counted_again_under_the_lock_after_a_look_without_it(
    make_job, make_user, picobot_config, monkeypatch, limit
):
    # A worker looks and plans without the claim lock; before it claims, another worker claims
    # runs that reach a limit. The limits must hold as counted under the lock, not as looked.
    limits = {"max_concurrent": 50, "max_concurrent_per_user": 50, "max_runs_per_window": 1000}
    picobot_config("scheduler", **{**limits, limit: 2})
    alice, bob = make_user(), make_user()
    now = db_now()
    mine = [make_job(owner=alice, next_run_at=now - timedelta(seconds=60 + i)) for i in range(2)]
    real_look = claims._look

    def look_then_another_worker_claims(*args: Any, **kwargs: Any) -> Any:
        look = real_look(*args, **kwargs)
        monkeypatch.setattr(claims, "_look", real_look)
        # Due before alice's, so the other worker takes these; alice's are left as planned.
        owner = bob if limit == "max_concurrent" else alice
        for i in range(2):
            make_job(owner=owner, next_run_at=now - timedelta(seconds=600 + i))
        others = claims.claim_due("w1", 2, due_before=now - timedelta(seconds=300)).claims
        assert len(others) == 2 and not {c.job_id for c in others} & {j.pk for j in mine}
        return look

    monkeypatch.setattr(claims, "_look", look_then_another_worker_claims)
    late = claims.claim_due("w2", 10)
    assert late.claims == []
    assert Job.objects.filter(pk__in=[j.pk for j in mine], claim_token__isnull=True).count() == 2
    # With the limit raised, the same claim takes them.
    picobot_config("scheduler", **{limit: 4})
    assert sorted(c.job_id for c in claims.claim_due("w2", 10).claims) == sorted(j.pk for j in mine)


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the claim planned without the lock")
def test_a_worker_that_looked_with_another_still_fills_its_slots(make_job, make_user, monkeypatch):
    # Two workers look at the same moment and plan the same oldest occurrences; the one that
    # claims second takes the next ones it planned instead of coming away empty (at once: not
    # by looking again), once claims have been seen to come short.
    monkeypatch.setattr(claims, "CLAIM_ATTEMPTS", 1)
    monkeypatch.setattr(claims, "_contended_until", float("inf"))
    now = db_now()
    jobs = [
        make_job(owner=make_user(), next_run_at=now - timedelta(seconds=60 - i)) for i in range(6)
    ]
    real_look = claims._look

    def look_then_another_worker_claims(*args: Any, **kwargs: Any) -> Any:
        look = real_look(*args, **kwargs)
        monkeypatch.setattr(claims, "_look", real_look)
        assert [c.job_id for c in claims.claim_due("w1", 2).claims] == [j.pk for j in jobs[:2]]
        return look

    monkeypatch.setattr(claims, "_look", look_then_another_worker_claims)
    assert [c.job_id for c in claims.claim_due("w2", 2).claims] == [j.pk for j in jobs[2:4]]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the claim planned without the lock")
def test_a_worker_that_lost_every_occurrence_it_planned_looks_again(
    make_job, make_user, monkeypatch, picobot_config
):
    # Another worker claimed everything this one planned: occurrences are still due, so it
    # looks again rather than coming away empty (and idling for a tick).
    picobot_config("scheduler", max_concurrent=16)
    now = db_now()
    jobs = [
        make_job(owner=make_user(), next_run_at=now - timedelta(seconds=60 - i)) for i in range(8)
    ]
    real_look = claims._look
    looks = []

    def look_then_another_worker_claims(*args: Any, **kwargs: Any) -> Any:
        look = real_look(*args, **kwargs)
        looks.append(look)
        if len(looks) == 1:
            taken = claims.claim_due("w1", claims.CLAIM_SURPLUS).claims
            assert len(taken) == claims.CLAIM_SURPLUS
        return look

    monkeypatch.setattr(claims, "_look", look_then_another_worker_claims)
    [claimed] = claims.claim_due("w2", 1).claims
    assert claimed.job_id == jobs[claims.CLAIM_SURPLUS].pk
    assert len(looks) == 3  # w2's first look, w1's, w2's second


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the claim planned without the lock")
def test_a_claim_offers_more_candidates_only_once_claims_come_short(
    make_job, make_user, monkeypatch, picobot_config
):
    # Alone, a worker plans one occurrence per free slot (planning and locking more would be
    # wasted); once a claim came short, it offers CLAIM_SURPLUS per slot.
    picobot_config("scheduler", max_concurrent=50)
    for _ in range(30):
        make_job(owner=make_user())
    offered: list[int] = []
    real_plan = claims._plan

    def counted_plan(chosen: Any, now: Any) -> Any:
        offered.append(len(chosen))
        return real_plan(chosen, now)

    monkeypatch.setattr(claims, "_plan", counted_plan)
    assert len(claims.claim_due("w1", 2).claims) == 2
    assert offered == [2]
    real_look = claims._look
    stolen: list[int] = []

    def look_then_steal(*args: Any, **kwargs: Any) -> Any:
        look = real_look(*args, **kwargs)
        if not stolen:
            ids = [row.id for row in look.page[:2]]
            stolen.extend(ids)
            Job.objects.filter(pk__in=ids).update(claim_token=uuid.uuid4())
        return look

    monkeypatch.setattr(claims, "_look", look_then_steal)
    offered.clear()
    assert len(claims.claim_due("w1", 2).claims) == 2  # came short, looked again with more
    assert offered == [2, 2 * claims.CLAIM_SURPLUS]


@pytest.mark.parametrize(
    ("wanted", "size"),
    [(0, 16), (8, 16), (9, 18), (100, 200), (101, 200), (1000, 200)],
)
def test_the_candidate_page_is_twice_the_candidates_wanted_within_its_bounds(wanted, size):
    assert claims._page_size(wanted) == size


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the claim's one round trip")
def test_a_claim_statement_that_fails_leaves_no_transaction_and_no_lock_behind():
    # The pipeline stops at the error with its transaction open (and the claim lock held): it
    # must be rolled back, or every other worker's claim would wait on this connection.
    import psycopg
    from psycopg.pq import TransactionStatus

    with pytest.raises(DataError):
        claims._in_one_round_trip("SELECT 1 / 0", [])
    assert connection.connection.info.transaction_status == TransactionStatus.IDLE
    db = connection.settings_dict
    where = {"dbname": db["NAME"], "user": db["USER"], "host": db["HOST"], "port": db["PORT"]}
    with psycopg.connect(**{k: v for k, v in where.items() if v}, autocommit=True) as other:
        [[free]] = other.execute(
            "SELECT pg_try_advisory_lock(%s)", [claims.CLAIM_LOCK_KEY]
        ).fetchall()
    assert free
