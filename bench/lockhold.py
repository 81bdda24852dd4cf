"""How long a claim holds the claim lock, as history and backlog grow.

    python -m bench.lockhold DATABASE_URL [--big]
Two series, each point the median of `REPEATS` claims of 16 runs by one process (nothing else
claiming), with everything a claim took put back between claims so every claim sees the same
tables:

- executions in the rolling window: 0 / 10k / 100k (20 candidate owners with 100 runs each in
  the window, the rest spread over 200 other owners), 2,000 jobs, 200 of them due;
- jobs: 10k / 100k (and 1M with --big, or BENCH_BIG=1), 10k of them due (20 owners), the rest
  due in a day (200 owners).

Due jobs of different owners interleave in due order (spread over one second), as they do in
life. One owner whose backlog is older than everyone else's due jobs is the worst case: the
claim then walks that backlog in the index (see docs/benchmarks.md).

"lock hold" is the round trip that takes the lock, claims and commits (PostgreSQL; the look is
read before it, without the lock): the hold plus one round trip, nothing else claiming (on
SQLite the whole claim, which holds the writer lock);
"claim" is the whole `claim_due` call. Prints one JSON line per point.
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

from bench.listing import _copy_rows
from bench.scenario import setup

REPEATS = 15
CANDIDATES = 20
OTHERS = 200
CONFIG = """[scheduler]
enabled = true
max_concurrent = 16
max_concurrent_per_user = 2
max_runs_per_window = 500
window_secs = 3600
"""


def _users(prefix: str, count: int) -> list[Any]:
    from kernel.models import User

    return [User.objects.create(username=f"{prefix}-{i}") for i in range(count)]


def _reset() -> None:
    from kernel.models import User
    from schedules.models import Execution, Job

    Execution.objects.all().delete()
    Job.objects.all().delete()
    User.objects.filter(username__startswith="lock-").delete()


def _jobs(owners: list[Any], count: int, due_in: timedelta) -> list[int]:
    """`count` interval jobs spread over `owners`, due `due_in` from now; returns one id per owner."""
    from schedules.dbtime import db_now
    from schedules.models import Job

    now = db_now()
    firsts = []
    for i, owner in enumerate(owners):
        share = count // len(owners) + (1 if i < count % len(owners) else 0)
        if share == 0:
            continue
        template = Job.objects.create(
            owner=owner,
            name="lock",
            prompt="p",
            schedule_type="interval",
            interval_secs=3600,
            next_run_at=now + due_in,
        )
        firsts.append(template.pk)
        if share > 1:
            _copy_rows(template.pk, share - 1, owner.pk, deleted=False)
    _shuffle_due_times(now + due_in)
    return firsts


def _shuffle_due_times(due: Any) -> None:
    """Spread the jobs due at `due` over the second before it, so owners' jobs interleave in
    due order as they do in life (copies share one due time, and ids come owner by owner)."""
    from django.db import connection

    from schedules.models import Job

    table = Job._meta.db_table
    if connection.vendor == "postgresql":
        sql = f"UPDATE {table} SET next_run_at = next_run_at - random() * interval '1 s' WHERE next_run_at = %s"  # noqa: S608 (name from the model)
    else:
        sql = (
            f"UPDATE {table} SET next_run_at = strftime('%%Y-%%m-%%d %%H:%%M:%%f', next_run_at, "  # noqa: S608 (name from the model)
            "'-' || ((abs(random()) %% 1000) / 1000.0) || ' seconds') WHERE next_run_at = %s"
        )
    with connection.cursor() as cursor:
        cursor.execute(sql, [connection.ops.adapt_datetimefield_value(due)])


def _history(job_ids: list[int], per_job: int) -> None:
    """`per_job` finished executions of each job, started within the last half hour."""
    from django.db import connection

    from schedules.models import Execution, Job

    table, jobs = Execution._meta.db_table, Job._meta.db_table
    for job_id in job_ids:
        if connection.vendor == "postgresql":
            sql = (
                f"INSERT INTO {table} (job_id, owner_id, scheduled_for, attempt, status, "  # noqa: S608 (names from the model)
                "started_at, finished_at, worker_id, schedule_version, prompt, capabilities, "
                "output, error, prompt_tokens, completion_tokens, missed_count) SELECT j.id, "
                "j.owner_id, now() - g * interval '1 ms', 1, 'succeeded', now() - g * interval '1 ms', now(), "
                "'w', 1, 'p', '[]', 'ok', '', 0, 0, 0 FROM generate_series(1, %s) g, "
                f"{jobs} j WHERE j.id = %s"
            )
        else:
            sql = (
                f"WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < %s) "  # noqa: S608 (names from the model)
                f"INSERT INTO {table} (job_id, owner_id, scheduled_for, attempt, status, "
                "started_at, finished_at, worker_id, schedule_version, prompt, capabilities, "
                "output, error, prompt_tokens, completion_tokens, missed_count) SELECT j.id, "
                "j.owner_id, strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', '-' || (g / 1000.0) || ' seconds'), "
                "1, 'succeeded', strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', '-' || (g / 1000.0) "
                "|| ' seconds'), strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now'), 'w', 1, 'p', '[]', "
                f"'ok', '', 0, 0, 0 FROM s, {jobs} j WHERE j.id = %s"
            )
        params = [per_job, job_id]
        with connection.cursor() as cursor:
            cursor.execute(sql, params)


def _measure() -> dict[str, float]:
    from django.db import connection

    from schedules import claims
    from schedules.models import Execution, Job

    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    trip = claims._in_one_round_trip
    trips: list[float] = []

    def timed(*args: Any) -> Any:
        # The lock, the claim statement and the commit go in one round trip, nothing else
        # claiming: its time is the hold plus one round trip.
        began = time.perf_counter()
        found = trip(*args)
        trips.append(time.perf_counter() - began)
        return found

    claims._in_one_round_trip = timed  # type: ignore[assignment]
    holds, totals = [], []
    try:
        for _ in range(REPEATS):
            started = time.perf_counter()
            result = claims.claim_due("lock-bench", 16)
            ended = time.perf_counter()
            assert len(result.claims) == 16, result
            totals.append(ended - started)
            # SQLite: the whole claim holds the writer lock.
            holds.append(trips.pop() if trips else ended - started)
            ids = [c.execution_id for c in result.claims]
            Execution.objects.filter(id__in=ids).delete()
            Job.objects.filter(id__in=[c.job_id for c in result.claims]).update(**claims.RELEASE)
    finally:
        claims._in_one_round_trip = trip  # type: ignore[assignment]
    return {
        "lock_hold_ms": round(statistics.median(holds) * 1000, 2),
        "claim_ms": round(statistics.median(totals) * 1000, 2),
    }


def history_series() -> None:
    for in_window in (0, 10_000, 100_000):
        _reset()
        candidates, others = _users("lock-c", CANDIDATES), _users("lock-o", OTHERS)
        _jobs(candidates, 200, -timedelta(seconds=1))
        quiet = _jobs(others, 1_800, timedelta(days=1))
        if in_window:
            _history(_jobs(candidates, CANDIDATES, timedelta(days=1)), 100)
            _history(quiet, (in_window - 100 * CANDIDATES) // len(quiet))
        row = {"series": "executions_in_window", "executions": in_window, **_measure()}
        print(json.dumps(row), flush=True)


def backlog_series(big: bool) -> None:
    for jobs in (10_000, 100_000, *((1_000_000,) if big else ())):
        _reset()
        _jobs(_users("lock-c", CANDIDATES), 10_000, -timedelta(seconds=1))
        _jobs(_users("lock-o", OTHERS), jobs - 10_000, timedelta(days=1))
        print(json.dumps({"series": "jobs_10k_due", "jobs": jobs, **_measure()}), flush=True)


def main() -> None:
    url = sys.argv[1]
    big = "--big" in sys.argv or os.environ.get("BENCH_BIG") == "1"
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "picobot.toml"
        config.write_text(CONFIG)
        setup(url, str(config))
        history_series()
        backlog_series(big)
        _reset()


if __name__ == "__main__":
    main()
