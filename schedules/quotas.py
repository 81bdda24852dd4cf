"""Per-user quotas, used by the REST API, the `schedule` tool and the claim.

Limits come from `settings.PICOBOT.scheduler`; the system principal (owner of heartbeats) is
exempt. Windows are rolling: [now - window_secs, now], as in the claim (`schedules/claims.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count

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


def _runs_in_window(now: datetime) -> Any:
    # Skipped executions never ran and do not count; soft-deleted jobs' runs still do.
    return Execution.objects.filter(started_at__gte=_window_start(now)).exclude(
        status=ExecutionStatus.SKIPPED
    )


def runs_in_window(owner_id: int, now: datetime) -> int:
    """Executions of the owner's jobs started (claimed) in the rolling window.

    Skipped executions never ran and do not count; soft-deleted jobs' runs still do.
    """
    return _runs_in_window(now).filter(job__owner_id=owner_id).count()


def runs_in_window_by_owner(owner_ids: Iterable[int], now: datetime) -> dict[int, int]:
    """`runs_in_window` for several owners in one query (owners with none are left out)."""
    return dict(
        _runs_in_window(now)
        .filter(job__owner_id__in=set(owner_ids))
        .values("job__owner_id")
        .annotate(n=Count("*"))  # not a column: the count is answered from the index alone
        .values_list("job__owner_id", "n")
    )


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
