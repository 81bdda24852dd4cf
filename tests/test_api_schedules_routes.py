"""Every route of the schedules API and each of its status codes."""

from __future__ import annotations

from datetime import timedelta
from itertools import pairwise

import pytest
from django.utils.dateparse import parse_datetime
from rest_framework.test import APIClient

from schedules.claims import Outcome, complete
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Job
from tests.api_schedules_support import (
    URL,
    cron_body,
    detail,
    interval_body,
    once_body,
    start_run,
)

pytestmark = pytest.mark.django_db

SCHEDULE_FIELDS = {
    "id", "name", "prompt", "schedule_type", "run_at", "interval_secs", "cron", "timezone",
    "capabilities", "enabled", "max_executions", "timeout_secs", "misfire", "notify_on",
    "notify_channels", "next_run_at", "last_run_at", "execution_count", "consecutive_failures",
    "last_error", "created_at", "updated_at", "next_runs", "cron_description",
}  # fmt: skip
EXECUTION_FIELDS = {
    "id", "schedule", "scheduled_for", "attempt", "status", "started_at", "finished_at", "output", "error",
    "cancel_requested_at",
}  # fmt: skip


@pytest.fixture
def alice(make_user):
    return make_user("alice", grant=["schedule:*", "net:*.example.com", "shell:ls,cat"])


@pytest.fixture
def client(alice, api_client_for) -> APIClient:
    return api_client_for(alice)


def create(client: APIClient, body: dict) -> dict:
    response = client.post(URL, body, format="json")
    assert response.status_code == 201, response.json()
    return response.json()


def test_create_answers_201_with_exactly_the_schedule_fields(client, alice) -> None:
    body = create(client, cron_body(capabilities=["net:api.example.com"]))
    assert set(body) == SCHEDULE_FIELDS
    job = Job.objects.get(pk=body["id"])
    assert job.owner == alice and job.origin == "api"
    assert body["capabilities"] == ["net:api.example.com"]
    assert body["cron_description"] == "At 09:00"


def test_create_applies_the_documented_defaults(client, settings) -> None:
    body = create(client, interval_body())
    assert body["capabilities"] == []
    assert body["enabled"] is True
    assert body["notify_on"] == ["success", "failure"]
    assert body["notify_channels"] is None
    assert body["misfire"] == "run_once"
    assert body["timeout_secs"] == settings.PICOBOT.scheduler.default_timeout_secs
    assert body["max_executions"] is None
    assert body["timezone"] == "UTC"
    assert body["name"] == "Check the build."
    assert body["cron_description"] is None


def test_an_interval_first_runs_one_interval_after_creation(client) -> None:
    before = db_now()
    body = create(client, interval_body(interval_secs=600))
    next_run = parse_datetime(body["next_run_at"])
    assert before + timedelta(seconds=600) <= next_run <= db_now() + timedelta(seconds=600)
    runs = [parse_datetime(r["utc"]) for r in body["next_runs"]]
    assert runs[0] == next_run
    assert [b - a for a, b in pairwise(runs)] == [timedelta(seconds=600)] * 4


def test_next_runs_show_local_times_in_the_schedule_zone_with_utc(client) -> None:
    body = create(client, cron_body(cron="30 8 * * *", timezone="America/New_York"))
    assert len(body["next_runs"]) == 5
    for run in body["next_runs"]:
        local, utc = parse_datetime(run["local"]), parse_datetime(run["utc"])
        assert (local.hour, local.minute) == (8, 30)
        assert local == utc and run["utc"].endswith("Z")
        assert local.utcoffset() in (timedelta(hours=-5), timedelta(hours=-4))


def test_a_once_schedule_runs_at_its_time_and_previews_only_that(client) -> None:
    run_at = (db_now() + timedelta(days=1)).replace(microsecond=0)
    body = create(client, once_body(run_at=run_at.isoformat(), timezone="Asia/Tokyo"))
    assert parse_datetime(body["next_run_at"]) == run_at
    assert [parse_datetime(r["utc"]) for r in body["next_runs"]] == [run_at]
    assert body["next_runs"][0]["local"].endswith("+09:00")


def test_list_shows_only_the_callers_schedules_newest_first(
    client, make_user, api_client_for
) -> None:
    first = create(client, cron_body(name="first"))
    second = create(client, interval_body(name="second"))
    create(api_client_for(make_user(grant=["schedule:*"])), interval_body(name="other"))
    response = client.get(URL)
    assert response.status_code == 200
    page = response.json()
    assert set(page) == {"count", "next", "previous", "results"}
    assert page["count"] == 2
    assert [s["id"] for s in page["results"]] == [second["id"], first["id"]]


def test_list_pages_with_limit_and_offset_and_caps_the_limit(client, alice) -> None:
    now = db_now()
    Job.objects.bulk_create(
        Job(owner=alice, name=f"j{i}", prompt="p", schedule_type="interval", interval_secs=60,
            next_run_at=now + timedelta(hours=1))
        for i in range(105)
    )  # fmt: skip
    page = client.get(URL, {"limit": 2, "offset": 1}).json()
    assert page["count"] == 105 and len(page["results"]) == 2
    assert "offset=3" in page["next"] and page["previous"] is not None
    big = client.get(URL, {"limit": 100_000}).json()
    assert len(big["results"]) == 100
    assert client.get(URL, {"limit": "lots", "offset": "-1"}).status_code == 200


def test_retrieve_shows_one_schedule(client) -> None:
    created = create(client, cron_body())
    response = client.get(detail(created["id"]))
    assert response.status_code == 200
    assert response.json() == created | {"next_runs": response.json()["next_runs"]}


def test_patch_answers_200_with_the_changed_schedule(client) -> None:
    created = create(client, cron_body())
    response = client.patch(
        detail(created["id"]), {"name": "evening", "cron": "0 18 * * *"}, format="json"
    )
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "evening" and body["cron"] == "0 18 * * *"
    assert body["cron_description"] == "At 18:00"
    assert parse_datetime(body["next_runs"][0]["local"]).hour == 18


def test_delete_answers_204_and_the_schedule_disappears_but_its_history_stays(client) -> None:
    created = create(client, interval_body())
    claim = start_run(created["id"])
    complete(claim, Outcome(ExecutionStatus.SUCCEEDED, output="done"))
    response = client.delete(detail(created["id"]))
    assert response.status_code == 204
    assert response.content == b""
    assert client.get(detail(created["id"])).status_code == 404
    assert client.get(URL).json()["count"] == 0
    job = Job.objects.get(pk=created["id"])
    assert job.deleted_at is not None
    assert Execution.objects.filter(job=job).count() == 1


def test_executions_are_listed_newest_first_in_the_envelope(client) -> None:
    created = create(client, interval_body(interval_secs=60))
    for _ in range(3):
        claim = start_run(created["id"])
        complete(claim, Outcome(ExecutionStatus.SUCCEEDED, output="ok"))
    response = client.get(f"{detail(created['id'])}/executions")
    assert response.status_code == 200
    page = response.json()
    assert page["count"] == 3 and page["next"] is None and page["previous"] is None
    assert set(page["results"][0]) == EXECUTION_FIELDS
    ids = [e["id"] for e in page["results"]]
    assert ids == sorted(ids, reverse=True)
    assert {e["status"] for e in page["results"]} == {"succeeded"}
    limited = client.get(f"{detail(created['id'])}/executions", {"limit": 1, "offset": 1}).json()
    assert [e["id"] for e in limited["results"]] == [ids[1]]
    capped = client.get(f"{detail(created['id'])}/executions", {"limit": 500})
    assert capped.status_code == 200


def test_cancel_answers_202_with_the_running_execution(client) -> None:
    created = create(client, interval_body())
    claim = start_run(created["id"])
    response = client.post(f"{detail(created['id'])}/cancel")
    assert response.status_code == 202
    body = response.json()
    assert set(body) == EXECUTION_FIELDS
    assert body["id"] == claim.execution_id and body["status"] == "running"
    requested = parse_datetime(body["cancel_requested_at"])
    assert requested is not None
    execution = Execution.objects.get(pk=claim.execution_id)
    assert execution.cancel_requested_at == requested
    again = client.post(f"{detail(created['id'])}/cancel").json()
    assert parse_datetime(again["cancel_requested_at"]) == requested


def test_a_cancelled_run_ends_cancelled_and_the_job_moves_on(client) -> None:
    created = create(client, interval_body())
    claim = start_run(created["id"])
    client.post(f"{detail(created['id'])}/cancel")
    complete(claim, Outcome(ExecutionStatus.CANCELLED, error="cancelled"))
    execution = client.get(f"{detail(created['id'])}/executions").json()["results"][0]
    assert execution["status"] == "cancelled" and execution["cancel_requested_at"]
    assert parse_datetime(client.get(detail(created["id"])).json()["next_run_at"]) > db_now()


def test_cancel_answers_409_when_nothing_runs(client) -> None:
    created = create(client, interval_body())
    response = client.post(f"{detail(created['id'])}/cancel")
    assert response.status_code == 409
    assert response.json() == {"detail": "No execution of this schedule is running."}


def test_every_route_needs_a_key_and_challenges_for_bearer(client) -> None:
    created = create(client, interval_body())
    anonymous = APIClient()
    for method, path in routes(created["id"]):
        response = getattr(anonymous, method)(path, {}, format="json")
        assert response.status_code == 401, (method, path)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert "detail" in response.json()


def test_every_route_answers_503_while_the_scheduler_is_disabled(client, picobot_config) -> None:
    created = create(client, interval_body())
    picobot_config("scheduler", enabled=False)
    for method, path in routes(created["id"]):
        response = getattr(client, method)(path, {}, format="json")
        assert response.status_code == 503, (method, path)
        assert "enabled = true" in response.json()["detail"]


def test_unsupported_methods_answer_405(client) -> None:
    created = create(client, interval_body())
    assert client.put(detail(created["id"]), interval_body(), format="json").status_code == 405
    assert client.delete(URL).status_code == 405


def test_requests_are_throttled_per_api_key(alice, api_client_for, settings) -> None:
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"api_key": "3/minute"},
    }
    first, second = api_client_for(alice), api_client_for(alice)
    assert [first.get(URL).status_code for _ in range(4)] == [200, 200, 200, 429]
    throttled = first.get(URL)
    assert "detail" in throttled.json() and int(throttled.headers["Retry-After"]) > 0
    assert second.get(URL).status_code == 200


def test_the_held_schedules_quota_answers_429_naming_it(client, picobot_config) -> None:
    picobot_config("scheduler", max_jobs_per_user=1)
    create(client, interval_body())
    response = client.post(URL, interval_body(), format="json")
    assert response.status_code == 429
    assert response.json()["quota"] == "max_jobs_per_user"
    assert "max_jobs_per_user" in response.json()["detail"]
    assert Job.objects.count() == 1


def test_the_created_per_window_quota_counts_deleted_schedules(client, picobot_config) -> None:
    picobot_config("scheduler", max_created_per_window=2)
    for _ in range(2):
        client.delete(detail(create(client, interval_body())["id"]))
    response = client.post(URL, interval_body(), format="json")
    assert response.status_code == 429
    assert response.json()["quota"] == "max_created_per_window"


def routes(job_id: int) -> list[tuple[str, str]]:
    return [
        ("post", URL),
        ("get", URL),
        ("get", detail(job_id)),
        ("patch", detail(job_id)),
        ("delete", detail(job_id)),
        ("get", f"{detail(job_id)}/executions"),
        ("post", f"{detail(job_id)}/cancel"),
    ]
