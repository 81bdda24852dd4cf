"""Completing several executions in one transaction (`claims.complete_many`) writes exactly what
completing them one by one writes: the same job rows, the same notifications, fenced the same
way, and in a number of statements that does not grow with the batch."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from kernel.models import User
from notifications.models import Channel, Contact, Kind, Notification
from schedules import claims
from schedules.claims import ClaimLost, Outcome
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Job

S = ExecutionStatus
pytestmark = pytest.mark.django_db

# Fields the comparison leaves out: ids, times read from the clock, and the retry's jitter.
CLOCK_FIELDS = {"id", "owner_id", "created_at", "updated_at", "last_run_at", "deleted_at"}


def _scene(make_user: Callable[..., User], due: Any) -> dict[str, tuple[Job, Outcome]]:
    """Jobs of two owners (one with verified WhatsApp and webhook contacts, one with none),
    each with the outcome its run will report: every branch of moving a job on."""
    quiet, reached = make_user(), make_user()
    for channel, address in (
        (Channel.WHATSAPP, "+15550001111"),
        (Channel.WEBHOOK, "https://x.example/h"),
    ):
        Contact.objects.create(owner=reached, channel=channel, address=address, verified_at=due)
    both = ["success", "failure"]

    def job(name: str, owner: User, outcome: Outcome, **fields: Any) -> tuple[Job, Outcome]:
        fields.setdefault("schedule_type", "interval")
        if fields["schedule_type"] == "interval":
            fields.setdefault("interval_secs", 3600)
        created = Job.objects.create(
            owner=owner, name=name, prompt="p", next_run_at=due, run_at=due, **fields
        )
        return created, outcome

    jobs = [
        job("once", quiet, Outcome(S.SUCCEEDED, output="done"), schedule_type="once"),
        job("interval", reached, Outcome(S.SUCCEEDED, output="hello"), notify_on=both),
        job(
            "console only", reached, Outcome(S.SUCCEEDED, output="hi"), notify_channels=["console"]
        ),
        job("nothing", reached, Outcome(S.SUCCEEDED, output="NOTHING_TO_REPORT"), notify_on=both),
        job("retrying", reached, Outcome(S.FAILED, error="boom"), notify_on=both),
        job(
            "disabled by failures",
            quiet,
            Outcome(S.TIMED_OUT, error="slow"),
            schedule_type="cron",
            cron="*/5 * * * *",
            notify_on=both,
            consecutive_failures=4,
            # Its second attempt: with max_retries = 1 this failure is final.
            pending_scheduled_for=due,
            pending_attempt=2,
        ),
        job("last run", reached, Outcome(S.SUCCEEDED, output="bye"), max_executions=1),
        job("silent", quiet, Outcome(S.SUCCEEDED, output="x"), notify_on=[]),
        job("told by tool", reached, Outcome(S.SUCCEEDED, output="again"), notify_on=both),
        job("deleted", quiet, Outcome(S.SUCCEEDED, output="gone")),
    ]
    Execution.objects.create(
        job=jobs[5][0], scheduled_for=due, attempt=1, status=S.FAILED, finished_at=due
    )
    return {j.name: (j, o) for j, o in jobs}


def _run(
    make_user: Callable[..., User],
    picobot_config: Callable[..., None],
    complete: Callable[[list[tuple[claims.Claim, Outcome]]], list[str]],
    due: Any,
) -> tuple[dict[str, Any], list[tuple[Any, ...]], dict[str, str]]:
    picobot_config("scheduler", max_retries=1, max_consecutive_failures=5, max_concurrent=50)
    picobot_config("scheduler", max_concurrent_per_user=50)
    scene = _scene(make_user, due)
    claimed = {c.job_id: c for c in claims.claim_due("w1", 50).claims}
    by_name = {name: claimed[job.pk] for name, (job, _) in scene.items()}
    Notification.objects.create(
        owner=scene["told by tool"][0].owner,
        channel="console",
        kind=Kind.TOOL,
        body="told",
        idempotency_key=f"tool:{by_name['told by tool'].execution_id}",
        job=scene["told by tool"][0],
        execution_id=by_name["told by tool"].execution_id,
        next_attempt_at=db_now(),
    )
    Job.objects.filter(pk=scene["deleted"][0].pk).update(deleted_at=db_now())
    statuses = complete([(by_name[name], outcome) for name, (_, outcome) in scene.items()])
    jobs = {
        name: {
            k: v
            for k, v in Job.objects.filter(pk=job.pk).values().get().items()
            if k not in CLOCK_FIELDS
            and not (name == "retrying" and k == "next_run_at")  # jittered backoff
        }
        for name, (job, _) in scene.items()
    }
    assert Job.objects.get(pk=scene["retrying"][0].pk).next_run_at is not None
    names = {job.pk: name for name, (job, _) in scene.items()}
    notes = sorted(
        (names[n.job_id], n.kind, n.channel, n.contact.address if n.contact else "", n.body)
        for n in Notification.objects.exclude(kind=Kind.TOOL).select_related("contact")
    )
    return jobs, notes, dict(zip(scene, statuses, strict=True))


def test_a_batch_writes_what_one_by_one_writes(make_user, picobot_config) -> None:
    def one_by_one(done: list[tuple[claims.Claim, Outcome]]) -> list[str]:
        return [claims.complete(claim, outcome) for claim, outcome in done]

    due = (db_now() - timedelta(seconds=5)).replace(microsecond=0)
    with transaction.atomic():
        alone = _run(make_user, picobot_config, one_by_one, due)
        transaction.set_rollback(True)
    together = _run(make_user, picobot_config, claims.complete_many, due)
    assert together == alone
    jobs, notes, statuses = together
    # The scene is what it says: each branch left its mark.
    assert statuses["retrying"] == S.FAILED and jobs["retrying"]["pending_attempt"] == 2
    assert jobs["disabled by failures"]["enabled"] is False
    assert jobs["last run"]["enabled"] is False and jobs["once"]["next_run_at"] is None
    assert jobs["deleted"]["claim_token"] is None and jobs["deleted"]["execution_count"] == 0
    kinds = {(name, kind, channel) for name, kind, channel, _, _ in notes}
    assert ("interval", Kind.RESULT, "whatsapp") in kinds
    assert ("interval", Kind.RESULT, "webhook") in kinds
    assert ("console only", Kind.RESULT, "console") in kinds
    assert ("once", Kind.RESULT, "console") in kinds
    assert ("disabled by failures", Kind.FAILURE, "console") in kinds
    assert ("disabled by failures", Kind.DISABLED, "console") in kinds
    assert {name for name, *_ in notes}.isdisjoint(
        {"nothing", "retrying", "silent", "told by tool"}
    )
    assert all(job["claim_token"] is None for job in jobs.values())


def _due_batch(make_user: Callable[..., User], size: int) -> list[tuple[claims.Claim, Outcome]]:
    owner = make_user()
    Contact.objects.create(
        owner=owner, channel=Channel.WHATSAPP, address="+15550002222", verified_at=db_now()
    )
    for i in range(size):
        Job.objects.create(
            owner=owner,
            name=f"job {i}",
            prompt="p",
            schedule_type="interval",
            interval_secs=60,
            next_run_at=db_now() - timedelta(seconds=1),
        )
    return [(c, Outcome(S.SUCCEEDED, output="ok")) for c in claims.claim_due("w1", size).claims]


@pytest.mark.parametrize("size", [2, 12])
def test_a_batch_costs_the_same_statements_whatever_its_size(
    make_user, picobot_config, size
) -> None:
    picobot_config("scheduler", max_concurrent=50, max_concurrent_per_user=50)
    done = _due_batch(make_user, size)
    assert len(done) == size
    with CaptureQueriesContext(connection) as queries:
        assert claims.complete_many(done) == [S.SUCCEEDED] * size
    # begin/lock/clock, executions, jobs, the notifications' two reads, insert, ids, commit.
    assert len(queries) <= 10, [q["sql"][:80] for q in queries]
    assert Notification.objects.filter(kind=Kind.RESULT).count() == size


def test_the_batched_job_update_is_fenced_on_each_token(make_user, picobot_config) -> None:
    picobot_config("scheduler", max_concurrent=50, max_concurrent_per_user=50)
    done = _due_batch(make_user, 3)
    stale = done[1][0]
    Job.objects.filter(pk=stale.job_id).update(claim_token=uuid.uuid4())
    before = list(Job.objects.order_by("id").values())
    updates = [(c.job_id, c.token, {**claims.RELEASE, "execution_count": 7}) for c, _ in done]
    with pytest.raises(ClaimLost, match=str(stale.job_id)), transaction.atomic():
        claims._fenced_job_updates(updates)
    assert list(Job.objects.order_by("id").values()) == before


def test_a_batch_never_records_success_for_a_run_whose_cancel_was_requested(
    make_user, picobot_config
) -> None:
    picobot_config("scheduler", max_concurrent=50, max_concurrent_per_user=50)
    done = _due_batch(make_user, 3)
    asked = done[1][0]
    Execution.objects.filter(pk=asked.execution_id).update(cancel_requested_at=db_now())
    assert claims.complete_many(done) == [S.SUCCEEDED, S.CANCELLED, S.SUCCEEDED]
    execution = Execution.objects.get(pk=asked.execution_id)
    assert (execution.status, execution.error) == (S.CANCELLED, claims.CANCELLED_ON_REQUEST)
    assert not Notification.objects.filter(execution_id=asked.execution_id).exists()
