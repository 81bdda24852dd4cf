"""Logs and traces: PICOBOT_LOG_FORMAT=json lines with the run's ids, and OpenTelemetry spans
exported when OTEL_* asks, from a real `runworker`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any

import pytest

from picobot_site.observability import JsonFormatter, run_ids
from schedules.models import Execution, ExecutionStatus
from tests.worker_support import ROOT, Workers, due_job

S = ExecutionStatus


def record(message: str, *args: Any, **extra: Any) -> logging.LogRecord:
    made = logging.LogRecord("picobot.worker", logging.INFO, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


def test_a_json_line_carries_the_ids_the_message_names() -> None:
    line = JsonFormatter().format(record("claimed job=%s execution=%s user=%s", 5, 7, 3))
    entry = json.loads(line)
    assert (entry["job_id"], entry["execution_id"], entry["user_id"]) == (5, 7, 3)
    assert entry["level"] == "INFO" and entry["logger"] == "picobot.worker"
    assert entry["message"] == "claimed job=5 execution=7 user=3"


def test_a_json_line_inside_a_run_carries_the_runs_ids_and_stays_one_line() -> None:
    with run_ids(job_id=1, execution_id=2, user_id=3):
        line = JsonFormatter().format(record("model said:\n%s", '{"x": "\u2028</script>"}'))
    assert "\n" not in line
    entry = json.loads(line)
    assert (entry["job_id"], entry["execution_id"], entry["user_id"]) == (1, 2, 3)
    assert JsonFormatter().format(record("after the run")).count("job_id") == 0


def test_an_exception_is_inside_the_json_object() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        made = record("failed", job_id=9)
        made.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(made))
    assert entry["job_id"] == 9 and "ValueError: boom" in entry["exception"]


def test_an_unknown_log_format_stops_start_up_naming_the_variable() -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env={**os.environ, "PICOBOT_LOG_FORMAT": "yaml"},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "PICOBOT_LOG_FORMAT" in result.stderr


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_worker_logs_json_and_exports_spans_with_the_runs_ids(
    tmp_path, model_server, make_user
) -> None:
    model_server.add(
        {"tool_calls": [{"name": "shell", "arguments": {"command": "ls", "args": []}}]},
        {"content": "listed"},
    )
    owner = make_user(grant=["shell:ls"])
    job = due_job(owner, capabilities=["shell:echo"])
    workers = Workers(tmp_path, model_server.base_url)
    env = {**workers.env, "PICOBOT_LOG_FORMAT": "json", "OTEL_TRACES_EXPORTER": "console"}
    result = subprocess.run(
        [sys.executable, "manage.py", "runworker", "--once", "--worker-id", "traced"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    execution = Execution.objects.get(job=job)
    assert execution.status == S.SUCCEEDED
    entries = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    about_the_run = [e for e in entries if e.get("execution_id") == execution.pk]
    assert about_the_run, entries
    assert all(e.get("job_id", job.pk) == job.pk for e in about_the_run)
    assert all(e.get("user_id", owner.pk) == owner.pk for e in about_the_run)
    # Lines written while the run executes carry all three ids.
    assert any(e.get("job_id") == job.pk and e.get("user_id") == owner.pk for e in about_the_run)
    spans = result.stdout
    for name in ("picobot.execution", "picobot.agent_turn", "picobot.tool_call"):
        assert f'"name": "{name}"' in spans, name
    assert f'"picobot.execution_id": {execution.pk}' in spans
    assert f'"picobot.job_id": {job.pk}' in spans
