"""The `schedule` tool through POST /api/v1/chat: the agent schedules follow-ups, never beyond
its own powers. Scheduled runs go through a real `runworker --once` in this process."""

from __future__ import annotations

import json
import re
import signal
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from kernel.models import ChatSession, ToolCall, User
from kernel.tools import get_tool
from schedules import claims
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Job
from schedules.tool import MAX_TOOL_EXECUTIONS
from schedules.worker import Worker

pytestmark = pytest.mark.django_db

PROMPT = "Check https://status.example.com and tell me if anything is down."


# --- helpers ---------------------------------------------------------------------------------


def chat(client: APIClient, message: str = "please", **body: Any) -> dict[str, Any]:
    response = client.post(
        "/api/v1/chat", json.dumps({"message": message, **body}), content_type="application/json"
    )
    assert response.status_code == 200, response.content
    return response.json()


def schedule_call(**arguments: Any) -> dict[str, Any]:
    return {"tool_calls": [{"name": "schedule", "arguments": arguments}]}


_BLOCK = re.compile(r"<<<UNTRUSTED_DATA (\w+)>>>\n(.*)\n<<<END_UNTRUSTED_DATA \1>>>", re.DOTALL)


def tool_result(model_server: Any, index: int = -1) -> str:
    """The content of the last tool message in the model request at `index`."""
    messages = model_server.requests[index]["messages"]
    return [m for m in messages if m["role"] == "tool"][-1]["content"]


def tool_output(model_server: Any, index: int = -1) -> dict[str, Any]:
    """The JSON a successful call returned, unwrapped from its untrusted-data block."""
    content = tool_result(model_server, index)
    match = _BLOCK.search(content)
    assert match, content
    return json.loads(match.group(2))


def last_call() -> ToolCall:
    return ToolCall.objects.filter(tool="schedule").latest("id")


@pytest.fixture
def owner(make_user: Callable[..., User]) -> User:
    return make_user(
        "alice", grant=["schedule:*", "net:*.example.com", "shell:echo", "shell:ls", "notify:*"]
    )


@pytest.fixture
def client(owner: User, api_client_for: Callable[[User], APIClient]) -> APIClient:
    return api_client_for(owner)


def make_due(job: Job) -> None:
    Job.objects.filter(pk=job.pk).update(next_run_at=db_now() - timedelta(seconds=1))


def run_worker_once() -> None:
    """`manage.py runworker --once` in this process; pytest's signal handlers are restored."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        call_command("runworker", "--once", "--worker-id", "test-worker")
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.fixture
def fast_worker(picobot_config: Callable[..., None]) -> Iterator[None]:
    picobot_config("scheduler", tick_secs=0.1)
    yield


# --- what the model sees ---------------------------------------------------------------------


def test_the_model_is_offered_the_tool_with_no_way_to_name_an_owner(model_server, client) -> None:
    model_server.add({"content": "hi"})
    chat(client)
    [spec] = [t for t in model_server.requests[0]["tools"] if t["function"]["name"] == "schedule"]
    parameters = spec["function"]["parameters"]
    assert parameters["additionalProperties"] is False
    assert parameters["properties"]["action"]["enum"] == [
        "create",
        "list",
        "update",
        "delete",
        "cancel",
    ]
    names = set(parameters["properties"])
    assert not names & {"owner", "user", "user_id", "owner_id", "username", "session_id"}


# --- refusals: each audited, nothing created ---------------------------------------------------


def test_a_child_with_capabilities_beyond_the_session_is_refused_naming_exactly_which(
    model_server, client
) -> None:
    # In the grant, but not in this session: only the session's own set may be given.
    model_server.add(
        schedule_call(
            action="create",
            prompt=PROMPT,
            interval_secs=3600,
            capabilities=["net:api.example.com", "net:*.example.com", "shell:echo"],
        ),
        {"content": "I cannot"},
    )
    body = chat(client, capabilities=["schedule:*", "net:api.example.com"])
    call = body["tool_calls"][0]
    assert call["decision"] == "error"
    assert call["error"] == (
        "capabilities: beyond this session's capabilities: net:*.example.com, shell:echo; "
        "nothing was created"
    )
    assert call["error"] in tool_result(model_server)
    assert Job.objects.count() == 0
    row = last_call()
    assert (row.decision, row.error, row.session_id) == ("error", call["error"], body["session_id"])


def test_a_child_beyond_the_current_grant_is_refused_even_within_the_session(
    model_server, client, owner
) -> None:
    model_server.add({"content": "ready"})
    session = chat(client, capabilities=["schedule:*", "shell:echo"])["session_id"]
    User.objects.filter(pk=owner.pk).update(grant=["schedule:*"])
    model_server.add(
        schedule_call(
            action="create", prompt=PROMPT, cron="0 9 * * *", capabilities=["shell:echo"]
        ),
        {"content": "no"},
    )
    call = chat(client, session_id=session)["tool_calls"][0]
    assert call["decision"] == "error" and "shell:echo" in call["error"]
    assert Job.objects.count() == 0


@pytest.mark.parametrize(
    ("requested", "named"),
    [
        (["schedule:*"], "schedule:*"),
        (["schedule:create"], "schedule:create"),
        (["shell:echo", "schedule:list"], "schedule:list"),
    ],
)
def test_a_child_may_not_hold_any_schedule_permission(
    model_server, client, requested, named
) -> None:
    # The session holds schedule:*, so containment alone would allow it.
    model_server.add(
        schedule_call(action="create", prompt=PROMPT, interval_secs=3600, capabilities=requested),
        {"content": "no"},
    )
    call = chat(client, capabilities=["schedule:*", "shell:echo"])["tool_calls"][0]
    assert call["decision"] == "error"
    assert "cannot manage schedules" in call["error"] and named in call["error"]
    assert "nothing was created" in call["error"]
    assert Job.objects.count() == 0
    assert last_call().decision == "error"


def test_both_kinds_of_excess_are_named_in_one_answer(model_server, client) -> None:
    model_server.add(
        schedule_call(
            action="create",
            prompt=PROMPT,
            interval_secs=3600,
            capabilities=["schedule:*", "shell:ls"],
        ),
        {"content": "no"},
    )
    call = chat(client, capabilities=["schedule:*", "shell:echo"])["tool_calls"][0]
    assert "schedule:*" in call["error"] and "shell:ls" in call["error"]
    assert Job.objects.count() == 0


@pytest.mark.parametrize("argument", ["owner", "user", "owner_id", "username"])
def test_a_schedule_for_another_user_is_refused_by_the_schema(
    model_server, client, make_user, argument
) -> None:
    bob = make_user("bob", grant=["schedule:*"])
    value = bob.pk if argument.endswith("id") else "bob"
    model_server.add(
        schedule_call(action="create", prompt=PROMPT, interval_secs=3600, **{argument: value}),
        {"content": "no"},
    )
    call = chat(client)["tool_calls"][0]
    assert call["decision"] == "invalid"
    assert argument in call["error"] and "not allowed" in call["error"]
    assert Job.objects.count() == 0
    assert last_call().decision == "invalid"


def test_another_users_schedule_cannot_be_seen_or_touched(
    model_server, client, make_user, api_client_for
) -> None:
    bob = make_user("bob", grant=["schedule:*"])
    response = api_client_for(bob).post(
        "/api/v1/schedules",
        {"prompt": "bob's", "schedule_type": "interval", "interval_secs": 3600},
        format="json",
    )
    bobs = Job.objects.get(pk=response.json()["id"])
    model_server.add(
        schedule_call(action="list", id=bobs.pk),
        schedule_call(action="update", id=bobs.pk, prompt="mine now"),
        schedule_call(action="delete", id=bobs.pk),
        schedule_call(action="cancel", id=bobs.pk),
        schedule_call(action="list"),
        {"content": "nothing"},
    )
    calls = chat(client)["tool_calls"]
    for call in calls[:4]:
        assert call["decision"] == "error"
        assert call["error"] == f"id: there is no schedule {bobs.pk} of yours"
    assert tool_output(model_server)["count"] == 0
    bobs.refresh_from_db()
    assert bobs.prompt == "bob's" and bobs.deleted_at is None


@pytest.mark.parametrize(
    ("schedule", "field", "reason"),
    [
        ({"cron": "*/30 * * * * *"}, "cron", "fires 30 s apart; the minimum interval is 60 s"),
        ({"cron": "* * * * *"}, "cron", "fires 60 s apart; the minimum interval is 300 s"),
        ({"interval_secs": 10}, "interval_secs", "Must be at least 300 s"),
        ({"cron": "0 0 30 2 *"}, "cron", "never fires"),
    ],
)
def test_a_too_frequent_schedule_is_refused_by_the_apis_rules(
    model_server, client, picobot_config, schedule, field, reason
) -> None:
    if "30 *" not in schedule.get("cron", ""):
        picobot_config("scheduler", min_interval_secs=300)
    model_server.add(schedule_call(action="create", prompt=PROMPT, **schedule), {"content": "no"})
    call = chat(client)["tool_calls"][0]
    assert call["decision"] == "error"
    assert call["error"].startswith(f"invalid schedule ({field}: ")
    assert reason in call["error"] and "nothing was created" in call["error"]
    assert Job.objects.count() == 0
    assert last_call().error == call["error"]


def test_each_action_needs_its_own_permission(model_server, client) -> None:
    model_server.add(
        schedule_call(action="create", prompt=PROMPT, interval_secs=3600),
        schedule_call(action="list"),
        {"content": "listed"},
    )
    calls = chat(client, capabilities=["schedule:list"])["tool_calls"]
    assert calls[0]["decision"] == "denied"
    assert calls[0]["missing_permission"] == "schedule:create"
    assert calls[1]["decision"] == "allowed"
    assert Job.objects.count() == 0


def test_the_per_user_quota_applies(model_server, client, picobot_config) -> None:
    picobot_config("scheduler", max_jobs_per_user=1)
    model_server.add(
        schedule_call(action="create", prompt="first", interval_secs=3600),
        schedule_call(action="create", prompt="second", interval_secs=3600),
        {"content": "one"},
    )
    calls = chat(client)["tool_calls"]
    assert calls[0]["decision"] == "allowed"
    assert calls[1]["decision"] == "error" and "max_jobs_per_user" in calls[1]["error"]
    assert list(Job.objects.values_list("prompt", flat=True)) == ["first"]


def test_max_executions_is_capped_and_defaults_to_the_cap(model_server, client) -> None:
    model_server.add(
        schedule_call(
            action="create",
            prompt=PROMPT,
            interval_secs=3600,
            max_executions=MAX_TOOL_EXECUTIONS + 1,
        ),
        schedule_call(action="create", prompt=PROMPT, interval_secs=3600),
        schedule_call(action="create", prompt="once", run_at="in 1 hour"),
        {"content": "done"},
    )
    calls = chat(client)["tool_calls"]
    assert calls[0]["decision"] == "invalid" and "max_executions" in calls[0]["error"]
    recurring, once = Job.objects.order_by("id")
    assert recurring.max_executions == MAX_TOOL_EXECUTIONS
    assert once.max_executions == 1


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"run_at": "tomorrow-ish"}, "run_at: use 'in 10 minutes'"),
        ({"run_at": "2030-01-31T09:00:00"}, "run_at: Has no UTC offset"),
        ({"run_at": "2030-01-31T09:00:00", "timezone": "Mars/Olympus"}, "timezone: Unknown"),
        ({"run_at": "2031-03-09T02:30:00", "timezone": "America/New_York"}, "does not exist"),
        ({"run_at": "in 999999 weeks"}, "run_at: "),
        ({"run_at": "2000-01-01T00:00:00Z"}, "run_at: Must be in the future"),
        ({"cron": "0 9 * *"}, "cron: Expected 5 fields"),
        ({"cron": "0 9 * * *", "timezone": "../../etc/passwd"}, "timezone: Unknown"),
        ({"interval_secs": 3600, "cron": "0 9 * * *"}, "interval_secs: Does not apply"),
        ({}, "give run_at for once, interval_secs for every N seconds, or cron"),
        ({"run_at": "in 1 hour", "id": 5}, "id: does not apply to action create"),
        ({"run_at": "in 1 hour", "capabilities": ["nonsense"]}, "capabilities: "),
        ({"run_at": "in 1 hour", "prompt": "a\x00b"}, "prompt: NUL characters"),
        ({"run_at": "in 1 hour", "prompt": "\ud800"}, "prompt: Lone surrogate"),
        ({"run_at": "in 1 hour", "prompt": "   "}, "prompt: Must not be blank"),
    ],
)
def test_invalid_input_is_a_clear_error_never_a_crash(
    model_server, client, arguments, expected
) -> None:
    model_server.add(
        schedule_call(**{"action": "create", "prompt": PROMPT, **arguments}), {"content": "no"}
    )
    call = chat(client)["tool_calls"][0]
    assert call["decision"] in ("error", "invalid")
    assert expected in call["error"], call["error"]
    assert "unexpectedly" not in call["error"]
    assert Job.objects.count() == 0


# --- a legitimate schedule, end to end ----------------------------------------------------------


def test_create_list_update_cancel_and_delete_work_end_to_end(model_server, client, owner) -> None:
    model_server.add(
        schedule_call(
            action="create",
            name="Status",
            prompt=PROMPT,
            cron="0 9 * * 1-5",
            timezone="Europe/Paris",
            capabilities=["net:status.example.com"],
        ),
        {"content": "Scheduled for weekdays at 09:00 Paris time."},
    )
    body = chat(client, capabilities=["schedule:*", "net:*.example.com"])
    session = body["session_id"]
    assert body["tool_calls"][0]["decision"] == "allowed"
    created = tool_output(model_server)
    assert created["result"] == "created"
    job = Job.objects.get()
    assert (job.owner, job.origin, job.name) == (owner, "tool", "Status")
    assert job.capabilities == ["net:status.example.com"]
    assert job.max_executions == MAX_TOOL_EXECUTIONS
    schedule = created["schedule"]
    assert schedule["id"] == job.pk and schedule["cron"] == "0 9 * * 1-5"
    runs = schedule["next_runs"]
    assert len(runs) == 3
    for run in runs:
        local = datetime.fromisoformat(run["local"])
        assert (local.hour, local.minute) == (9, 0) and local.weekday() < 5
        assert local.utcoffset() in (timedelta(hours=1), timedelta(hours=2))
        assert datetime.fromisoformat(run["utc"].replace("Z", "+00:00")) == local
    assert runs[0]["utc"] == job.next_run_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    assert runs[0]["local"] in created["message"]

    model_server.add(schedule_call(action="list"), {"content": "You have one."})
    chat(client, session_id=session)
    listed = tool_output(model_server)
    assert listed["count"] == 1 and listed["schedules"][0]["id"] == job.pk

    model_server.add(
        schedule_call(action="update", id=job.pk, cron="30 8 * * 1-5"), {"content": "Moved."}
    )
    chat(client, session_id=session)
    updated = tool_output(model_server)
    job.refresh_from_db()
    assert updated["result"] == "updated"
    assert (job.cron, job.schedule_version) == ("30 8 * * 1-5", 2)
    assert datetime.fromisoformat(updated["schedule"]["next_runs"][0]["local"]).hour == 8

    model_server.add(schedule_call(action="cancel", id=job.pk), {"content": "Nothing runs."})
    call = chat(client, session_id=session)["tool_calls"][0]
    assert call["decision"] == "error" and "nothing to cancel" in call["error"]
    make_due(job)
    [claim] = claims.claim_due("w-test", 1).claims
    model_server.add(schedule_call(action="cancel", id=job.pk), {"content": "Stopping it."})
    chat(client, session_id=session)
    cancelled = tool_output(model_server)
    execution = Execution.objects.get(pk=claim.execution_id)
    assert cancelled["result"] == "cancel_requested"
    assert cancelled["execution"]["id"] == execution.pk
    assert execution.cancel_requested_at is not None

    model_server.add(
        schedule_call(action="delete", id=job.pk),
        schedule_call(action="list"),
        {"content": "Deleted."},
    )
    chat(client, session_id=session)
    job.refresh_from_db()
    assert job.deleted_at is not None
    assert tool_output(model_server)["count"] == 0
    decisions = list(
        ToolCall.objects.filter(session_id=session)
        .order_by("id")
        .values_list("decision", flat=True)
    )
    assert decisions == ["allowed"] * 3 + ["error"] + ["allowed"] * 3


def test_in_ten_minutes_is_ten_minutes_after_the_database_clock(model_server, client) -> None:
    model_server.add(
        schedule_call(action="create", prompt="stretch", run_at="in 10 minutes"),
        schedule_call(action="create", prompt="water", run_at="in 2 hours"),
        {"content": "ok"},
    )
    before = db_now()
    chat(client)
    after = db_now()
    stretch, water = Job.objects.order_by("id")
    assert stretch.schedule_type == "once"
    assert before + timedelta(minutes=10) <= stretch.run_at <= after + timedelta(minutes=10)
    assert stretch.next_run_at == stretch.run_at
    assert before + timedelta(hours=2) <= water.run_at <= after + timedelta(hours=2)


def in_a_month() -> datetime:
    """A calendar date about a month ahead (within the one-year limit whatever today is)."""
    return (db_now() + timedelta(days=30)).replace(hour=0, minute=0, second=0, microsecond=0)


@pytest.mark.parametrize(
    ("arguments", "check"),
    [
        (
            {"run_at": "{day}T09:00:00+01:00"},
            {"schedule_type": "once", "run_at": timedelta(hours=8)},
        ),
        (
            {"run_at": "{day}T09:00:00Z"},
            {"schedule_type": "once", "run_at": timedelta(hours=9)},
        ),
        (
            {"run_at": "{day} 09:00", "timezone": "Asia/Kolkata"},
            {"schedule_type": "once", "run_at": timedelta(hours=3, minutes=30)},
        ),
        ({"cron": "0 0 18 * * *"}, {"schedule_type": "cron", "cron": "0 0 18 * * *"}),
        ({"cron": "  15  7 * * * "}, {"schedule_type": "cron", "cron": "15 7 * * *"}),
        ({"interval_secs": 900}, {"schedule_type": "interval", "interval_secs": 900}),
    ],
)
def test_natural_inputs_are_normalised(model_server, client, arguments, check) -> None:
    day = in_a_month()
    if "run_at" in arguments:
        arguments = {**arguments, "run_at": arguments["run_at"].format(day=day.date())}
        check = {**check, "run_at": day + check["run_at"]}
    model_server.add(schedule_call(action="create", prompt=PROMPT, **arguments), {"content": "ok"})
    assert chat(client)["tool_calls"][0]["decision"] == "allowed"
    job = Job.objects.get()
    for field, value in check.items():
        assert getattr(job, field) == value
    runs = tool_output(model_server)["schedule"]["next_runs"]
    assert len(runs) == (1 if check["schedule_type"] == "once" else 3)


def test_a_near_duplicate_returns_the_existing_schedule(model_server, client) -> None:
    model_server.add(
        schedule_call(action="create", prompt=PROMPT, run_at="in 10 minutes"),
        schedule_call(action="create", prompt=PROMPT, run_at="in 13 minutes"),
        {"content": "ok"},
    )
    chat(client)
    job = Job.objects.get()
    answer = tool_output(model_server)
    assert answer["result"] == "existing" and answer["schedule"]["id"] == job.pk
    assert "nothing new was created" in answer["message"]
    assert tool_output(model_server, 1)["result"] == "created"


@pytest.mark.parametrize(
    "again",
    [
        {"cron": "0 9 * * *", "timezone": "Europe/Paris"},
        {"interval_secs": 3600},
    ],
)
def test_an_identical_recurring_schedule_is_not_created_twice(model_server, client, again) -> None:
    model_server.add(
        schedule_call(action="create", prompt=PROMPT, **again),
        schedule_call(action="create", prompt=PROMPT, **again),
        {"content": "ok"},
    )
    chat(client)
    assert Job.objects.count() == 1
    assert tool_output(model_server)["result"] == "existing"


@pytest.mark.parametrize(
    "different",
    [
        {"prompt": "something else", "run_at": "in 10 minutes"},
        {"prompt": PROMPT, "run_at": "in 20 minutes"},
        {"prompt": PROMPT, "run_at": "in 10 minutes", "capabilities": ["shell:echo"]},
    ],
)
def test_a_different_schedule_is_not_a_duplicate(model_server, client, different) -> None:
    model_server.add(
        schedule_call(action="create", prompt=PROMPT, run_at="in 10 minutes"),
        schedule_call(action="create", **different),
        {"content": "ok"},
    )
    chat(client)
    assert Job.objects.count() == 2
    assert tool_output(model_server)["result"] == "created"


def test_a_schedule_holding_more_than_the_session_can_only_be_renamed_disabled_or_deleted(
    model_server, client
) -> None:
    response = client.post(
        "/api/v1/schedules",
        {"prompt": "list files", "schedule_type": "interval", "interval_secs": 3600,
         "capabilities": ["shell:ls"]},
        format="json",
    )  # fmt: skip
    job = Job.objects.get(pk=response.json()["id"])
    model_server.add(
        schedule_call(action="update", id=job.pk, prompt="now do something else"),
        schedule_call(action="update", id=job.pk, capabilities=["shell:ls", "shell:echo"]),
        schedule_call(action="update", id=job.pk, name="renamed", enabled=False),
        schedule_call(action="update", id=job.pk, enabled=True),
        {"content": "ok"},
    )
    calls = chat(client, capabilities=["schedule:*", "shell:echo"])["tool_calls"]
    assert calls[0]["decision"] == "error" and "shell:ls" in calls[0]["error"]
    assert calls[1]["decision"] == "error" and "shell:ls" in calls[1]["error"]
    assert calls[2]["decision"] == "allowed"
    assert calls[3]["decision"] == "error"
    job.refresh_from_db()
    assert (job.prompt, job.capabilities, job.name, job.enabled) == (
        "list files",
        ["shell:ls"],
        "renamed",
        False,
    )


def test_an_update_may_not_widen_capabilities_or_add_schedule_permissions(
    model_server, client
) -> None:
    model_server.add(
        schedule_call(action="create", prompt=PROMPT, interval_secs=3600),
        {"content": "ok"},
    )
    session = chat(client, capabilities=["schedule:*", "shell:echo"])["session_id"]
    job = Job.objects.get()
    model_server.add(
        schedule_call(action="update", id=job.pk, capabilities=["schedule:create"]),
        schedule_call(action="update", id=job.pk, capabilities=["shell:ls"]),
        schedule_call(action="update", id=job.pk, capabilities=["shell:echo"]),
        {"content": "ok"},
    )
    calls = chat(client, session_id=session)["tool_calls"]
    assert "cannot manage schedules" in calls[0]["error"]
    assert "beyond this session's capabilities: shell:ls" in calls[1]["error"]
    assert calls[2]["decision"] == "allowed"
    job.refresh_from_db()
    assert job.capabilities == ["shell:echo"]


# --- scheduled runs (a real worker) -----------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_created_job_runs_with_exactly_the_subset_it_was_given(
    model_server, client, fast_worker
) -> None:
    model_server.add(
        schedule_call(
            action="create", prompt="Say hi with echo.", run_at="in 1 hour",
            capabilities=["shell:echo"],
        ),
        {"content": "Scheduled."},
    )  # fmt: skip
    chat(client, capabilities=["schedule:*", "shell:echo", "shell:ls"])
    job = Job.objects.get()
    make_due(job)
    model_server.add(
        {"tool_calls": [{"name": "shell", "arguments": {"command": "echo", "args": ["hi"]}}]},
        {"tool_calls": [{"name": "shell", "arguments": {"command": "ls"}}]},
        {"content": "hi"},
    )
    run_worker_once()
    execution = Execution.objects.get(job=job)
    assert execution.status == ExecutionStatus.SUCCEEDED, execution.error
    assert execution.capabilities == ["shell:echo"]
    calls = ToolCall.objects.filter(execution=execution).order_by("id")
    assert [(c.tool, c.decision, c.missing_permission) for c in calls] == [
        ("shell", "allowed", ""),
        ("shell", "denied", "shell:ls"),  # in the session and the grant, not in the job
    ]


@pytest.mark.django_db(transaction=True)
def test_a_scheduled_run_never_creates_updates_or_deletes_whatever_its_snapshot_says(
    model_server, client, fast_worker
) -> None:
    # Made through the API, which may give schedule:* (the owner's grant has it).
    response = client.post(
        "/api/v1/schedules",
        {"prompt": "Tidy my schedules.", "schedule_type": "interval", "interval_secs": 3600,
         "capabilities": ["schedule:*"]},
        format="json",
    )  # fmt: skip
    assert response.status_code == 201, response.content
    job = Job.objects.get()
    make_due(job)
    model_server.add(
        schedule_call(action="create", prompt="again", interval_secs=3600),
        schedule_call(action="create", prompt="again", run_at="in 10 minutes"),
        schedule_call(action="update", id=job.pk, interval_secs=60),
        schedule_call(action="delete", id=job.pk),
        {"content": "I could not."},
    )
    run_worker_once()
    execution = Execution.objects.get(job=job)
    assert execution.status == ExecutionStatus.SUCCEEDED, execution.error
    assert execution.capabilities == ["schedule:*"]
    calls = ToolCall.objects.filter(execution=execution).order_by("id")
    assert [(c.decision, c.missing_permission) for c in calls] == [
        ("denied", "schedule:create"),
        ("denied", "schedule:create"),
        ("denied", "schedule:update"),
        ("denied", "schedule:delete"),
    ]
    assert "a scheduled run cannot create" in tool_result(model_server, 1)
    assert Job.objects.count() == 1
    job.refresh_from_db()
    assert (job.interval_secs, job.deleted_at) == (3600, None)


@pytest.mark.django_db(transaction=True)
def test_a_scheduled_run_lists_and_cancels_only_its_own_job(
    model_server, client, fast_worker, monkeypatch
) -> None:
    def create(prompt: str) -> Job:
        response = client.post(
            "/api/v1/schedules",
            {"prompt": prompt, "schedule_type": "interval", "interval_secs": 3600,
             "capabilities": ["schedule:*"]},
            format="json",
        )  # fmt: skip
        return Job.objects.get(pk=response.json()["id"])

    # The worker's monitor reads cancel requests twice a second: the answer after the cancel is
    # held until the monitor has stopped the run, and the next call then finds it stopped.
    stopped = threading.Event()
    watch = Worker.handle_one_watch

    def watch_and_tell(self: Worker) -> bool:
        if watch(self):
            stopped.set()
            return True
        return False

    monkeypatch.setattr(Worker, "handle_one_watch", watch_and_tell)
    other = create("Another job of the same owner.")
    job = create("Stop yourself.")
    make_due(job)
    model_server.add(
        schedule_call(action="list"),
        schedule_call(action="list", id=other.pk),
        schedule_call(action="cancel", id=other.pk),
        schedule_call(action="cancel"),
        {"hold": stopped, **schedule_call(action="list")},
        {"content": "unreachable"},
    )
    try:
        run_worker_once()
    finally:
        stopped.set()
    listed = tool_output(model_server, 1)
    assert [s["id"] for s in listed["schedules"]] == [job.pk]
    execution = Execution.objects.get(job=job)
    assert execution.status == ExecutionStatus.CANCELLED
    calls = ToolCall.objects.filter(execution=execution).order_by("id")
    assert [c.decision for c in calls][:4] == ["allowed", "denied", "denied", "allowed"]
    assert not Execution.objects.filter(job=other).exists()
    assert ChatSession.objects.count() == 0


def test_the_tool_is_registered_by_the_schedules_app() -> None:
    assert get_tool("schedule").name == "schedule"


def test_a_schedule_holding_a_schedule_permission_cannot_be_re_prompted_by_a_session_holding_it(
    model_server, client
) -> None:
    """Even `schedule:` permissions the session holds itself count as wider: a child may never
    hold one, so a job made through the API with one is not the agent's to re-prompt."""
    response = client.post(
        "/api/v1/schedules",
        {"prompt": "list my schedules", "schedule_type": "interval", "interval_secs": 3600,
         "capabilities": ["schedule:list"]},
        format="json",
    )  # fmt: skip
    job = Job.objects.get(pk=response.json()["id"])
    model_server.add(
        schedule_call(action="update", id=job.pk, prompt="now delete them all"),
        schedule_call(action="update", id=job.pk, interval_secs=7200),
        {"content": "ok"},
    )
    calls = chat(client, capabilities=["schedule:*", "shell:echo"])["tool_calls"]
    for call in calls:
        assert call["decision"] == "error" and "schedule:list" in call["error"], call
    job.refresh_from_db()
    assert (job.prompt, job.interval_secs) == ("list my schedules", 3600)


@pytest.mark.parametrize("host", ["127.0.0.1", "10.0.0.5", "[::1]"])
def test_a_session_holding_net_star_cannot_give_a_child_an_exact_non_public_host(
    model_server, make_user, api_client_for, host: str
) -> None:
    """The owner's grant names the host exactly, but the session holds only `net:*`, which
    could not fetch it: the child may not get it either (http_fetch's exact-host rule)."""
    user = make_user("bob", grant=["schedule:*", "net:*", f"net:{host}"])
    model_server.add(
        schedule_call(
            action="create", prompt="fetch /admin", interval_secs=3600, capabilities=[f"net:{host}"]
        ),
        {"content": "ok"},
    )
    calls = chat(api_client_for(user), capabilities=["schedule:*", "net:*"])["tool_calls"]
    assert calls[0]["decision"] == "error" and f"net:{host}" in calls[0]["error"]
    assert not Job.objects.exists()
