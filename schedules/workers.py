"""The workers registry: each `runworker` reports itself so the console can show who is alive.

A worker writes its row when it starts, then again with each lease renewal round (every third
of `lease_secs`, from the monitor thread, never from the claim loop), and marks it stopped when
it exits: one statement each time, an upsert on `worker_id`, stamped with the database's clock.
A worker counts as alive while its last report is less than one lease old.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection

from schedules.dbtime import db_now
from schedules.models import Worker

FORGET_AFTER = timedelta(days=7)


def _now_sql() -> str:
    # The database's clock, as `claims.agenda` reads it.
    if connection.vendor == "postgresql":
        return "clock_timestamp()"
    return "strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now')"


def report(worker_id: str, concurrency: int, slots_busy: int, *, starting: bool = False) -> None:
    """Upsert this worker's row (one statement); `starting` also resets its start time."""
    table = Worker._meta.db_table
    now = _now_sql()
    restart = ", started_at = excluded.started_at" if starting else ""
    sql = (
        f"INSERT INTO {table} (worker_id, host, pid, concurrency, slots_busy, started_at, "  # noqa: S608 (only our own table and clock expression)
        f"last_seen_at, stopped_at) VALUES (%s, %s, %s, %s, %s, {now}, {now}, NULL) "
        f"ON CONFLICT (worker_id) DO UPDATE SET host = excluded.host, pid = excluded.pid, "
        f"concurrency = excluded.concurrency, slots_busy = excluded.slots_busy, "
        f"last_seen_at = excluded.last_seen_at, stopped_at = NULL{restart}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [worker_id, socket.gethostname(), os.getpid(), concurrency, slots_busy])


def stopped(worker_id: str) -> None:
    """Mark the worker stopped (a clean exit), and forget workers not seen for a week."""
    now = db_now()
    Worker.objects.filter(worker_id=worker_id).update(stopped_at=now, slots_busy=0)
    Worker.objects.filter(last_seen_at__lt=now - FORGET_AFTER).delete()


def alive(now: datetime | None = None) -> list[Worker]:
    """Workers seen within a lease of `now` (default: the database's now), most recent first."""
    lease = timedelta(seconds=settings.PICOBOT.scheduler.lease_secs)
    since = (now or db_now()) - lease
    return list(
        Worker.objects.filter(stopped_at__isnull=True, last_seen_at__gte=since).order_by(
            "-last_seen_at"
        )
    )
