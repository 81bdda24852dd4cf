"""Per-user quotas, used by the REST API, the `schedule` tool and the claim.

Limits come from `settings.PICOBOT.scheduler`; the system principal (owner of heartbeats) is
exempt. Windows are rolling: [now - window_secs, now], as in the claim (`schedules/claims.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection

from .models import Execution, ExecutionStatus, Job


class QuotaExceeded(Exception):
    """A per-user quota would be exceeded; `quota` names it (the API answers 429)."""

    def __init__(self, quota: str, message: str) -> None:
        super().__init__(message)
        self.quota = quota
        self.message = message


def _limits() -> Any:
    return settings.PICOBOT.scheduler


def _window_start(now: datetime) -> datetime:
    return now - timedelta(seconds=_limits().window_secs)


def jobs_held(owner: Any) -> int:
    """Schedules the owner holds: every job not soft-deleted."""
    return Job.objects.live().filter(owner=owner).count()


def created_in_window(owner: Any, now: datetime) -> int:
    """Schedules created in the rolling window, deleted ones included."""
    return Job.objects.filter(owner=owner, created_at__gte=_window_start(now)).count()


def check_can_create(owner: Any, now: datetime) -> None:
    """Raise QuotaExceeded if `owner` may not create another schedule now."""
    if getattr(owner, "is_system", False):
        return
    limits = _limits()
    if jobs_held(owner) >= limits.max_jobs_per_user:
        raise QuotaExceeded(
            "max_jobs_per_user",
            f"quota max_jobs_per_user exceeded: at most {limits.max_jobs_per_user} schedules "
            "per user; delete one first",
        )
    if created_in_window(owner, now) >= limits.max_created_per_window:
        raise QuotaExceeded(
            "max_created_per_window",
            f"quota max_created_per_window exceeded: at most {limits.max_created_per_window} "
            f"schedules created per {limits.window_secs} s; try again later",
        )


def runs_in_window(owner_id: int, now: datetime) -> int:
    """Executions of the owner's jobs started (claimed) in the rolling window.

    Skipped executions never ran and do not count; soft-deleted jobs' runs still do.
    """
    return runs_in_window_by_owner([owner_id], now).get(owner_id, 0)


def runs_in_window_by_owner(owner_ids: Iterable[int], now: datetime) -> dict[int, int]:
    """`runs_in_window` for several owners in one query (owners with none are left out), each
    counted up to max_runs_per_window: a count that reaches it says all there is to say."""
    owners = sorted(set(owner_ids))
    if not owners:
        return {}
    users = Job._meta.get_field("owner").related_model._meta.db_table
    marks = ", ".join(["%s"] * len(owners))
    sql, params = runs_in_window_sql(
        f"SELECT id AS owner_id FROM {users} WHERE id IN ({marks})",  # noqa: S608 (name from the model, values bound)
        now,
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, *owners])
        return {owner: int(n) for owner, n in cursor.fetchall() if n}


def runs_in_window_sql(
    owners_sql: str, now: datetime | None = None, *, window_start_sql: str | None = None
) -> tuple[str, list[Any]]:
    """The query of `runs_in_window_by_owner`, (owner_id, count) rows, for the owners that
    `owners_sql` selects (a column named owner_id; its parameters go after the ones returned).
    The window starts `window_secs` before `now`, or at `window_start_sql` (an SQL expression,
    for a clock read in the same statement).

    Each owner's count is a range of the (owner, started_at) index, cut off at
    max_runs_per_window entries, so its cost follows neither the owner's history nor their
    number of jobs, nor anyone else's."""
    execution = Execution._meta.db_table
    params: list[Any] = []
    if window_start_sql is None:
        assert now is not None
        window_start_sql = "%s"
        params.append(connection.ops.adapt_datetimefield_value(_window_start(now)))
    sql = (
        "SELECT o.owner_id, (SELECT COUNT(*) FROM (SELECT 1 FROM "  # noqa: S608 (names from the models, values bound)
        f"{execution} e WHERE e.owner_id = o.owner_id AND e.started_at >= {window_start_sql} "
        "AND NOT (e.status = %s) LIMIT %s) counted) "
        f"FROM (SELECT DISTINCT owner_id FROM ({owners_sql}) owners) o"
    )
    return sql, [*params, ExecutionStatus.SKIPPED, _limits().max_runs_per_window]


def can_run(owner_id: int, now: datetime, *, is_system: bool | None = None) -> bool:
    """Whether one more execution of the owner's may start now (checked inside the claim).

    Pass `is_system` when the caller already knows it, to save a query.
    """
    if is_system is None:
        from django.contrib.auth import get_user_model

        is_system = get_user_model().objects.filter(pk=owner_id, is_system=True).exists()
    if is_system:
        return True
    return runs_in_window(owner_id, now) < _limits().max_runs_per_window


def check_can_run(owner_id: int, now: datetime, *, is_system: bool | None = None) -> None:
    """Raise QuotaExceeded("max_runs_per_window") when `can_run` is false."""
    if not can_run(owner_id, now, is_system=is_system):
        limit = _limits()
        raise QuotaExceeded(
            "max_runs_per_window",
            f"quota max_runs_per_window exceeded: at most {limit.max_runs_per_window} "
            f"executions per {limit.window_secs} s",
        )
