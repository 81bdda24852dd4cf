"""The queue's health, as the console's dashboard and the web `/metrics` read it.

`queue_state()` is one SELECT of scalar subqueries, each on an index (the due-job index, the
running-execution index, the workers' last-seen index), stamped with the database's clock: cheap
enough to run on every scrape. The dashboard adds the last hour's lag percentiles and the last
day's executions per hour and status, one query each.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.apps import apps
from django.conf import settings
from django.db import connection
from django.db.models import (
    Count,
    DateTimeField,
    ExpressionWrapper,
    QuerySet,
    Value,
)
from django.db.models.functions import Now, Substr, TruncHour

from schedules.models import FAILURE_STATUSES, Execution, ExecutionStatus, Job, Worker

S = ExecutionStatus
CHART_HOURS = 24


@dataclass(frozen=True)
class QueueState:
    now: datetime
    due: int
    overdue: int
    oldest_overdue: datetime | None
    running: int
    workers_alive: int
    dead_notifications: int | None  # None: the notifications table does not exist

    @property
    def oldest_overdue_secs(self) -> float:
        if self.oldest_overdue is None:
            return 0.0
        return max(0.0, (self.now - self.oldest_overdue).total_seconds())


def _before(secs: float) -> Any:
    """The database's now minus `secs`, inside the query."""
    return ExpressionWrapper(Now() - Value(timedelta(seconds=secs)), output_field=DateTimeField())


def _due_jobs() -> QuerySet[Job]:
    return Job.objects.filter(
        enabled=True, deleted_at__isnull=True, claim_token__isnull=True, next_run_at__lte=Now()
    )


def _overdue_jobs() -> QuerySet[Job]:
    tick = float(settings.PICOBOT.scheduler.tick_secs)
    return _due_jobs().filter(next_run_at__lt=_before(tick))


def _alive_workers() -> QuerySet[Worker]:
    lease = float(settings.PICOBOT.scheduler.lease_secs)
    return Worker.objects.filter(stopped_at__isnull=True, last_seen_at__gte=_before(lease))


def dead_notifications() -> QuerySet[Any] | None:
    """The dead notifications, or None where the notifications table does not exist yet."""
    try:
        model = apps.get_model("notifications", "Notification")
    except LookupError:
        return None
    return model.objects.filter(status="dead")


def _count_sql(queryset: QuerySet[Any]) -> tuple[str, tuple[Any, ...]]:
    sql, params = queryset.order_by().values("pk").query.sql_with_params()
    return f"(SELECT COUNT(*) FROM ({sql}) AS counted)", params  # noqa: S608 (a compiled queryset)


def queue_state() -> QueueState:
    """The queue's numbers now, in one query."""
    parts: list[tuple[str, tuple[Any, ...]]] = [
        (_now_sql(), ()),
        _count_sql(_due_jobs()),
        _count_sql(_overdue_jobs()),
        _first_sql(_overdue_jobs().order_by("next_run_at").values("next_run_at")[:1]),
        _count_sql(Execution.objects.filter(status=S.RUNNING)),
        _count_sql(_alive_workers()),
    ]
    dead = dead_notifications()
    if dead is not None:
        parts.append(_count_sql(dead))
    sql = "SELECT " + ", ".join(part for part, _ in parts)
    params = [p for _, part_params in parts for p in part_params]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    now, due, overdue, oldest, running, alive = row[:6]
    return QueueState(
        now=_utc(now),  # type: ignore[arg-type]
        due=due,
        overdue=overdue,
        oldest_overdue=_utc(oldest),
        running=running,
        workers_alive=alive,
        dead_notifications=row[6] if dead is not None else None,
    )


def _utc(value: datetime | str | None) -> datetime | None:
    # PostgreSQL answers aware datetimes; SQLite answers the UTC text Django stores.
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _first_sql(queryset: QuerySet[Any]) -> tuple[str, tuple[Any, ...]]:
    sql, params = queryset.query.sql_with_params()
    return f"({sql})", params


def _now_sql() -> str:
    if connection.vendor == "postgresql":
        return "clock_timestamp()"
    return "strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now')"


def lag_percentiles(now: datetime, hours: float = 1.0) -> tuple[float | None, float | None]:
    """p50 and p95 of (start - due) of first attempts started in the last `hours`, in seconds."""
    recent = Execution.objects.filter(
        started_at__gte=now - timedelta(hours=hours), attempt=1
    ).exclude(status=S.SKIPPED)
    if connection.vendor == "postgresql":
        sql, params = recent.values("pk").query.sql_with_params()
        table = Execution._meta.db_table
        query = (
            "SELECT percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY "  # noqa: S608 (our own compiled queryset)
            f"EXTRACT(EPOCH FROM started_at - scheduled_for)) FROM {table} "
            f"WHERE id IN ({sql})"
        )
        with connection.cursor() as cursor:
            cursor.execute(query, params)
            (values,) = cursor.fetchone()
        return (values[0], values[1]) if values else (None, None)
    # SQLite: julianday() in SQL, not Django's per-row Python function for a duration.
    sql, params = recent.values("pk").query.sql_with_params()
    query = (
        "SELECT (julianday(started_at) - julianday(scheduled_for)) * 86400.0 AS lag "  # noqa: S608 (our own compiled queryset)
        f"FROM {Execution._meta.db_table} WHERE id IN ({sql}) ORDER BY lag"
    )
    with connection.cursor() as cursor:
        cursor.execute(query, params)
        lags = [row[0] for row in cursor.fetchall()]
    return _percentile(lags, 0.5), _percentile(lags, 0.95)


def _percentile(ordered: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (what PostgreSQL's percentile_cont does)."""
    if not ordered:
        return None
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class HourlyChart:
    """Executions started per hour and status over the last `CHART_HOURS` hours."""

    hours: list[datetime]
    counts: dict[datetime, dict[str, int]] = field(default_factory=dict)

    def total(self, statuses: frozenset[str] | set[str]) -> int:
        return sum(n for by in self.counts.values() for s, n in by.items() if s in statuses)

    @property
    def peak(self) -> int:
        return max((sum(by.values()) for by in self.counts.values()), default=0)


def hourly_chart(now: datetime) -> HourlyChart:
    """One grouped query over the started-at index."""
    end = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    hours = [end - timedelta(hours=h) for h in range(CHART_HOURS - 1, -1, -1)]
    rows = (
        Execution.objects.filter(started_at__gte=hours[0])
        .annotate(hour=_hour_of("started_at"))
        .values("hour", "status")
        .annotate(n=Count("id"))
        .order_by()
    )
    counts: dict[datetime, dict[str, int]] = defaultdict(dict)
    for row in rows:
        counts[_hour_start(row["hour"])][row["status"]] = row["n"]
    return HourlyChart(hours, dict(counts))


def _hour_of(field_name: str) -> Any:
    """The hour a timestamp falls in, computed by the database itself: SQLite keeps UTC text
    ("YYYY-MM-DD HH:MM:SS"), whose first 13 characters are the hour, where Django's TruncHour
    would call a Python function for every row."""
    if connection.vendor == "sqlite":
        return Substr(field_name, 1, 13)
    return TruncHour(field_name)


def _hour_start(value: datetime | str) -> datetime:
    if isinstance(value, str):
        return datetime.strptime(value, "%Y-%m-%d %H").replace(tzinfo=UTC)
    return _utc(value)  # type: ignore[return-value]


FAILURES = frozenset(str(s) for s in FAILURE_STATUSES)
