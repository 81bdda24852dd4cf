"""The floor: what the database itself allows, on the project's own tables and indexes.

    python -m bench.floor DATABASE_URL BATCH
is started by `bench.throughput` (one or four processes) once due jobs are in place. Each uses
the bare driver (psycopg or sqlite3, no Django) and loops over two transactions until nothing
is due:

1. take the claim lock, claim up to BATCH due jobs (token, worker, lease, the clock read in
   SQL) and insert their `running` executions (ON CONFLICT DO NOTHING), commit;
2. finish them all, fenced on id and token: the executions `succeeded`, the jobs released,
   counted and (once jobs) disabled, commit.

That is the work one run needs from the database with nothing else in the way (no model, no
Python per run beyond the loop). Each process prints one JSON line: runs and CPU seconds.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

LOCK_KEY = 0x7069636F
LEASE_SECS = 60

PG_CLAIM = """
WITH claimed AS (
    UPDATE schedules_job SET claim_token = gen_random_uuid(), claimed_by = %(worker)s,
        claimed_at = clock_timestamp(), lease_expires_at = clock_timestamp() + interval '60 s'
    WHERE id IN (
        SELECT id FROM schedules_job
        WHERE enabled AND deleted_at IS NULL AND claim_token IS NULL
          AND next_run_at <= clock_timestamp()
        ORDER BY next_run_at, id LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
    RETURNING id, claim_token, claimed_at, next_run_at, schedule_version, prompt, capabilities
)
INSERT INTO schedules_execution (job_id, scheduled_for, attempt, status, started_at, worker_id,
    claim_token, schedule_version, prompt, capabilities, output, error, prompt_tokens,
    completion_tokens, missed_count)
SELECT id, next_run_at, 1, 'running', claimed_at, %(worker)s, claim_token, schedule_version,
    prompt, capabilities, '', '', 0, 0, 0 FROM claimed
ON CONFLICT (job_id, scheduled_for, attempt) DO NOTHING
RETURNING id, job_id, claim_token
"""
PG_FINISH_EXECUTIONS = """
UPDATE schedules_execution e SET status = 'succeeded', finished_at = clock_timestamp(),
    output = 'ok', prompt_tokens = 10, completion_tokens = 5
FROM unnest(%s::bigint[], %s::uuid[]) AS v(id, token)
WHERE e.id = v.id AND e.claim_token = v.token AND e.status = 'running'
RETURNING e.id
"""
PG_FINISH_JOBS = """
UPDATE schedules_job j SET claim_token = NULL, claimed_by = '', claimed_at = NULL,
    lease_expires_at = NULL, last_run_at = j.claimed_at, execution_count = j.execution_count + 1,
    next_run_at = NULL, enabled = false
FROM unnest(%s::bigint[], %s::uuid[]) AS v(id, token)
WHERE j.id = v.id AND j.claim_token = v.token
"""


def postgres_loop(url: str, worker: str, batch: int) -> int:
    import psycopg

    runs = 0
    with psycopg.connect(url, prepare_threshold=0) as conn:
        while True:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [LOCK_KEY])
                rows = conn.execute(PG_CLAIM, {"worker": worker, "batch": batch}).fetchall()
            if not rows:
                return runs
            ids, jobs, tokens = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
            with conn.transaction():
                done = conn.execute(PG_FINISH_EXECUTIONS, [ids, tokens]).fetchall()
                conn.execute(PG_FINISH_JOBS, [jobs, tokens])
            runs += len(done)


def _sqlite_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def sqlite_loop(path: str, worker: str, batch: int) -> int:
    import sqlite3

    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    runs = 0
    while True:
        rows = _sqlite_claim(conn, worker, batch)
        if not rows:
            return runs
        now = _sqlite_time(datetime.now(UTC))
        conn.execute("BEGIN IMMEDIATE")
        marks = ", ".join(["(?, ?)"] * len(rows))
        flat = [value for row in rows for value in row[:2]]
        done = conn.execute(
            "UPDATE schedules_execution AS e SET status = 'succeeded', finished_at = ?, "  # noqa: S608 (placeholders only)
            "output = 'ok', prompt_tokens = 10, completion_tokens = 5 "
            f"FROM (VALUES {marks}) AS v WHERE e.id = v.column1 AND e.claim_token = v.column2 "
            "AND e.status = 'running' RETURNING id",
            [now, *flat],
        ).fetchall()
        flat = [value for row in rows for value in (row[2], row[1])]
        conn.execute(
            "UPDATE schedules_job AS j SET claim_token = NULL, claimed_by = '', "  # noqa: S608 (placeholders only)
            "claimed_at = NULL, lease_expires_at = NULL, last_run_at = j.claimed_at, "
            "execution_count = j.execution_count + 1, next_run_at = NULL, enabled = 0 "
            f"FROM (VALUES {marks}) AS v WHERE j.id = v.column1 AND j.claim_token = v.column2",
            flat,
        )
        conn.execute("COMMIT")
        runs += len(done)


def _sqlite_claim(conn: Any, worker: str, batch: int) -> list[tuple[Any, ...]]:
    conn.execute("BEGIN IMMEDIATE")
    now = datetime.now(UTC)
    stamp, lease = _sqlite_time(now), _sqlite_time(now + timedelta(seconds=LEASE_SECS))
    claimed = conn.execute(
        "UPDATE schedules_job SET claim_token = lower(hex(randomblob(16))), claimed_by = ?, "
        "claimed_at = ?, lease_expires_at = ? WHERE id IN (SELECT id FROM schedules_job "
        "WHERE enabled AND deleted_at IS NULL AND claim_token IS NULL AND next_run_at <= ? "
        "ORDER BY next_run_at, id LIMIT ?) "
        "RETURNING id, claim_token, next_run_at, schedule_version, prompt, capabilities",
        [worker, stamp, lease, stamp, batch],
    ).fetchall()
    rows: list[tuple[Any, ...]] = []
    if claimed:
        marks = ", ".join(
            ["(?, ?, 1, 'running', ?, ?, ?, ?, ?, ?, '', '', 0, 0, 0)"] * len(claimed)
        )
        params = [
            v
            for job_id, token, due, version, prompt, caps in claimed
            for v in (job_id, due, stamp, worker, token, version, prompt, caps)
        ]
        rows = conn.execute(
            "INSERT INTO schedules_execution (job_id, scheduled_for, attempt, status, "  # noqa: S608 (placeholders only)
            "started_at, worker_id, claim_token, schedule_version, prompt, capabilities, output, "
            "error, prompt_tokens, completion_tokens, missed_count) "
            f"VALUES {marks} ON CONFLICT (job_id, scheduled_for, attempt) DO NOTHING "
            "RETURNING id, claim_token, job_id",
            params,
        ).fetchall()
    conn.execute("COMMIT")
    return rows


def main() -> None:
    url, batch = sys.argv[1], int(sys.argv[2])
    worker = f"floor-{uuid.uuid4().hex[:8]}"
    started = time.process_time()
    if url.startswith("sqlite:///"):
        runs = sqlite_loop(url.removeprefix("sqlite:///"), worker, batch)
    else:
        runs = postgres_loop(url, worker, batch)
    print(json.dumps({"runs": runs, "cpu_secs": time.process_time() - started}))


if __name__ == "__main__":
    main()
