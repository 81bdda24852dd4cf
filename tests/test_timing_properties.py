"""Property tests: cron occurrences against a minute-by-minute oracle, in many zones."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo, available_timezones

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from schedules.timing import (
    ScheduleError,
    ScheduleSpec,
    next_after,
    parse_cron,
    validate_spec,
)

NOW = datetime(2025, 1, 1, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
WINDOW = timedelta(hours=50)

TRICKY_ZONES = [
    "America/New_York",
    "Europe/London",
    "Europe/Dublin",  # negative daylight saving in the tz database
    "Australia/Lord_Howe",  # a 30-minute change
    "Antarctica/Troll",  # a 2-hour change
    "Asia/Kathmandu",
    "America/St_Johns",
    "America/Santiago",
    "America/Havana",  # changes at midnight
    "Pacific/Chatham",
    "Africa/Casablanca",
    "UTC",
]
ZONES = st.one_of(
    st.sampled_from(TRICKY_ZONES),
    st.sampled_from(sorted(available_timezones() - {"localtime", "Factory", "posixrules"})),
)


def number_field(low: int, high: int) -> st.SearchStrategy[str]:
    value = st.integers(low, high)
    return st.one_of(
        st.just("*"),
        st.integers(1, high).map(lambda n: f"*/{n}"),
        value.map(str),
        st.tuples(value, value).map(lambda p: f"{min(p)},{max(p)}" if p[0] != p[1] else str(p[0])),
        st.tuples(value, value).map(lambda p: f"{min(p)}-{max(p)}"),
        st.tuples(value, value, st.integers(1, 7)).map(
            lambda p: f"{min(p[:2])}-{max(p[:2])}/{p[2]}"
        ),
    )


DOM = st.one_of(
    st.sampled_from(["*", "?", "L", "1,15", "*/2", "1-7", "13", "28-31"]),
    st.integers(1, 31).map(str),
)
MONTH = st.sampled_from(["*", "*", "*", "3", "3,4", "9-11", "10,11", "*/2", "jan-jun"])
DOW = st.sampled_from(["*", "*", "*", "?", "1-5", "0", "sun", "6,0", "1#2", "0#1", "5L", "mon-fri"])
CRONS = st.tuples(number_field(0, 59), number_field(0, 23), DOM, MONTH, DOW).map(" ".join)
# Starts close to the months where most zones change their clocks.
STARTS = st.builds(
    lambda year, month, day, minute: (
        datetime(year, month, day, tzinfo=UTC) + timedelta(minutes=minute)
    ),
    st.integers(2025, 2031),
    st.sampled_from([1, 3, 3, 4, 4, 9, 10, 10, 11, 11]),
    st.integers(1, 28),
    st.integers(0, 24 * 60 * 3),
)


def spec_or_reject(expr: str, zone: str) -> ScheduleSpec:
    try:
        return validate_spec(
            schedule_type="cron", cron=expr, timezone=zone, now=NOW, min_interval_secs=60
        )
    except ScheduleError:
        assume(False)
        raise


def matches(expr: str, local: datetime) -> bool:
    plan = parse_cron(expr)
    tod = local.hour * 3600 + local.minute * 60 + local.second
    return local.day in plan.days_in(local.year, local.month) and tod in set(plan.tods)


def oracle(spec: ScheduleSpec, start: datetime, end: datetime) -> list[datetime]:
    """Occurrences in (start, end], found by looking at every minute of real time."""
    zone = ZoneInfo(spec.timezone)
    wall_clock = parse_cron(spec.cron).wall_clock
    found = []
    instant = start.replace(second=0, microsecond=0) + MINUTE
    previous = (instant - MINUTE).astimezone(zone)
    while instant <= end:
        local = instant.astimezone(zone)
        hit = matches(spec.cron, local.replace(tzinfo=None))
        if wall_clock:
            hit = hit and local.fold == 0
            jump = local.utcoffset() - previous.utcoffset()  # type: ignore[operator]
            if jump > timedelta(0):
                # The clock jumped forward: skipped wall-clock times run now.
                skipped = previous.replace(tzinfo=None) + MINUTE
                while skipped < local.replace(tzinfo=None):
                    hit = hit or matches(spec.cron, skipped)
                    skipped += MINUTE
        if hit:
            found.append(instant)
        previous = local
        instant += MINUTE
    return found


def computed(spec: ScheduleSpec, start: datetime, end: datetime) -> list[datetime]:
    found = []
    when = next_after(spec, start)
    while when is not None and when <= end:
        found.append(when)
        when = next_after(spec, when)
    return found


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(CRONS, ZONES, STARTS)
def test_occurrences_match_a_minute_by_minute_oracle(expr: str, zone: str, start: datetime) -> None:
    spec = spec_or_reject(expr, zone)
    expected = oracle(spec, start, start + WINDOW)
    assert computed(spec, start, start + WINDOW) == expected


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(CRONS, ZONES, STARTS)
def test_occurrences_increase_exist_and_are_a_minute_apart(
    expr: str, zone: str, start: datetime
) -> None:
    spec = spec_or_reject(expr, zone)
    tz = ZoneInfo(zone)
    plan = parse_cron(spec.cron)
    found = []
    when = next_after(spec, start)
    while when is not None and len(found) < 60:
        found.append(when)
        when = next_after(spec, when)
    assert found
    assert all(a < b for a, b in pairwise(found))
    assert all(b - a >= timedelta(seconds=60) for a, b in pairwise(found))
    for instant in found:
        local = instant.astimezone(tz)
        naive = local.replace(tzinfo=None)
        # The local time exists: it maps back to the same instant.
        assert naive.replace(tzinfo=tz, fold=local.fold).astimezone(UTC) == instant
        if not plan.wall_clock:
            assert matches(spec.cron, naive)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    st.tuples(number_field(0, 59), number_field(0, 59), number_field(0, 23)).map(" ".join),
    ZONES,
    STARTS,
    st.sampled_from([60, 300, 900]),
)
def test_accepted_six_field_crons_fire_no_closer_than_the_minimum_without_a_clock_change(
    fields: str, zone: str, start: datetime, min_interval_secs: int
) -> None:
    expr = fields + " * * *"
    try:
        spec = validate_spec(
            schedule_type="cron",
            cron=expr,
            timezone=zone,
            now=NOW,
            min_interval_secs=min_interval_secs,
        )
    except ScheduleError as error:
        assert error.field == "cron"
        assert parse_cron(" ".join(expr.split())).min_gap_secs() < min_interval_secs
        return
    tz = ZoneInfo(zone)
    found = computed(spec, start, start + timedelta(hours=30))
    assert all(a < b for a, b in pairwise(found))
    for a, b in pairwise(found):
        if a.astimezone(tz).utcoffset() == b.astimezone(tz).utcoffset():
            assert (b - a).total_seconds() >= min_interval_secs
        else:
            # Around a clock change the gap can shrink, never below a minute.
            assert (b - a).total_seconds() >= 60


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(CRONS, ZONES, STARTS, st.integers(0, 50 * 3600 - 1), st.integers(0, 999_999))
def test_next_after_any_instant_is_the_oracles_next(
    expr: str, zone: str, start: datetime, offset_secs: int, micros: int
) -> None:
    spec = spec_or_reject(expr, zone)
    probe = start + timedelta(seconds=offset_secs, microseconds=micros)
    expected = oracle(spec, probe, start + WINDOW + timedelta(hours=2))
    assume(expected)
    assert next_after(spec, probe) == expected[0]


PLAIN_DAYS = st.sampled_from(["*", "1", "1,15", "1-7", "13", "28-31", "L"])
PLAIN_DOW = st.sampled_from(["*", "1-5", "0", "6,0", "1#2", "mon-fri"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    st.tuples(number_field(0, 59), number_field(0, 23), PLAIN_DAYS, MONTH, PLAIN_DOW).map(" ".join),
    STARTS,
)
def test_day_and_time_matching_agrees_with_croniter_in_utc(expr: str, start: datetime) -> None:
    # Only forms where croniter and Vixie cron agree on AND/OR of the two day fields: croniter
    # ANDs a restricted day of month with `#`, cron's rule (both restricted: OR) does not.
    from croniter import croniter

    _, _, dom, _, dow = expr.split()
    assume(not ("#" in dow and dom != "*"))
    # croniter reads a one-value range such as `0-0` as `*`.
    assume(not re.search(r"(?<![0-9])([0-9]+)-\1(?![0-9])", expr))
    spec = spec_or_reject(expr, "UTC")
    theirs = croniter(expr, start.replace(tzinfo=None))
    when = start
    for _ in range(30):
        mine = next_after(spec, when)
        expected = theirs.get_next(datetime).replace(tzinfo=UTC)
        assert mine == expected
        when = mine
