"""PATCH affects the next run only; DELETE and cancel against a running execution."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils.dateparse import parse_datetime

from schedules import lifecycle
from schedules.claims import Outcome, claim_due, complete
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Job
from tests.api_schedules_support import URL, cron_body, detail, interval_body, once_body, start_run

pytestmark = pytest.mark.django_db
S = ExecutionStatus


@pytest.fixture
def alice(make_user):
    return make_user("alice", grant=["schedule:*", "net:*.example.com", "shell:ls,cat"])


@pytest.fixture
def client(alice, api_client_for):
    return api_client_for(alice)


def create(client, body) -> Job:
    response = client.post(URL, body, format="json")
    assert response.status_code == 201, response.json()
    return Job.objects.get(pk=response.json()["id"])


def test_a_patch_of_the_prompt_leaves_the_running_execution_as_it_started(client) -> None:
    job = create(client, interval_body(prompt="old", capabilities=["shell:ls"]))
    claim = start_run(job.pk)
    response = client.patch(
        detail(job.pk), {"prompt": "new", "capabilities": ["net:api.example.com"]}, format="json"
    )
    assert response.status_code == 200
    execution = Execution.objects.get(pk=claim.execution_id)
    assert execution.prompt == "old" and execution.capabilities == ["shell:ls"]
    assert execution.status == S.RUNNING
    job.refresh_from_db()
    assert job.prompt == "new" and job.capabilities == ["net:api.example.com"]
    assert job.schedule_version == 2
    # The old run ends; the next claim runs the new prompt with the new capabilities.
    complete(claim, Outcome(S.SUCCEEDED, output="done"))
    job.refresh_from_db()
    assert job.next_run_at == claim.scheduled_for + timedelta(seconds=3600)
    Job.objects.filter(pk=job.pk).update(next_run_at=db_now() - timedelta(seconds=1))
    [following] = claim_due("w2", 10).claims
    assert following.prompt == "new" and following.capabilities == ["net:api.example.com"]
    assert following.scheduled_for > claim.scheduled_for


def test_changing_what_runs_bumps_the_version_resets_failures_and_drops_a_retry(client) -> None:
    job = create(client, interval_body())
    retry_for = db_now() - timedelta(minutes=5)
    Job.objects.filter(pk=job.pk).update(
        consecutive_failures=4,
        pending_scheduled_for=retry_for,
        pending_attempt=2,
        next_run_at=db_now() + timedelta(seconds=30),
    )
    client.patch(detail(job.pk), {"prompt": "fixed prompt"}, format="json")
    job.refresh_from_db()
    assert job.schedule_version == 2
    assert job.consecutive_failures == 0
    assert job.pending_scheduled_for is None and job.pending_attempt == 1
    assert job.next_run_at == retry_for + timedelta(seconds=3600)


def _failed_once_job(client) -> tuple[Job, Execution]:
    """A once job whose first attempt failed: a retry is pending."""
    job = create(client, once_body(prompt="broken prompt"))
    claim = start_run(job.pk)
    complete(claim, Outcome(S.FAILED, error="boom"))
    job.refresh_from_db()
    assert job.pending_scheduled_for == claim.scheduled_for and job.pending_attempt == 2
    return job, Execution.objects.get(pk=claim.execution_id)


def _claim_now(job: Job):
    Job.objects.filter(pk=job.pk).update(next_run_at=db_now() - timedelta(seconds=1))
    [claim] = [c for c in claim_due("w2", 10).claims if c.job_id == job.pk]
    return claim


def test_a_patch_of_a_once_job_waiting_for_its_retry_runs_the_change_in_that_retry(client):
    # A once job has one occurrence: dropping its retry would leave it enabled with nothing to
    # run, the fix never tried.
    job, first = _failed_once_job(client)
    response = client.patch(detail(job.pk), {"prompt": "fixed prompt"}, format="json")
    assert response.status_code == 200
    assert response.json()["enabled"] is True and response.json()["next_run_at"] is not None
    job.refresh_from_db()
    assert (job.schedule_version, job.consecutive_failures) == (2, 0)
    assert job.pending_scheduled_for == first.scheduled_for
    retry = _claim_now(job)
    assert (retry.prompt, retry.scheduled_for, retry.attempt) == (
        "fixed prompt",
        first.scheduled_for,
        2,
    )
    complete(retry, Outcome(S.SUCCEEDED, output="done"))
    job.refresh_from_db()
    assert (job.enabled, job.next_run_at, job.execution_count) == (False, None, 1)


@pytest.mark.parametrize(
    ("outcome", "runs_again"),
    [(S.FAILED, True), (S.TIMED_OUT, True), (S.INTERRUPTED, True), (S.SUCCEEDED, False)],
)
def test_a_once_job_patched_while_it_runs_ends_or_runs_the_change_next(client, outcome, runs_again):
    job = create(client, once_body(prompt="old"))
    claim = start_run(job.pk)
    assert client.patch(detail(job.pk), {"prompt": "new"}, format="json").status_code == 200
    complete(claim, Outcome(outcome, error="" if outcome == S.SUCCEEDED else "boom"))
    job.refresh_from_db()
    if not runs_again:
        # Its one run is over: disabled, as after any once run, never enabled with nothing due.
        assert (job.enabled, job.next_run_at, job.execution_count) == (False, None, 1)
        return
    assert job.enabled and job.next_run_at is not None
    assert (job.pending_scheduled_for, job.pending_attempt) == (claim.scheduled_for, 2)
    following = _claim_now(job)
    assert (following.prompt, following.scheduled_for, following.attempt) == (
        "new",
        claim.scheduled_for,
        2,
    )


def test_a_once_job_patched_during_its_last_allowed_attempt_still_tries_the_fix(
    client, picobot_config
):
    # The PATCH resets the failure count: the attempts of the old prompt do not use up the
    # retries of the new one.
    picobot_config("scheduler", max_retries=1)
    job, first = _failed_once_job(client)
    last = _claim_now(job)  # attempt 2: the old prompt's last allowed one
    assert client.patch(detail(job.pk), {"prompt": "fixed"}, format="json").status_code == 200
    complete(last, Outcome(S.FAILED, error="boom again"))
    job.refresh_from_db()
    assert job.enabled and (job.pending_scheduled_for, job.pending_attempt) == (
        first.scheduled_for,
        3,
    )
    fixed = _claim_now(job)
    assert (fixed.prompt, fixed.attempt) == ("fixed", 3)
    # The new prompt gets max_retries of its own, then the occurrence is given up.
    complete(fixed, Outcome(S.FAILED, error="still broken"))
    complete(_claim_now(job), Outcome(S.FAILED, error="still broken"))
    job.refresh_from_db()
    assert (job.enabled, job.next_run_at, job.pending_scheduled_for) == (False, None, None)


def test_a_once_job_given_a_new_time_drops_its_retry_for_the_new_occurrence(client):
    job, _ = _failed_once_job(client)
    run_at = db_now() + timedelta(hours=5)
    response = client.patch(detail(job.pk), {"run_at": run_at.isoformat()}, format="json")
    assert response.status_code == 200
    job.refresh_from_db()
    assert (job.pending_scheduled_for, job.pending_attempt) == (None, 1)
    assert job.next_run_at == run_at


@pytest.mark.parametrize(
    "changes",
    [{"name": "renamed"}, {"timeout_secs": 60}, {"notify_on": ["failure"]}, {"misfire": "skip"}],
)
def test_other_changes_do_not_bump_the_version(client, changes) -> None:
    job = create(client, interval_body())
    Job.objects.filter(pk=job.pk).update(consecutive_failures=2)
    before = Job.objects.get(pk=job.pk)
    assert client.patch(detail(job.pk), changes, format="json").status_code == 200
    job.refresh_from_db()
    assert job.schedule_version == 1 and job.consecutive_failures == 2
    assert job.next_run_at == before.next_run_at
    for field, value in changes.items():
        assert getattr(job, field) == value


def test_a_patch_that_repeats_the_current_values_changes_nothing(client) -> None:
    job = create(client, cron_body(capabilities=["shell:ls"]))
    same = {"prompt": job.prompt, "cron": job.cron, "capabilities": ["shell:ls"]}
    assert client.patch(detail(job.pk), same, format="json").status_code == 200
    assert Job.objects.get(pk=job.pk).schedule_version == 1


def test_a_schedule_change_recomputes_the_next_run(client) -> None:
    job = create(client, cron_body(cron="0 9 * * *", timezone="UTC"))
    response = client.patch(detail(job.pk), {"cron": "15 21 * * *"}, format="json").json()
    next_run = parse_datetime(response["next_run_at"])
    assert (next_run.hour, next_run.minute) == (21, 15)
    assert next_run > db_now()
    assert Job.objects.get(pk=job.pk).schedule_version == 2


def test_a_change_of_type_does_not_carry_the_old_types_fields(client) -> None:
    job = create(client, cron_body())
    response = client.patch(
        detail(job.pk), {"schedule_type": "interval", "interval_secs": 900}, format="json"
    )
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["cron"] == "" and body["interval_secs"] == 900
    assert body["timezone"] == "Europe/London"


def test_an_interval_whose_first_run_passed_can_still_change_its_interval(client) -> None:
    job = create(client, interval_body(run_at=(db_now() + timedelta(hours=1)).isoformat()))
    Job.objects.filter(pk=job.pk).update(run_at=db_now() - timedelta(hours=1))
    response = client.patch(detail(job.pk), {"interval_secs": 7200}, format="json")
    assert response.status_code == 200, response.json()
    assert parse_datetime(response.json()["next_run_at"]) > db_now() + timedelta(seconds=7000)


def test_re_enabling_computes_the_next_run_from_now(client) -> None:
    job = create(client, interval_body(interval_secs=600))
    client.patch(detail(job.pk), {"enabled": False}, format="json")
    Job.objects.filter(pk=job.pk).update(
        next_run_at=db_now() - timedelta(days=3), consecutive_failures=10
    )
    body = client.patch(detail(job.pk), {"enabled": True}, format="json").json()
    next_run = parse_datetime(body["next_run_at"])
    assert db_now() < next_run <= db_now() + timedelta(seconds=600)
    assert body["consecutive_failures"] == 0 and body["enabled"] is True


def test_re_enabling_drops_a_retry_pending_from_before_so_no_occurrence_runs_twice(client) -> None:
    job = create(client, cron_body())
    Job.objects.filter(pk=job.pk).update(next_run_at=db_now() - timedelta(seconds=1))
    [failed] = claim_due("w", 1).claims
    complete(failed, Outcome(S.FAILED, error="boom"))
    assert Job.objects.get(pk=job.pk).pending_scheduled_for == failed.scheduled_for
    client.patch(detail(job.pk), {"enabled": False}, format="json")
    Job.objects.filter(pk=job.pk).update(
        pending_scheduled_for=failed.scheduled_for - timedelta(days=3)
    )
    client.patch(detail(job.pk), {"enabled": True}, format="json")
    Job.objects.filter(pk=job.pk).update(next_run_at=db_now() - timedelta(seconds=1))
    [run] = claim_due("w", 1).claims
    assert run.attempt == 1 and run.scheduled_for > failed.scheduled_for
    complete(run, Outcome(S.SUCCEEDED, output="ok"))
    assert Job.objects.get(pk=job.pk).next_run_at > db_now()
    assert claim_due("w", 1).claims == []


def test_a_schedule_that_used_up_max_executions_cannot_be_re_enabled_without_raising_it(
    client,
) -> None:
    job = create(client, interval_body(max_executions=1))
    Job.objects.filter(pk=job.pk).update(next_run_at=db_now() - timedelta(seconds=1))
    [run] = claim_due("w", 1).claims
    complete(run, Outcome(S.SUCCEEDED, output="ok"))
    job.refresh_from_db()
    assert not job.enabled and job.execution_count == 1
    response = client.patch(detail(job.pk), {"enabled": True}, format="json")
    assert response.status_code == 400 and "enabled" in response.json()
    response = client.patch(detail(job.pk), {"enabled": True, "max_executions": 1}, format="json")
    assert response.status_code == 400
    assert Job.objects.get(pk=job.pk).enabled is False
    response = client.patch(detail(job.pk), {"enabled": True, "max_executions": 2}, format="json")
    assert response.status_code == 200 and response.json()["enabled"] is True


def test_a_disabled_schedule_previews_no_runs(client) -> None:
    job = create(client, cron_body())
    body = client.patch(detail(job.pk), {"enabled": False}, format="json").json()
    assert body["next_runs"] == []


def test_a_once_schedule_whose_time_passed_cannot_be_re_enabled(client) -> None:
    job = create(client, once_body())
    Job.objects.filter(pk=job.pk).update(
        enabled=False, run_at=db_now() - timedelta(minutes=1), next_run_at=None
    )
    response = client.patch(detail(job.pk), {"enabled": True}, format="json")
    assert response.status_code == 400
    assert "enabled" in response.json()
    assert Job.objects.get(pk=job.pk).enabled is False
    later = (db_now() + timedelta(hours=3)).isoformat()
    response = client.patch(detail(job.pk), {"enabled": True, "run_at": later}, format="json")
    assert response.status_code == 200 and response.json()["enabled"] is True


def test_an_update_never_undoes_a_workers_write_made_meanwhile(alice, client) -> None:
    job = create(client, interval_body())
    stale = Job.objects.get(pk=job.pk)
    Job.objects.filter(pk=job.pk).update(execution_count=7, last_run_at=db_now(), last_error="boom")
    lifecycle.update_job(stale, {"name": "renamed", "prompt": "new"})
    job.refresh_from_db()
    assert (job.name, job.prompt) == ("renamed", "new")
    assert job.execution_count == 7 and job.last_error == "boom" and job.last_run_at


def test_a_worker_finishing_an_old_version_does_not_overwrite_the_new_next_run(client) -> None:
    job = create(client, cron_body(cron="0 9 * * *", timezone="UTC"))
    claim = start_run(job.pk)
    new = client.patch(detail(job.pk), {"cron": "30 17 * * *"}, format="json").json()
    complete(claim, Outcome(S.SUCCEEDED, output="ok"))
    job.refresh_from_db()
    assert job.next_run_at == parse_datetime(new["next_run_at"])
    assert (job.next_run_at.hour, job.next_run_at.minute) == (17, 30)


def test_delete_cancels_the_running_execution_then_deletes(client) -> None:
    job = create(client, interval_body())
    claim = start_run(job.pk)
    assert client.delete(detail(job.pk)).status_code == 204
    execution = Execution.objects.get(pk=claim.execution_id)
    assert execution.cancel_requested_at is not None
    job.refresh_from_db()
    assert job.deleted_at is not None
    # The worker sees the request and finishes the run as cancelled; the job stays deleted.
    assert complete(claim, Outcome(S.CANCELLED, error="cancelled")) == S.CANCELLED
    job.refresh_from_db()
    assert job.deleted_at is not None
    assert Execution.objects.get(pk=claim.execution_id).status == S.CANCELLED
    Job.objects.filter(pk=job.pk).update(next_run_at=db_now() - timedelta(seconds=1))
    assert claim_due("w3", 10).claims == []


def test_a_run_completing_just_before_the_delete_leaves_it_deleted(client) -> None:
    job = create(client, interval_body())
    claim = start_run(job.pk)
    stale = Job.objects.get(pk=job.pk)
    complete(claim, Outcome(S.SUCCEEDED, output="done"))
    assert lifecycle.soft_delete(stale) is True
    assert Execution.objects.get(pk=claim.execution_id).cancel_requested_at is None
    assert Job.objects.get(pk=job.pk).deleted_at is not None
    assert lifecycle.soft_delete(stale) is False


def test_cancel_after_the_run_finished_is_a_409(client) -> None:
    job = create(client, interval_body())
    claim = start_run(job.pk)
    complete(claim, Outcome(S.SUCCEEDED, output="done"))
    assert client.post(f"{detail(job.pk)}/cancel").status_code == 409
    assert lifecycle.request_cancel(job) is None


def test_lifecycle_refusals_carry_what_the_tool_needs(alice) -> None:
    with pytest.raises(lifecycle.ScheduleInvalid) as invalid:
        lifecycle.create_job(alice, {"prompt": "", "schedule_type": "interval"}, origin="tool")
    assert "prompt" in invalid.value.errors
    from kernel.permissions import CapabilitySet

    with pytest.raises(lifecycle.CapabilitiesExceeded) as exceeded:
        lifecycle.create_job(
            alice,
            interval_body(capabilities=["shell:ls", "net:api.example.com"]),
            origin="tool",
            ceiling=CapabilitySet(["shell:ls"]),
        )
    assert exceeded.value.missing == ["net:api.example.com"]
    job = lifecycle.create_job(alice, interval_body(), origin="tool")
    assert job.origin == "tool" and list(lifecycle.jobs_of(alice)) == [job]
