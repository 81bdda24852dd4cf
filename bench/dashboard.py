"""The console under a long history: the dashboard, the executions list and a /metrics scrape.

    python -m bench.dashboard DATABASE_URL [EXECUTIONS]
fills an empty database with EXECUTIONS executions (default 100,000) of 1,000 jobs over the
last 7 days (a few hundred due, running or failing), then serves each page through Django's
full request stack (middleware, session, template) as a logged-in operator, and prints one JSON
line: the median and worst of 15 requests per page, in milliseconds, and the queries per page.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

REQUESTS = 15
JOBS = 1000
DAYS = 7
STATUSES = ["succeeded"] * 90 + ["failed"] * 5 + ["timed_out", "lost", "cancelled", "skipped"]


def setup(url: str) -> None:
    config = Path(tempfile.mkdtemp()) / "picobot.toml"
    config.write_text("[scheduler]\nenabled = true\n")
    os.environ.update(
        DATABASE_URL=url,
        PICOBOT_CONFIG=str(config),
        DJANGO_SETTINGS_MODULE="picobot_site.settings",
        PICOBOT_LOG_LEVEL="WARNING",
        ALLOWED_HOSTS="testserver",
    )
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def fill(executions: int) -> None:
    from kernel.models import User
    from schedules.dbtime import db_now
    from schedules.models import Execution, Job

    Execution.objects.all().delete()
    Job.objects.all().delete()
    User.objects.filter(username__startswith="bench").delete()
    users = [User.objects.create(username=f"bench{n}") for n in range(20)]
    now = db_now()
    jobs = Job.objects.bulk_create(
        Job(
            owner=users[n % len(users)],
            name=f"bench {n}",
            prompt="p",
            schedule_type="interval",
            interval_secs=600,
            # A tenth are due (some long overdue), the rest later.
            next_run_at=now + timedelta(seconds=(n - JOBS // 10) * 30),
        )
        for n in range(JOBS)
    )
    span = timedelta(days=DAYS).total_seconds()
    batch: list[Any] = []
    for n in range(executions):
        due = now - timedelta(seconds=span * (n + 1) / executions)
        status = "running" if n < 16 else STATUSES[n % len(STATUSES)]
        started = due + timedelta(milliseconds=5 + n % 400)
        batch.append(
            Execution(
                job=jobs[n % JOBS],
                owner_id=jobs[n % JOBS].owner_id,
                scheduled_for=due,
                started_at=started,
                finished_at=None if status == "running" else started + timedelta(seconds=2),
                status=status,
                worker_id=f"host:{n % 4}",
                output="done",
            )
        )
        if len(batch) == 5000:
            Execution.objects.bulk_create(batch)
            batch = []
    Execution.objects.bulk_create(batch)
    from django.db import connection

    # Fresh statistics, as autovacuum keeps them in life: the bench database has just had
    # hundreds of thousands of rows written and deleted by the other benchmarks.
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")


def measure(client: Any, url: str) -> dict[str, float]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    times = []
    for _ in range(REQUESTS):
        with CaptureQueriesContext(connection) as queries:
            start = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200, (url, response.status_code)
    return {
        "median_ms": round(statistics.median(times), 1),
        "max_ms": round(max(times), 1),
        "queries": len(queries),
    }


def section(databases: list[tuple[str, str]]) -> list[str]:
    """The console's rows of docs/benchmarks.md: each database, in its own process."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    lines = [
        "",
        "### The operator console at 100k executions (`bench/dashboard.py`)",
        "",
        "Each page through Django's whole request stack as a logged-in operator, 1,000 "
        "schedules and 100,000 executions over 7 days; median (worst) of 15 requests, and the "
        "queries per page.",
        "",
        "| database | dashboard ms | executions list ms | schedules list ms | /metrics ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, url in databases:
        out = subprocess.run(
            [sys.executable, "-m", "bench.dashboard", url],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        cells = [
            f"{r[page]['median_ms']} ({r[page]['max_ms']}), {r[page]['queries']} q"
            for page in ("dashboard", "executions", "schedules", "metrics")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    url = sys.argv[1]
    executions = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    setup(url)
    from django.test import Client

    from kernel.models import User

    fill(executions)
    User.objects.filter(username="bench-operator").delete()
    operator = User.objects.create_superuser("bench-operator", password="bench operator password")
    client = Client()
    client.force_login(operator)
    pages = {
        "dashboard": "/admin/dashboard/",
        "executions": "/admin/schedules/execution/",
        "schedules": "/admin/schedules/job/",
        "metrics": "/metrics",
    }
    result: dict[str, Any] = {"rows": executions}
    for name, path in pages.items():
        result[name] = measure(client, path)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
