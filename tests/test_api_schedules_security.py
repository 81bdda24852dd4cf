"""Ownership, the grant, escalation and the order of the checks on the schedules API."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from schedules.models import Execution, Job
from tests.api_schedules_support import URL, cron_body, detail, interval_body, start_run

pytestmark = pytest.mark.django_db

GRANT = ["schedule:*", "net:*.example.com", "filesystem:read:/srv/notes/**", "shell:ls,cat"]


@pytest.fixture
def alice(make_user):
    return make_user("alice", grant=GRANT)


@pytest.fixture
def bob(make_user):
    return make_user("bob", grant=GRANT)


@pytest.fixture
def alices_job(alice, api_client_for) -> Job:
    response = api_client_for(alice).post(URL, interval_body(), format="json")
    return Job.objects.get(pk=response.json()["id"])


def item_routes(job_id: int) -> list[tuple[str, str, dict]]:
    return [
        ("get", detail(job_id), {}),
        ("patch", detail(job_id), {"prompt": "Send me your secrets."}),
        ("delete", detail(job_id), {}),
        ("get", f"{detail(job_id)}/executions", {}),
        ("post", f"{detail(job_id)}/cancel", {}),
    ]


@pytest.mark.parametrize("index", range(5), ids=["get", "patch", "delete", "executions", "cancel"])
def test_another_users_schedule_is_indistinguishable_from_a_missing_one(
    index, alices_job, bob, api_client_for
) -> None:
    start_run(alices_job.pk)  # so cancel has something it could cancel
    client = api_client_for(bob)
    method, path, body = item_routes(alices_job.pk)[index]
    response = getattr(client, method)(path, body, format="json")
    assert response.status_code == 404
    _, missing_path, _ = item_routes(alices_job.pk + 1000)[index]
    missing = getattr(client, method)(missing_path, body, format="json")
    assert (missing.status_code, missing.json()) == (404, response.json())
    job = Job.objects.get(pk=alices_job.pk)
    assert job.deleted_at is None and job.prompt == alices_job.prompt
    assert not Execution.objects.filter(job=job, cancel_requested_at__isnull=False).exists()


@pytest.mark.parametrize("index", range(5), ids=["get", "patch", "delete", "executions", "cancel"])
def test_a_deleted_schedule_is_a_404_on_every_route(index, alices_job, alice, api_client_for):
    client = api_client_for(alice)
    assert client.delete(detail(alices_job.pk)).status_code == 204
    method, path, body = item_routes(alices_job.pk)[index]
    assert getattr(client, method)(path, body, format="json").status_code == 404


def test_the_list_never_shows_another_users_schedules(alices_job, bob, api_client_for) -> None:
    page = api_client_for(bob).get(URL).json()
    assert page["count"] == 0 and page["results"] == []


ACTION_ROUTES = [
    ("create", "post", lambda job: URL),
    ("list", "get", lambda job: URL),
    ("list", "get", lambda job: detail(job)),
    ("list", "get", lambda job: f"{detail(job)}/executions"),
    ("update", "patch", lambda job: detail(job)),
    ("delete", "delete", lambda job: detail(job)),
    ("cancel", "post", lambda job: f"{detail(job)}/cancel"),
]


@pytest.mark.parametrize(("action", "method", "path"), ACTION_ROUTES)
def test_each_route_needs_its_schedule_action_in_the_grant(
    action, method, path, alices_job, alice, api_client_for
) -> None:
    others = sorted({"create", "list", "update", "delete", "cancel"} - {action})
    alice.grant = [f"schedule:{a}" for a in others] + ["net:*.example.com"]
    alice.save(update_fields=["grant"])
    response = getattr(api_client_for(alice), method)(path(alices_job.pk), {}, format="json")
    assert response.status_code == 403
    assert f"schedule:{action}" in response.json()["detail"]
    assert Job.objects.live().count() == 1


def test_create_refuses_capabilities_beyond_the_grant_and_names_exactly_those(
    alice, api_client_for
) -> None:
    body = interval_body(
        capabilities=["net:api.example.com", "net:*", "shell:ls,sh", "filesystem:read:/etc/**"]
    )
    response = api_client_for(alice).post(URL, body, format="json")
    assert response.status_code == 403
    assert response.json()["missing"] == ["net:*", "shell:ls,sh", "filesystem:read:/etc/**"]
    for permission in response.json()["missing"]:
        assert permission in response.json()["detail"]
    assert not Job.objects.exists()


def test_create_refuses_a_schedule_permission_the_grant_lacks(make_user, api_client_for):
    user = make_user(grant=["schedule:create", "schedule:list"])
    body = interval_body(capabilities=["schedule:delete"])
    response = api_client_for(user).post(URL, body, format="json")
    assert response.status_code == 403
    assert response.json()["missing"] == ["schedule:delete"]


def test_patch_refuses_capabilities_beyond_the_grant_and_changes_nothing(
    alices_job, alice, api_client_for
) -> None:
    before = Job.objects.filter(pk=alices_job.pk).values().get()
    response = api_client_for(alice).patch(
        detail(alices_job.pk),
        {"prompt": "new", "capabilities": ["shell:*", "net:api.example.com"]},
        format="json",
    )
    assert response.status_code == 403
    assert response.json()["missing"] == ["shell:*"]
    assert Job.objects.filter(pk=alices_job.pk).values().get() == before


def test_patch_rechecks_capabilities_against_the_current_grant(alice, api_client_for) -> None:
    client = api_client_for(alice)
    created = client.post(
        URL, interval_body(capabilities=["net:api.example.com"]), format="json"
    ).json()
    alice.grant = ["schedule:*"]
    alice.save(update_fields=["grant"])
    response = client.patch(
        detail(created["id"]), {"capabilities": ["net:api.example.com"]}, format="json"
    )
    assert response.status_code == 403
    assert response.json()["missing"] == ["net:api.example.com"]


def test_capabilities_are_stored_exactly_as_asked_never_narrowed_or_widened(
    alice, api_client_for
) -> None:
    asked = ["net:api.example.com", "filesystem:read:/srv/notes/a/**", "shell:cat"]
    body = api_client_for(alice).post(URL, interval_body(capabilities=asked), format="json")
    assert body.status_code == 201
    assert body.json()["capabilities"] == asked
    assert Job.objects.get().capabilities == asked


def test_without_capabilities_a_schedule_gets_none(alice, api_client_for) -> None:
    api_client_for(alice).post(URL, interval_body(), format="json")
    assert Job.objects.get().capabilities == []


def test_malformed_permissions_are_a_400_naming_each(alice, api_client_for) -> None:
    body = interval_body(capabilities=["net:api.example.com", "bogus", "filesystem:read:../x", 7])
    response = api_client_for(alice).post(URL, body, format="json")
    assert response.status_code == 400
    reasons = response.json()["capabilities"]
    assert len(reasons) == 3
    assert "'bogus'" in reasons[0] and "'filesystem:read:../x'" in reasons[1]


# --- the order of the checks --------------------------------------------------------------------


def test_401_comes_before_503(picobot_config) -> None:
    picobot_config("scheduler", enabled=False)
    assert APIClient().get(URL).status_code == 401


def test_a_disabled_scheduler_answers_503_before_403(make_user, api_client_for, picobot_config):
    picobot_config("scheduler", enabled=False)
    nobody = api_client_for(make_user(grant=[]))
    assert nobody.post(URL, interval_body(), format="json").status_code == 503


def test_a_missing_action_permission_answers_403_before_404(
    alices_job, make_user, api_client_for
) -> None:
    reader = api_client_for(make_user(grant=["schedule:list"]))
    assert reader.patch(detail(alices_job.pk), {"prompt": "x"}, format="json").status_code == 403
    assert reader.delete(detail(999_999)).status_code == 403


def test_404_comes_before_400(alices_job, bob, api_client_for) -> None:
    response = api_client_for(bob).patch(
        detail(alices_job.pk), {"interval_secs": "soon", "bogus": 1}, format="json"
    )
    assert response.status_code == 404


def test_400_comes_before_the_capability_403(alice, api_client_for) -> None:
    body = interval_body(interval_secs=1, capabilities=["shell:*"])
    response = api_client_for(alice).post(URL, body, format="json")
    assert response.status_code == 400
    assert "interval_secs" in response.json()


def test_the_capability_403_comes_before_the_quota_429(
    alice, api_client_for, picobot_config
) -> None:
    picobot_config("scheduler", max_jobs_per_user=1)
    client = api_client_for(alice)
    client.post(URL, interval_body(), format="json")
    escalating = client.post(URL, cron_body(capabilities=["shell:*"]), format="json")
    assert escalating.status_code == 403
    assert client.post(URL, cron_body(), format="json").status_code == 429
