"""Property tests: cron occurrences against a minute-by-minute oracle, in many zones."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from functools import cache
from itertools import pairwise
from zoneinfo import ZoneInfo, available_timezones

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from schedules.timing import (
    ScheduleError,
    ScheduleSpec,
    next_after,
    parse_cron,
    too_close_to_previous,
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
# Five fields, or six with a seconds field first (one second: more would be under a minute apart).
SECONDS = st.one_of(st.just(""), st.just("0 "), st.integers(1, 59).map(lambda s: f"{s} "))
CRONS = st.builds(
    lambda second, rest: second + " ".join(rest),
    SECONDS,
    st.tuples(number_field(0, 59), number_field(0, 23), DOM, MONTH, DOW),
)
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
    """Occurrences in (start, end], found by walking real time a minute at a time and, in each
    minute, every second the cron names (zones change their clocks on whole minutes)."""
    zone = ZoneInfo(spec.timezone)
    plan = parse_cron(spec.cron)
    tods = set(plan.tods)
    seconds = sorted({tod % 60 for tod in tods})

    def matching_seconds(local: datetime) -> set[int]:
        if local.day not in plan.days_in(local.year, local.month):
            return set()
        base = local.hour * 3600 + local.minute * 60
        return {s for s in seconds if base + s in tods}

    found = []
    instant = start.replace(second=0, microsecond=0)
    previous = (instant - MINUTE).astimezone(zone)
    while instant <= end:
        local = instant.astimezone(zone)
        naive = local.replace(tzinfo=None)
        hits = matching_seconds(naive)
        if plan.wall_clock:
            hits = hits if local.fold == 0 else set()
            jump = local.utcoffset() - previous.utcoffset()  # type: ignore[operator]
            if jump > timedelta(0):
                # The clock jumped forward: skipped wall-clock times run in this minute,
                # each keeping its second.
                skipped = previous.replace(tzinfo=None) + MINUTE
                while skipped < naive:
                    hits |= matching_seconds(skipped)
                    skipped += MINUTE
        found += [
            when
            for when in (instant + timedelta(seconds=s) for s in sorted(hits))
            if start < when <= end
        ]
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


DST_ZONES = [
    "America/New_York",
    "Europe/London",
    "Europe/Dublin",
    "Australia/Lord_Howe",
    "Antarctica/Troll",
    "America/St_Johns",
    "America/Santiago",
    "America/Havana",
    "Pacific/Chatham",
]


@cache
def transitions(zone_name: str, year: int) -> list[datetime]:
    """The instants in `year` at which `zone_name` changes its UTC offset, to the second."""
    zone = ZoneInfo(zone_name)
    found = []
    hour = datetime(year, 1, 1, tzinfo=UTC)
    while hour.year == year:
        following = hour + timedelta(hours=1)
        if hour.astimezone(zone).utcoffset() != following.astimezone(zone).utcoffset():
            low, high = hour, following
            while high - low > timedelta(seconds=1):
                middle = low + (high - low) / 2
                if middle.astimezone(zone).utcoffset() == low.astimezone(zone).utcoffset():
                    low = middle
                else:
                    high = middle
            found.append(high.replace(microsecond=0))
        hour = following
    return found


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    CRONS,
    st.sampled_from(DST_ZONES),
    st.integers(2025, 2030),
    st.integers(0, 3),
    st.integers(-4 * 3600, 4 * 3600),
    st.integers(0, 999_999),
)
def test_next_after_an_instant_near_a_clock_change_is_the_oracles_next(
    expr: str, zone: str, year: int, which: int, offset_secs: int, micros: int
) -> None:
    # Probes are drawn around the changes themselves, most within a few minutes of one: a
    # skipped wall time with a seconds field runs after the gap, so "a few seconds after the gap
    # ends" is where a lookup could miss it.
    spec = spec_or_reject(expr, zone)
    changes = transitions(zone, year)
    assume(changes)
    near = offset_secs if abs(offset_secs) > 3600 else offset_secs // 30
    probe = changes[which % len(changes)] + timedelta(seconds=near, microseconds=micros)
    expected = oracle(spec, probe, probe + timedelta(hours=26))
    assume(expected)
    assert next_after(spec, probe) == expected[0]


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(DST_ZONES),
    st.integers(2025, 2030),
    st.integers(0, 3),
    st.integers(0, 59),
    st.integers(0, 10_000),
    st.integers(0, 120),
    st.integers(0, 999_999),
    st.sampled_from(["", ",{m2}", ",{m2} {h}"]),
)
def test_a_skipped_wall_time_with_seconds_is_found_from_inside_its_late_minute(
    zone: str,
    year: int,
    which: int,
    second: int,
    pick: int,
    probe_secs: int,
    micros: int,
    extra: str,
) -> None:
    # A 6-field wall-clock cron whose time falls in a spring-forward gap runs at the first valid
    # minute after the gap, keeping its second: asked from a few seconds after the gap ends (or
    # anywhere before that run), the next occurrence is that run.
    tz = ZoneInfo(zone)
    forward = [
        t
        for t in transitions(zone, year)
        if t.astimezone(tz).utcoffset() > (t - timedelta(seconds=1)).astimezone(tz).utcoffset()
    ]
    assume(forward)
    change = forward[which % len(forward)]
    before = (change - timedelta(seconds=1)).astimezone(tz)
    gap_minutes = int(
        (change.astimezone(tz).utcoffset() - before.utcoffset()).total_seconds() // 60  # type: ignore[operator]
    )
    gap_start = before.replace(tzinfo=None) + timedelta(seconds=1)
    skipped = gap_start + timedelta(minutes=pick % gap_minutes)
    minute, hour = skipped.minute, skipped.hour
    other_minute = (minute + 30) % 60
    expr = f"{second} {minute}{extra.format(m2=other_minute, h='')} {hour} * * *"
    spec = spec_or_reject(expr, zone)
    probe = change + timedelta(seconds=probe_secs, microseconds=micros)
    expected = oracle(spec, probe, probe + timedelta(hours=26))
    assert expected
    assert next_after(spec, probe) == expected[0]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    st.tuples(number_field(0, 59), number_field(0, 59), number_field(0, 23)).map(" ".join),
    st.sampled_from(DST_ZONES),
    st.integers(2025, 2030),
    st.integers(0, 3),
    st.sampled_from([60, 300, 900, 1800, 3600]),
)
def test_runs_of_accepted_crons_are_the_minimum_apart_in_real_time_across_clock_changes(
    fields: str, zone: str, year: int, which: int, min_interval_secs: int
) -> None:
    # The guarantee over real instants: the claim records an occurrence closer than the
    # minimum to the one before it as skipped, so what runs is never closer.
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
    changes = transitions(zone, year)
    assume(changes)
    change = changes[which % len(changes)]
    found = computed(spec, change - timedelta(hours=6), change + timedelta(hours=6))
    ran = [t for t in found if too_close_to_previous(spec, t, min_interval_secs) is None]
    assert all((b - a).total_seconds() >= min_interval_secs for a, b in pairwise(ran))
    for skipped in set(found) - set(ran):
        # Only a clock change brings an accepted cron's times that close: the later one lies
        # just after it (in the repeated hour, or just after the gap's compensated run).
        assert timedelta(0) <= skipped - change <= timedelta(hours=3, seconds=min_interval_secs)
