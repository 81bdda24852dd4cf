"""Validation of schedules: every bad input is a ScheduleError naming its field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schedules.timing import (
    ScheduleError,
    ScheduleSpec,
    describe_cron,
    first_run,
    spec_of,
    validate_spec,
)

NOW = datetime(2027, 1, 1, 12, 0, tzinfo=UTC)


def validate(**values: Any) -> ScheduleSpec:
    values.setdefault("min_interval_secs", 60)
    return validate_spec(now=NOW, **values)


def refused(**values: Any) -> ScheduleError:
    with pytest.raises(ScheduleError) as caught:
        validate(**values)
    assert caught.value.message
    return caught.value


@pytest.mark.parametrize(
    "expr",
    ["*/30 * * * * *", "0,30 5 * * * *"],
)
def test_crons_firing_less_than_a_minute_apart_are_refused_at_sixty_seconds(expr: str) -> None:
    error = refused(schedule_type="cron", cron=expr)
    assert error.field == "cron"
    assert "30 s apart" in error.message


def test_every_minute_is_accepted_at_sixty_seconds() -> None:
    assert validate(schedule_type="cron", cron="* * * * *").cron == "* * * * *"


def test_every_five_minutes_depends_on_the_minimum() -> None:
    assert refused(schedule_type="cron", cron="*/5 * * * *", min_interval_secs=600).field == "cron"
    assert validate(schedule_type="cron", cron="*/5 * * * *", min_interval_secs=300)


def test_the_minimum_interval_wraps_past_midnight() -> None:
    # 23:10 and 00:10 are 23 hours apart within the day but one hour apart across midnight.
    error = refused(schedule_type="cron", cron="10 0,23 * * *", min_interval_secs=2 * 3600)
    assert "3600 s apart" in error.message
    assert validate(schedule_type="cron", cron="10 0,23 * * *", min_interval_secs=3600)
    assert validate(schedule_type="cron", cron="0 9 * * *", min_interval_secs=86_400)


def test_a_cron_that_never_fires_is_refused() -> None:
    error = refused(schedule_type="cron", cron="0 0 30 2 *")
    assert error.field == "cron"
    assert "never fires" in error.message


def test_leap_days_and_nth_weekdays_are_accepted() -> None:
    assert validate(schedule_type="cron", cron="0 0 29 2 *")
    assert validate(schedule_type="cron", cron="0 0 * 2 1#5")
    assert validate(schedule_type="cron", cron="0 0 L * *")
    assert validate(schedule_type="cron", cron="0 0 * * 5L")


def test_whitespace_is_normalised() -> None:
    assert validate(schedule_type="cron", cron="  0\t0  18 *  * *\n").cron == "0 0 18 * * *"


def test_seven_fields_are_refused_with_a_clear_message() -> None:
    error = refused(schedule_type="cron", cron="0 0 12 * * * 2027")
    assert error.field == "cron"
    assert "7 fields" in error.message


@pytest.mark.parametrize(
    "expr",
    [
        "",
        "   ",
        "* * * *",
        "60 * * * *",
        "* 24 * * *",
        "* * 0 * *",
        "* * * 13 *",
        "* * * * 8",
        "5-1 * * * *",
        "*/0 * * * *",
        "R * * * *",
        "H * * * *",
        "0 0 15W * *",
        "0 0 * * 1#6",
        "@reboot",
        "@every 5m",
        "1,,2 * * * *",
        "0 0 * * mon-",
        "0 0 * jan-dex *",
        "99999999999999999999 * * * *",
        "0 0 * * 1\x00",
        "0 0 * * \ud800",
        "0 0 * * 1" + " " * 300 + "x",
        "x" * 10_000,
    ],
)
def test_bad_crons_are_refused_on_the_cron_field(expr: str) -> None:
    assert refused(schedule_type="cron", cron=expr).field == "cron"


@pytest.mark.parametrize(
    "zone",
    [
        "",
        "Mars/Olympus",
        "../../etc/passwd",
        "/etc/localtime",
        "localtime",
        "Factory",
        "UTC\x00",
        "\ud800",
        "Europe/\udcff",
        "A" * 100_000,
        "utc",
        "Europe/London/",
    ],
)
def test_bad_time_zones_are_refused_on_the_timezone_field(zone: str) -> None:
    error = refused(schedule_type="cron", cron="0 9 * * *", timezone=zone)
    assert error.field == "timezone"


@pytest.mark.parametrize("zone", [None, 5, b"UTC", ["UTC"]])
def test_a_time_zone_that_is_not_a_string_is_refused(zone: Any) -> None:
    assert refused(schedule_type="cron", cron="0 9 * * *", timezone=zone).field == "timezone"


@pytest.mark.parametrize("schedule_type", ["", "daily", None, 3, "ONCE"])
def test_an_unknown_schedule_type_is_refused(schedule_type: Any) -> None:
    assert refused(schedule_type=schedule_type).field == "schedule_type"


def test_a_once_schedule_needs_an_aware_future_run_at_within_a_year() -> None:
    assert refused(schedule_type="once").field == "run_at"
    naive = refused(schedule_type="once", run_at=datetime(2027, 6, 1))
    assert naive.field == "run_at" and "offset" in naive.message
    assert refused(schedule_type="once", run_at="2027-06-01T09:00:00").field == "run_at"
    assert refused(schedule_type="once", run_at="tomorrow").field == "run_at"
    assert refused(schedule_type="once", run_at=12345).field == "run_at"
    past = refused(schedule_type="once", run_at=NOW - timedelta(seconds=1))
    assert "future" in past.message
    assert refused(schedule_type="once", run_at=NOW).field == "run_at"
    far = refused(schedule_type="once", run_at=NOW + timedelta(days=366))
    assert far.field == "run_at" and "365 days" in far.message


def test_a_once_schedule_is_normalised_to_utc() -> None:
    spec = validate(schedule_type="once", run_at="2027-06-01T09:00:00+02:00")
    assert spec.run_at == datetime(2027, 6, 1, 7, 0, tzinfo=UTC)
    assert spec.run_at.tzinfo is UTC
    assert first_run(spec, NOW) == spec.run_at
    later = validate(
        schedule_type="once",
        run_at=datetime(2027, 6, 1, 9, tzinfo=timezone(timedelta(hours=-5))),
        max_ahead=timedelta(days=200),
    )
    assert later.run_at == datetime(2027, 6, 1, 14, tzinfo=UTC)


def test_interval_bounds() -> None:
    assert refused(schedule_type="interval").field == "interval_secs"
    assert refused(schedule_type="interval", interval_secs=59).field == "interval_secs"
    assert refused(schedule_type="interval", interval_secs="60").field == "interval_secs"
    assert refused(schedule_type="interval", interval_secs=True).field == "interval_secs"
    assert refused(schedule_type="interval", interval_secs=60.0).field == "interval_secs"
    assert refused(schedule_type="interval", interval_secs=10**30).field == "interval_secs"
    assert validate(schedule_type="interval", interval_secs=60).interval_secs == 60


def test_an_interval_may_start_at_a_given_future_time() -> None:
    start = NOW + timedelta(hours=2)
    spec = validate(schedule_type="interval", interval_secs=3600, run_at=start)
    assert first_run(spec, NOW) == start
    assert first_run(
        validate(schedule_type="interval", interval_secs=3600), NOW
    ) == NOW + timedelta(hours=1)
    assert (
        refused(schedule_type="interval", interval_secs=3600, run_at=NOW - timedelta(hours=1)).field
        == "run_at"
    )


@pytest.mark.parametrize(
    ("values", "field"),
    [
        (
            {"schedule_type": "once", "run_at": NOW + timedelta(hours=1), "cron": "* * * * *"},
            "cron",
        ),
        (
            {"schedule_type": "once", "run_at": NOW + timedelta(hours=1), "interval_secs": 60},
            "interval_secs",
        ),
        ({"schedule_type": "interval", "interval_secs": 60, "cron": "* * * * *"}, "cron"),
        ({"schedule_type": "cron", "cron": "* * * * *", "interval_secs": 60}, "interval_secs"),
        (
            {"schedule_type": "cron", "cron": "* * * * *", "run_at": NOW + timedelta(hours=1)},
            "run_at",
        ),
        ({"schedule_type": "cron"}, "cron"),
        ({"schedule_type": "cron", "cron": None}, "cron"),
        ({"schedule_type": "cron", "cron": 5}, "cron"),
    ],
)
def test_fields_that_do_not_belong_to_the_type_are_refused(
    values: dict[str, Any], field: str
) -> None:
    assert refused(**values).field == field


def test_an_empty_cron_with_another_type_is_not_an_error() -> None:
    assert validate(schedule_type="interval", interval_secs=60, cron="").cron == ""


def test_names_macros_and_question_marks_are_understood() -> None:
    assert (
        validate(schedule_type="cron", cron="0 9 * jan-mar mon-fri").cron == "0 9 * jan-mar mon-fri"
    )
    assert validate(schedule_type="cron", cron="@daily").cron == "@daily"
    assert validate(schedule_type="cron", cron="0 9 ? * MON")


def test_spec_of_reads_a_jobs_fields() -> None:
    class Job:
        schedule_type = "cron"
        run_at = None
        interval_secs = None
        cron = "0 9 * * *"
        timezone = "Europe/London"

    assert spec_of(Job()) == ScheduleSpec("cron", None, None, "0 9 * * *", "Europe/London")


def test_describe_cron_reads_like_english() -> None:
    assert describe_cron("0 0 18 * * *") == "At 18:00"
    assert "15 minutes" in describe_cron("*/15 * * * *")
    assert describe_cron("not a cron") == "not a cron"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_text_as_a_cron_is_accepted_or_refused_on_the_cron_field(text: str) -> None:
    try:
        spec = validate(schedule_type="cron", cron=text)
    except ScheduleError as error:
        assert error.field == "cron"
    else:
        assert spec.cron == " ".join(text.split())


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(["*", "*/7", "1-5", "0", "L", "mon", "jan", "#", "/", ",", "-", "?", "9"]),
        min_size=1,
        max_size=9,
    ).map(" ".join)
)
def test_cron_like_text_is_accepted_or_refused_on_the_cron_field(text: str) -> None:
    try:
        validate(schedule_type="cron", cron=text, min_interval_secs=1)
    except ScheduleError as error:
        assert error.field == "cron"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_as_a_time_zone_is_accepted_or_refused_on_the_timezone_field(text: str) -> None:
    try:
        spec = validate(schedule_type="cron", cron="0 9 * * *", timezone=text)
    except ScheduleError as error:
        assert error.field == "timezone"
    else:
        assert spec.timezone == text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_text_as_run_at_is_accepted_or_refused_on_the_run_at_field(text: str) -> None:
    try:
        validate(schedule_type="once", run_at=text)
    except ScheduleError as error:
        assert error.field == "run_at"
