"""`/metrics` on the web app and on `runworker --metrics-port`: the token, the queue gauges, and
labels that never carry an id."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from prometheus_client.parser import text_string_to_metric_families

from kernel.models import User
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Worker
from tests.worker_support import Workers, due_job, wait_until

S = ExecutionStatus
TOKEN = "a-metrics-token-for-tests"
ID_LABEL_NAMES = re.compile(r"^(id|pk|job|user|execution|contact|session|worker|owner)(_id)?$|_id$")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
# Label names whose values may be numbers: histogram buckets, quantiles, HTTP status codes.
NUMERIC_LABELS = {"le", "quantile", "status", "code", "generation"}
# Python's own version numbers are not ids.
SKIPPED_FAMILIES = {"python_info"}


def id_like_labels(exposition: str) -> list[str]:
    """Every (series, label) of the exposition whose label could identify a row."""
    found = []
    for family in text_string_to_metric_families(exposition):
        if family.name in SKIPPED_FAMILIES:
            continue
        for sample in family.samples:
            for name, value in sample.labels.items():
                numeric = value.isdigit() and not (name in NUMERIC_LABELS and len(value) <= 3)
                if ID_LABEL_NAMES.search(name) or UUID.search(value) or numeric:
                    found.append(f"{sample.name}{{{name}={value!r}}}")
                elif re.search(r"/\d+(/|$)", value):
                    found.append(f"{sample.name}{{{name}={value!r}}} (a path with an id)")
    return found


def test_the_label_checker_catches_ids() -> None:
    bad = (
        "# TYPE x counter\n"
        'x_total{job_id="4"} 1\n'
        'x_total{status="12345"} 1\n'
        'x_total{view="/admin/schedules/job/7/change/"} 1\n'
        'x_total{token="0b6f6b8e-2f38-4c8e-9d53-7a4f8a7d7c11"} 1\n'
    )
    assert len(id_like_labels(bad)) == 4
    assert id_like_labels('# TYPE y counter\ny_total{status="200",method="GET"} 1\n') == []


@pytest.mark.django_db
def test_metrics_is_open_without_a_token_and_reads_the_queue_in_one_query(
    client, settings, make_user, picobot_config
) -> None:
    settings.PICOBOT_METRICS_TOKEN = ""
    picobot_config("scheduler", tick_secs=30)
    owner = make_user()
    due_job(owner, next_run_at=db_now() - timedelta(minutes=5))
    due_job(owner, next_run_at=db_now() - timedelta(milliseconds=1))
    due_job(owner, next_run_at=db_now() + timedelta(hours=1))
    running = due_job(owner, next_run_at=db_now() + timedelta(hours=1))
    Execution.objects.create(job=running, scheduled_for=db_now(), started_at=db_now())
    with CaptureQueriesContext(connection) as queries:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert len(queries) == 1
    samples = {
        s.name: s.value
        for f in text_string_to_metric_families(response.content.decode())
        for s in f.samples
    }
    assert samples["picobot_queue_due_jobs"] == 2
    assert samples["picobot_queue_overdue_jobs"] == 1  # due more than tick_secs ago
    assert 290 < samples["picobot_queue_oldest_overdue_seconds"] < 400
    assert samples["picobot_queue_running_executions"] == 1
    assert samples["picobot_queue_workers_alive"] == 0
    assert "django_http_requests_total_by_method_total" in samples


@pytest.mark.django_db
@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x"]
)
def test_with_a_token_set_a_scrape_without_it_is_refused(client, settings, header) -> None:
    settings.PICOBOT_METRICS_TOKEN = TOKEN
    extra = {} if header is None else {"HTTP_AUTHORIZATION": header}
    response = client.get("/metrics", **extra)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert b"picobot" not in response.content


@pytest.mark.django_db
def test_with_a_token_set_a_scrape_with_it_is_answered(client, settings) -> None:
    settings.PICOBOT_METRICS_TOKEN = TOKEN
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    assert b"picobot_queue_due_jobs" in response.content


@pytest.mark.django_db
def test_no_web_metric_carries_an_id_after_requests_to_pages_with_ids(
    client, settings, make_user
) -> None:
    settings.PICOBOT_METRICS_TOKEN = ""
    User.objects.create_superuser("operator", password="a long operator password")
    client.login(username="operator", password="a long operator password")
    job = due_job(make_user())
    for url in (f"/admin/schedules/job/{job.pk}/change/", "/admin/kernel/user/1/change/"):
        client.get(url)
    client.get("/api/v1/schedules/12345")
    exposition = client.get("/metrics").content.decode()
    assert "picobot_queue_due_jobs" in exposition
    assert id_like_labels(exposition) == []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_runworker_metrics_port_serves_the_worker_metrics_without_ids(
    tmp_path: Path, model_server: Any, make_user
) -> None:
    model_server.add(
        {"tool_calls": [{"name": "shell", "arguments": {"command": "ls", "args": []}}]},
        {"content": "listed"},
    )
    owner = make_user(grant=["shell:ls"])
    job = due_job(owner, capabilities=["shell:echo"])
    port = free_port()
    workers = Workers(tmp_path, model_server.base_url)
    try:
        workers.start("--metrics-port", str(port), worker_id="metrics-w")
        wait_until(lambda: Execution.objects.filter(job=job, status=S.SUCCEEDED).exists(), 60)
        wait_until(lambda: Worker.objects.filter(worker_id="metrics-w").exists(), 60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            exposition = answer.read().decode()
    finally:
        workers.stop_all()
        print(workers.logs())
    assert 'picobot_executions_total{schedule_type="interval",status="succeeded"} 1.0' in exposition
    assert 'picobot_tool_calls_total{decision="denied",tool="shell"} 1.0' in exposition
    assert "picobot_claims_total 1.0" in exposition
    assert "picobot_execution_lag_seconds_bucket" in exposition
    assert id_like_labels(exposition) == []


@pytest.mark.django_db
def test_in_multiprocess_mode_metrics_reports_the_other_processes_counters(
    client, settings, tmp_path, monkeypatch
) -> None:
    """qcluster's processes write to PROMETHEUS_MULTIPROC_DIR; the web /metrics reads it all."""
    settings.PICOBOT_METRICS_TOKEN = ""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    task = (
        "from prometheus_client import Counter\n"
        "Counter('picobot_test_deliveries', 'x', ['channel']).labels('webhook').inc(3)\n"
    )
    for _ in range(2):  # two processes, as qcluster's workers are
        subprocess.run([sys.executable, "-c", task], check=True, env=dict(os.environ))
    exposition = client.get("/metrics").content.decode()
    assert 'picobot_test_deliveries_total{channel="webhook"} 6.0' in exposition
    assert "picobot_queue_due_jobs" in exposition
    assert id_like_labels(exposition) == []
