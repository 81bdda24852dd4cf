"""Misfires, cadence without drift, retry backoff and previews."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from schedules import timing
from schedules.timing import (
    DuePlan,
    ScheduleSpec,
    count_between,
    first_run,
    next_after,
    plan_due,
    preview,
    retry_at,
    validate_spec,
)

NOW = datetime(2027, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)


def at(hour: int, minute: int = 0, second: int = 0, day: int = 1) -> datetime:
    return datetime(2027, 1, day, hour, minute, second, tzinfo=UTC)


def hourly_cron(zone: str = "UTC") -> ScheduleSpec:
    return validate_spec(
        schedule_type="cron", cron="0 * * * *", timezone=zone, now=NOW, min_interval_secs=60
    )


def hourly_interval() -> ScheduleSpec:
    return validate_spec(
        schedule_type="interval", interval_secs=3600, now=NOW, min_interval_secs=60
    )


def test_interval_cadence_stays_anchored_across_a_late_run() -> None:
    spec = hourly_interval()
    # Due at 10:00, started at 10:40: the next run is still 11:00, not 11:40.
    plan = plan_due(spec, at(10), at(10, 40), "run_once")
    assert plan == DuePlan(at(10), 0, False, at(11))
    assert next_after(spec, at(10)) == at(11)


@pytest.mark.parametrize("spec", [hourly_cron(), hourly_interval()], ids=["cron", "interval"])
def test_run_once_after_a_three_hour_outage_runs_one_occurrence_for_the_missed_ones(
    spec: ScheduleSpec,
) -> None:
    plan = plan_due(spec, at(1), at(4, 0, 30), "run_once")
    assert plan == DuePlan(scheduled_for=at(4), missed_count=3, skip=False, next_run_at=at(5))


@pytest.mark.parametrize("spec", [hourly_cron(), hourly_interval()], ids=["cron", "interval"])
def test_skip_after_an_outage_records_one_skip_and_moves_to_the_future(spec: ScheduleSpec) -> None:
    plan = plan_due(spec, at(1), at(4, 0, 30), "skip")
    assert plan == DuePlan(scheduled_for=at(4), missed_count=3, skip=True, next_run_at=at(5))
    assert plan.next_run_at > at(4, 0, 30)


@pytest.mark.parametrize("misfire", ["run_once", "skip"])
def test_an_occurrence_on_time_just_runs(misfire: str) -> None:
    plan = plan_due(hourly_cron(), at(1), at(1, 0, 2), misfire)
    assert plan == DuePlan(at(1), 0, False, at(2))


def test_a_once_job_still_runs_late_even_under_skip() -> None:
    spec = validate_spec(schedule_type="once", run_at=at(9), now=NOW, min_interval_secs=60)
    plan = plan_due(spec, at(9), at(9, day=20), "skip")
    assert plan == DuePlan(at(9), 0, False, None)
    assert next_after(spec, at(9)) is None


def test_a_missed_count_respects_daylight_saving() -> None:
    spec = hourly_cron("America/New_York")
    # Fall back 2027-11-07: 00:00 EDT (04:00Z) to 03:00 EST (08:00Z) is five hourly runs.
    start = datetime(2027, 11, 7, 4, tzinfo=UTC)
    plan = plan_due(spec, start, datetime(2027, 11, 7, 8, 1, tzinfo=UTC), "run_once")
    assert plan.scheduled_for == datetime(2027, 11, 7, 8, tzinfo=UTC)
    assert plan.missed_count == 4


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Australia/Lord_Howe"])
def test_a_year_long_outage_of_a_minute_cron_is_counted_without_looping(
    zone: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = validate_spec(
        schedule_type="cron", cron="* * * * *", timezone=zone, now=NOW, min_interval_secs=60
    )
    steps = {"n": 0}
    real_next_after = timing.next_after

    def counted(*args: object, **kwargs: object) -> object:
        steps["n"] += 1
        return real_next_after(*args, **kwargs)

    monkeypatch.setattr(timing, "next_after", counted)
    plan = plan_due(
        spec, datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, 0, 0, 30, tzinfo=UTC), "skip"
    )
    # Work is bounded: a few thousand steps at most, not one per missed minute (525,600).
    assert 0 < steps["n"] < 10_000
    # Real time: a year of minutes whatever the zone (the spring gap and autumn repeat cancel).
    assert plan == DuePlan(
        datetime(2027, 1, 1, tzinfo=UTC), 365 * 1440, True, datetime(2027, 1, 1, 0, 1, tzinfo=UTC)
    )


def test_a_long_outage_of_a_wall_clock_cron_counts_each_day_once() -> None:
    spec = validate_spec(
        schedule_type="cron",
        cron="30 2 * * *",
        timezone="America/New_York",
        now=NOW,
        min_interval_secs=60,
    )
    first = next_after(spec, datetime(2026, 1, 1, tzinfo=UTC))
    assert first is not None
    plan = plan_due(spec, first, datetime(2027, 12, 31, 12, tzinfo=UTC), "run_once")
    assert plan.missed_count == 2 * 365 - 1
    assert count_between(spec, first, plan.scheduled_for) == plan.missed_count


def test_a_long_interval_outage_is_counted_arithmetically() -> None:
    spec = validate_spec(schedule_type="interval", interval_secs=60, now=NOW, min_interval_secs=60)
    plan = plan_due(spec, at(0), at(0) + timedelta(days=3650, seconds=30), "run_once")
    assert plan.missed_count == 3650 * 1440
    assert plan.scheduled_for == at(0) + timedelta(days=3650)


def test_count_between_agrees_with_stepping_through_occurrences() -> None:
    spec = validate_spec(
        schedule_type="cron",
        cron="*/20 0-3 * * *",
        timezone="Europe/London",
        now=NOW,
        min_interval_secs=60,
    )
    start = next_after(spec, datetime(2027, 3, 20, tzinfo=UTC))
    end = datetime(2027, 11, 5, tzinfo=UTC)
    assert start is not None
    stepped, when = 0, start
    while when < end:
        stepped += 1
        when = next_after(spec, when)  # type: ignore[assignment]
    assert count_between(spec, start, end) == stepped


class FixedRandom:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def retry(attempt: int, value: float, next_occurrence: datetime | None = None) -> datetime | None:
    return retry_at(
        attempt=attempt,
        failed_at=NOW,
        next_occurrence=next_occurrence,
        base_secs=10,
        max_secs=3600,
        rng=FixedRandom(value),
    )


def test_retries_back_off_exponentially_with_jitter_in_the_upper_half() -> None:
    assert retry(1, 0.0) == NOW + timedelta(seconds=5)
    assert retry(1, 1.0) == NOW + timedelta(seconds=10)
    assert retry(2, 1.0) == NOW + timedelta(seconds=20)
    assert retry(3, 0.5) == NOW + timedelta(seconds=30)


def test_the_backoff_is_capped() -> None:
    assert retry(30, 1.0) == NOW + timedelta(seconds=3600)
    assert retry(10_000, 1.0) == NOW + timedelta(seconds=3600)


def test_a_retry_at_or_past_the_next_occurrence_is_given_up() -> None:
    assert retry(1, 1.0, next_occurrence=NOW + timedelta(seconds=10)) is None
    assert retry(1, 1.0, next_occurrence=NOW + timedelta(seconds=9)) is None
    assert retry(1, 1.0, next_occurrence=NOW + timedelta(seconds=11)) == NOW + timedelta(seconds=10)


def test_jitter_spreads_retries() -> None:
    rng = random.Random(4)
    delays = {
        retry_at(
            attempt=3, failed_at=NOW, next_occurrence=None, base_secs=10, max_secs=3600, rng=rng
        )
        for _ in range(20)
    }
    assert len(delays) > 10
    assert all(NOW + timedelta(seconds=20) <= d <= NOW + timedelta(seconds=40) for d in delays)  # type: ignore[operator]


def test_preview_of_an_interval_keeps_its_cadence() -> None:
    spec = validate_spec(
        schedule_type="interval",
        interval_secs=3600,
        run_at=at(10),
        timezone="Asia/Kathmandu",
        now=NOW,
        min_interval_secs=60,
    )
    rows = preview(spec, 2, at(12, 30))
    assert [utc for _, utc in rows] == [at(13), at(14)]
    assert rows[0][0].isoformat() == "2027-01-01T18:45:00+05:45"
    assert [utc for _, utc in preview(spec, 3, NOW, start=at(10))] == [at(10), at(11), at(12)]
    assert preview(spec, 0, NOW) == []


def test_preview_of_a_once_schedule_shows_it_until_it_passes() -> None:
    spec = validate_spec(schedule_type="once", run_at=at(10), now=NOW, min_interval_secs=60)
    assert [utc for _, utc in preview(spec, 5, NOW)] == [at(10)]
    assert preview(spec, 5, at(11)) == []


def test_re_enabling_an_interval_whose_start_has_passed_keeps_its_cadence() -> None:
    spec = ScheduleSpec("interval", at(10), 3600, "", "UTC")
    assert first_run(spec, at(12, 30)) == at(13)
    assert first_run(spec, at(13)) == at(14)
    assert first_run(spec, at(9)) == at(10)
