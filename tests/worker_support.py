"""Real `manage.py runworker` processes for tests, against the live test database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.db import connection

from schedules.dbtime import db_now
from schedules.models import Job

ROOT = Path(__file__).resolve().parent.parent


def database_url() -> str:
    """The URL of the database this test runs on (the test database, not the default one)."""
    s = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{s['NAME']}"
    auth = s["USER"] or ""
    if s.get("PASSWORD"):
        auth += f":{s['PASSWORD']}"
    host = s.get("HOST") or "127.0.0.1"
    port = s.get("PORT") or 5432
    return f"postgres://{auth}@{host}:{port}/{s['NAME']}"


class Workers:
    """Starts worker processes with a scheduler config of the test's choosing."""

    def __init__(
        self, tmp_path: Path, model_url: str | None, *, sections: str = "", **scheduler: Any
    ) -> None:
        """`sections`: more of the config file as TOML text (for example a [heartbeats] table)."""
        self.tmp_path = tmp_path
        values = {"enabled": True, "tick_secs": 0.2, "lease_secs": 3, **scheduler}
        lines = ["[scheduler]"] + [f"{k} = {_toml(v)}" for k, v in values.items()]
        self.config = tmp_path / "picobot.worker.toml"
        self.config.write_text("\n".join(lines) + "\n" + sections)
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "PICOBOT_TEST_CONFIG": str(self.config),
            "DATABASE_URL": database_url(),
            "PICOBOT_LOG_LEVEL": "INFO",
        }
        for name in ("PICOBOT_MODEL_BASE_URL", "PICOBOT_MODEL", "PICOBOT_MODEL_API_KEY"):
            self.env.pop(name, None)
        if model_url:
            self.env["PICOBOT_MODEL_BASE_URL"] = model_url
            self.env["PICOBOT_MODEL"] = "scripted-model"
            self.env["PICOBOT_MODEL_API_KEY"] = "test-model-key"
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, worker_id: str = "w1") -> subprocess.Popen[bytes]:
        log = open(self.tmp_path / f"worker-{worker_id}-{len(self.processes)}.log", "wb")
        process = subprocess.Popen(
            [sys.executable, "manage.py", "runworker", "--worker-id", worker_id, *args],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        return process

    def run_once(self, *args: str, worker_id: str = "once", timeout: float = 60) -> int:
        process = self.start("--once", *args, worker_id=worker_id)
        return process.wait(timeout=timeout)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.tmp_path.glob("*.log")))

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.wait(timeout=10)
        # Captured by pytest and shown only when the test fails: what the workers saw.
        for path in sorted(self.tmp_path.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()
            print(f"--- {path.name} (last {min(len(lines), 200)} of {len(lines)} lines) ---")
            print("\n".join(lines[-200:]))


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def wait_until(predicate: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def sleep_pids(seconds: str, parent_pid: int | None = None) -> list[int]:
    """Live `sleep <seconds>` processes (a worker's shell tool subprocesses), only those that
    descend from `parent_pid` when given (the shell tool's sandbox launcher stands between the
    worker and the program). Another test run on the same machine may be sleeping too: callers
    match on their worker's pid, or on an argument unique to their run."""
    listing = subprocess.run(
        ["ps", "-eo", "pid=,ppid=,stat=,args="], capture_output=True, text=True, check=True
    ).stdout
    parents: dict[int, int] = {}
    candidates: list[int] = []
    for line in listing.splitlines():
        fields = line.split(None, 3)
        if len(fields) < 4:
            continue
        pid, ppid, stat, args = fields
        parents[int(pid)] = int(ppid)
        argv = args.split()
        if stat.startswith("Z") or argv[1:] != [seconds] or "sleep" not in argv[0]:
            continue
        candidates.append(int(pid))
    return [pid for pid in candidates if parent_pid is None or _descends(pid, parent_pid, parents)]


def _descends(pid: int, ancestor: int, parents: dict[int, int]) -> bool:
    seen: set[int] = set()
    while pid in parents and pid not in seen:
        seen.add(pid)
        pid = parents[pid]
        if pid == ancestor:
            return True
    return False


def sleep_child(parent_pid: int, seconds: str) -> int | None:
    """The pid of a live `sleep <seconds>` started (through the launcher) by `parent_pid`."""
    return next(iter(sleep_pids(seconds, parent_pid)), None)


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    found = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True)
    stat = found.stdout.strip()
    return found.returncode == 0 and bool(stat) and not stat.startswith("Z")


def due_job(owner: Any, **fields: Any) -> Job:
    """A job due now (created directly: these tests exercise the worker, not validation)."""
    values: dict[str, Any] = {
        "name": "job",
        "prompt": "say hi",
        "schedule_type": "interval",
        "interval_secs": 3600,
        "next_run_at": db_now() - timedelta(milliseconds=10),
    }
    values.update(fields)
    return Job.objects.create(owner=owner, **values)


def max_overlap(intervals: list[tuple[Any, Any]]) -> int:
    """The largest number of [start, end) intervals open at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    current = peak = 0
    for _, delta in events:  # at equal times an end (-1) sorts before a start (+1)
        current += delta
        peak = max(peak, current)
    return peak
