"""Helpers shared by the tests/test_api_schedules_*.py files."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from schedules import claims
from schedules.dbtime import db_now
from schedules.models import Job

URL = "/api/v1/schedules"


def detail(job_id: int) -> str:
    return f"{URL}/{job_id}"


def cron_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "morning digest",
        "prompt": "Summarise my inbox.",
        "schedule_type": "cron",
        "cron": "0 9 * * *",
        "timezone": "Europe/London",
    }
    body.update(overrides)
    return body


def interval_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": "Check the build.",
        "schedule_type": "interval",
        "interval_secs": 3600,
    }
    body.update(overrides)
    return body


def once_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": "Remind me.",
        "schedule_type": "once",
        "run_at": (db_now() + timedelta(hours=2)).isoformat(),
    }
    body.update(overrides)
    return body


def start_run(job_id: int, worker: str = "w-test") -> claims.Claim:
    """Make the job due and claim it as a worker would: it now has a running execution."""
    Job.objects.filter(pk=job_id).update(next_run_at=db_now() - timedelta(seconds=1))
    result = claims.claim_due(worker, 10)
    [claim] = [c for c in result.claims if c.job_id == job_id]
    return claim
