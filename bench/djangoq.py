"""django-q2 on the same database, for comparison: task throughput and schedule lag.

    python -m bench.djangoq DATABASE_URL
Tasks: JOBS no-op tasks queued through the ORM broker, then one `qcluster` (2 workers, the
project's Q_CLUSTER) runs them; executions per second from the first start to the last stop.
Schedules: STEADY once schedules due evenly over 15 s starting 10 s after the cluster; lag is
the task's own start time minus the schedule's due time. Prints one JSON line.
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

from bench.scenario import CONFIG, ROOT, STARTUP_SECS, STEADY_JOBS, STEADY_SPREAD_SECS, setup
from bench.throughput import JOBS


def noop() -> str:
    return "ok"


def lag(due_epoch: float) -> float:
    return time.time() - due_epoch


def _cluster(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "manage.py", "qcluster"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait(count: int, timeout: float) -> None:
    from django_q.models import Success

    deadline = time.monotonic() + timeout
    while Success.objects.count() < count and time.monotonic() < deadline:
        time.sleep(0.5)


def _reset() -> None:
    from django_q.models import OrmQ, Schedule, Task

    OrmQ.objects.all().delete()
    Task.objects.all().delete()
    Schedule.objects.all().delete()


def tasks(env: dict[str, str]) -> float:
    from django.db.models import Max, Min
    from django_q.models import Success
    from django_q.tasks import async_task

    _reset()
    for _ in range(JOBS):
        async_task("bench.djangoq.noop")
    proc = _cluster(env)
    try:
        _wait(JOBS, 600)
    finally:
        _stop(proc)
    span = Success.objects.aggregate(first=Min("started"), last=Max("stopped"))
    done = Success.objects.count()
    return round(done / (span["last"] - span["first"]).total_seconds(), 1)


def schedules(env: dict[str, str]) -> list[float]:
    from django.utils import timezone
    from django_q.models import Schedule, Success

    _reset()
    first = timezone.now() + timedelta(seconds=STARTUP_SECS)
    for i in range(STEADY_JOBS):
        due = first + timedelta(seconds=STEADY_SPREAD_SECS * i / STEADY_JOBS)
        Schedule.objects.create(
            func="bench.djangoq.lag",
            args=repr((due.timestamp(),)),
            schedule_type=Schedule.ONCE,
            next_run=due,
        )
    proc = _cluster(env)
    try:
        _wait(STEADY_JOBS, STARTUP_SECS + STEADY_SPREAD_SECS + 120)
    finally:
        _stop(proc)
    return [float(result) for result in Success.objects.values_list("result", flat=True)]


def main() -> None:
    url = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "picobot.toml"
        config.write_text(CONFIG)
        setup(url, str(config))
        env = {
            **os.environ,
            "PICOBOT_LOG_LEVEL": "WARNING",
            "DJANGO_SETTINGS_MODULE": "bench.djangoq_settings",
        }
        per_sec = tasks(env)
        lags = sorted(schedules(env))
        _reset()
    p99 = lags[min(len(lags) - 1, round(0.99 * (len(lags) - 1)))] if lags else float("nan")
    row = {
        "execs_per_sec": per_sec,
        "lag_p50_ms": round(statistics.median(lags) * 1000) if lags else None,
        "lag_p99_ms": round(p99 * 1000),
        "scheduled": len(lags),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
