"""Our cron engine (`schedules.timing`) beside croniter: where croniter departs from Debian cron's
rules, and the cost of one "next fire time" call.

Run: `.venv/bin/python -m bench.cron_engine` (prints a Markdown section for docs/benchmarks.md).
The expected answers below are Debian cron's, written out by hand, not taken from either engine.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "picobot_site.settings")

from croniter import croniter

from schedules.timing import ScheduleError, ScheduleSpec, next_after, validate_cron

NY = "America/New_York"

# (what it shows, cron, zone, start (UTC), Debian cron's next fire times in UTC "MM-DD HH:MM")
OCCURRENCE_CASES: list[tuple[str, str, str, datetime, list[str]]] = [
    (
        "a wall-clock time in the repeated hour runs once",
        "30 1 * * *", NY, datetime(2027, 11, 6, 12, tzinfo=UTC),
        ["11-07 05:30", "11-08 06:30", "11-09 06:30"],
    ),
    (
        "a wall-clock time in the skipped hour runs once, after the gap",
        "30 2 * * *", NY, datetime(2027, 3, 13, 12, tzinfo=UTC),
        ["03-14 07:00", "03-15 06:30", "03-16 06:30"],
    ),
    (
        "`0-0` is minute 0, not every minute",
        "0-0 9 * * *", "UTC", datetime(2027, 1, 1, tzinfo=UTC),
        ["01-01 09:00", "01-02 09:00", "01-03 09:00"],
    ),
    (
        "a `*/2` day of month with a weekday means both (Vixie's star rule)",
        "0 9 */2 * mon", "UTC", datetime(2027, 1, 1, tzinfo=UTC),
        ["01-11 09:00", "01-25 09:00", "02-01 09:00"],
    ),
    (
        "a `*/2` weekday with a day range means both (Vixie's star rule)",
        "0 9 1-7 * */2", "UTC", datetime(2027, 1, 1, tzinfo=UTC),
        ["01-02 09:00", "01-03 09:00", "01-05 09:00"],
    ),
    (
        "a real-time cron runs through both passes of the repeated hour",
        "*/30 1 * * *", NY, datetime(2027, 11, 7, 4, tzinfo=UTC),
        ["11-07 05:00", "11-07 05:30", "11-07 06:00", "11-07 06:30"],
    ),
    (
        "day of month OR weekday when neither is starred",
        "0 9 1,15 * fri", "UTC", datetime(2027, 1, 1, tzinfo=UTC),
        ["01-01 09:00", "01-08 09:00", "01-15 09:00"],
    ),
]  # fmt: skip

# (cron, what a scheduler should do with it)
ACCEPTANCE_CASES: list[tuple[str, bool, str]] = [
    ("0 9 15W * *", False, "`W` (nearest weekday) is not Debian cron; silently accepted"),
    ("R 9 * * *", False, "`R` (random) is not Debian cron; accepted"),
    ("0 0 30 2 *", False, "never fires (Feb 30); accepted, and a scheduler would never run it"),
    ("0 9 * * 5L", True, "last Friday of the month"),
    ("0 9 * * fri#5", True, "fifth Friday (some months)"),
]

SPEED_CASES = [("0 9 * * *", NY), ("*/15 * * * *", "UTC"), ("30 1 * * mon-fri", "Europe/London")]


def ours(expr: str, zone: str, start: datetime, count: int) -> list[datetime]:
    spec = ScheduleSpec("cron", None, None, expr, zone)
    out, when = [], start
    for _ in range(count):
        when = next_after(spec, when)
        out.append(when)
    return out


def theirs(expr: str, zone: str, start: datetime, count: int) -> list[datetime]:
    iterator = croniter(expr, start.astimezone(ZoneInfo(zone)))
    return [iterator.get_next(datetime).astimezone(UTC) for _ in range(count)]


def short(times: list[datetime]) -> str:
    return ", ".join(t.strftime("%m-%d %H:%M") for t in times)


def occurrence_rows() -> tuple[list[str], int]:
    rows, wrong = [], 0
    for what, expr, zone, start, expected in OCCURRENCE_CASES:
        got_ours = short(ours(expr, zone, start, len(expected)))
        got_theirs = short(theirs(expr, zone, start, len(expected)))
        want = ", ".join(expected)
        wrong += got_theirs != want
        rows.append(
            f"| `{expr}` {zone} | {what} | {_mark(got_ours, want)} | {_mark(got_theirs, want)} |"
        )
    return rows, wrong


def _mark(got: str, want: str) -> str:
    return "right" if got == want else f"**wrong**: {got}"


def _word(accepted: bool, should: bool) -> str:
    return ("accepts" if accepted else "refuses") + ("" if accepted == should else " (**wrong**)")


def accepts(check: Callable[[str], object], expr: str) -> bool:
    try:
        check(expr)
    except (ScheduleError, ValueError, KeyError):
        return False
    return True


def acceptance_rows() -> tuple[list[str], int]:
    rows, wrong = [], 0
    for expr, should, why in ACCEPTANCE_CASES:
        ours_ok = accepts(lambda e: validate_cron(e, min_interval_secs=60), expr)
        theirs_ok = accepts(croniter, expr)
        wrong += theirs_ok != should
        rows.append(f"| `{expr}` | {why} | {_word(ours_ok, should)} | {_word(theirs_ok, should)} |")
    return rows, wrong


def per_call_us(step: Callable[[datetime], datetime], calls: int) -> float:
    when = datetime(2027, 1, 1, tzinfo=UTC)
    started = time.perf_counter()
    for _ in range(calls):
        when = step(when)
    return (time.perf_counter() - started) / calls * 1e6


def speed_rows(calls: int) -> list[str]:
    rows = []
    for expr, zone in SPEED_CASES:
        spec = ScheduleSpec("cron", None, None, expr, zone)
        tz = ZoneInfo(zone)
        ours_us = per_call_us(lambda t, s=spec: next_after(s, t), calls)
        fresh_us = per_call_us(
            lambda t, e=expr, z=tz: croniter(e, t.astimezone(z)).get_next(datetime), calls
        )
        iterator = croniter(expr, datetime(2027, 1, 1, tzinfo=tz))
        iterate_us = per_call_us(lambda t, i=iterator: i.get_next(datetime), calls)
        rows.append(
            f"| `{expr}` {zone} | {ours_us:.1f} | {fresh_us:.1f} ({fresh_us / ours_us:.1f}x) "
            f"| {iterate_us:.1f} ({iterate_us / ours_us:.1f}x) |"
        )
    return rows


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 5_000
    occurrences, wrong_times = occurrence_rows()
    acceptance, wrong_accept = acceptance_rows()
    version = importlib.metadata.version("croniter")
    print(
        f"### Cron engine: ours beside croniter {version} (`.venv/bin/python -m bench.cron_engine`)"
    )
    print()
    print(f"{platform.machine()}, Python {platform.python_version()}; {calls} calls per row.")
    print(
        f"croniter departs from Debian cron in {wrong_times} of {len(OCCURRENCE_CASES)} "
        f"fire-time cases and {wrong_accept} of {len(ACCEPTANCE_CASES)} acceptance cases."
    )
    print()
    print("| cron, zone | Debian cron | ours | croniter |\n| --- | --- | --- | --- |")
    print("\n".join(occurrences))
    print()
    print("| cron | meaning | ours | croniter |\n| --- | --- | --- | --- |")
    print("\n".join(acceptance))
    print()
    print(
        "Microseconds per next-fire-time call (ours: `timing.next_after`, stateless; croniter: "
        "a new `croniter(expr, t).get_next()` per call, as a scheduler computing from the "
        "scheduled time does, and iterating one object):"
    )
    print()
    print(
        "| cron, zone | ours µs | croniter new µs | croniter iterate µs |\n| --- | ---: | ---: | ---: |"
    )
    print("\n".join(speed_rows(calls)))


if __name__ == "__main__":
    main()
