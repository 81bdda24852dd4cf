"""The queue in the operator console: schedules and executions through the real admin views."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.admin.models import LogEntry
from django.db import connection
from django.test.utils import CaptureQueriesContext

from kernel.models import ChatSession, ToolCall, User
from schedules import claims
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Job, Origin, Worker
from schedules.timing import first_run, spec_of

S = ExecutionStatus
pytestmark = pytest.mark.django_db

PASSWORD = "a long operator password"
# Attacker-controlled text: a prompt, the model's output, an error, tool arguments.
SCRIPT = "<script>alert('x')</script>"
JS_LINK = '<a href="javascript:alert(1)">click</a>'
SVG = '<svg onload="alert(1)"><circle r="5"/></svg>'
PAYLOAD = f"{SCRIPT} {JS_LINK} {SVG}"


@pytest.fixture
def operator(client: Any) -> Any:
    User.objects.create_superuser("operator", password=PASSWORD)
    client.login(username="operator", password=PASSWORD)
    return client


def make_job(owner: User, **fields: Any) -> Job:
    values: dict[str, Any] = {
        "name": "daily report",
        "prompt": "say hi",
        "schedule_type": "cron",
        "cron": "0 9 * * *",
        "timezone": "Europe/Paris",
        "next_run_at": db_now() + timedelta(hours=1),
    }
    values.update(fields)
    return Job.objects.create(owner=owner, **values)


def make_execution(job: Job, n: int = 1, **fields: Any) -> Execution:
    now = db_now()
    values: dict[str, Any] = {
        "scheduled_for": now - timedelta(minutes=n),
        "status": S.SUCCEEDED,
        "started_at": now - timedelta(minutes=n) + timedelta(seconds=1),
        "finished_at": now - timedelta(minutes=n) + timedelta(seconds=3),
        "worker_id": "host:1",
    }
    values.update(fields)
    return Execution.objects.create(job=job, **values)


def form_data(job: Job | None = None, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "report",
        "prompt": "say hi",
        "schedule_type": "cron",
        "run_at_0": "",
        "run_at_1": "",
        "interval_secs": "",
        "cron": "0 9 * * *",
        "timezone": "Europe/Paris",
        "capabilities": "",
        "enabled": "on",
        "max_executions": "",
        "timeout_secs": "300",
        "misfire": "run_once",
        "executions-TOTAL_FORMS": "0",
        "executions-INITIAL_FORMS": "0",
    }
    if job is not None:
        data.update(
            {
                "name": job.name,
                "prompt": job.prompt,
                "cron": job.cron,
                "timezone": job.timezone,
                "timeout_secs": str(job.timeout_secs),
                "capabilities": "\n".join(job.capabilities),
            }
        )
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def act(operator: Any, action: str, *jobs: Job) -> Any:
    return operator.post(
        "/admin/schedules/job/",
        {"action": action, "_selected_action": [str(j.pk) for j in jobs]},
        follow=True,
    )


# --- the form: the API's validation --------------------------------------------------------------


def test_a_too_frequent_cron_is_refused_in_the_form_with_the_reason(operator, make_user) -> None:
    owner = make_user("alice", grant=["schedule:*"])
    response = operator.post(
        "/admin/schedules/job/add/", form_data(owner=str(owner.pk), cron="*/10 * * * * *")
    )
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "cron" in errors and "60" in errors["cron"][0]
    assert not Job.objects.exists()

    job = make_job(owner)
    response = operator.post(
        f"/admin/schedules/job/{job.pk}/change/", form_data(job, cron="* * * * * *")
    )
    assert response.status_code == 200
    assert "cron" in response.context["adminform"].form.errors
    assert Job.objects.get(pk=job.pk).cron == "0 9 * * *"


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("timezone", "Mars/Olympus", "unknown time zone"),
        ("cron", "0 0 30 2 *", "never"),
        ("timeout_secs", "999999", "max_timeout_secs"),
    ],
)
def test_other_bad_schedules_are_refused_in_the_form_naming_the_field(
    operator, make_user, field, value, reason
) -> None:
    owner = make_user("alice")
    response = operator.post(
        "/admin/schedules/job/add/", form_data(owner=str(owner.pk), **{field: value})
    )
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert field in errors and reason.lower() in " ".join(errors[field]).lower()
    assert not Job.objects.exists()


def test_capabilities_beyond_the_owners_grant_are_refused_in_the_form(operator, make_user) -> None:
    owner = make_user("alice", grant=["shell:ls"])
    response = operator.post(
        "/admin/schedules/job/add/",
        form_data(owner=str(owner.pk), capabilities="shell:ls\nnet:example.com"),
    )
    errors = response.context["adminform"].form.errors
    assert "net:example.com" in errors["capabilities"][0]
    assert not Job.objects.exists()


def test_a_schedule_added_in_the_admin_goes_through_create_with_origin_admin(
    operator, make_user
) -> None:
    owner = make_user("alice", grant=["shell:ls"])
    response = operator.post(
        "/admin/schedules/job/add/", form_data(owner=str(owner.pk), capabilities="shell:ls")
    )
    assert response.status_code == 302, response.context["adminform"].form.errors
    job = Job.objects.get()
    assert (job.owner, job.origin, job.capabilities) == (owner, Origin.ADMIN, ["shell:ls"])
    assert job.next_run_at is not None and job.next_run_at > db_now()


def test_an_admin_edit_of_the_prompt_bumps_the_version_and_changes_nothing_else(
    operator, make_user
) -> None:
    owner = make_user("alice")
    job = make_job(owner, consecutive_failures=3)
    response = operator.post(
        f"/admin/schedules/job/{job.pk}/change/", form_data(job, prompt="say hello")
    )
    assert response.status_code == 302
    job.refresh_from_db()
    assert (job.prompt, job.schedule_version, job.consecutive_failures) == ("say hello", 2, 0)
    assert job.cron == "0 9 * * *"


# --- heartbeats ---------------------------------------------------------------------------------


def test_heartbeat_jobs_are_read_only_with_a_note_and_refuse_state_actions(
    operator, make_user
) -> None:
    from kernel.models import system_principal

    heartbeat = make_job(
        system_principal(), name="check mail", heartbeat_name="mail", origin=Origin.HEARTBEAT
    )
    page = operator.get(f"/admin/schedules/job/{heartbeat.pk}/change/")
    assert page.status_code == 200
    assert b"source of truth" in page.content
    assert b'name="prompt"' not in page.content  # no editable field
    response = operator.post(
        f"/admin/schedules/job/{heartbeat.pk}/change/", form_data(heartbeat, prompt="changed")
    )
    assert response.status_code == 403
    for action in ("disabled", "deleted"):
        page = act(operator, action, heartbeat)
        assert b"config file" in page.content
    heartbeat.refresh_from_db()
    assert (heartbeat.prompt, heartbeat.enabled, heartbeat.deleted_at) == ("say hi", True, None)


# --- actions ------------------------------------------------------------------------------------


def test_run_now_makes_the_job_due_wakes_the_workers_and_logs_who_did_it(
    operator, make_user
) -> None:
    owner = make_user("alice")
    job = make_job(owner)
    before = db_now()
    act(operator, "run_now", job)
    job.refresh_from_db()
    assert before <= job.next_run_at <= db_now()
    entry = LogEntry.objects.get(object_id=str(job.pk))
    assert entry.user.username == "operator" and "Run now" in entry.get_change_message()
    assert claims.anything_due()


def test_run_now_refuses_a_disabled_or_running_job_and_says_why(operator, make_user) -> None:
    owner = make_user("alice")
    disabled = make_job(owner, name="off", enabled=False)
    running = make_job(owner, name="busy", claim_token="00000000-0000-0000-0000-000000000001")
    page = act(operator, "run_now", disabled, running)
    assert b"disabled; enable it first" in page.content
    assert b"running now" in page.content
    assert not LogEntry.objects.exists()


def test_disable_enable_and_delete_go_through_the_lifecycle(operator, make_user) -> None:
    owner = make_user("alice")
    job = make_job(owner, consecutive_failures=2)
    act(operator, "disabled", job)
    job.refresh_from_db()
    assert not job.enabled
    act(operator, "enabled", job)
    job.refresh_from_db()
    assert job.enabled and job.consecutive_failures == 0
    running = make_execution(job, status=S.RUNNING, finished_at=None)
    act(operator, "deleted", job)
    job.refresh_from_db()
    running.refresh_from_db()
    assert job.deleted_at is not None and running.cancel_requested_at is not None
    assert Job.objects.filter(pk=job.pk).exists()  # soft: history is kept
    listing = operator.get("/admin/schedules/job/")
    assert job.name.encode() not in listing.content
    assert job.name.encode() in operator.get("/admin/schedules/job/?state=deleted").content
    assert LogEntry.objects.filter(object_id=str(job.pk)).count() == 3


def test_re_enabling_a_once_job_whose_time_passed_is_refused_with_the_reason(
    operator, make_user
) -> None:
    owner = make_user("alice")
    job = make_job(
        owner, schedule_type="once", cron="", run_at=db_now() - timedelta(hours=1), enabled=False
    )
    page = act(operator, "enabled", job)
    assert b"time has passed" in page.content
    assert not Job.objects.get(pk=job.pk).enabled


def test_cancel_asks_the_running_execution_to_stop(operator, make_user) -> None:
    owner = make_user("alice")
    job = make_job(owner)
    running = make_execution(job, status=S.RUNNING, finished_at=None)
    idle = make_job(owner, name="idle")
    page = act(operator, "cancel", job, idle)
    running.refresh_from_db()
    assert running.cancel_requested_at is not None
    assert b"no execution is running" in page.content


def test_there_is_no_hard_delete(operator, make_user) -> None:
    job = make_job(make_user("alice"))
    assert operator.get(f"/admin/schedules/job/{job.pk}/delete/").status_code == 403
    assert "delete_selected" not in operator.get("/admin/schedules/job/").content.decode()


# --- what the pages show ------------------------------------------------------------------------


def test_the_schedule_page_shows_the_next_five_runs_capabilities_and_last_executions(
    operator, make_user
) -> None:
    owner = make_user("alice", grant=["shell:python", "net:example.com"])
    job = make_job(owner, capabilities=["net:example.com", "shell:python"])
    job.next_run_at = first_run(spec_of(job), db_now())
    job.save()
    for n in range(12):
        make_execution(job, n + 1, scheduled_for=db_now() - timedelta(days=n + 1))
    page = operator.get(f"/admin/schedules/job/{job.pk}/change/").content.decode()
    assert page.count("T09:00:00+01:00") + page.count("T09:00:00+02:00") == 5
    assert "<li><code>net:example.com</code></li><li><code>shell:python</code></li>" in page
    assert "Interpreters (python)" in page
    assert "At 09:00" in page  # the cron in words
    assert page.count("/admin/schedules/execution/") >= 10
    assert f"/admin/kernel/user/{owner.pk}/change/" in page


def test_attacker_controlled_text_is_escaped_on_every_page(operator, make_user) -> None:
    owner = make_user("mallory", grant=["shell:ls"])
    job = make_job(owner, name=PAYLOAD, prompt=PAYLOAD, last_error=PAYLOAD)
    execution = make_execution(
        job, prompt=PAYLOAD, output=PAYLOAD, error=PAYLOAD, worker_id=PAYLOAD
    )
    ToolCall.objects.create(
        execution=execution,
        user=owner,
        tool="shell",
        decision="denied",
        missing_permission=PAYLOAD,
        arguments={"command": PAYLOAD, "args": [JS_LINK]},
        error=PAYLOAD,
    )
    ChatSession.objects.create(owner=owner, messages=[{"role": "user", "content": PAYLOAD}])
    Worker.objects.create(
        worker_id=PAYLOAD, host=PAYLOAD, pid=1, started_at=db_now(), last_seen_at=db_now()
    )
    # url: whether the page shows the stored text (escaped)
    pages = {
        "/admin/schedules/job/": True,
        f"/admin/schedules/job/{job.pk}/change/": True,
        "/admin/schedules/execution/": True,
        f"/admin/schedules/execution/{execution.pk}/change/": True,
        "/admin/kernel/toolcall/": True,
        f"/admin/kernel/toolcall/{ToolCall.objects.get().pk}/change/": True,
        "/admin/kernel/chatsession/": False,
        f"/admin/kernel/chatsession/{ChatSession.objects.get().pk}/change/": True,
        "/admin/schedules/worker/": True,
        "/admin/dashboard/": True,
    }
    for url, shows in pages.items():
        response = operator.get(url)
        assert response.status_code == 200, url
        body = response.content.decode()
        assert "<script>alert" not in body, url
        assert 'href="javascript:' not in body, url
        assert "<svg onload" not in body, url
        assert not shows or "&lt;script&gt;" in body, url


# --- query counts -------------------------------------------------------------------------------


def queries_for(client: Any, url: str) -> int:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    assert response.status_code == 200, url
    return len(captured)


def populate(rows: int) -> None:
    owners = [
        User.objects.create(username=f"owner{n}-{rows}", grant=["shell:ls"]) for n in range(3)
    ]
    for n in range(rows):
        job = make_job(owners[n % 3], name=f"job {n}")
        execution = make_execution(job, n + 1)
        ToolCall.objects.create(
            execution=execution, user=job.owner, tool="shell", decision="allowed"
        )
        ChatSession.objects.create(owner=job.owner)


CHANGELISTS = [
    "/admin/schedules/job/",
    "/admin/schedules/execution/",
    "/admin/schedules/worker/",
    "/admin/kernel/toolcall/",
    "/admin/kernel/chatsession/",
    "/admin/kernel/user/",
    "/admin/kernel/apikey/",
    "/admin/dashboard/",
    "/admin/",
]


def test_every_changelist_and_the_dashboard_cost_the_same_queries_for_20_or_200_rows(
    operator,
) -> None:
    populate(20)
    small = {url: queries_for(operator, url) for url in CHANGELISTS}
    populate(180)
    large = {url: queries_for(operator, url) for url in CHANGELISTS}
    assert small == large


# --- what an operator met -----------------------------------------------------------------------


def test_the_console_is_branded_and_links_to_the_dashboard_and_the_queue(operator) -> None:
    index = operator.get("/admin/").content.decode()
    assert "PicoBot operator console" in index and "Django administration" not in index
    for url in ("/admin/dashboard/", "/admin/schedules/job/", "/admin/schedules/execution/"):
        assert f'href="{url}"' in index


def test_django_q2s_schedule_and_queue_pages_are_gone_and_its_tasks_are_labelled(operator) -> None:
    index = operator.get("/admin/").content.decode()
    assert "Scheduled tasks" not in index and "Queued tasks" not in index
    assert "Notification delivery" in index
    assert operator.get("/admin/django_q/schedule/").status_code == 404
    assert operator.get("/admin/django_q/schedule/add/").status_code == 404
    assert operator.get("/admin/django_q/ormq/").status_code == 404


def test_the_grant_comes_before_djangos_permissions_on_the_user_page(operator, make_user) -> None:
    user = make_user("alice", grant=["schedule:*"])
    page = operator.get(f"/admin/kernel/user/{user.pk}/change/").content.decode()
    assert page.index('name="grant"') < page.index('name="groups"')
    assert f"/admin/schedules/job/?owner__id__exact={user.pk}" in page


def test_an_api_key_is_revoked_from_the_users_page(operator, make_user) -> None:
    from kernel.models import ApiKey

    user = make_user("alice", grant=["schedule:*"])
    key, _ = ApiKey.issue(user)
    other, _ = ApiKey.issue(user)
    data = {
        "username": user.username,
        "grant": "schedule:*",
        "is_active": "on",
        "date_joined_0": "2026-01-01",
        "date_joined_1": "00:00:00",
        "api_keys-TOTAL_FORMS": "2",
        "api_keys-INITIAL_FORMS": "2",
        "api_keys-0-id": str(key.pk),
        "api_keys-0-user": str(user.pk),
        "api_keys-0-revoke": "on",
        "api_keys-1-id": str(other.pk),
        "api_keys-1-user": str(user.pk),
    }
    response = operator.post(f"/admin/kernel/user/{user.pk}/change/", data)
    assert response.status_code == 302
    key.refresh_from_db()
    other.refresh_from_db()
    assert key.revoked_at is not None and other.revoked_at is None


def test_a_tool_call_links_to_its_execution_user_and_schedule(operator, make_user) -> None:
    owner = make_user("alice")
    execution = make_execution(make_job(owner))
    call = ToolCall.objects.create(
        execution=execution, user=owner, tool="shell", decision="allowed"
    )
    listing = operator.get("/admin/kernel/toolcall/").content.decode()
    assert f"/admin/schedules/execution/{execution.pk}/change/" in listing
    assert f"/admin/kernel/user/{owner.pk}/change/" in listing
    detail = operator.get(f"/admin/schedules/execution/{execution.pk}/change/").content.decode()
    assert f"/admin/schedules/job/{execution.job_id}/change/" in detail
    assert "shell" in detail and "allowed" in detail  # the audit inline
    assert operator.get(f"/admin/kernel/toolcall/{call.pk}/change/").status_code == 200


def test_a_chat_transcript_reads_as_turns(operator, make_user) -> None:
    session = ChatSession.objects.create(
        owner=make_user("alice"),
        messages=[
            {"role": "user", "content": "what is in my notes?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "function": {"name": "filesystem_read"}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "a shopping list"},
            {"role": "assistant", "content": "A shopping list."},
        ],
    )
    page = operator.get(f"/admin/kernel/chatsession/{session.pk}/change/").content.decode()
    assert page.count('class="turn"') == 4
    assert "calls: filesystem_read" in page and "tool result (c1)" in page
    assert '"role": "user"' not in page  # not one raw JSON blob


def test_retention_purges_an_executions_tool_call_audit_with_it_and_keeps_newer_ones(
    make_user, picobot_config
) -> None:
    """history_days is the audit's retention too: the calls of a purged run go with it."""
    owner = make_user("alice")
    job = make_job(owner)
    old = make_execution(job, 1, finished_at=db_now() - timedelta(days=40))
    new = make_execution(job, 2)
    for execution in (old, new):
        ToolCall.objects.create(execution=execution, user=owner, tool="shell", decision="allowed")
    assert claims.purge_history() == (1, 0)
    assert list(ToolCall.objects.values_list("execution_id", flat=True)) == [new.pk]
