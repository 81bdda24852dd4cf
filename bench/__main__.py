"""`make bench`: claims per second, lag from due to start and idle load, 1 and 4 workers, both
databases; permission checks with hostile patterns (`bench.permissions`); and the operator
console's pages at 100k executions (`bench.dashboard`).

Each scenario runs in its own process (`bench.scenario`) against its own database
(picobot_bench), and the results are written to docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench import dashboard, permissions

ROOT = Path(__file__).resolve().parent.parent
NOTES_HEADING = "## Notes"
POSTGRES_SERVER = os.environ.get("PICOBOT_BENCH_POSTGRES", "postgres://postgres@127.0.0.1:5432")


def postgres_url() -> str | None:
    try:
        import psycopg

        with psycopg.connect(
            f"{POSTGRES_SERVER}/postgres", autocommit=True, connect_timeout=3
        ) as c:
            if not c.execute(
                "SELECT 1 FROM pg_database WHERE datname = 'picobot_bench'"
            ).fetchone():
                c.execute("CREATE DATABASE picobot_bench")
    except Exception as exc:
        print(f"PostgreSQL unreachable ({exc}); benchmarking SQLite only", file=sys.stderr)
        return None
    return f"{POSTGRES_SERVER}/picobot_bench"


def scenario(url: str, workers: int, module: str = "bench.scenario") -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", module, url, *([str(workers)] if workers else [])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        databases = [("SQLite", f"sqlite:///{tmp}/picobot_bench.sqlite3")]
        pg = postgres_url()
        if pg:
            databases.append(("PostgreSQL", pg))
        rows = []
        notify_rows = []
        for name, url in databases:
            for workers in (1, 4):
                result = scenario(url, workers)
                print(name, result, flush=True)
                rows.append((name, result))
            notify_rows.append((name, scenario(url, 0, module="bench.notifications")))
            print(name, notify_rows[-1][1], flush=True)
        console = dashboard.section(databases)
    lines = [
        "# Benchmarks",
        "",
        "Measured with `make bench` (`.venv/bin/python -m bench`), on "
        f"{datetime.now(UTC):%Y-%m-%d}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}. The model is the scripted local server "
        "answering at once, so these numbers are the scheduler's own overhead.",
        "",
        "- **claims/s**: 600 once jobs of 20 users all due at once; executions started per "
        "second (first to last claim). `max_concurrent = 16`, 16 execution slots in total "
        "(`--concurrency 16` for one worker, 4 each for four).",
        "- **lag**: 150 once jobs coming due evenly over 15 s (well under capacity), the first "
        "10 s after the workers start; started_at minus scheduled_for (database clock), "
        "`tick_secs = 1`.",
        "- **idle q/s**: statements per second one worker (16 slots) sends with nothing due "
        "(150 jobs due in an hour), counted inside its process over 20 s (`bench/idle.py`).",
        "",
        "| database | workers | claims/s | lag p50 (ms) | lag p99 (ms) | idle q/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['workers']} | {r['claims_per_sec']} | {r['lag_p50_ms']} "
            f"| {r['lag_p99_ms']} | {r['idle_queries_per_sec']} |"
        )
    lines += permissions.section()
    lines += [
        "",
        "Notifications (`bench/notifications.py`): one `qcluster` (2 workers, ORM broker) "
        "delivering WhatsApp messages to the local fake Twilio. **sent/s**: 400 rows queued at "
        "once, first to last `sent`. **latency**: 100 rows written one at a time (10 a second) "
        "as a completion writes them, from the write to `sent`.",
        "",
        "| database | sent/s | latency p50 (ms) | latency p99 (ms) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in notify_rows:
        lines.append(
            f"| {name} | {r['sent_per_sec']} | {r['latency_p50_ms']} | {r['latency_p99_ms']} |"
        )
    lines += console
    doc = ROOT / "docs" / "benchmarks.md"
    # Everything from the notes heading on is written by hand (history, analysis): kept.
    old = doc.read_text() if doc.exists() else ""
    notes = old[old.index(NOTES_HEADING) :] if NOTES_HEADING in old else ""
    doc.write_text("\n".join(lines) + "\n" + ("\n" + notes if notes else ""))
    print("wrote docs/benchmarks.md")


if __name__ == "__main__":
    main()
