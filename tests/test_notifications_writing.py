"""Which rows a completion writes: notify settings, NOTHING_TO_REPORT, auto-disable, fencing."""

from __future__ import annotations

import pytest

from notifications import rules
from notifications.models import Contact, Kind, Notification
from schedules import claims
from schedules.claims import Outcome
from schedules.models import ExecutionStatus, Job
from tests.notification_support import verified_contact
from tests.worker_support import due_job

S = ExecutionStatus
pytestmark = pytest.mark.django_db
TOKEN = rules.NOTHING_TO_REPORT


def complete(job, status=S.SUCCEEDED, output="", error=""):
    [claim] = claims.claim_due("w", 1).claims
    return claims.complete(claim, Outcome(status, output=output, error=error))


@pytest.fixture
def owner(make_user):
    user = make_user()
    verified_contact(user, "+14155550001")
    return user


@pytest.mark.parametrize(
    "output",
    [
        TOKEN,
        f"  {TOKEN}  ",
        f"\n\n{TOKEN}\n",
        f"{TOKEN}\nI checked everything; all fine.",
        f"I checked everything; all fine.\n{TOKEN}",
        f"Checked.\n   {TOKEN}   \n\n",
    ],
)
def test_nothing_to_report_alone_or_on_its_own_first_or_last_line_sends_nothing(owner, output):
    complete(due_job(owner), output=output)
    assert not Notification.objects.exists()


@pytest.mark.parametrize(
    "output",
    [
        f"The disk is full, not {TOKEN} at all.",
        f"Line one\nthere is {TOKEN} here\nline three",
        f"{TOKEN}{TOKEN}x and more",
    ],
)
def test_the_token_inside_a_sentence_is_sent_without_the_token(owner, output):
    complete(due_job(owner), output=output)
    [row] = Notification.objects.all()
    assert row.kind == Kind.RESULT and TOKEN not in row.body and row.body.strip()


def test_a_result_goes_to_every_verified_contact_once_with_an_idempotency_key(owner, make_user):
    verified_contact(owner, "+14155550002")
    Contact.objects.create(owner=owner, channel="whatsapp", address="+14155550003")
    job = due_job(owner, name="daily")
    complete(job, output="Done.")
    rows = list(Notification.objects.order_by("id"))
    assert [r.contact.address for r in rows] == ["+14155550001", "+14155550002"]
    assert all(r.body == "daily: Done." and r.status == "pending" for r in rows)
    assert len({r.idempotency_key for r in rows}) == 2


def test_notify_on_success_only_skips_failures_and_the_reverse(owner, picobot_config):
    picobot_config("scheduler", max_retries=0)
    complete(due_job(owner, notify_on=["failure"]), output="fine")
    complete(due_job(owner, notify_on=["success"]), status=S.FAILED, error="boom")
    assert not Notification.objects.exists()


def test_a_failed_attempt_that_will_be_retried_reports_nothing_yet(owner):
    complete(due_job(owner), status=S.FAILED, error="boom")
    assert not Notification.objects.exists()


def test_a_final_failure_is_reported(owner, picobot_config):
    picobot_config("scheduler", max_retries=0)
    complete(due_job(owner, name="nightly"), status=S.FAILED, error="model unreachable")
    [row] = Notification.objects.all()
    assert row.kind == Kind.FAILURE and "model unreachable" in row.body


def test_an_auto_disabled_job_tells_its_owner_why(owner, picobot_config):
    picobot_config("scheduler", max_retries=0, max_consecutive_failures=1)
    job = due_job(owner, name="flaky", notify_on=[])
    complete(job, status=S.FAILED, error="boom")
    [row] = Notification.objects.all()
    assert row.kind == Kind.DISABLED and "consecutive failed runs" in row.body
    job.refresh_from_db()
    assert not job.enabled


def test_no_contact_means_the_console(make_user):
    complete(due_job(make_user()), output="hello")
    [row] = Notification.objects.all()
    assert (row.channel, row.contact) == ("console", None)


def test_notify_channels_limits_where_results_go(owner):
    complete(due_job(owner, notify_channels=["webhook"]), output="hello")
    assert not Notification.objects.exists()


def test_a_superseded_completion_writes_nothing(owner):
    job = due_job(owner)
    [claim] = claims.claim_due("w", 1).claims
    Job.objects.filter(pk=job.pk).update(claim_token=None)  # another worker took it over
    assert claims.complete(claim, Outcome(S.SUCCEEDED, output="late")) == S.SUPERSEDED
    assert not Notification.objects.exists()


def test_a_run_that_used_the_notify_tool_does_not_send_its_result(owner):
    due_job(owner)
    [claim] = claims.claim_due("w", 1).claims
    Notification.objects.create(
        owner=owner,
        channel="whatsapp",
        kind=Kind.TOOL,
        body="x",
        idempotency_key="tool-row",
        execution_id=claim.execution_id,
        next_attempt_at=claim.started_at,
    )
    claims.complete(claim, Outcome(S.SUCCEEDED, output="the result"))
    assert list(Notification.objects.values_list("kind", flat=True)) == [Kind.TOOL]


def test_whatsapp_bodies_are_cut_at_4096_with_a_marker(owner):
    complete(due_job(owner, name="big"), output="x" * 10_000)
    [row] = Notification.objects.all()
    assert len(row.body) == 4096 and row.body.endswith(rules.CUT_MARKER)
