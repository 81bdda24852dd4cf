"""The minimum interval: exact at its boundary, and held over real instants across clock changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest

from schedules.claims import skip_reason
from schedules.models import Job
from schedules.timing import (
    DuePlan,
    ScheduleError,
    ScheduleSpec,
    next_after,
    too_close_to_previous,
    validate_spec,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def cron(expr: str, minimum: int, zone: str = "UTC") -> ScheduleSpec:
    return validate_spec(
        schedule_type="cron", cron=expr, timezone=zone, now=NOW, min_interval_secs=minimum
    )


# (expression, its smallest gap between two fire times of a day, wrapping past midnight)
EXACT_GAPS = [
    ("*/5 * * * *", 300),
    ("0 * * * *", 3600),
    ("0 9,17 * * *", 8 * 3600),
    ("0 0 18 * * *", 86_400),  # the seed's heartbeat: once a day
    ("30 0,1 * * * *", 60),  # 00:00:30, 00:01:30: one minute
    ("10,50 */2 * * * *", 40),  # :10 and :50 of every other minute
    ("45 59 23,0 * * *", 3600),  # 23:59:45 and 00:59:45: the gap wraps past midnight
    ("7 0 0,23 * * *", 3600),  # 23:00:07 to 00:00:07 the next day
    ("0 0 0 * * mon", 86_400),  # a weekly cron's times of day are one a day
]


@pytest.mark.parametrize(("expr", "gap"), EXACT_GAPS)
def test_a_cron_exactly_at_the_minimum_is_accepted(expr: str, gap: int) -> None:
    assert cron(expr, gap).cron == expr


@pytest.mark.parametrize(("expr", "gap"), EXACT_GAPS)
def test_a_cron_one_second_under_the_minimum_is_refused(expr: str, gap: int) -> None:
    with pytest.raises(ScheduleError) as refused:
        cron(expr, gap + 1)
    assert refused.value.field == "cron"
    assert f"fires {gap} s apart; the minimum interval is {gap + 1} s" in refused.value.message


@pytest.mark.parametrize("minimum", [1, 60, 61, 3600, 86_400])
def test_an_interval_exactly_at_the_minimum_is_accepted_and_one_second_under_is_refused(
    minimum: int,
) -> None:
    def interval(secs: int) -> ScheduleSpec:
        return validate_spec(
            schedule_type="interval", interval_secs=secs, now=NOW, min_interval_secs=minimum
        )

    assert interval(minimum).interval_secs == minimum
    if minimum > 1:
        with pytest.raises(ScheduleError) as refused:
            interval(minimum - 1)
        assert refused.value.field == "interval_secs"
        assert f"at least {minimum} s (got {minimum - 1})" in refused.value.message


# A clock change brings two occurrences closer than the minimum the cron was accepted under.
# (zone, cron, minimum, the earlier occurrence, the later one: local ISO times)
CLOSER_AT_A_CLOCK_CHANGE = [
    # spring forward: a skipped time runs after the gap, next to the first time after it
    ("America/New_York", "1 2,3 * * *", 3600, "2027-03-14T03:00:00-04:00", "2027-03-14T03:01:00-04:00"),
    ("America/New_York", "30 1 2,3 * * *", 3600, "2027-03-14T03:00:30-04:00", "2027-03-14T03:01:30-04:00"),
    ("Europe/London", "1 1,2 * * *", 3600, "2027-03-28T02:00:00+01:00", "2027-03-28T02:01:00+01:00"),
    ("Australia/Lord_Howe", "1,31 2 * * *", 1800, "2027-10-03T02:30:00+11:00", "2027-10-03T02:31:00+11:00"),
    ("Pacific/Chatham", "0 3,4 * * *", 3600, "2027-09-26T03:45:00+13:45", "2027-09-26T04:00:00+13:45"),
    ("America/Santiago", "30 0,1 * * *", 3600, "2027-09-05T01:00:00-03:00", "2027-09-05T01:30:00-03:00"),
    # fall back: a real-time cron goes through both passes of the repeated hour
    ("America/New_York", "*/59 1 * * *", 120, "2027-11-07T01:59:00-04:00", "2027-11-07T01:00:00-05:00"),
    ("Europe/London", "*/50 1 * * *", 900, "2027-10-31T01:50:00+01:00", "2027-10-31T01:00:00+00:00"),
    ("Australia/Lord_Howe", "*/45 1 * * *", 2400, "2027-04-04T01:45:00+11:00", "2027-04-04T01:45:00+10:30"),
    ("America/Santiago", "*/50 23 * * *", 900, "2027-04-03T23:50:00-03:00", "2027-04-03T23:00:00-04:00"),
]  # fmt: skip


def runs_around(spec: ScheduleSpec, start: datetime, days: int) -> tuple[list, list]:
    """(occurrences that run, (occurrence, reason) skipped) as the claim decides them."""
    job = Job(schedule_type=spec.schedule_type, cron=spec.cron, timezone=spec.timezone)
    ran, skipped = [], []
    when = next_after(spec, start)
    while when is not None and when < start + timedelta(days=days):
        following = next_after(spec, when)
        reason = skip_reason(job, spec, DuePlan(when, 0, False, following))
        (skipped.append((when, reason)) if reason else ran.append(when))
        when = following
    return ran, skipped


@pytest.mark.parametrize(("zone", "expr", "minimum", "earlier", "later"), CLOSER_AT_A_CLOCK_CHANGE)
def test_across_a_clock_change_runs_stay_the_minimum_apart_and_the_later_one_is_skipped(
    picobot_config, zone: str, expr: str, minimum: int, earlier: str, later: str
) -> None:
    picobot_config("scheduler", min_interval_secs=minimum)
    spec = cron(expr, minimum, zone)
    first, second = datetime.fromisoformat(earlier), datetime.fromisoformat(later)
    assert next_after(spec, first) == second  # the engine's own sequence has the close pair
    ran, skipped = runs_around(spec, first - timedelta(days=2), days=4)
    assert all((b - a).total_seconds() >= minimum for a, b in pairwise(ran))
    assert [when for when, _ in skipped] == [second]
    assert first in ran
    gap = (second - first).total_seconds()
    assert f"only {gap:g} s after the occurrence at" in skipped[0][1]
    assert f"closer than the minimum interval ({minimum} s)" in skipped[0][1]


@pytest.mark.parametrize("zone", ["America/New_York", "Europe/London", "Australia/Lord_Howe"])
def test_without_a_clock_change_nothing_is_skipped_even_exactly_at_the_minimum(
    picobot_config, zone: str
) -> None:
    picobot_config("scheduler", min_interval_secs=3600)
    spec = cron("15 0 * * * *", 3600, zone)  # every hour at :00:15, exactly the minimum
    start = datetime(2027, 6, 1, tzinfo=ZoneInfo(zone))
    ran, skipped = runs_around(spec, start, days=3)
    assert skipped == []
    assert len(ran) == 72


def test_a_minimum_raised_after_acceptance_skips_only_what_a_clock_change_brings_closer(
    picobot_config,
) -> None:
    # Accepted at 60 s (fires 00:00 and 00:59), then the operator raises the minimum to an hour:
    # the cron's own 59-minute gap stays; only the fall-back pair (60 s apart) is skipped.
    spec = cron("*/59 1 * * *", 60, "America/New_York")
    picobot_config("scheduler", min_interval_secs=3600)
    ran, skipped = runs_around(spec, datetime(2027, 11, 5, tzinfo=UTC), days=4)
    local = [when.astimezone(ZoneInfo("America/New_York")).isoformat() for when, _ in skipped]
    assert local == ["2027-11-07T01:00:00-05:00"]
    assert len(ran) == 4 * 2 + 1  # two a day, plus the second pass's 01:59


def test_an_interval_or_once_schedule_is_never_skipped_for_closeness() -> None:
    every_minute = validate_spec(
        schedule_type="interval", interval_secs=60, now=NOW, min_interval_secs=60
    )
    when = datetime(2027, 3, 14, 7, 0, tzinfo=UTC)
    assert too_close_to_previous(every_minute, when, 3600) is None
