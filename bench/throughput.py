"""One throughput measurement in its own process: a burst of due once jobs, run to the end.

    python -m bench.throughput DATABASE_URL MODE PROCESSES
MODE is `floor` (bench/floor.py: bare SQL, batches of 16), `nomodel` (the worker with the agent
loop replaced by an instant answer) or `scripted` (the worker against the scripted model
server). Workers get 16 execution slots in total (`--concurrency 16`, or 4 each for four), with
`max_concurrent = 16`. The jobs notify nobody unless BENCH_NOTIFY=1. The workers are started first and the jobs made due once they have
registered and are idle, so start-up is not measured. Prints one JSON line: executions per second (first start to last
finish, database clock), and for workers CPU ms, statements and commits per run, counted in
their processes (bench/worker.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.scenario import CONFIG, ROOT, add_jobs, reset, setup

JOBS = int(os.environ.get("BENCH_BURST_JOBS", "800"))
FLOOR_BATCH = 16
# Settling time once the workers have registered.
WORKER_START_SECS = float(os.environ.get("BENCH_WORKER_START_SECS", "2"))
# BENCH_NOTIFY=1: the jobs keep the default notify_on, so each run also writes a (console)
# notification and queues its delivery task.
NOTIFY = os.environ.get("BENCH_NOTIFY") == "1"
# BENCH_SLOTS_PER_WORKER=N: N slots per worker instead of 16 in all (`max_concurrent = 16`
# still caps the runs at once).
SLOTS_PER_WORKER = int(os.environ.get("BENCH_SLOTS_PER_WORKER", "0"))
# BENCH_WORKER_LOGS=DIR: the workers' logs go to DIR/workerN.log (by default, nowhere).
LOGS = os.environ.get("BENCH_WORKER_LOGS", "")


def _span(expected: int, timeout: float) -> tuple[int, float]:
    from django.db.models import Max, Min

    from schedules.models import Execution, ExecutionStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Execution.objects.exclude(status=ExecutionStatus.RUNNING).count() >= expected:
            break
        time.sleep(0.2)
    done = Execution.objects.exclude(status=ExecutionStatus.RUNNING)
    agg = done.aggregate(first=Min("started_at"), last=Max("finished_at"))
    return done.count(), (agg["last"] - agg["first"]).total_seconds()


def floor(url: str, processes: int) -> dict[str, Any]:
    from schedules.dbtime import db_now

    add_jobs(reset(), JOBS, db_now() - timedelta(seconds=1), 0)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.floor", url, str(FLOOR_BATCH)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    outs = [json.loads(proc.communicate(timeout=600)[0].strip().splitlines()[-1]) for proc in procs]
    runs, span = _span(JOBS, 60)
    cpu = sum(o["cpu_secs"] for o in outs)
    statements = (4 * -(-runs // FLOOR_BATCH)) / runs  # lock, claim+insert, 2 finish updates
    return {
        "execs_per_sec": round(runs / span, 1),
        "cpu_ms_per_run": round(cpu * 1000 / runs, 3),
        "statements_per_run": round(statements, 3),
        "commits_per_run": round(2 / FLOOR_BATCH, 3),
    }


def workers(url: str, mode: str, processes: int, env: dict[str, str]) -> dict[str, Any]:
    from schedules.dbtime import db_now
    from schedules.models import Job

    add_jobs(reset(), JOBS, db_now() + timedelta(hours=1), 0)
    if not NOTIFY:
        # Like the floor, which writes no notification: the scheduler's own cost per run.
        Job.objects.update(notify_on=[])
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        counts = Path(tmp) / "counts.jsonl"
        child_env = {**env, "BENCH_COUNTS_FILE": str(counts)}
        extra = ["--no-model"] if mode == "nomodel" else []
        extra += ["--concurrency", str(SLOTS_PER_WORKER or 16 // processes)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "bench.worker", *extra, "--worker-id", f"bench{i}"],
                cwd=ROOT,
                env=child_env,
                stdout=subprocess.DEVNULL,
                stderr=stack.enter_context(open(Path(LOGS) / f"worker{i}.log", "w"))
                if LOGS
                else subprocess.DEVNULL,
            )
            for i in range(processes)
        ]
        try:
            _started(procs)
            for proc in procs:
                proc.send_signal(signal.SIGUSR2)
            Job.objects.update(next_run_at=db_now() - timedelta(seconds=1))
            _wake()
            runs, span = _span(JOBS, 600)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(timeout=120)
        rows = [json.loads(line) for line in counts.read_text().splitlines()]
    total = {key: sum(r[key] for r in rows) for key in rows[0]}
    claims = max(1, total["claims"])
    return {
        "execs_per_sec": round(runs / span, 1),
        "cpu_ms_per_run": round(total["cpu_secs"] * 1000 / runs, 3),
        "statements_per_run": round(total["statements"] / runs, 2),
        "commits_per_run": round(total["commits"] / runs, 2),
        "runs_per_claim": round(total["claimed"] / claims, 1),
        "runs_per_completion": round(total["completed"] / max(1, total["completions"]), 1),
        "look_ms_per_claim": round(total["look"] * 1000 / claims, 2),
        "locked_trip_ms_per_claim": round(total["locked_trip"] * 1000 / claims, 2),
    }


def _started(procs: list[subprocess.Popen[bytes]]) -> None:
    """Wait until every worker has registered (its first lease round, once its loop runs),
    then WORKER_START_SECS more: on a busy machine start-up takes longer than any fixed wait,
    and would be counted in the CPU per run."""
    from schedules.models import Worker

    pids = {proc.pid for proc in procs}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if any(proc.poll() is not None for proc in procs):
            raise SystemExit(
                "a bench worker exited while starting (BENCH_WORKER_LOGS=DIR shows why)"
            )
        up = set(Worker.objects.filter(pid__in=pids, stopped_at=None).values_list("pid", flat=True))
        if up == pids:
            break
        time.sleep(0.2)
    time.sleep(WORKER_START_SECS)


def _wake() -> None:
    from django.db import transaction

    from schedules.claims import wake_workers

    with transaction.atomic():
        wake_workers()


def main() -> None:
    url, mode, processes = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "picobot.toml"
        config.write_text(CONFIG)
        setup(url, str(config))
        if mode == "floor":
            result = floor(url, processes)
        else:
            from kernel.testing.model_server import ScriptedModelServer

            server = ScriptedModelServer(default={"content": "ok"}).start()
            env = {
                **os.environ,
                "PICOBOT_MODEL_BASE_URL": server.base_url,
                "PICOBOT_MODEL": "bench-model",
                "PICOBOT_LOG_LEVEL": "WARNING",
            }
            try:
                result = workers(url, mode, processes, env)
            finally:
                server.stop()
        reset()
    print(json.dumps({"mode": mode, "processes": processes, "jobs": JOBS, **result}))


if __name__ == "__main__":
    main()
