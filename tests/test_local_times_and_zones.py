"""`run_at` as a local time plus `timezone` (one parser for the API and the tool), abbreviation
zones refused with suggestions, consistent messages, and a disabled schedule's next run."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from kernel.context import ScheduledRunCapabilities, ToolContext
from kernel.kernel import kernel
from kernel.models import User
from schedules.dbtime import db_now
from schedules.models import Job
from schedules.timing import ScheduleError, parse_run_at, validate_timezone
from tests.api_schedules_support import URL, detail, interval_body, once_body

pytestmark = pytest.mark.django_db

ZONE = "America/New_York"


def next_transitions(zone_name: str) -> tuple[datetime, datetime]:
    """The naive local wall times just after the next spring-forward gap starts and in the next
    repeated hour of `zone_name` (both within a year from now)."""
    zone = ZoneInfo(zone_name)
    instant = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    gap = fold = None
    for _ in range(24 * 366):
        before = instant.astimezone(zone).utcoffset()
        after = (instant + timedelta(hours=1)).astimezone(zone).utcoffset()
        assert before is not None and after is not None
        local = (instant + timedelta(hours=1)).astimezone(zone).replace(tzinfo=None)
        if after > before and gap is None:
            gap = local - (after - before) + timedelta(minutes=30)  # inside the skipped hour
        if after < before and fold is None:
            fold = local + timedelta(minutes=30)  # inside the repeated hour
        instant += timedelta(hours=1)
    assert gap is not None and fold is not None
    return gap, fold


@pytest.fixture
def client(make_user, api_client_for):
    return api_client_for(make_user(grant=["schedule:*"]))


def post(client, body: dict[str, Any]):
    return client.post(URL, json.dumps(body), content_type="application/json")


# --- one parser --------------------------------------------------------------------------------


def test_a_local_run_at_with_a_timezone_is_read_in_that_zone(client) -> None:
    local = (datetime.now(ZoneInfo(ZONE)) + timedelta(days=3)).replace(
        hour=9, minute=0, second=0, microsecond=0, tzinfo=None
    )
    response = post(client, once_body(run_at=local.isoformat(), timezone=ZONE))
    assert response.status_code == 201, response.content
    job = Job.objects.get()
    assert job.run_at == local.replace(tzinfo=ZoneInfo(ZONE)).astimezone(UTC)
    assert job.timezone == ZONE


def test_a_local_run_at_without_a_timezone_is_refused_saying_what_to_add(client) -> None:
    local = (db_now() + timedelta(days=3)).replace(tzinfo=None).isoformat()
    response = post(client, once_body(run_at=local))
    assert response.status_code == 400
    [reason] = response.json()["run_at"]
    assert "Has no UTC offset" in reason and "`timezone`" in reason


def test_a_skipped_local_time_is_refused_and_a_repeated_one_is_its_first_occurrence(
    client,
) -> None:
    gap, fold = next_transitions(ZONE)
    refused = post(client, once_body(run_at=gap.isoformat(), timezone=ZONE))
    assert refused.status_code == 400
    [reason] = refused.json()["run_at"]
    assert f"{gap.isoformat()} does not exist in {ZONE}" in reason
    accepted = post(client, once_body(run_at=fold.isoformat(), timezone=ZONE))
    assert accepted.status_code == 201, accepted.content
    first = fold.replace(tzinfo=ZoneInfo(ZONE), fold=0).astimezone(UTC)
    assert Job.objects.get().run_at == first
    assert first + timedelta(hours=1) == fold.replace(tzinfo=ZoneInfo(ZONE), fold=1).astimezone(UTC)


def test_patching_a_local_run_at_reads_it_in_the_schedules_own_zone(client) -> None:
    local = (datetime.now(ZoneInfo("Asia/Kolkata")) + timedelta(days=2)).replace(
        hour=9, minute=0, second=0, microsecond=0, tzinfo=None
    )
    created = post(client, interval_body(timezone="Asia/Kolkata")).json()
    response = client.patch(
        detail(created["id"]),
        json.dumps({"run_at": local.isoformat()}),
        content_type="application/json",
    )
    assert response.status_code == 200, response.content
    assert Job.objects.get().run_at == local.replace(tzinfo=ZoneInfo("Asia/Kolkata")).astimezone(
        UTC
    )


def test_the_tool_and_the_api_share_the_parser_and_its_messages() -> None:
    gap, fold = next_transitions(ZONE)
    with pytest.raises(ScheduleError) as skipped:
        parse_run_at(gap.isoformat(), ZONE)
    assert "does not exist" in skipped.value.message
    assert parse_run_at(fold.isoformat(), ZONE) == fold.replace(
        tzinfo=ZoneInfo(ZONE), fold=0
    ).astimezone(UTC)
    assert parse_run_at("2030-01-01T09:00:00+01:00", None) == datetime(2030, 1, 1, 8, tzinfo=UTC)
    with pytest.raises(ScheduleError, match="no UTC offset"):
        parse_run_at("2030-01-01T09:00:00", None)


# --- abbreviation zones --------------------------------------------------------------------------

ABBREVIATIONS = {
    "EST": "America/New_York",
    "MST": "America/Phoenix",
    "HST": "Pacific/Honolulu",
    "EST5EDT": "America/New_York",
    "CST6CDT": "America/Chicago",
    "MST7MDT": "America/Denver",
    "PST8PDT": "America/Los_Angeles",
    "CET": "Europe/Paris",
    "EET": "Europe/Athens",
    "MET": "Europe/Berlin",
    "WET": "Europe/Lisbon",
    "PST": "America/Los_Angeles",
    "est": "America/New_York",
    "BST": "Europe/London",
}


@pytest.mark.parametrize(("zone", "suggested"), ABBREVIATIONS.items())
def test_an_abbreviation_zone_is_refused_with_the_regions_that_use_it(
    client, zone: str, suggested: str
) -> None:
    response = post(client, interval_body(timezone=zone))
    assert response.status_code == 400
    [reason] = response.json()["timezone"]
    assert "abbreviation" in reason and suggested in reason and "Etc/GMT+5" in reason
    assert not Job.objects.exists()


@pytest.mark.parametrize("zone", ["UTC", "Etc/GMT+5", "Etc/GMT-14", "America/New_York", "GMT"])
def test_fixed_offsets_and_regions_are_accepted(zone: str) -> None:
    assert validate_timezone(zone) == zone


def test_a_zone_in_the_wrong_case_gets_a_did_you_mean(client) -> None:
    response = post(client, interval_body(timezone="europe/london"))
    assert response.json()["timezone"] == [
        "Unknown time zone 'europe/london': did you mean 'Europe/London'?"
    ]


# --- messages ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_body", "field", "message"),
    [
        (
            lambda: interval_body(cron="0 9 * * *"),
            "cron",
            "Does not apply to an interval schedule.",
        ),
        (
            lambda: once_body(interval_secs=3600),
            "interval_secs",
            "Does not apply to a once schedule.",
        ),
    ],
)
def test_messages_use_the_right_article(client, make_body, field, message) -> None:
    response = post(client, make_body())
    assert response.json()[field] == [message]


def test_a_disabled_schedule_shows_no_next_run(client) -> None:
    created = post(client, interval_body()).json()
    assert created["next_run_at"] is not None
    response = client.patch(
        detail(created["id"]), json.dumps({"enabled": False}), content_type="application/json"
    )
    assert response.json()["next_run_at"] is None and response.json()["next_runs"] == []
    assert client.get(detail(created["id"])).json()["next_run_at"] is None
    assert client.get(URL).json()["results"][0]["next_run_at"] is None


def test_a_denial_after_the_owner_grant_was_narrowed_says_so(make_user) -> None:
    owner: User = make_user(grant=["shell:date", "shell:echo"])
    context = ToolContext(
        user=owner,
        capabilities=ScheduledRunCapabilities(["shell:date"], owner),
        execution_id=None,
        job_id=None,
    )
    User.objects.filter(pk=owner.pk).update(grant=["shell:echo"])
    result = kernel.invoke("shell", {"command": "date", "args": []}, context)
    assert result.decision == "denied"
    assert "needs shell:date, which the owner's grant no longer includes" in result.content
    narrow = ToolContext(user=owner, capabilities=ScheduledRunCapabilities(["shell:ls"], owner))
    other = kernel.invoke("shell", {"command": "echo", "args": []}, narrow)
    assert "needs shell:echo, which this run was not given" in other.content
