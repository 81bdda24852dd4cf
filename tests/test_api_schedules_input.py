"""No input to the schedules API produces a 500: every bad body is a 400 naming its field."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from schedules.dbtime import db_now
from schedules.models import Job
from tests.api_schedules_support import URL, detail, interval_body

pytestmark = pytest.mark.django_db


@pytest.fixture
def client(make_user, api_client_for):
    return api_client_for(make_user(grant=["schedule:*", "net:*.example.com"]))


def post_raw(client, body: str | bytes, path: str = URL, method: str = "post"):
    return getattr(client, method)(path, data=body, content_type="application/json")


def body_with(**fields) -> str:
    return json.dumps(interval_body(**fields))


def assert_400(response, field: str | None = None) -> dict:
    assert response.status_code == 400, response.content[:500]
    body = response.json()
    assert isinstance(body, dict) and body
    for key, reasons in body.items():
        assert isinstance(key, str)
        assert isinstance(reasons, list) and all(isinstance(r, str) for r in reasons)
    if field is not None:
        assert field in body, body
    return body


RAW_BODIES = {
    "malformed json": ('{"prompt": "hi",', "non_field_errors"),
    "empty body": ("", "prompt"),
    "array": ("[1, 2]", "non_field_errors"),
    "string": ('"hello"', "non_field_errors"),
    "null": ("null", "non_field_errors"),
    "number": ("42", "non_field_errors"),
    "deep nesting": ("[" * 100_000 + "]" * 100_000, "non_field_errors"),
    "NaN": ('{"prompt": "x", "schedule_type": "interval", "interval_secs": NaN}', None),
    "huge integer": (
        '{"prompt": "x", "schedule_type": "interval", "interval_secs": ' + "9" * 5000 + "}",
        None,
    ),
    "NUL escape in prompt": (
        '{"prompt": "a\\u0000b", "schedule_type": "interval", "interval_secs": 3600}',
        "prompt",
    ),
    "lone surrogate in prompt": (
        '{"prompt": "a\\ud800b", "schedule_type": "interval", "interval_secs": 3600}',
        "prompt",
    ),
    "lone surrogate in name": (
        '{"name": "\\udfff", "prompt": "p", "schedule_type": "interval", "interval_secs": 3600}',
        "name",
    ),
    "lone surrogate as a key": (
        '{"\\ud800": 1, "prompt": "p", "schedule_type": "interval", "interval_secs": 3600}',
        "\\ud800",
    ),
    "NUL as a key": ('{"\\u0000": 1, "prompt": "p", "schedule_type": "once"}', "\\x00"),
    "NUL in a capability": (body_with(capabilities=["net:a\u0000.example.com"]), "capabilities"),
    "surrogate in a capability": (
        '{"prompt": "p", "schedule_type": "interval", "interval_secs": 3600, '
        '"capabilities": ["net:\\ud800.example.com"]}',
        "capabilities",
    ),
    "NUL in timezone": (body_with(timezone="UTC\u0000"), "timezone"),
    "NUL in cron": (
        json.dumps({"prompt": "p", "schedule_type": "cron", "cron": "0 9 * * *\u0000"}),
        "cron",
    ),
}


@pytest.mark.parametrize("case", list(RAW_BODIES), ids=list(RAW_BODIES))
def test_raw_bodies_are_refused_with_400(client, case) -> None:
    raw, field = RAW_BODIES[case]
    assert_400(post_raw(client, raw), field)
    assert not Job.objects.exists()


def test_bytes_that_are_not_utf8_are_a_400(client) -> None:
    assert_400(post_raw(client, b'{"prompt": "\xff\xfe"}'), "non_field_errors")


def test_a_body_that_is_not_json_is_a_415(client) -> None:
    response = client.post(URL, data="prompt=hi", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415
    assert "detail" in response.json()


FIELD_CASES = {
    "prompt missing": ({"prompt": None}, "prompt"),
    "prompt empty": ({"prompt": ""}, "prompt"),
    "prompt blank": ({"prompt": "   \n"}, "prompt"),
    "prompt too long": ({"prompt": "x" * 20_001}, "prompt"),
    "prompt a number": ({"prompt": 5}, "prompt"),
    "prompt a list": ({"prompt": ["a"]}, "prompt"),
    "name blank": ({"name": " "}, "name"),
    "name too long": ({"name": "n" * 201}, "name"),
    "schedule_type unknown": ({"schedule_type": "hourly"}, "schedule_type"),
    "schedule_type a number": ({"schedule_type": 1}, "schedule_type"),
    "interval a string": ({"interval_secs": "3600"}, "interval_secs"),
    "interval a float": ({"interval_secs": 3600.0}, "interval_secs"),
    "interval a boolean": ({"interval_secs": True}, "interval_secs"),
    "interval too short": ({"interval_secs": 1}, "interval_secs"),
    "interval zero": ({"interval_secs": 0}, "interval_secs"),
    "interval negative": ({"interval_secs": -60}, "interval_secs"),
    "interval huge": ({"interval_secs": 10**30}, "interval_secs"),
    "interval over a year": ({"interval_secs": 2_000_000_000}, "interval_secs"),
    "cron with an interval": ({"cron": "0 9 * * *"}, "cron"),
    "timezone empty": ({"timezone": ""}, "timezone"),
    "timezone path-like": ({"timezone": "../../../etc/passwd"}, "timezone"),
    "timezone absolute path": ({"timezone": "/etc/localtime"}, "timezone"),
    "timezone localtime": ({"timezone": "localtime"}, "timezone"),
    "timezone unknown": ({"timezone": "Mars/Olympus"}, "timezone"),
    "timezone too long": ({"timezone": "A" * 500}, "timezone"),
    "timezone a number": ({"timezone": 0}, "timezone"),
    "run_at naive": ({"run_at": "2030-01-01T09:00:00"}, "run_at"),
    "run_at garbage": ({"run_at": "tomorrow"}, "run_at"),
    "run_at a number": ({"run_at": 1700000000}, "run_at"),
    "run_at in the past": ({"run_at": "2001-01-01T00:00:00Z"}, "run_at"),
    "run_at overflowing": ({"run_at": "9999-12-31T23:59:59-14:00"}, "run_at"),
    "run_at underflowing": ({"run_at": "0001-01-01T00:00:00+14:00"}, "run_at"),
    "run_at too far ahead": ({"run_at": "2999-01-01T00:00:00Z"}, "run_at"),
    "capabilities not a list": ({"capabilities": "net:*"}, "capabilities"),
    "capabilities too many": (
        {"capabilities": [f"net:h{i}.example.com" for i in range(101)]},
        "capabilities",
    ),
    "capability empty": ({"capabilities": [""]}, "capabilities"),
    "capability huge": ({"capabilities": ["net:" + "a" * 5000]}, "capabilities"),
    "enabled a string": ({"enabled": "true"}, "enabled"),
    "enabled a number": ({"enabled": 1}, "enabled"),
    "max_executions zero": ({"max_executions": 0}, "max_executions"),
    "max_executions a boolean": ({"max_executions": False}, "max_executions"),
    "max_executions huge": ({"max_executions": 2**63}, "max_executions"),
    "timeout over the maximum": ({"timeout_secs": 3601}, "timeout_secs"),
    "timeout zero": ({"timeout_secs": 0}, "timeout_secs"),
    "misfire unknown": ({"misfire": "catch_up"}, "misfire"),
    "notify_on unknown": ({"notify_on": ["always"]}, "notify_on"),
    "notify_on not a list": ({"notify_on": "success"}, "notify_on"),
    "notify_channels unknown": ({"notify_channels": ["sms"]}, "notify_channels"),
    "unknown field": ({"owner": 1}, "owner"),
    "read-only field": ({"next_run_at": "2030-01-01T00:00:00Z"}, "next_run_at"),
    "another read-only field": ({"execution_count": 0}, "execution_count"),
}


@pytest.mark.parametrize("case", list(FIELD_CASES), ids=list(FIELD_CASES))
def test_bad_fields_are_refused_with_400_naming_the_field(client, case) -> None:
    changes, field = FIELD_CASES[case]
    body = interval_body()
    for key, value in changes.items():
        if value is None:
            body.pop(key)
        else:
            body[key] = value
    assert_400(client.post(URL, body, format="json"), field)
    assert not Job.objects.exists()


CRON_CASES = {
    "never fires": "0 0 30 2 *",
    "too frequent": "0,30 * * * * *",
    "too frequent with seconds": "*/10 * * * * *",
    "out of range": "61 * * * *",
    "seven fields": "0 0 9 * * * 2030",
    "garbage": "every day",
    "empty": "",
    "non-ascii": "0 9 * * mön",
}


@pytest.mark.parametrize("cron", list(CRON_CASES.values()), ids=list(CRON_CASES))
def test_impossible_crons_are_a_400_on_cron(client, cron) -> None:
    body = {"prompt": "p", "schedule_type": "cron", "cron": cron}
    assert_400(client.post(URL, body, format="json"), "cron")


def test_a_six_field_cron_with_seconds_is_accepted(client) -> None:
    body = {"prompt": "p", "schedule_type": "cron", "cron": "0 0 18 * * *"}
    response = client.post(URL, body, format="json")
    assert response.status_code == 201, response.json()
    assert response.json()["next_runs"][0]["utc"].endswith("T18:00:00Z")


def test_a_once_schedule_needs_run_at(client) -> None:
    assert_400(client.post(URL, {"prompt": "p", "schedule_type": "once"}, format="json"), "run_at")


def test_a_prompt_just_over_the_limit_is_a_400(client) -> None:
    assert_400(post_raw(client, body_with(prompt="x" * 25_000)), "prompt")


def test_a_body_over_the_upload_limit_is_a_413_not_a_500(client) -> None:
    response = post_raw(client, body_with(prompt="x" * 3_000_000))
    assert response.status_code == 413
    assert "too" in response.json()["detail"] or "larger" in response.json()["detail"]


def test_a_prompt_of_exactly_20000_characters_is_accepted(client) -> None:
    response = client.post(URL, interval_body(prompt="é" * 20_000), format="json")
    assert response.status_code == 201


def test_patch_bodies_are_checked_the_same_way(client) -> None:
    job_id = client.post(URL, interval_body(), format="json").json()["id"]
    for raw, field in [
        ("[]", "non_field_errors"),
        ("{", "non_field_errors"),
        ('{"prompt": "\\u0000"}', "prompt"),
        ('{"prompt": "\\ud800"}', "prompt"),
        ('{"interval_secs": true}', "interval_secs"),
        ('{"timezone": "../etc"}', "timezone"),
        ('{"id": 5}', "id"),
        ('{"cron": "0 9 * * *"}', "cron"),
        ('{"enabled": null}', "enabled"),
        ('{"schedule_type": "once"}', "run_at"),
    ]:
        assert_400(post_raw(client, raw, detail(job_id), "patch"), field)
    assert client.get(detail(job_id)).json()["prompt"] == "Check the build."


def test_a_valid_run_at_with_an_offset_is_stored_in_utc(client) -> None:
    when = (db_now() + timedelta(days=2)).replace(microsecond=0)
    local = when.astimezone(__import__("zoneinfo").ZoneInfo("Asia/Kolkata"))
    body = {"prompt": "p", "schedule_type": "once", "run_at": local.isoformat()}
    response = client.post(URL, body, format="json")
    assert response.status_code == 201
    assert response.json()["run_at"] == when.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize("path", ["abc", "99999999999999999999999", "-1", "0", "1.5"])
def test_odd_ids_are_404s(client, path) -> None:
    assert client.get(f"{URL}/{path}").status_code == 404
    assert client.patch(f"{URL}/{path}", {"prompt": "x"}, format="json").status_code == 404
