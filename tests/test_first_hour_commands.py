"""The commands as a new user meets them: Ctrl-C under `make run` drains a run in flight, a
config typo is one line, `runworker --once` says what it ran, and the logs say what happened."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

from schedules.models import Execution, ExecutionStatus
from tests.worker_support import ROOT, due_job, wait_until

S = ExecutionStatus


# --- config mistakes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            "[scheduler]\ntick_sec = 1\n",
            "unknown key scheduler.tick_sec; did you mean `tick_secs`?",
        ),
        ("[shceduler]\n", "unknown section [shceduler]; did you mean `scheduler`?"),
        ("[model]\nmax_turn = 3\n", "unknown key model.max_turn; did you mean `max_turns`?"),
        ("[scheduler]\nlease_secs = '60'\n", "scheduler.lease_secs must be an integer, not str"),
        ("[scheduler]\nzzz = 1\n", "unknown key scheduler.zzz"),
    ],
)
@pytest.mark.parametrize("command", ["check", "runworker", "migrate"])
def test_a_config_mistake_is_one_line_naming_the_file_and_key_and_exits_2(
    tmp_path: Path, toml: str, expected: str, command: str
) -> None:
    config = tmp_path / "picobot.toml"
    config.write_text(toml)
    env = {**os.environ, "PICOBOT_CONFIG": str(config), "DJANGO_SETTINGS_MODULE": ""}
    env.pop("DJANGO_SETTINGS_MODULE")
    done = subprocess.run(
        [sys.executable, "manage.py", command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == f"Configuration error: {config}: {expected}\n"


# --- runworker --once says what it ran -----------------------------------------------------------


def run_once() -> str:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    out = io.StringIO()
    try:
        call_command("runworker", "--once", "--worker-id", "once", stdout=out)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return out.getvalue()


@pytest.mark.django_db(transaction=True)
def test_runworker_once_says_nothing_was_due(picobot_config) -> None:
    picobot_config("scheduler", enabled=True, tick_secs=0.1)
    assert run_once().strip() == "nothing due"


@pytest.mark.django_db(transaction=True)
def test_runworker_once_says_what_it_ran_and_how_each_ended(
    picobot_config, make_user, model_server
) -> None:
    picobot_config("scheduler", enabled=True, tick_secs=0.1, max_concurrent=1)
    model_server.add({"content": "fine"}, {"status": 400}, {"content": "fine too"})
    owner = make_user()
    for name in ("a", "b", "c"):
        due_job(owner, name=name)
    assert run_once().strip() == "ran 3 executions: 2 succeeded, 1 failed"


# --- signals -------------------------------------------------------------------------------------


def held_model(model_server: Any) -> threading.Event:
    hold = threading.Event()
    model_server.add({"content": "finished after the stop", "hold": hold})
    return hold


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_sigint_and_sigterm_together_are_one_stop_request(
    tmp_path: Path, make_user, model_server
) -> None:
    """What a terminal plus a supervisor deliver for one Ctrl-C: the run still drains."""
    from tests.worker_support import Workers

    hold = held_model(model_server)
    job = due_job(make_user("carol"))
    group = Workers(tmp_path, model_server.base_url)
    try:
        worker = group.start(worker_id="pair")
        wait_until(lambda: model_server.requests, 60, "the run to reach the model")
        worker.send_signal(signal.SIGINT)
        worker.send_signal(signal.SIGTERM)
        wait_until(lambda: "pair stopping on" in group.logs(), 30, "the drain to start")
        hold.set()
        assert worker.wait(timeout=30) == 0
    finally:
        hold.set()
        group.stop_all()
    assert Execution.objects.get(job=job).status == S.SUCCEEDED
    logs = group.logs()
    # "SIGINT and SIGTERM together" when both arrived before the drain began; either way one stop.
    assert "pair stopping on SIGINT" in logs
    assert f"job={job.pk} execution=" in logs and "user=carol(" in logs
    assert "ended succeeded" in logs and "second stop signal" not in logs


# --- make run: Ctrl-C drains ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, key: str | None = None, body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    data = None
    if body is not None:
        request.add_header("Content-Type", "application/json")
        data = json.dumps(body).encode()
    try:
        with urllib.request.urlopen(request, data=data, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def answers(url: str) -> bool:
    try:
        return http("GET", url)[0] == 200
    except OSError:
        return False


class Launcher:
    """`make run`'s launcher (`python -m picobot_site.local`) on a SQLite file of its own."""

    def __init__(self, tmp_path: Path, model_url: str) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.database = tmp_path / "run.sqlite3"
        config = tmp_path / "picobot.toml"
        config.write_text("[scheduler]\nenabled = true\ntick_secs = 0.2\n")
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "picobot_site.settings",
            "PICOBOT_CONFIG": str(config),
            "DATABASE_URL": f"sqlite:///{self.database}",
            "PICOBOT_ADDRESS": self.address,
            "SECRET_KEY": "launcher-test",
            "PICOBOT_MODEL_BASE_URL": model_url,
            "PICOBOT_MODEL": "scripted-model",
            "PICOBOT_MODEL_API_KEY": "test-model-key",
            "PICOBOT_LOG_LEVEL": "INFO",
        }
        self.log_path = tmp_path / "launcher.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # Its own session and process group, as a terminal gives a foreground job.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "picobot_site.local"],
            cwd=ROOT,
            env=self.env,
            stdout=open(self.log_path, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(lambda: answers(f"http://{self.address}/api/v1/"), 90, "make run to serve")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api_key(self) -> str:
        done = subprocess.run(
            [
                sys.executable,
                "manage.py",
                "createapikey",
                "alice",
                "--create-user",
                "--grant",
                "schedule:*",
            ],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return done.stdout.strip().splitlines()[-1]

    def statuses(self) -> list[str]:
        with sqlite3.connect(self.database) as db:
            return [row[0] for row in db.execute("SELECT status FROM schedules_execution")]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.mark.slow
def test_ctrl_c_under_make_run_drains_a_run_in_flight(tmp_path: Path, model_server) -> None:
    hold = held_model(model_server)
    launcher = Launcher(tmp_path, model_server.base_url)
    try:
        launcher.start()
        key = launcher.api_key()
        base = f"http://{launcher.address}/api/v1"
        bad, _ = http("POST", f"{base}/schedules", key, {"prompt": "x", "schedule_type": "daily"})
        assert bad == 400
        run_at = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
        status, job = http(
            "POST",
            f"{base}/schedules",
            key,
            {"prompt": "hi", "schedule_type": "once", "run_at": run_at},
        )
        assert status == 201, job
        wait_until(lambda: model_server.requests, 60, "the run to reach the model")
        assert launcher.statuses() == [S.RUNNING]
        os.killpg(launcher.process.pid, signal.SIGINT)  # what Ctrl-C does: the whole group
        wait_until(lambda: "stopping on SIGTERM" in launcher.log(), 30, "the worker to drain")
        time.sleep(0.5)
        hold.set()
        assert launcher.process.wait(timeout=60) == 0
    finally:
        hold.set()
        launcher.stop()
    assert launcher.statuses() == [S.SUCCEEDED]
    log = launcher.log()
    assert f"job={job['id']} execution=" in log and "ended succeeded" in log
    assert "second stop signal" not in log and "Traceback" not in log
    # One line per event: the 400 appears once (the server's line), and no HTTP-client chatter.
    assert len(re.findall(r"POST /api/v1/schedules HTTP/1.1\" 400", log)) == 1
    assert "Bad Request" not in log and "HTTP Request:" not in log


# --- logs ----------------------------------------------------------------------------------------


def test_a_503_is_logged_as_a_warning_and_a_4xx_not_by_the_request_logger(caplog) -> None:
    import logging

    request_logger = logging.getLogger("django.request")
    with caplog.at_level(logging.DEBUG):
        request_logger.error("Service Unavailable: /api/v1/chat", extra={"status_code": 503})
        request_logger.warning("Bad Request: /api/v1/schedules", extra={"status_code": 400})
        request_logger.error("Internal Server Error: /x", extra={"status_code": 500})
    levels = {record.getMessage().split(":")[0]: record.levelname for record in caplog.records}
    assert levels["Service Unavailable"] == "WARNING"
    assert levels["Internal Server Error"] == "ERROR"
    assert "Bad Request" not in levels  # the server's access line already shows it


def test_make_run_shows_the_system_checks_once() -> None:
    from picobot_site import local

    # `migrate` shows them; every child skips them (W001 appeared four times before).
    for command in local.worker_commands().values():
        assert "--skip-checks" in command
