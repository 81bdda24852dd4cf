"""Daylight saving: wall-clock crons keep local time, every other cron follows real time."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from schedules.timing import ScheduleSpec, first_run, next_after, preview, validate_spec

NOW = datetime(2027, 1, 1, tzinfo=UTC)


def cron_spec(expr: str, zone: str) -> ScheduleSpec:
    return validate_spec(
        schedule_type="cron", cron=expr, timezone=zone, now=NOW, min_interval_secs=60
    )


def fires_on(expr: str, zone: str, day: date) -> list[datetime]:
    """The occurrences whose local date is `day`, as local datetimes."""
    tz = ZoneInfo(zone)
    spec = cron_spec(expr, zone)
    start = datetime(day.year, day.month, day.day, tzinfo=tz) - timedelta(days=1)
    found = []
    when = next_after(spec, start)
    while when is not None and when.astimezone(tz).date() <= day:
        if when.astimezone(tz).date() == day:
            found.append(when.astimezone(tz))
        when = next_after(spec, when)
    return found


def wall(times: list[datetime]) -> list[tuple[int, int, int]]:
    """(hour, minute, UTC offset in minutes) of each local time."""
    return [(t.hour, t.minute, int(t.utcoffset().total_seconds()) // 60) for t in times]


NY_SPRING, NY_FALL = date(2027, 3, 14), date(2027, 11, 7)
LONDON_SPRING, LONDON_FALL = date(2027, 3, 28), date(2027, 10, 31)


def test_a_skipped_time_runs_once_at_the_end_of_the_gap_in_new_york() -> None:
    assert wall(fires_on("30 2 * * *", "America/New_York", NY_SPRING)) == [(3, 0, -240)]


def test_a_time_after_the_repeated_hour_runs_once_in_new_york() -> None:
    assert wall(fires_on("30 2 * * *", "America/New_York", NY_FALL)) == [(2, 30, -300)]


def test_a_repeated_time_runs_once_at_its_first_occurrence_in_new_york() -> None:
    assert wall(fires_on("30 1 * * *", "America/New_York", NY_FALL)) == [(1, 30, -240)]
    assert wall(fires_on("30 1 * * *", "America/New_York", NY_SPRING)) == [(1, 30, -300)]


def test_london_skips_one_to_two_in_spring_and_repeats_it_in_autumn() -> None:
    zone = "Europe/London"
    # 02:30 exists on both change days in London: it runs once, at 02:30.
    assert wall(fires_on("30 2 * * *", zone, LONDON_SPRING)) == [(2, 30, 60)]
    assert wall(fires_on("30 2 * * *", zone, LONDON_FALL)) == [(2, 30, 0)]
    # 01:30 is the time that does not exist (spring) and occurs twice (autumn).
    assert wall(fires_on("30 1 * * *", zone, LONDON_SPRING)) == [(2, 0, 60)]
    assert wall(fires_on("30 1 * * *", zone, LONDON_FALL)) == [(1, 30, 60)]


def test_times_around_the_gap_run_on_the_day_before_and_after() -> None:
    zone = "America/New_York"
    assert wall(fires_on("30 2 * * *", zone, NY_SPRING - timedelta(days=1))) == [(2, 30, -300)]
    assert wall(fires_on("30 2 * * *", zone, NY_SPRING + timedelta(days=1))) == [(2, 30, -240)]


def test_two_skipped_times_that_land_on_one_instant_are_one_occurrence() -> None:
    # 02:00, 02:30 (both in the gap) and 03:00 all run at 03:00 EDT: one occurrence.
    times = fires_on("0,30 2,3 * * *", "America/New_York", NY_SPRING)
    assert wall(times) == [(3, 0, -240), (3, 30, -240)]


@pytest.mark.parametrize(
    ("zone", "day", "count"),
    [
        ("America/New_York", NY_SPRING, 92),
        ("America/New_York", NY_FALL, 100),
        ("Europe/London", LONDON_SPRING, 92),
        ("Europe/London", LONDON_FALL, 100),
    ],
)
def test_every_fifteen_minutes_keeps_fifteen_real_minutes(zone: str, day: date, count: int) -> None:
    times = fires_on("*/15 * * * *", zone, day)
    assert len(times) == count
    instants = [t.astimezone(UTC) for t in times]
    assert all(b - a == timedelta(minutes=15) for a, b in itertools.pairwise(instants))


def test_an_hourly_cron_runs_through_both_passes_of_the_repeated_hour() -> None:
    times = fires_on("0 * * * *", "America/New_York", NY_FALL)
    assert len(times) == 25
    assert wall(times)[:4] == [(0, 0, -240), (1, 0, -240), (1, 0, -300), (2, 0, -300)]


def test_a_real_time_cron_does_not_run_inside_the_gap() -> None:
    times = fires_on("*/30 0-3 * * *", "America/New_York", NY_SPRING)
    assert wall(times) == [
        (0, 0, -300),
        (0, 30, -300),
        (1, 0, -300),
        (1, 30, -300),
        (3, 0, -240),
        (3, 30, -240),
    ]


def test_the_seeds_cron_fires_at_six_pm_in_new_york_every_day_of_the_year() -> None:
    tz = ZoneInfo("America/New_York")
    spec = cron_spec("0 0 18 * * *", "America/New_York")
    when = next_after(spec, datetime(2027, 1, 1, tzinfo=tz))
    days = []
    while when is not None and when.astimezone(tz).year == 2027:
        local = when.astimezone(tz)
        assert (local.hour, local.minute, local.second) == (18, 0, 0)
        days.append(local.date())
        when = next_after(spec, when)
    assert len(days) == 365 == len(set(days))


def test_lord_howe_moves_its_clocks_by_thirty_minutes() -> None:
    zone = "Australia/Lord_Howe"
    spring, autumn = date(2027, 10, 3), date(2027, 4, 4)
    # 02:00-02:30 does not exist on the spring day: 02:15 runs at 02:30 (+11:00).
    assert wall(fires_on("15 2 * * *", zone, spring)) == [(2, 30, 660)]
    # 01:30-02:00 happens twice in autumn: 01:45 runs at its first occurrence.
    assert wall(fires_on("45 1 * * *", zone, autumn)) == [(1, 45, 660)]
    quarter_hours = fires_on("*/15 * * * *", zone, autumn)
    assert len(quarter_hours) == 96 + 2
    instants = [t.astimezone(UTC) for t in quarter_hours]
    assert all(b - a == timedelta(minutes=15) for a, b in itertools.pairwise(instants))
    assert len(fires_on("*/15 * * * *", zone, spring)) == 96 - 2


def test_a_zone_with_a_quarter_hour_offset_keeps_local_time() -> None:
    spec = cron_spec("0 9 * * *", "Asia/Kathmandu")
    when = next_after(spec, datetime(2027, 6, 1, tzinfo=UTC))
    assert when == datetime(2027, 6, 1, 3, 15, tzinfo=UTC)
    hourly = cron_spec("0 * * * *", "Asia/Kathmandu")
    assert next_after(hourly, datetime(2027, 6, 1, 0, 20, tzinfo=UTC)) == datetime(
        2027, 6, 1, 1, 15, tzinfo=UTC
    )


def test_the_first_run_is_the_first_match_strictly_after_creation() -> None:
    spec = cron_spec("0 12 * * *", "UTC")
    assert first_run(spec, datetime(2027, 5, 1, 12, 0, tzinfo=UTC)) == datetime(
        2027, 5, 2, 12, 0, tzinfo=UTC
    )
    assert first_run(spec, datetime(2027, 5, 1, 11, 59, 59, tzinfo=UTC)) == datetime(
        2027, 5, 1, 12, 0, tzinfo=UTC
    )


def test_next_after_works_from_any_instant_inside_a_repeated_hour() -> None:
    spec = cron_spec("*/20 * * * *", "America/New_York")
    # 01:50 EST, in the second pass: the next one is 02:00 EST, not the first pass's 01:xx.
    assert next_after(spec, datetime(2027, 11, 7, 6, 50, tzinfo=UTC)) == datetime(
        2027, 11, 7, 7, 0, tzinfo=UTC
    )
    wall_clock = cron_spec("0,20,40 1,2 * * *", "America/New_York")
    # Wall-clock: after 01:10 EST (second pass) the repeated times are done; 02:00 EST is next.
    assert next_after(wall_clock, datetime(2027, 11, 7, 6, 10, tzinfo=UTC)) == datetime(
        2027, 11, 7, 7, 0, tzinfo=UTC
    )


def test_a_six_field_cron_keeps_its_second_when_it_falls_in_a_gap() -> None:
    times = fires_on("30 30 2 * * *", "America/New_York", NY_SPRING)
    assert [(t.hour, t.minute, t.second) for t in times] == [(3, 0, 30)]


def test_the_preview_shows_local_time_and_utc() -> None:
    spec = cron_spec("30 2 * * *", "America/New_York")
    rows = preview(spec, 3, datetime(2027, 3, 13, 12, tzinfo=UTC))
    assert [(local.isoformat(), utc.isoformat()) for local, utc in rows] == [
        ("2027-03-14T03:00:00-04:00", "2027-03-14T07:00:00+00:00"),
        ("2027-03-15T02:30:00-04:00", "2027-03-15T06:30:00+00:00"),
        ("2027-03-16T02:30:00-04:00", "2027-03-16T06:30:00+00:00"),
    ]
