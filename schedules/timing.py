"""Schedule math: validation, occurrences, daylight saving, misfires, retry backoff.

Pure functions and the one place every schedule rule lives: the REST API, the agent's
`schedule` tool, heartbeats and the worker all call these. Nothing here touches the database or
reads a clock; callers pass `now` (the database's clock, see `schedules/dbtime.py`).

Cron expressions are parsed here rather than by croniter: croniter's own iteration does not
follow Debian cron's daylight-saving rules, silently accepts forms we refuse (`R`, `15W`, a
seventh year field) and expands `0-0` to `*`. Occurrences are computed in naive local time and
mapped to instants with `zoneinfo`'s fold information:

- A "wall-clock" cron (minute and hour fields both begin with something other than `*`) runs
  a repeated local time once, at its first occurrence, and a nonexistent local time once, at the
  first valid minute after the gap (keeping its second).
- Every other cron follows real time: every instant whose local wall time matches, through both
  passes of a repeated hour and never inside a gap.

Occurrences that land on one instant are one occurrence.

The minimum interval holds over real instants. `validate_cron` checks it on one day's times;
a clock change can still bring two occurrences closer (`1 2,3 * * *` in New York fires 03:00
and 03:01 on the spring-forward day). The worker records the later one `skipped` with the
reason (`too_close_to_previous`), rather than the check refusing such crons: whether a cron
meets a clock change depends on the zone's future rules, which a tz database update can change
long after the schedule was accepted, while the check at the run always sees the rules in force.
"""

from __future__ import annotations

import bisect
import calendar
import dataclasses
import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from functools import lru_cache
from itertools import pairwise
from typing import Any, Protocol
from zoneinfo import ZoneInfo, available_timezones

ONCE = "once"
INTERVAL = "interval"
CRON = "cron"
SCHEDULE_TYPES = (ONCE, INTERVAL, CRON)
RUN_ONCE = "run_once"
SKIP = "skip"

DAY_SECS = 86_400
MAX_CRON_LENGTH = 200
MAX_TIMEZONE_LENGTH = 64
# No modern zone moves its clocks by more than this at once; it bounds how far back a repeated
# hour can reach and how far a later wall time can map to an earlier instant.
MAX_SHIFT = timedelta(hours=3)
# A cron that matches no day in 400 years (the Gregorian cycle) never fires.
SEARCH_YEARS = 400
# Bounds on the work of one call, so no input can make the worker spin.
MAX_SCAN_STEPS = 200_000
MAX_COUNT_DAYS = 40_000

# Zone names that are in the tz database but mean nothing portable.
_UNUSABLE_ZONES = frozenset({"localtime", "Factory", "posixrules"})


class ScheduleError(ValueError):
    """A schedule the API must refuse; `field` is the API field it concerns."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ScheduleSpec:
    schedule_type: str
    run_at: datetime | None
    interval_secs: int | None
    cron: str
    timezone: str


@dataclass(frozen=True)
class DuePlan:
    """What to do with a due job.

    `scheduled_for` is the occurrence to run (or to record as skipped when `skip`);
    `missed_count` is how many earlier due occurrences it stands for; `next_run_at` is the
    occurrence after it (None: the schedule has no more).
    """

    scheduled_for: datetime
    missed_count: int
    skip: bool
    next_run_at: datetime | None


class _HasSchedule(Protocol):
    schedule_type: str
    run_at: datetime | None
    interval_secs: int | None
    cron: str
    timezone: str


def spec_of(job: _HasSchedule) -> ScheduleSpec:
    """The schedule of a stored job (already validated when it was saved)."""
    return ScheduleSpec(
        schedule_type=job.schedule_type,
        run_at=job.run_at,
        interval_secs=job.interval_secs,
        cron=job.cron or "",
        timezone=job.timezone or "UTC",
    )


# --- cron parsing -------------------------------------------------------------------------------

_MONTH_NAMES = {
    name: i
    for i, name in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"],
        start=1,
    )
}
_DOW_NAMES = {name: i for i, name in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_ATOM = re.compile(r"^(\*|[a-z0-9]+(?:-[a-z0-9]+)?)(?:/([0-9]+))?$")


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int] | None = None


_SECOND = _Field("second", 0, 59)
_MINUTE = _Field("minute", 0, 59)
_HOUR = _Field("hour", 0, 23)
_DOM = _Field("day of month", 1, 31)
_MONTH = _Field("month", 1, 12, _MONTH_NAMES)
_DOW = _Field("day of week", 0, 7, _DOW_NAMES)


@dataclass(frozen=True)
class CronPlan:
    """A parsed cron expression."""

    expr: str
    tods: tuple[int, ...]  # seconds since local midnight, sorted
    wall_clock: bool
    months: frozenset[int]
    doms: frozenset[int]
    dom_last: bool
    dows: frozenset[int]  # 0 = Sunday
    dow_nth: frozenset[tuple[int, int]]  # (weekday, n): the nth such weekday of the month
    dow_last: frozenset[int]  # the last such weekday of the month
    day_and: bool  # Vixie cron: AND when either day field begins with `*`, else OR
    # Matching days per (year, month), filled as months are looked at.
    _days: dict[tuple[int, int], tuple[int, ...]] = dataclasses.field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    def days_in(self, year: int, month: int) -> tuple[int, ...]:
        """The matching days of a month."""
        days = self._days.get((year, month))
        if days is None:
            if month in self.months:
                first_wd, ndays = calendar.monthrange(year, month)
                days = _month_days(self, (first_wd + 1) % 7, ndays)
            else:
                days = ()
            if len(self._days) < 20_000:
                self._days[(year, month)] = days
        return days

    def min_gap_secs(self) -> int:
        """The smallest gap between consecutive fire times of a day, wrapping past midnight."""
        tods = self.tods
        gaps = [b - a for a, b in pairwise(tods)]
        gaps.append(tods[0] + DAY_SECS - tods[-1])
        return min(gaps)


def _month_days(plan: CronPlan, first_dow: int, ndays: int) -> tuple[int, ...]:
    days = []
    for day in range(1, ndays + 1):
        dow = (first_dow + day - 1) % 7
        dom_ok = day in plan.doms or (plan.dom_last and day == ndays)
        dow_ok = (
            dow in plan.dows
            or (dow, (day - 1) // 7 + 1) in plan.dow_nth
            or (dow in plan.dow_last and day + 7 > ndays)
        )
        if (dom_ok and dow_ok) if plan.day_and else (dom_ok or dow_ok):
            days.append(day)
    return tuple(days)


class _CronSyntaxError(Exception):
    pass


def _value(text: str, field: _Field) -> int:
    if text.isdigit():
        value = int(text)
    elif field.names is not None and text in field.names:
        value = field.names[text]
    else:
        raise _CronSyntaxError(f"{text!r} is not a valid {field.name}")
    if not field.low <= value <= field.high:
        raise _CronSyntaxError(f"{field.name} {value} is out of range ({field.low}-{field.high})")
    return value


def _expand(text: str, field: _Field) -> set[int]:
    values: set[int] = set()
    for part in text.split(","):
        match = _ATOM.match(part)
        if match is None:
            raise _CronSyntaxError(f"{part!r} is not a valid {field.name}")
        span, step_text = match.groups()
        if span == "*":
            low, high = field.low, field.high
        elif "-" in span:
            first, last = span.split("-")
            low, high = _value(first, field), _value(last, field)
            if low > high:
                raise _CronSyntaxError(f"range {part!r} in the {field.name} field runs backwards")
        else:
            low = _value(span, field)
            high = field.high if step_text is not None else low
        step = 1
        if step_text is not None:
            step = int(step_text)
            if not 1 <= step <= field.high:
                raise _CronSyntaxError(f"step {step} in the {field.name} field is out of range")
        values.update(range(low, high + 1, step))
    return values


def _parse_dom(text: str) -> tuple[set[int], bool]:
    days: set[int] = set()
    last = False
    for part in text.split(","):
        if part == "l":
            last = True
        elif part == "?":
            days.update(range(1, 32))
        else:
            days |= _expand(part, _DOM)
    return days, last


def _parse_dow(text: str) -> tuple[set[int], set[tuple[int, int]], set[int]]:
    plain: set[int] = set()
    nth: set[tuple[int, int]] = set()
    last: set[int] = set()
    for part in text.split(","):
        if part == "?":
            plain.update(range(7))
        elif "#" in part:
            day_text, _, n_text = part.partition("#")
            day = _value(day_text, _DOW) % 7
            if not n_text.isdigit() or not 1 <= int(n_text) <= 5:
                raise _CronSyntaxError(f"{part!r}: the week after # must be 1 to 5")
            nth.add((day, int(n_text)))
        elif part.endswith("l") and len(part) > 1:
            last.add(_value(part[:-1], _DOW) % 7)
        else:
            plain |= {d % 7 for d in _expand(part, _DOW)}
    return plain, nth, last


def _normalise_cron(expr: str) -> str:
    return " ".join(expr.split())


@lru_cache(maxsize=4096)
def parse_cron(expr: str) -> CronPlan:
    """Parse a normalised cron expression; raises ScheduleError("cron", ...)."""
    try:
        return _parse_cron(expr)
    except _CronSyntaxError as exc:
        raise ScheduleError("cron", str(exc)) from None


def _parse_cron(expr: str) -> CronPlan:
    text = _MACROS.get(expr.lower(), expr).lower()
    if text.startswith("@"):
        raise _CronSyntaxError(
            f"unknown macro {expr!r} (use @yearly, @monthly, @weekly, @daily or @hourly)"
        )
    fields = text.split()
    if len(fields) == 5:
        second_text = "0"
    elif len(fields) == 6:
        second_text, fields = fields[0], fields[1:]
    elif len(fields) == 7:
        raise _CronSyntaxError(
            "7 fields (with a year) are not supported: use 5 fields, or 6 with seconds first"
        )
    else:
        raise _CronSyntaxError(
            f"expected 5 fields (minute hour day month weekday) or 6 with seconds first, "
            f"got {len(fields)}"
        )
    minute_text, hour_text, dom_text, month_text, dow_text = fields
    seconds = _expand(second_text, _SECOND)
    minutes = _expand(minute_text, _MINUTE)
    hours = _expand(hour_text, _HOUR)
    doms, dom_last = _parse_dom(dom_text)
    months = _expand(month_text, _MONTH)
    dows, dow_nth, dow_last = _parse_dow(dow_text)
    tods = tuple(sorted(h * 3600 + m * 60 + s for h in hours for m in minutes for s in seconds))
    return CronPlan(
        expr=expr,
        tods=tods,
        wall_clock=not minute_text.startswith("*") and not hour_text.startswith("*"),
        months=frozenset(months),
        doms=frozenset(doms),
        dom_last=dom_last,
        dows=frozenset(dows),
        dow_nth=frozenset(dow_nth),
        dow_last=frozenset(dow_last),
        day_and=dom_text.startswith(("*", "?")) or dow_text.startswith(("*", "?")),
    )


def _ever_fires(plan: CronPlan) -> bool:
    # Each month pattern (weekday of the 1st, length) occurs for every month within 400 years.
    for month in plan.months:
        lengths = (28, 29) if month == 2 else (calendar.monthrange(2001, month)[1],)
        for ndays in lengths:
            for first_dow in range(7):
                if _month_days(plan, first_dow, ndays):
                    return True
    return False


@lru_cache(maxsize=4096)
def describe_cron(expr: str) -> str:
    """A human-readable description of a cron expression (the expression itself on failure).

    Cached: the describer loads its translation catalogue on every call (~1 ms), and a list
    page shows the same few expressions again and again."""
    try:
        from cron_descriptor import Options, get_description

        options = Options()
        options.use_24hour_time_format = True
        text = _MACROS.get(expr.strip().lower(), expr)
        return str(get_description(text, options))
    except Exception:  # cron-descriptor raises many types; a description is never essential
        return expr


# --- validation ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _zone_names() -> frozenset[str]:
    return frozenset(available_timezones()) - _UNUSABLE_ZONES


@lru_cache(maxsize=1024)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


# Abbreviation zones: each names an offset (EST is UTC-5 all year) or a pair of old US rules, not
# a place, so a user who writes one almost always means a region's local time, daylight saving
# included. They are refused with the region names that use them; `Etc/GMT+5` and `UTC` remain
# for a fixed offset. Common abbreviations that are not zone names at all get the same help.
_ABBREVIATION_ZONES: dict[str, str] = {
    "EST": "America/New_York (Eastern time, with daylight saving) or America/Panama (UTC-5 all year)",
    "EDT": "America/New_York",
    "EST5EDT": "America/New_York",
    "CST": "America/Chicago (US Central time) or Asia/Shanghai (China)",
    "CDT": "America/Chicago",
    "CST6CDT": "America/Chicago",
    "MST": "America/Denver (Mountain time, with daylight saving) or America/Phoenix (UTC-7 all year)",
    "MDT": "America/Denver",
    "MST7MDT": "America/Denver",
    "PST": "America/Los_Angeles",
    "PDT": "America/Los_Angeles",
    "PST8PDT": "America/Los_Angeles",
    "HST": "Pacific/Honolulu",
    "AKST": "America/Anchorage",
    "CET": "Europe/Paris, Europe/Berlin or another Central European city",
    "CEST": "Europe/Paris, Europe/Berlin or another Central European city",
    "MET": "Europe/Paris, Europe/Berlin or another Central European city",
    "EET": "Europe/Athens, Europe/Helsinki or Europe/Bucharest",
    "WET": "Europe/Lisbon",
    "BST": "Europe/London",
    "IST": "Asia/Kolkata (India), Europe/Dublin (Ireland) or Asia/Jerusalem (Israel)",
    "JST": "Asia/Tokyo",
    "AEST": "Australia/Sydney",
}


@lru_cache(maxsize=1)
def _zone_names_by_case() -> dict[str, str]:
    return {name.casefold(): name for name in _zone_names()}


def validate_timezone(value: Any) -> str:
    """An IANA region name (or UTC / Etc/GMT±N), or ScheduleError("timezone", ...).

    The abbreviation zones (EST, MST, HST, EST5EDT, CET, ...) are refused with the region names
    that use them. This is the one rule for the API, the `schedule` tool and heartbeats."""
    if not isinstance(value, str):
        raise ScheduleError("timezone", "must be a string naming an IANA time zone")
    if not value:
        raise ScheduleError("timezone", "must not be empty (for example 'UTC' or 'Europe/London')")
    shown = value[:40].encode("ascii", "backslashreplace").decode("ascii")
    suggestion = _ABBREVIATION_ZONES.get(value.upper()) if len(value) <= 8 else None
    if suggestion is not None:
        raise ScheduleError(
            "timezone",
            f"{shown!r} is an abbreviation, not a region, and has no daylight-saving rules of "
            f"its own: use {suggestion}; for a fixed offset, 'UTC' or 'Etc/GMT+5' (which is UTC-5: "
            "the sign is reversed)",
        )
    if len(value) > MAX_TIMEZONE_LENGTH or value not in _zone_names():
        close = _zone_names_by_case().get(value.casefold()) if len(value) < 64 else None
        hint = f"did you mean {close!r}?" if close else "use an IANA name such as 'Europe/London'"
        raise ScheduleError("timezone", f"unknown time zone {shown!r}: {hint}")
    return value


def validate_cron(value: Any, *, min_interval_secs: int) -> str:
    """The normalised expression, or ScheduleError("cron", ...)."""
    if not isinstance(value, str):
        raise ScheduleError("cron", "must be a string")
    expr = _normalise_cron(value)
    if not expr:
        raise ScheduleError("cron", "is required for a cron schedule")
    if len(expr) > MAX_CRON_LENGTH:
        raise ScheduleError("cron", f"is longer than {MAX_CRON_LENGTH} characters")
    if not expr.isascii() or not expr.isprintable():
        raise ScheduleError("cron", "may contain only printable ASCII characters")
    plan = parse_cron(expr)
    if not _ever_fires(plan):
        raise ScheduleError("cron", f"{expr!r} never fires (no date matches it)")
    gap = plan.min_gap_secs()
    if gap < min_interval_secs:
        raise ScheduleError(
            "cron",
            f"{expr!r} fires {gap} s apart; the minimum interval is {min_interval_secs} s",
        )
    return expr


def _parsed_datetime(field: str, value: Any) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip()) if len(value) <= 64 else None
        except ValueError:
            value = None
        if value is None:
            raise ScheduleError(
                field, "must be an ISO 8601 date-time, for example 2030-01-31T09:00:00+01:00"
            )
    if not isinstance(value, datetime):
        raise ScheduleError(field, "must be an ISO 8601 date-time")
    return value


def local_to_utc(field: str, local: datetime, zone_name: str) -> datetime:
    """The instant of the naive local time `local` in `zone_name`.

    A local time the clocks skip (spring forward) is refused; one that occurs twice (fall back)
    means its first occurrence."""
    zone = _zone(zone_name)
    first = local.replace(tzinfo=zone, fold=0)
    if first.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != local:
        raise ScheduleError(
            field,
            f"{local.isoformat()} does not exist in {zone_name} (the clocks skip it): give "
            "another time",
        )
    return first.astimezone(UTC)


def parse_run_at(value: Any, timezone: str | None, *, field: str = "run_at") -> datetime:
    """`run_at` as an aware UTC instant: ISO 8601 with an offset, or a local time in `timezone`.

    The one parser the API and the `schedule` tool share. `timezone` is the zone the caller
    stated (None when they stated none: a time without an offset is then refused). A skipped
    local time is refused; a repeated one means its first occurrence."""
    when = _parsed_datetime(field, value)
    if when.tzinfo is not None and when.utcoffset() is not None:
        return when.astimezone(UTC)
    if timezone is None:
        raise ScheduleError(
            field,
            "has no UTC offset: give one (2030-01-31T09:00:00+01:00, or ...Z for UTC) or a "
            "`timezone` to read it in",
        )
    return local_to_utc(field, when.replace(tzinfo=None), validate_timezone(timezone))


def _future(
    field: str, value: Any, timezone: str | None, now: datetime, max_ahead: timedelta
) -> datetime:
    when = parse_run_at(value, timezone, field=field)
    if when <= now:
        raise ScheduleError(field, "must be in the future")
    if when - now > max_ahead:
        raise ScheduleError(field, f"must be at most {max_ahead.days} days ahead")
    return when


def article(word: str) -> str:
    """`word` with its indefinite article: "an interval", "a cron", "a once" (by sound)."""
    vowel_sound = word[:1].lower() in "aeiou" and not word.lower().startswith(("one", "once", "u"))
    return f"{'an' if vowel_sound else 'a'} {word}"


def _refuse_foreign(schedule_type: str, **given: bool) -> None:
    for field, present in given.items():
        if present:
            raise ScheduleError(field, f"does not apply to {article(schedule_type)} schedule")


def validate_spec(
    *,
    schedule_type: Any,
    run_at: Any = None,
    interval_secs: Any = None,
    cron: Any = "",
    timezone: Any = "UTC",
    now: datetime,
    timezone_given: bool = False,
    min_interval_secs: int,
    max_ahead: timedelta = timedelta(days=365),
) -> ScheduleSpec:
    """Check and normalise a schedule; raises ScheduleError naming the API field at fault.

    `run_at` may be a local time without an offset when the caller stated `timezone`
    (`timezone_given`); it is read there (see `parse_run_at`)."""
    if schedule_type not in SCHEDULE_TYPES:
        raise ScheduleError("schedule_type", "must be one of: once, interval, cron")
    zone_name = validate_timezone(timezone)
    read_in = zone_name if timezone_given else None
    has_cron = not (cron is None or (isinstance(cron, str) and not cron.strip()))
    if schedule_type == ONCE:
        _refuse_foreign(ONCE, interval_secs=interval_secs is not None, cron=has_cron)
        if run_at is None:
            raise ScheduleError("run_at", "is required for a once schedule")
        when = _future("run_at", run_at, read_in, now, max_ahead)
        return ScheduleSpec(ONCE, when, None, "", zone_name)
    if schedule_type == INTERVAL:
        _refuse_foreign(INTERVAL, cron=has_cron)
        secs = _interval(interval_secs, min_interval_secs, max_ahead)
        first = None if run_at is None else _future("run_at", run_at, read_in, now, max_ahead)
        return ScheduleSpec(INTERVAL, first, secs, "", zone_name)
    _refuse_foreign(CRON, run_at=run_at is not None, interval_secs=interval_secs is not None)
    if not has_cron:
        raise ScheduleError("cron", "is required for a cron schedule")
    expr = validate_cron(cron, min_interval_secs=min_interval_secs)
    return ScheduleSpec(CRON, None, None, expr, zone_name)


def _interval(value: Any, min_interval_secs: int, max_ahead: timedelta) -> int:
    if value is None:
        raise ScheduleError("interval_secs", "is required for an interval schedule")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ScheduleError("interval_secs", "must be a whole number of seconds")
    if value < min_interval_secs:
        raise ScheduleError(
            "interval_secs", f"must be at least {min_interval_secs} s (got {value})"
        )
    limit = int(max_ahead.total_seconds())
    if value > limit:
        raise ScheduleError("interval_secs", f"must be at most {limit} s")
    return value


# --- occurrences --------------------------------------------------------------------------------


def _utc_naive(when: datetime) -> datetime:
    if when.tzinfo is None:
        raise ValueError("schedule math needs aware datetimes")
    return when.astimezone(UTC).replace(tzinfo=None)


def _offset_at(zone: tzinfo, utc_naive: datetime) -> timedelta:
    return zone.utcoffset(utc_naive.replace(tzinfo=UTC).astimezone(zone))  # type: ignore[return-value]


def _next_date(plan: CronPlan, after: date) -> date | None:
    """The first matching local date strictly after `after`."""
    year, month = after.year, after.month
    days = plan.days_in(year, month)
    index = bisect.bisect_right(days, after.day)
    if index < len(days):
        return date(year, month, days[index])
    for _ in range(SEARCH_YEARS * 12):
        month += 1
        if month > 12:
            year, month = year + 1, 1
            if year > 9999:
                return None
        days = plan.days_in(year, month)
        if days:
            return date(year, month, days[0])
    return None


def _at(day: date, tod: int) -> datetime:
    return datetime(day.year, day.month, day.day, tod // 3600, tod // 60 % 60, tod % 60)


def _next_naive(plan: CronPlan, wall: datetime) -> datetime | None:
    """The first matching naive local time strictly after `wall`."""
    day = wall.date()
    if day.day in plan.days_in(day.year, day.month):
        tod = wall.hour * 3600 + wall.minute * 60 + wall.second
        index = bisect.bisect_right(plan.tods, tod)
        if index < len(plan.tods):
            return _at(day, plan.tods[index])
    following = _next_date(plan, day)
    return None if following is None else _at(following, plan.tods[0])


def _gap_end(zone: tzinfo, before: datetime, after: datetime) -> datetime:
    """The UTC instant (naive) of the transition in (before, after], to the second."""
    before_offset = _offset_at(zone, before)
    low, high = before, after
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        middle = middle.replace(microsecond=0)
        if middle <= low:
            middle = low + timedelta(seconds=1)
        if _offset_at(zone, middle) == before_offset:
            low = middle
        else:
            high = middle
    return high


def _instants(plan: CronPlan, zone: tzinfo, local: datetime) -> list[datetime]:
    """The UTC instants (naive, ascending) at which the matching local time `local` fires."""
    first = zone.utcoffset(local)
    second = zone.utcoffset(local.replace(fold=1))
    assert first is not None and second is not None
    if first == second:
        return [local - first]
    if first > second:  # a repeated time: fold 0 is the first pass
        if plan.wall_clock:
            return [local - first]
        return [local - first, local - second]
    if not plan.wall_clock:  # inside a gap
        return []
    # A nonexistent wall-clock time runs at the first valid minute after the gap.
    transition = _gap_end(zone, local - second, local - first)
    if transition.second or transition.microsecond:
        transition = transition.replace(second=0, microsecond=0) + timedelta(minutes=1)
    return [transition + timedelta(seconds=local.second)]


def _next_cron(plan: CronPlan, zone: tzinfo, after: datetime) -> datetime | None:
    """The first occurrence strictly after the UTC instant `after` (naive)."""
    offset = _offset_at(zone, after)
    wall = after + offset
    local = _next_naive(plan, wall)
    if local is None:
        return None
    first = zone.utcoffset(local)
    if first == zone.utcoffset(local.replace(fold=1)):
        candidate = local - first  # type: ignore[operator]
        if candidate > after and _no_transition_near(plan, zone, after, offset):
            return candidate
    return _next_slow(plan, zone, after, wall)


def _no_transition_near(plan: CronPlan, zone: tzinfo, after: datetime, offset: timedelta) -> bool:
    """Whether the next matching local time after `after` is surely the next occurrence.

    A real-time cron looks ahead: a repeated hour before that time fires earlier instants. A
    wall-clock cron looks back: the local times of a gap that just ended run at the first valid
    minute after it, keeping their second, so they can still lie ahead of `after` although
    their wall time is behind it.
    """
    if plan.wall_clock:
        return _offset_at(zone, after - MAX_SHIFT) == offset
    return _offset_at(zone, after + MAX_SHIFT) == offset


def _next_slow(plan: CronPlan, zone: tzinfo, after: datetime, wall: datetime) -> datetime | None:
    # Near a transition a later wall time can be an earlier instant (a repeated hour; a skipped
    # time that runs after the gap, keeping its second), so scan from MAX_SHIFT before `wall`
    # and stop once no later wall time can beat the best found.
    best: datetime | None = None
    limit: datetime | None = None
    local = _next_naive(plan, wall - MAX_SHIFT - timedelta(microseconds=1))
    for _ in range(MAX_SCAN_STEPS):
        if local is None or (limit is not None and local > limit):
            break
        for instant in _instants(plan, zone, local):
            if instant > after and (best is None or instant < best):
                best = instant
                limit = best + _offset_at(zone, best) + MAX_SHIFT
        local = _next_naive(plan, local)
    return best


def _aware_utc(naive: datetime | None) -> datetime | None:
    return None if naive is None else naive.replace(tzinfo=UTC)


def next_after(spec: ScheduleSpec, scheduled_for: datetime) -> datetime | None:
    """The first occurrence strictly after `scheduled_for` (UTC); None for a once schedule.

    Interval occurrences are counted from the scheduled time, not the finish time: no drift.
    """
    if spec.schedule_type == INTERVAL:
        assert spec.interval_secs
        return (scheduled_for + timedelta(seconds=spec.interval_secs)).astimezone(UTC)
    if spec.schedule_type == CRON:
        plan = parse_cron(spec.cron)
        return _aware_utc(_next_cron(plan, _zone(spec.timezone), _utc_naive(scheduled_for)))
    return None


def first_run(spec: ScheduleSpec, created_at: datetime) -> datetime | None:
    """The first occurrence of a schedule created (or re-enabled) at `created_at`.

    once: `run_at` (even if passed: the caller decides); interval: `run_at` when given, else
    `created_at + interval` (a `run_at` already passed continues its cadence after
    `created_at`); cron: the first match strictly after `created_at`.
    """
    if spec.schedule_type == ONCE:
        return None if spec.run_at is None else spec.run_at.astimezone(UTC)
    if spec.schedule_type == INTERVAL:
        if spec.run_at is None:
            return next_after(spec, created_at)
        anchor = spec.run_at.astimezone(UTC)
        if anchor > created_at or not spec.interval_secs:
            return anchor
        # Re-enabled after its first run time: keep the cadence from run_at.
        step = timedelta(seconds=spec.interval_secs)
        return anchor + step * ((created_at - anchor) // step + 1)
    return next_after(spec, created_at)


def occurrences(spec: ScheduleSpec, start: datetime) -> Iterator[datetime]:
    """`start` (taken as an occurrence) and every occurrence after it, in order."""
    current: datetime | None = start.astimezone(UTC)
    while current is not None:
        yield current
        current = next_after(spec, current)


def preview(
    spec: ScheduleSpec, count: int, after: datetime, *, start: datetime | None = None
) -> list[tuple[datetime, datetime]]:
    """The next `count` fire times as (local time in the schedule's zone, UTC).

    Without `start`: the occurrences strictly after `after` of a schedule created at `after`
    (an interval with `run_at` keeps its cadence from `run_at`). With `start` (a job's
    `next_run_at`): that occurrence and the ones after it.
    """
    if count <= 0:
        return []
    first = start if start is not None else _first_preview(spec, after)
    if first is None:
        return []
    zone = _zone(spec.timezone)
    result: list[tuple[datetime, datetime]] = []
    for when in occurrences(spec, first):
        result.append((when.astimezone(zone), when))
        if len(result) >= count:
            break
    return result


def _first_preview(spec: ScheduleSpec, after: datetime) -> datetime | None:
    first = first_run(spec, after)
    return first if first is not None and first > after else None


# --- run-time predicates -----------------------------------------------------------------------

_ACTIVE_HOURS = re.compile(r"^([0-9]{2}):([0-9]{2})-([0-9]{2}):([0-9]{2})$")


def parse_active_hours(value: Any) -> tuple[int, int]:
    """`"HH:MM-HH:MM"` as (start, end) minutes after local midnight; end may be 24:00 and may
    be earlier than start (the window wraps past midnight). Raises ScheduleError("active_hours")."""
    match = _ACTIVE_HOURS.match(value) if isinstance(value, str) else None
    if match is None:
        raise ScheduleError(
            "active_hours", 'must look like "HH:MM-HH:MM" (for example 08:00-20:00)'
        )
    start_h, start_m, end_h, end_m = (int(part) for part in match.groups())
    if start_h > 23 or start_m > 59 or end_m > 59 or end_h > 24 or (end_h == 24 and end_m):
        raise ScheduleError("active_hours", f"{value!r} is not a time of day (00:00 to 24:00)")
    start, end = start_h * 60 + start_m, end_h * 60 + end_m
    if start == end % (24 * 60):
        raise ScheduleError(
            "active_hours", f"{value!r} is empty or the whole day: leave active_hours out instead"
        )
    return start, end


def within_active_hours(active_hours: str, timezone: str, instant: datetime) -> bool:
    """Whether `instant` falls in `active_hours` ([start, end) of wall time in `timezone`)."""
    start, end = parse_active_hours(active_hours)
    local = instant.astimezone(_zone(timezone))
    minute = local.hour * 60 + local.minute + local.second / 60
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end


def too_close_to_previous(
    spec: ScheduleSpec, scheduled_for: datetime, min_interval_secs: int
) -> datetime | None:
    """The occurrence before `scheduled_for` when it is closer than the minimum, else None.

    The minimum is `min_interval_secs`, or the cron's own shortest gap of a day when that is
    smaller (the minimum was raised after the cron was accepted): only a clock change brings
    two occurrences of an accepted schedule that close. Skipping each occurrence that is too
    close to the one before it leaves every two remaining occurrences at least that far apart.
    Interval and once schedules follow real time and never need it.
    """
    if spec.schedule_type != CRON:
        return None
    minimum = min(min_interval_secs, parse_cron(spec.cron).min_gap_secs())
    scheduled_for = scheduled_for.astimezone(UTC)
    earlier = next_after(spec, scheduled_for - timedelta(seconds=minimum))
    if earlier is not None and earlier < scheduled_for:
        return earlier
    return None


# --- misfires -----------------------------------------------------------------------------------


def plan_due(spec: ScheduleSpec, next_run_at: datetime, now: datetime, misfire: str) -> DuePlan:
    """What to do with a job whose `next_run_at` has come (`next_run_at <= now`).

    An occurrence is missed when a later one is also already due. `run_once` runs the latest
    due occurrence, standing for the missed ones (`missed_count`); `skip` records the latest due
    occurrence as skipped (standing for the missed ones too) and moves to the next future
    occurrence. With nothing missed, both simply run `next_run_at`. A once job still runs late.
    The work is bounded whatever the length of the outage.
    """
    next_run_at = next_run_at.astimezone(UTC)
    now = now.astimezone(UTC)
    if spec.schedule_type == ONCE or next_run_at > now:
        return DuePlan(next_run_at, 0, False, next_after(spec, next_run_at))
    if spec.schedule_type == INTERVAL:
        assert spec.interval_secs
        step = timedelta(seconds=spec.interval_secs)
        missed = (now - next_run_at) // step
        latest = next_run_at + step * missed
    else:
        latest, missed = _latest_due_cron(spec, next_run_at, now)
    following = next_after(spec, latest)
    skip = missed > 0 and misfire == SKIP
    return DuePlan(latest, missed, skip, following)


def _latest_due_cron(spec: ScheduleSpec, first: datetime, now: datetime) -> tuple[datetime, int]:
    """The last occurrence at or before `now` and how many occurrences from `first` precede it."""
    latest = first
    missed = 0
    current: datetime | None = first
    for _ in range(1000):
        current = next_after(spec, latest)
        if current is None or current > now:
            return latest, missed
        latest, missed = current, missed + 1
    # A long outage: find the latest due occurrence near `now`, then count the rest by day.
    latest = _last_at_or_before(spec, latest, now)
    return latest, missed + count_between(spec, current, latest)  # type: ignore[arg-type]


def _last_at_or_before(spec: ScheduleSpec, floor: datetime, now: datetime) -> datetime:
    """The last occurrence in [floor, now], `floor` being one; looks back in growing windows."""
    window = timedelta(hours=1)
    while True:
        start = now - window
        if start <= floor:
            first: datetime | None = floor
        else:
            first = next_after(spec, start - timedelta(microseconds=1))
        found: datetime | None = None
        current = first
        for _ in range(MAX_SCAN_STEPS):
            if current is None or current > now:
                break
            found = current
            current = next_after(spec, current)
        if found is not None or start <= floor:
            return found if found is not None else floor
        window *= 4


def count_between(spec: ScheduleSpec, start: datetime, end: datetime) -> int:
    """How many occurrences lie in [start, end), `start` being an occurrence. Bounded work."""
    if end <= start:
        return 0
    if spec.schedule_type == INTERVAL:
        assert spec.interval_secs
        step = timedelta(seconds=spec.interval_secs)
        return math.ceil((end - start) / step)
    if spec.schedule_type == ONCE:
        return 1
    plan = parse_cron(spec.cron)
    zone = _zone(spec.timezone)
    count = 0
    current: datetime | None = start
    # Count whole local days arithmetically; days with a transition and the two ends one by one.
    end_day = end.astimezone(zone).date()
    days = 0
    while current is not None and current < end:
        local_day = current.astimezone(zone).date()
        if local_day + timedelta(days=2) < end_day and days < MAX_COUNT_DAYS:
            count += _count_rest_of_day(spec, current, local_day, zone)
            day = local_day + timedelta(days=1)
            while day + timedelta(days=1) < end_day and days < MAX_COUNT_DAYS:
                days += 1
                if day.day in plan.days_in(day.year, day.month):
                    count += _count_day(spec, plan, zone, day)
                day += timedelta(days=1)
            if days >= MAX_COUNT_DAYS:
                return count  # saturated: an outage of a century is not counted further
            current = _first_on_or_after_day(spec, zone, day)
            continue
        count += 1
        current = next_after(spec, current)
    return count


def _day_start_utc(zone: tzinfo, day: date) -> datetime:
    midnight = datetime(day.year, day.month, day.day)
    return (midnight.replace(tzinfo=zone)).astimezone(UTC)


def _first_on_or_after_day(spec: ScheduleSpec, zone: tzinfo, day: date) -> datetime | None:
    return next_after(spec, _day_start_utc(zone, day) - timedelta(microseconds=1))


def _count_rest_of_day(spec: ScheduleSpec, start: datetime, day: date, zone: tzinfo) -> int:
    count = 0
    current: datetime | None = start
    while current is not None and current.astimezone(zone).date() == day:
        count += 1
        current = next_after(spec, current)
    return count


def _count_day(spec: ScheduleSpec, plan: CronPlan, zone: tzinfo, day: date) -> int:
    begin = _day_start_utc(zone, day)
    finish = _day_start_utc(zone, day + timedelta(days=1))
    if finish - begin == timedelta(days=1) and _offset_at(zone, _utc_naive(begin)) == _offset_at(
        zone, _utc_naive(finish)
    ):
        return len(plan.tods)
    # A day with a transition: count distinct instants (a gap merges, a repeat doubles).
    return len({instant for tod in plan.tods for instant in _instants(plan, zone, _at(day, tod))})


# --- retries ------------------------------------------------------------------------------------


def retry_at(
    *,
    attempt: int,
    failed_at: datetime,
    next_occurrence: datetime | None,
    base_secs: float,
    max_secs: float,
    rng: Any = random,
) -> datetime | None:
    """When to retry after attempt number `attempt` (1 = the first run) failed at `failed_at`.

    Exponential backoff, `base_secs * 2**(attempt-1)` capped at `max_secs`, with "equal jitter"
    (uniform in the upper half of that delay, so delays still grow). None when the retry would
    land at or past `next_occurrence`: the occurrence is then given up and the job moves on.
    Whether retries remain (`max_retries`) is the caller's decision.
    """
    exponent = min(max(attempt, 1) - 1, 62)
    delay = min(float(max_secs), float(base_secs) * (2**exponent))
    jittered = delay / 2 + rng.random() * delay / 2
    when = failed_at.astimezone(UTC) + timedelta(seconds=max(jittered, 0.001))
    if next_occurrence is not None and when >= next_occurrence:
        return None
    return when
