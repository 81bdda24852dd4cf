"""`loadheartbeats`: the operator's prompts from `[heartbeats]`, kept in step with the database."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Iterator
from datetime import timedelta
from io import StringIO
from zoneinfo import ZoneInfo

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test.utils import CaptureQueriesContext

from kernel.models import User, system_principal
from picobot_site.config import NOTIFY_CHANNELS, ConfigError, parse_config
from schedules import claims
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Job, Origin
from schedules.serializers import NOTIFY_CHANNEL_CHOICES

pytestmark = pytest.mark.django_db

SEED = """
[heartbeats]
enabled = true
default_interval_secs = 300

[[heartbeats.prompts]]
name = "health_check"
prompt = "Check system health and report issues"
interval_secs = 60

[[heartbeats.prompts]]
name = "daily_summary"
prompt = "Generate daily summary"
cron = "0 0 18 * * *"
timezone = "America/New_York"
"""


@pytest.fixture
def heartbeats_file() -> Iterator[Callable[[str], None]]:
    """Use this TOML text as the config file's heartbeats (the rest of the config unchanged)."""
    original = settings.PICOBOT

    def use(text: str) -> None:
        heartbeats = parse_config(tomllib.loads(text)).heartbeats
        settings.PICOBOT = dataclasses.replace(settings.PICOBOT, heartbeats=heartbeats)

    yield use
    settings.PICOBOT = original


def load(*args: str) -> list[str]:
    out = StringIO()
    call_command("loadheartbeats", *args, stdout=out)
    return out.getvalue().splitlines()


def heartbeat(name: str) -> Job:
    return Job.objects.get(heartbeat_name=name)


def writes(queries: CaptureQueriesContext) -> list[str]:
    verbs = ("INSERT", "UPDATE", "DELETE")
    return [
        q["sql"] for q in queries.captured_queries if q["sql"].lstrip().upper().startswith(verbs)
    ]


def test_the_seeds_example_file_loads_and_schedules_exactly(heartbeats_file):
    heartbeats_file(SEED)
    before = db_now()
    assert load() == ["heartbeats: create health_check", "heartbeats: create daily_summary"]
    after = db_now()
    health, daily = heartbeat("health_check"), heartbeat("daily_summary")
    for job in (health, daily):
        assert job.owner == system_principal()
        assert job.origin == Origin.HEARTBEAT
        assert job.is_heartbeat
        assert job.enabled and job.capabilities == []
        assert job.notify_on == []  # notify = false by default
    assert (health.schedule_type, health.interval_secs) == ("interval", 60)
    assert health.prompt == "Check system health and report issues"
    assert before + timedelta(seconds=60) <= health.next_run_at <= after + timedelta(seconds=60)
    assert (daily.schedule_type, daily.cron, daily.timezone) == (
        "cron",
        "0 0 18 * * *",
        "America/New_York",
    )
    local = daily.next_run_at.astimezone(ZoneInfo("America/New_York"))
    assert (local.hour, local.minute, local.second) == (18, 0, 0)
    assert before < daily.next_run_at <= after + timedelta(days=1)


def test_a_second_load_reports_everything_unchanged_and_writes_nothing(heartbeats_file):
    heartbeats_file(SEED)
    load()
    with CaptureQueriesContext(connection) as queries:
        lines = load()
    assert lines == ["heartbeats: unchanged health_check", "heartbeats: unchanged daily_summary"]
    assert writes(queries) == []
    # The clock, the heartbeat jobs, the system principal: reads only, and no lock taken.
    assert len(queries.captured_queries) == 3


def test_an_edited_prompt_is_updated_in_place_with_its_history_and_a_new_version(
    heartbeats_file,
):
    heartbeats_file(SEED)
    load()
    daily = heartbeat("daily_summary")
    Execution.objects.create(
        job=daily, scheduled_for=db_now(), status=ExecutionStatus.SUCCEEDED, finished_at=db_now()
    )
    heartbeats_file(
        SEED.replace('"Generate daily summary"', '"Summarise the day"').replace(
            '"0 0 18 * * *"', '"0 30 7 * * mon-fri"'
        )
    )
    assert load("--dry-run") == [
        "heartbeats (dry run): unchanged health_check",
        "heartbeats (dry run): update daily_summary: prompt, cron",
    ]
    assert heartbeat("daily_summary").prompt == "Generate daily summary"  # dry run: no change
    assert load()[1] == "heartbeats: update daily_summary: prompt, cron"
    updated = heartbeat("daily_summary")
    assert updated.pk == daily.pk
    assert updated.schedule_version == daily.schedule_version + 1
    assert (updated.prompt, updated.cron) == ("Summarise the day", "0 30 7 * * mon-fri")
    local = updated.next_run_at.astimezone(ZoneInfo("America/New_York"))
    assert (local.hour, local.minute, local.weekday() < 5) == (7, 30, True)
    assert updated.executions.count() == 1


def test_a_changed_schedule_type_leaves_nothing_of_the_old_schedule(heartbeats_file):
    heartbeats_file(SEED)
    load()
    heartbeats_file(SEED.replace('cron = "0 0 18 * * *"', "interval_secs = 3600"))
    assert load()[1] == "heartbeats: update daily_summary: schedule_type, interval_secs, cron"
    daily = heartbeat("daily_summary")
    assert (daily.schedule_type, daily.interval_secs, daily.cron) == ("interval", 3600, "")


def test_removal_disables_the_job_and_keeps_it(heartbeats_file):
    heartbeats_file(SEED)
    load()
    only_daily = SEED.split("[[heartbeats.prompts]]")
    heartbeats_file(only_daily[0] + "[[heartbeats.prompts]]" + only_daily[2])
    assert load() == ["heartbeats: unchanged daily_summary", "heartbeats: disable health_check"]
    health = Job.objects.get(heartbeat_name="health_check")
    assert not health.enabled and health.deleted_at is None
    assert heartbeat("daily_summary").enabled
    assert load()[1] == "heartbeats: unchanged health_check"  # stays disabled, no write


def test_enabled_false_disables_every_heartbeat_and_re_adding_re_enables_the_same_job(
    heartbeats_file,
):
    heartbeats_file(SEED)
    load()
    ids = {name: heartbeat(name).pk for name in ("health_check", "daily_summary")}
    heartbeats_file(SEED.replace("enabled = true", "enabled = false"))
    assert load() == ["heartbeats: disable health_check", "heartbeats: disable daily_summary"]
    assert not Job.objects.filter(heartbeat_name__isnull=False, enabled=True).exists()
    heartbeats_file(SEED)
    before = db_now()
    assert load() == [
        "heartbeats: update health_check: enabled",
        "heartbeats: update daily_summary: enabled",
    ]
    for name, pk in ids.items():
        job = heartbeat(name)
        assert job.pk == pk and job.enabled
        assert job.next_run_at > before  # counted from now, not from before the pause
    assert Job.objects.filter(heartbeat_name__isnull=False).count() == 2


def test_a_prompt_with_neither_interval_nor_cron_runs_every_default_interval(heartbeats_file):
    heartbeats_file(SEED + '\n[[heartbeats.prompts]]\nname = "tidy"\nprompt = "Tidy up"\n')
    load()
    assert heartbeat("tidy").interval_secs == 300


def test_capabilities_come_from_the_file_only(heartbeats_file, make_user):
    make_user("alice", grant=["shell:*", "net:*"])
    heartbeats_file(
        SEED.replace(
            "default_interval_secs = 300",
            'default_interval_secs = 300\ncapabilities = ["shell:df,uptime", "net:status.example.com"]',
        ).replace("interval_secs = 60", 'interval_secs = 60\ncapabilities = ["shell:df"]')
    )
    load()
    assert heartbeat("health_check").capabilities == ["shell:df"]
    assert heartbeat("daily_summary").capabilities == ["shell:df,uptime", "net:status.example.com"]
    # At run time the owner's grant is re-read: the system principal's is the section's.
    assert system_principal().grant == ["shell:df,uptime", "net:status.example.com"]


@pytest.mark.parametrize(
    ("section", "prompt", "beyond"),
    [
        ([], ["shell:df"], "shell:df"),  # the section is empty by default
        (["shell:df"], ["shell:df,rm"], "shell:df,rm"),
        (["net:*.example.com"], ["net:example.com"], "net:example.com"),
        (["filesystem:read:/var/log/**"], ["filesystem:read:/etc/**"], "filesystem:read:/etc/**"),
    ],
)
def test_a_prompt_capability_beyond_the_section_is_refused_by_name_and_nothing_is_written(
    heartbeats_file, section, prompt, beyond
):
    heartbeats_file(SEED)
    load()
    before = list(Job.objects.order_by("id").values())
    grant = system_principal().grant
    text = SEED.replace(
        "default_interval_secs = 300", f"capabilities = {section!r}".replace("'", '"')
    )
    text += (
        f'\n[[heartbeats.prompts]]\nname = "probe"\nprompt = "p"\ncapabilities = ["{prompt[0]}"]\n'
    )
    text = text.replace("interval_secs = 60", "interval_secs = 120")  # a change that must not land
    heartbeats_file(text)
    with pytest.raises(CommandError) as refused:
        load()
    assert f"heartbeat 'probe': capabilities beyond [heartbeats] capabilities: {beyond}" in str(
        refused.value
    )
    assert "nothing changed" in str(refused.value)
    assert list(Job.objects.order_by("id").values()) == before
    assert system_principal().grant == grant


@pytest.mark.parametrize(
    ("line", "field", "reason"),
    [
        ('cron = "*/30 * * * * *"', "cron", "fires 30 s apart; the minimum interval is 60 s"),
        ("interval_secs = 59", "interval_secs", "Must be at least 60 s (got 59)"),
        ('cron = "0 0 30 2 *"', "cron", "never fires"),
        ('timezone = "Mars/Olympus"\ninterval_secs = 600', "timezone", "Unknown time zone"),
        ('timezone = "PST8PDT"\ninterval_secs = 600', "timezone", "America/Los_Angeles"),
        ('active_hours = "8-20"\ninterval_secs = 600', "active_hours", "HH:MM-HH:MM"),
        ('active_hours = "09:00-25:00"\ninterval_secs = 600', "active_hours", "not a time of day"),
    ],
)
def test_a_bad_prompt_stops_the_load_naming_it_and_the_reason_before_any_write(
    heartbeats_file, line, field, reason
):
    heartbeats_file(SEED + f'\n[[heartbeats.prompts]]\nname = "bad"\nprompt = "p"\n{line}\n')
    with pytest.raises(CommandError) as refused:
        load()
    assert f"heartbeat 'bad': {field}: " in str(refused.value)
    assert reason in str(refused.value)
    assert not Job.objects.exists()  # the two good prompts were not created either
    assert not User.objects.filter(is_system=True).exists()


def test_the_minimum_interval_applies_exactly_at_its_boundary(heartbeats_file, picobot_config):
    picobot_config("scheduler", min_interval_secs=90)
    heartbeats_file(SEED.replace("interval_secs = 60", "interval_secs = 90"))
    load()
    assert heartbeat("health_check").interval_secs == 90
    heartbeats_file(SEED.replace("interval_secs = 60", "interval_secs = 89"))
    with pytest.raises(CommandError, match="Must be at least 90 s"):
        load()
    heartbeats_file(SEED.replace("interval_secs = 60", 'cron = "0,30 */3 * * * *"'))
    with pytest.raises(CommandError, match="fires 30 s apart"):
        load()


def test_active_hours_and_a_change_of_them_are_written_and_versioned(heartbeats_file):
    heartbeats_file(
        SEED.replace("interval_secs = 60", 'interval_secs = 60\nactive_hours = "08:00-20:00"')
    )
    load()
    job = heartbeat("health_check")
    assert job.active_hours == "08:00-20:00"
    heartbeats_file(
        SEED.replace("interval_secs = 60", 'interval_secs = 60\nactive_hours = "22:00-06:00"')
    )
    assert load()[0] == "heartbeats: update health_check: active_hours"
    changed = heartbeat("health_check")
    assert changed.active_hours == "22:00-06:00"
    assert changed.schedule_version == job.schedule_version + 1


@pytest.mark.parametrize(
    ("section", "prompt", "notify_on", "channels"),
    [
        ("false", None, [], None),
        ("true", None, ["success", "failure"], None),
        ('"whatsapp"', None, ["success", "failure"], ["whatsapp"]),
        ("false", '["webhook", "console"]', ["success", "failure"], ["webhook", "console"]),
        ("true", "false", [], None),
    ],
)
def test_notify_routes_results_to_the_system_principals_contacts(
    heartbeats_file, section, prompt, notify_on, channels
):
    text = SEED.replace("default_interval_secs = 300", f"notify = {section}")
    if prompt is not None:
        text = text.replace("interval_secs = 60", f"interval_secs = 60\nnotify = {prompt}")
    heartbeats_file(text)
    load()
    job = heartbeat("health_check")
    assert (job.notify_on, job.notify_channels) == (notify_on, channels)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"sms"', "unknown channel 'sms'"),
        ("[]", "non-empty list"),
        ('["console", "console"]', "names a channel twice"),
        ("3", "must be true, false, a channel name"),
    ],
)
def test_a_bad_notify_value_stops_start_up_naming_the_key(value, message):
    with pytest.raises(ConfigError, match=message) as refused:
        parse_config(tomllib.loads(f"[heartbeats]\nnotify = {value}\n"))
    assert "heartbeats.notify" in str(refused.value)


def test_the_notify_channels_are_the_apis():
    assert NOTIFY_CHANNELS == NOTIFY_CHANNEL_CHOICES


def test_a_per_prompt_enabled_false_keeps_its_job_disabled(heartbeats_file):
    heartbeats_file(SEED.replace("interval_secs = 60", "interval_secs = 60\nenabled = false"))
    load()
    assert not heartbeat("health_check").enabled
    assert heartbeat("daily_summary").enabled


def test_a_running_execution_keeps_the_version_it_started_with(heartbeats_file):
    heartbeats_file(SEED)
    load()
    Job.objects.filter(heartbeat_name="health_check").update(next_run_at=db_now())
    [claim] = claims.claim_due("w", 5).claims
    heartbeats_file(SEED.replace("Check system health", "Check disks"))
    load()
    job = heartbeat("health_check")
    assert job.schedule_version == claim.schedule_version + 1
    next_run = job.next_run_at
    claims.complete(claim, claims.Outcome(ExecutionStatus.SUCCEEDED, output="ok"))
    execution = Execution.objects.get(pk=claim.execution_id)
    assert execution.prompt == "Check system health and report issues"
    assert execution.schedule_version == claim.schedule_version
    assert heartbeat("health_check").next_run_at == next_run  # the update's, not the old run's


def test_a_bad_heartbeats_file_stops_runworker_before_it_starts(heartbeats_file):
    heartbeats_file(
        SEED + '\n[[heartbeats.prompts]]\nname = "bad"\nprompt = "p"\ncron = "* * * * * *"\n'
    )
    with pytest.raises(
        CommandError, match="heartbeat 'bad': cron: '\\* \\* \\* \\* \\* \\*' fires 1 s"
    ):
        call_command("runworker", "--once", stdout=StringIO())
    assert not Job.objects.exists()
    # A good file: see test_heartbeat_runs.py, where real workers print the plan at start.


def test_a_heartbeats_result_reaches_the_system_principals_contacts_and_a_quiet_one_sends_nothing(
    heartbeats_file,
):
    from notifications.models import Notification
    from tests.notification_support import verified_contact

    heartbeats_file(SEED.replace("default_interval_secs = 300", 'notify = "whatsapp"'))
    load()
    verified_contact(system_principal(), "+14155550101")
    for output in ("Disk 91% full on /var", "NOTHING_TO_REPORT"):
        Job.objects.filter(heartbeat_name="health_check").update(next_run_at=db_now())
        [claim] = claims.claim_due("w", 5).claims
        claims.complete(claim, claims.Outcome(ExecutionStatus.SUCCEEDED, output=output))
    [row] = Notification.objects.all()
    assert row.contact.address == "+14155550101" and row.channel == "whatsapp"
    assert row.body == "health_check: Disk 91% full on /var"
    assert row.owner_id == system_principal().pk
