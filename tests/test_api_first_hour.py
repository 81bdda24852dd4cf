"""What a new user meets first: the index, the docs page (no network), the schema in a browser and
for tools, trailing slashes, non-JSON bodies, unknown query parameters, filters, the executions
of all schedules, and one's own chat sessions."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from django.contrib.staticfiles import finders
from django.test import Client

from kernel.models import ChatSession
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Job
from tests.api_schedules_support import URL, cron_body, detail, interval_body

pytestmark = pytest.mark.django_db


@pytest.fixture
def user(make_user):
    return make_user("alice", grant=["schedule:*"])


@pytest.fixture
def client(user, api_client_for):
    return api_client_for(user)


def post(client, body, path=URL):
    return client.post(path, json.dumps(body), content_type="application/json")


# --- finding one's way -------------------------------------------------------------------------


def test_the_api_index_lists_the_docs_the_schema_and_every_route() -> None:
    body = Client().get("/api/v1/").json()
    assert body["docs"].endswith("/api/v1/docs") and body["schema"].endswith("/api/v1/schema")
    paths = {route["path"] for route in body["routes"]}
    assert {"/api/v1/schedules", "/api/v1/executions", "/api/v1/chat/sessions"} <= paths
    assert Client().get("/api/v1").status_code == 200


def test_the_root_leads_to_the_docs() -> None:
    response = Client().get("/")
    assert response.status_code == 302 and response["Location"] == "/api/v1/docs"


def test_the_docs_page_is_served_from_local_static_files_with_no_cdn() -> None:
    response = Client().get("/api/v1/docs")
    assert response.status_code == 200
    page = response.content.decode()
    assert "swagger-ui" in page
    external = re.findall(r"""(?:src|href)=["'](https?:)?//""", page)
    assert external == [], "the docs page must not load anything from another host"
    for asset in re.findall(r"""(?:src|href)=["'](/static/[^"']+)["']""", page):
        assert finders.find(asset.removeprefix("/static/")), f"{asset} is not a local static file"
    assert "/api/v1/schema" in page


def test_the_schema_is_shown_in_a_browser_yaml_for_tools_and_json_on_request() -> None:
    browser = Client().get(
        "/api/v1/schema", HTTP_ACCEPT="text/html,application/xhtml+xml,*/*;q=0.8"
    )
    assert browser["Content-Type"].startswith("text/html")
    assert "Content-Disposition" not in browser
    assert "openapi: 3" in browser.content.decode() and "/api/v1/docs" in browser.content.decode()
    tool = Client().get("/api/v1/schema", HTTP_ACCEPT="*/*")
    assert "yaml" in tool["Content-Type"] or "openapi" in tool["Content-Type"]
    assert tool.content.startswith(b"openapi: 3")
    as_json = Client().get("/api/v1/schema", HTTP_ACCEPT="application/json")
    assert as_json["Content-Type"].startswith("application/json")
    assert as_json.json()["openapi"].startswith("3")


def test_every_route_takes_a_trailing_slash_too(client) -> None:
    job = post(client, interval_body()).json()
    for path in (
        "/api/v1/schedules/",
        f"/api/v1/schedules/{job['id']}/",
        f"/api/v1/schedules/{job['id']}/executions/",
        "/api/v1/executions/",
        "/api/v1/chat/sessions/",
        "/api/v1/me/",
        "/api/v1/schema/",
        "/api/v1/docs/",
    ):
        assert client.get(path).status_code == 200, path
    assert post(client, interval_body(), path="/api/v1/schedules/").status_code == 201


def test_a_form_body_is_told_to_send_json(client, settings) -> None:
    settings.PICOBOT_MODEL_BASE_URL = "http://127.0.0.1:9/v1"  # chat parses before any model call
    settings.PICOBOT_MODEL = "m"
    for path in (URL, "/api/v1/chat"):
        response = client.post(path, {"prompt": "hi"}, format="multipart")
        assert response.status_code == 415
        assert "Content-Type: application/json" in response.json()["detail"]
    form = client.post(URL, "prompt=hi", content_type="application/x-www-form-urlencoded").json()[
        "detail"
    ]
    assert form.startswith('Unsupported media type "application/x-www-form-urlencoded": send')


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/schedules?sort=name",
        "/api/v1/schedules?limit=5&emabled=true",
        "/api/v1/executions?state=failed",
        "/api/v1/chat/sessions?page=2",
        "/api/v1/me?verbose=1",
    ],
)
def test_an_unknown_query_parameter_is_refused_naming_it(client, path) -> None:
    response = client.get(path)
    assert response.status_code == 400
    [(name, [reason])] = response.json().items()
    assert name in path and "Unknown query parameter" in reason


def test_an_unknown_query_parameter_on_a_detail_route_is_refused(client) -> None:
    job = post(client, interval_body()).json()
    assert client.get(f"{detail(job['id'])}?fields=name").status_code == 400


# --- filters -----------------------------------------------------------------------------------


def test_schedules_filter_by_enabled_type_and_name(client) -> None:
    post(client, interval_body(name="Build watcher"))
    post(client, cron_body(name="Morning digest"))
    post(client, cron_body(name="Evening digest", enabled=False))

    def names(query: str) -> set[str]:
        response = client.get(f"{URL}?{query}")
        assert response.status_code == 200, response.content
        return {job["name"] for job in response.json()["results"]}

    assert names("enabled=true") == {"Build watcher", "Morning digest"}
    assert names("enabled=false") == {"Evening digest"}
    assert names("schedule_type=cron") == {"Morning digest", "Evening digest"}
    assert names("name=DIGEST&enabled=true") == {"Morning digest"}


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("enabled=yes", "enabled"),
        ("schedule_type=daily", "schedule_type"),
        ("enabled=true&enabled=false", "enabled"),
    ],
)
def test_a_bad_filter_value_is_a_400_naming_it(client, query, field) -> None:
    response = client.get(f"{URL}?{query}")
    assert response.status_code == 400 and field in response.json()


def make_executions(job: Job) -> list[Execution]:
    now = db_now()
    rows = [
        (now - timedelta(days=2), ExecutionStatus.SUCCEEDED),
        (now - timedelta(days=1), ExecutionStatus.FAILED),
        (now - timedelta(hours=1), ExecutionStatus.TIMED_OUT),
    ]
    return [
        Execution.objects.create(job=job, scheduled_for=when, status=status, prompt=job.prompt)
        for when, status in rows
    ]


def test_executions_filter_by_status_and_time_across_all_schedules(client, user, make_user) -> None:
    mine = [Job.objects.get(pk=post(client, interval_body()).json()["id"]) for _ in range(2)]
    for job in mine:
        make_executions(job)
    deleted = Job.objects.get(pk=post(client, interval_body()).json()["id"])
    make_executions(deleted)
    client.delete(detail(deleted.pk))
    stranger = make_user(grant=["schedule:*"])
    make_executions(
        Job.objects.create(owner=stranger, prompt="x", schedule_type="interval", interval_secs=3600)
    )
    everything = client.get("/api/v1/executions").json()
    assert everything["count"] == 6
    assert {row["schedule"] for row in everything["results"]} == {job.pk for job in mine}
    failed = client.get("/api/v1/executions?status=failed,timed_out").json()
    assert {row["status"] for row in failed["results"]} == {"failed", "timed_out"}
    assert failed["count"] == 4
    since = (db_now() - timedelta(hours=2)).isoformat().replace("+00:00", "Z")
    recent = client.get("/api/v1/executions", {"scheduled_after": since}).json()
    assert recent["count"] == 2
    one = client.get(f"/api/v1/executions?schedule={mine[0].pk}&status=succeeded").json()
    assert one["count"] == 1
    per_job = client.get(f"{detail(mine[0].pk)}/executions?status=failed").json()
    assert per_job["count"] == 1
    row = everything["results"][0]
    assert client.get(f"/api/v1/executions/{row['id']}").json()["id"] == row["id"]
    other = Execution.objects.exclude(job__owner=user).first()
    assert client.get(f"/api/v1/executions/{other.pk}").status_code == 404
    assert client.get("/api/v1/executions/nope").status_code == 404


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("status=exploded", "status"),
        ("scheduled_after=yesterday", "scheduled_after"),
        ("scheduled_after=2030-01-01T00:00:00", "scheduled_after"),
        (
            "scheduled_after=2030-01-02T00:00:00Z&scheduled_before=2030-01-01T00:00:00Z",
            "scheduled_before",
        ),
        ("schedule=abc", "schedule"),
    ],
)
def test_a_bad_execution_filter_is_a_400_naming_it(client, query, field) -> None:
    response = client.get(f"/api/v1/executions?{query}")
    assert response.status_code == 400 and field in response.json(), response.content


def test_the_executions_list_needs_schedule_list(make_user, api_client_for) -> None:
    client = api_client_for(make_user(grant=["schedule:create"]))
    assert client.get("/api/v1/executions").status_code == 403


# --- chat sessions -----------------------------------------------------------------------------


def test_one_lists_and_reads_ones_own_chat_sessions_only(client, user, make_user) -> None:
    mine = ChatSession.objects.create(
        owner=user,
        capabilities=["shell:date"],
        messages=[
            {"role": "user", "content": "what day is it?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "function": {"name": "shell", "arguments": "{}"}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "Friday"},
            {"role": "assistant", "content": "It is Friday."},
        ],
    )
    theirs = ChatSession.objects.create(owner=make_user(), capabilities=[])
    listing = client.get("/api/v1/chat/sessions").json()
    assert [row["id"] for row in listing["results"]] == [mine.pk]
    assert listing["results"][0]["message_count"] == 4
    assert "messages" not in listing["results"][0]
    one = client.get(f"/api/v1/chat/sessions/{mine.pk}").json()
    assert one["capabilities"] == ["shell:date"]
    assert one["messages"][1] == {"role": "assistant", "content": None, "tool_calls": ["shell"]}
    assert one["messages"][3]["content"] == "It is Friday."
    assert client.get(f"/api/v1/chat/sessions/{theirs.pk}").status_code == 404
    assert client.get("/api/v1/chat/sessions/x").status_code == 404
    assert Client().get("/api/v1/chat/sessions").status_code == 401


# --- the schema reads well ---------------------------------------------------------------------


def test_every_operation_has_its_own_summary_description_and_a_readable_id() -> None:
    schema = Client().get("/api/v1/schema", HTTP_ACCEPT="application/json").json()
    operations = [
        (path, method, operation)
        for path, item in schema["paths"].items()
        for method, operation in item.items()
    ]
    descriptions = [operation.get("description") for _, _, operation in operations]
    assert all(descriptions) and len(set(descriptions)) == len(descriptions)
    for path, method, operation in operations:
        assert operation.get("summary"), (method, path)
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", operation["operationId"]), operation["operationId"]
        assert not re.search(
            r"_(create|retrieve|partial_update|destroy)$", operation["operationId"]
        )
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "path":
                assert parameter["schema"] == {"type": "integer"}, (path, parameter)
        for code, response in operation["responses"].items():
            if code.startswith("4") and path.startswith("/api/v1/schedules"):
                examples = next(iter(response.get("content", {}).values()), {}).get("examples")
                assert examples, (method, path, code)
    names = set(schema["components"]["schemas"])
    assert not [name for name in names if name.endswith("RequestRequest")]
    assert {"ScheduleInput", "ChatRequest", "FieldErrors"} <= names
