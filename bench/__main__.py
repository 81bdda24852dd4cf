"""`make bench`: the worker against the database's floor, lag, idle load, lock hold and the list.

Every measurement runs in its own process against its own database (SQLite in a temporary
directory; PostgreSQL database $PICOBOT_BENCH_DATABASE, default picobot_bench, on
$PICOBOT_BENCH_POSTGRES). Throughput runs are interleaved (floor, worker without model, worker
with the scripted model; 1 and 4 processes; both databases) and repeated BENCH_REPEATS times
(default 3); the medians are written to docs/benchmarks.md with each as a ratio to the floor.
BENCH_BIG=1 adds the 1M-job points of the lock-hold and list series (several minutes more).
Also permission checks with hostile patterns (`bench.permissions`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import dashboard, permissions

ROOT = Path(__file__).resolve().parent.parent
NOTES_HEADING = "## Notes"
POSTGRES_SERVER = os.environ.get("PICOBOT_BENCH_POSTGRES", "postgres://postgres@127.0.0.1:5432")
POSTGRES_DATABASE = os.environ.get("PICOBOT_BENCH_DATABASE", "picobot_bench")
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
BIG = os.environ.get("BENCH_BIG") == "1"
MODES = [("floor", 1), ("floor", 4), ("nomodel", 1), ("nomodel", 4), ("scripted", 1)]
MODES += [("scripted", 4)]


def postgres_url() -> str | None:
    try:
        import psycopg

        with psycopg.connect(
            f"{POSTGRES_SERVER}/postgres", autocommit=True, connect_timeout=3
        ) as c:
            if not c.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", [POSTGRES_DATABASE]
            ).fetchone():
                c.execute(f'CREATE DATABASE "{POSTGRES_DATABASE}"')
    except Exception as exc:
        print(f"PostgreSQL unreachable ({exc}); benchmarking SQLite only", file=sys.stderr)
        return None
    return f"{POSTGRES_SERVER}/{POSTGRES_DATABASE}"


def run(module: str, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PICOBOT_LOG_LEVEL": "WARNING"},
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


THROUGHPUT_KEYS = ("execs_per_sec", "cpu_ms_per_run", "statements_per_run", "commits_per_run")
THROUGHPUT_KEYS += ("runs_per_claim", "look_ms_per_claim", "locked_trip_ms_per_claim")


def throughput(databases: list[tuple[str, str]]) -> dict[tuple[str, str, int], dict[str, float]]:
    samples: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for repeat in range(REPEATS):
        for name, url in databases:
            for mode, processes in MODES:
                [row] = run("bench.throughput", url, mode, str(processes))
                print(repeat, name, row, flush=True)
                samples[(name, mode, processes)].append(row)
    return {
        point: {key: statistics.median(r.get(key, 0) for r in rows) for key in THROUGHPUT_KEYS}
        for point, rows in samples.items()
    }


def throughput_table(medians: dict[tuple[str, str, int], dict[str, float]]) -> list[str]:
    lines = [
        "| database | what | processes | execs/s | of the floor | CPU ms/run | statements/run "
        "| commits/run | runs/claim | look / lock+claim+commit trip (ms per claim) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    labels = {"floor": "bare-SQL floor", "nomodel": "worker, no model", "scripted": "worker, "}
    labels["scripted"] += "scripted model"
    for (name, mode, processes), m in medians.items():
        floor = medians.get((name, "floor", processes), {}).get("execs_per_sec") or float("nan")
        lines.append(
            f"| {name} | {labels[mode]} | {processes} | {m['execs_per_sec']:.0f} "
            f"| {100 * m['execs_per_sec'] / floor:.1f} % | {m['cpu_ms_per_run']:.2f} "
            f"| {m['statements_per_run']:.2f} | {m['commits_per_run']:.2f} "
            + (
                "| — | — |"
                if mode == "floor"
                else f"| {m['runs_per_claim']:.1f} | {m['look_ms_per_claim']:.1f} / "
                f"{m['locked_trip_ms_per_claim']:.1f} |"
            )
        )
    return lines


def series(databases: list[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for name, url in databases:
        for workers in (1, 4):
            [r] = run("bench.scenario", url, str(workers))
            out["lag"].append(
                f"| {name} | {workers} | {r['lag_p50_ms']} | {r['lag_p99_ms']} "
                f"| {r['idle_queries_per_sec']} |"
            )
        for r in run("bench.lockhold", url, *(["--big"] if BIG else [])):
            size = r.get("executions", r.get("jobs"))
            out["lock"].append(
                f"| {name} | {r['series']} | {size:,} | {r['lock_hold_ms']} | {r['claim_ms']} |"
            )
        sizes = ["10000", "100000", *(["1000000"] if BIG else [])]
        for r in run("bench.listing", url, *sizes):
            out["list"].append(
                f"| {name} | {r['jobs']:,} | {r['list_ms']} | {r['list_sql_ms']} "
                f"| {r['list_offset_100_ms']} |"
            )
        [n] = run("bench.notifications", url)
        out["notify"].append(
            f"| {name} | {n['sent_per_sec']} | {n['latency_p50_ms']} | {n['latency_p99_ms']} |"
        )
        if name == "PostgreSQL":
            [q] = run("bench.djangoq", url)
            out["djangoq"].append(
                f"| django-q2 (ORM broker, 2 workers) | {q['execs_per_sec']} | {q['lag_p50_ms']} "
                f"| {q['lag_p99_ms']} |"
            )
        print(name, dict(out), flush=True)
    return out


def document(
    medians: dict[Any, dict[str, float]], rest: dict[str, list[str]], console: list[str], loads: str
) -> None:
    lines = [
        "# Benchmarks",
        "",
        f"Measured with `make bench` on {datetime.now(UTC):%Y-%m-%d}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; load average {loads} "
        f"(start / end, 1-minute figures). Medians of {REPEATS} interleaved runs.",
        "",
        f"Throughput: {os.environ.get('BENCH_BURST_JOBS', '800')} once jobs of 20 users, all due "
        "at once; executions per second from the first start to the last finish (database "
        "clock); 16 execution slots in total, `max_concurrent = 16`. CPU, statements and "
        "commits per run are counted inside the processes (`bench/worker.py`, `bench/floor.py`); "
        "a statement run outside a transaction counts as a commit.",
        "",
        *throughput_table(medians),
        "",
        "Lag from due to start (150 once jobs due evenly over 15 s, 10 s after start) and idle "
        "statements per second (`bench/scenario.py`, `bench/idle.py`), scripted model:",
        "",
        "| database | workers | lag p50 (ms) | lag p99 (ms) | idle q/s |",
        "| --- | ---: | ---: | ---: | ---: |",
        *rest["lag"],
        "",
        "django-q2 on the same PostgreSQL (`bench/djangoq.py`: the same burst as no-op tasks; "
        "150 once schedules for the lag):",
        "",
        "| system | execs/s | lag p50 (ms) | lag p99 (ms) |",
        "| --- | ---: | ---: | ---: |",
        *rest["djangoq"],
        "",
        "Claim lock hold and claim latency, one claim of 16 runs (`bench/lockhold.py`):",
        "",
        "| database | series | size | lock hold (ms) | claim (ms) |",
        "| --- | --- | ---: | ---: | ---: |",
        *rest["lock"],
        "",
        "`GET /api/v1/schedules?limit=100` (`bench/listing.py`; the caller owns 200 live jobs):",
        "",
        "| database | jobs | list (ms) | of it SQL (ms) | offset 100 (ms) |",
        "| --- | ---: | ---: | ---: | ---: |",
        *rest["list"],
        "",
        "Notifications (`bench/notifications.py`): one `qcluster` (2 workers, ORM broker) "
        "delivering WhatsApp messages to the local fake Twilio. **sent/s**: 400 rows queued at "
        "once, first to last `sent`. **latency**: 100 rows written one at a time (10 a second) "
        "as a completion writes them, from the write to `sent`.",
        "",
        "| database | sent/s | latency p50 (ms) | latency p99 (ms) |",
        "| --- | ---: | ---: | ---: |",
        *rest["notify"],
    ]
    lines += permissions.section()
    lines += console
    doc = ROOT / "docs" / "benchmarks.md"
    # Everything from the notes heading on is written by hand (history, analysis): kept.
    old = doc.read_text() if doc.exists() else ""
    notes = old[old.index(NOTES_HEADING) :] if NOTES_HEADING in old else ""
    doc.write_text("\n".join(lines) + "\n" + ("\n" + notes if notes else ""))
    print("wrote docs/benchmarks.md")


def main() -> None:
    start_load = load()
    with tempfile.TemporaryDirectory() as tmp:
        databases = [("SQLite", f"sqlite:///{tmp}/picobot_bench.sqlite3")]
        pg = postgres_url()
        if pg:
            databases.append(("PostgreSQL", pg))
        medians = throughput(databases)
        rest = series(databases)
        console = dashboard.section(databases)
    document(medians, rest, console, f"{start_load} → {load()}")


if __name__ == "__main__":
    main()
