"""One benchmark scenario in its own process (Django configured for one database).

    python -m bench.scenario DATABASE_URL WORKERS
prints one JSON line: the lag from due to start (p50/p99) for jobs that come due over time,
and the queries per second of an idle worker. Throughput is `bench.throughput`'s.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
USERS = 20
STEADY_JOBS = 150
STEADY_SPREAD_SECS = 15.0
# The steady jobs come due this long after the workers start, so the lag measures a running
# scheduler, not how long a Python process takes to import Django (seconds on a busy machine).
STARTUP_SECS = 10.0
CONFIG = """[scheduler]
enabled = true
tick_secs = 1
lease_secs = 60
max_concurrent = 16
max_concurrent_per_user = 16
max_runs_per_window = 1000000
"""


def setup(url: str, config_path: str) -> None:
    os.environ["DATABASE_URL"] = url
    os.environ["PICOBOT_CONFIG"] = config_path
    os.environ["DJANGO_SETTINGS_MODULE"] = "picobot_site.settings"
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def reset() -> list[Any]:
    from kernel.models import User
    from schedules.models import Execution, Job

    Execution.objects.all().delete()
    Job.objects.all().delete()
    User.objects.filter(username__startswith="bench-").delete()
    return [User.objects.create(username=f"bench-{i}") for i in range(USERS)]


def add_jobs(users: list[Any], count: int, first_due: Any, spread_secs: float) -> None:
    from schedules.models import Job

    Job.objects.bulk_create(
        Job(
            owner=users[i % len(users)],
            name=f"bench {i}",
            prompt="p",
            schedule_type="once",
            run_at=first_due,
            next_run_at=first_due + timedelta(seconds=spread_secs * i / count),
        )
        for i in range(count)
    )


def run_workers(env: dict[str, str], workers: int, expected: int, timeout: float) -> None:
    from schedules.models import Execution, ExecutionStatus

    concurrency = str(max(1, 16 // workers))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "manage.py",
                "runworker",
                "--concurrency",
                concurrency,
                "--worker-id",
                f"bench{i}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(workers)
    ]
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            done = Execution.objects.exclude(status=ExecutionStatus.RUNNING).count()
            if done >= expected:
                break
            time.sleep(0.5)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=60)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    index = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[index]


def main() -> None:
    url, workers = sys.argv[1], int(sys.argv[2])
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "picobot.toml"
        config.write_text(CONFIG)
        setup(url, str(config))
        from kernel.testing.model_server import ScriptedModelServer
        from schedules.dbtime import db_now
        from schedules.models import Execution

        server = ScriptedModelServer(default={"content": "ok"}).start()
        env = {
            **os.environ,
            "PICOBOT_MODEL_BASE_URL": server.base_url,
            "PICOBOT_MODEL": "bench-model",
            "PICOBOT_LOG_LEVEL": "WARNING",
        }
        # Steady: jobs come due over time; how late does each start?
        users = reset()
        first_due = db_now() + timedelta(seconds=STARTUP_SECS)
        add_jobs(users, STEADY_JOBS, first_due, STEADY_SPREAD_SECS)
        run_workers(env, workers, STEADY_JOBS, 600)
        lags = [
            (started - scheduled).total_seconds()
            for started, scheduled in Execution.objects.values_list("started_at", "scheduled_for")
        ]
        # Idle: jobs exist but none is due for an hour; how often does a worker ask?
        users = reset()
        add_jobs(users, STEADY_JOBS, db_now() + timedelta(hours=1), 0)
        idle = subprocess.run(
            [sys.executable, "-m", "bench.idle", url, str(config)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        idle_qps = json.loads(idle.stdout.strip().splitlines()[-1])["idle_queries_per_sec"]
        server.stop()
        reset()
    print(
        json.dumps(
            {
                "workers": workers,
                "steady_jobs": len(lags),
                "lag_p50_ms": round(statistics.median(lags) * 1000),
                "lag_p99_ms": round(percentile(lags, 0.99) * 1000),
                "idle_queries_per_sec": idle_qps,
            }
        )
    )


if __name__ == "__main__":
    main()
