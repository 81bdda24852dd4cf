"""The schedules list at scale: `GET /api/v1/schedules?limit=100` with 10k / 100k / 1M jobs.

    python -m bench.listing DATABASE_URL SIZE [SIZE ...]
The caller owns 200 live jobs (cron, interval and once, in several zones) and 50 deleted ones,
spread evenly through the table; everyone else's jobs fill it up to SIZE. Prints one JSON line
per size: the median latency of the first page and of the page at offset 100, the time of it
spent in SQL, and the plan of the page query.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OWN_LIVE = 200
OWN_DELETED = 50
REQUESTS = 15


def setup(url: str, config: str) -> None:
    os.environ.update(
        DATABASE_URL=url,
        DJANGO_SETTINGS_MODULE="picobot_site.settings",
        PICOBOT_LOG_LEVEL="WARNING",
        PICOBOT_CONFIG=config,
        ALLOWED_HOSTS="testserver",
    )
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def _copy_rows(template_id: int, count: int, owner_id: int, deleted: bool) -> None:
    """`count` copies of the template job for `owner_id`, by one INSERT ... SELECT."""
    from django.db import connection

    from schedules.models import Job

    columns = [f.column for f in Job._meta.concrete_fields if f.column not in ("id",)]
    chosen = [
        "%s" if c == "owner_id" else ("%s" if c == "deleted_at" else c)
        for c in columns  # owner and deletion stamp are bound, the rest copied
    ]
    table = Job._meta.db_table
    if connection.vendor == "postgresql":
        series = "generate_series(1, %s)"
    else:
        series = "(WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < %s) SELECT n FROM s)"
    sql = (
        f"INSERT INTO {table} ({', '.join(columns)}) "  # noqa: S608 (names from the model)
        f"SELECT {', '.join(chosen)} FROM {table}, {series} AS g WHERE {table}.id = %s"
    )
    params: list[Any] = []
    for c in columns:
        if c == "owner_id":
            params.append(owner_id)
        elif c == "deleted_at":
            params.append(connection.ops.adapt_datetimefield_value(_now()) if deleted else None)
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, count, template_id])


def _now() -> Any:
    from django.utils import timezone

    return timezone.now()


def populate(size: int) -> str:
    """Fill the tables; returns the caller's API key."""
    from kernel.models import ApiKey, User
    from schedules.models import Execution, Job

    Execution.objects.all().delete()
    Job.objects.all().delete()
    User.objects.filter(username__startswith="list-").delete()
    caller = User.objects.create(username="list-caller", grant=["schedule:*"])
    others = User.objects.create(username="list-others")
    kinds = [
        {"schedule_type": "cron", "cron": "*/5 9-17 * * 1-5", "timezone": "Europe/Paris"},
        {"schedule_type": "interval", "interval_secs": 3600, "timezone": "UTC"},
        {"schedule_type": "once", "run_at": _now(), "timezone": "America/New_York"},
    ]
    templates = [
        Job.objects.create(owner=caller, name=f"t{i}", prompt="p" * 200, next_run_at=_now(), **k)
        for i, k in enumerate(kinds)
    ]
    rest = max(0, size - OWN_LIVE - OWN_DELETED)
    chunks = OWN_LIVE + OWN_DELETED
    for i in range(chunks):
        _copy_rows(templates[0].id, rest // chunks, others.id, deleted=False)
        template = templates[i % len(templates)]
        _copy_rows(template.id, 1, caller.id, deleted=i >= OWN_LIVE)
    for template in templates:
        template.delete()
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    return ApiKey.issue(caller)[1]


def measure(secret: str, path: str) -> tuple[float, float]:
    """Median wall ms of the request, and of its SQL."""
    from django.db import connection
    from django.test import Client

    client = Client(HTTP_AUTHORIZATION=f"Bearer {secret}")
    sql_secs = [0.0]

    def timed(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            sql_secs[0] += time.perf_counter() - started

    totals, sqls = [], []
    with connection.execute_wrapper(timed):
        for _ in range(REQUESTS):
            sql_secs[0] = 0.0
            started = time.perf_counter()
            response = client.get(path)
            totals.append(time.perf_counter() - started)
            sqls.append(sql_secs[0])
            assert response.status_code == 200, response.content[:300]
    return statistics.median(totals) * 1000, statistics.median(sqls) * 1000


def plan() -> str:
    from kernel.models import User
    from schedules import lifecycle

    caller = User.objects.get(username="list-caller")
    query = lifecycle.jobs_of(caller).order_by("-id")[:100]
    return query.explain()


def main() -> None:
    url, sizes = sys.argv[1], [int(s) for s in sys.argv[2:]]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "picobot.toml"
        config.write_text("[scheduler]\nenabled = true\n")
        setup(url, str(config))
        for size in sizes:
            report(size)


def report(size: int) -> None:
    secret = populate(size)
    first_ms, first_sql_ms = measure(secret, "/api/v1/schedules?limit=100")
    second_ms, _ = measure(secret, "/api/v1/schedules?limit=100&offset=100")
    row = {
        "jobs": size,
        "list_ms": round(first_ms, 1),
        "list_sql_ms": round(first_sql_ms, 1),
        "list_offset_100_ms": round(second_ms, 1),
        "plan": plan(),
    }
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
