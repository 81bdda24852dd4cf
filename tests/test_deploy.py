"""The production path: gunicorn with DEBUG off, `check --deploy`, and the systemd units."""

from __future__ import annotations

import configparser
import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from schedules.worker import CANCEL_SETTLE_SECS
from tests.worker_support import ROOT, database_url

DEPLOY = ROOT / "deploy"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return (
                answer.status,
                answer.headers.get("Content-Type", ""),
                answer.read().decode(errors="replace"),
            )
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode(errors="replace")


def production_env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "picobot_site.settings",
        "PICOBOT_CONFIG": str(ROOT / "tests" / "picobot.test.toml"),
        "DATABASE_URL": database_url(),
        "DEBUG": "false",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
    }
    env.update(extra)
    return env


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_gunicorn_with_debug_off_serves_the_admin_login_and_the_api_docs_with_their_assets(
    tmp_path: Path,
) -> None:
    port = free_port()
    log = open(tmp_path / "gunicorn.log", "wb")
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "gunicorn", "picobot_site.wsgi:application"),
            *("--bind", f"127.0.0.1:{port}", "--workers", "1"),
        ],
        cwd=ROOT,
        env=production_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, _, page = get(f"{base}/admin/login/")
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "gunicorn.log").read_text()
                assert time.monotonic() < deadline, "gunicorn did not answer"
                time.sleep(0.2)
        assert status == 200 and "PicoBot" in page
        stylesheets = re.findall(r'<link rel="stylesheet" href="([^"]+)"', page)
        assert any("admin/css/base" in href for href in stylesheets), stylesheets
        for href in stylesheets:
            status, content_type, css = get(base + href)
            assert status == 200 and content_type.startswith("text/css"), href
            assert len(css) > 100
        status, content_type, _ = get(f"{base}/static/picobot/console.css")
        assert status == 200 and content_type.startswith("text/css")
        status, _, schema = get(f"{base}/api/v1/schema")
        assert status == 200 and "openapi" in schema
        # The API docs page and every asset it loads come from our own static files (no CDN).
        status, _, docs = get(f"{base}/api/v1/docs")
        assert status == 200
        assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css|png))"', docs)
        assert any("swagger-ui" in asset for asset in assets), assets
        for asset in assets:
            assert asset.startswith("/static/"), asset
            assert get(base + asset)[0] == 200, asset
        assert get(f"{base}/static/nothing-here.css")[0] == 404
    finally:
        server.terminate()
        server.wait(timeout=30)


def env_file_values() -> dict[str, str]:
    values = {}
    for line in (DEPLOY / "picobot.env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


@pytest.mark.django_db(transaction=True)
def test_check_deploy_is_clean_with_the_documented_settings() -> None:
    documented = env_file_values()
    env = production_env(
        **{k: v for k, v in documented.items() if k.startswith(("PICOBOT_", "ALLOWED", "DEBUG"))}
    )
    env.update(
        PICOBOT_CONFIG=str(ROOT / "tests" / "picobot.test.toml"),
        SECRET_KEY=secrets.token_urlsafe(50),
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    output = result.stdout + result.stderr
    # Every check is silent: security, picobot and the API schema's own (drf-spectacular).
    assert not re.findall(r"\((\w+\.[WE]\d+)\)", output), output
    assert result.returncode == 0, output


def test_check_deploy_without_those_settings_warns() -> None:
    env = production_env(DEBUG="true", SECRET_KEY="short")
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "security.W018" in result.stderr + result.stdout


def unit(name: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / name)
    return parser["Service"]


def test_the_worker_units_stop_timeout_covers_the_drain() -> None:
    service = unit("picobot-worker.service")
    argv = shlex.split(service["ExecStart"])
    assert argv[1:3] == ["manage.py", "runworker"]
    grace = float(argv[argv.index("--grace-secs") + 1])
    # The drain, then the settle of cancelled runs, then a margin for the process to exit.
    assert grace + CANCEL_SETTLE_SECS + 5 <= float(service["TimeoutStopSec"])
    assert service["KillSignal"] == "SIGTERM"


@pytest.mark.parametrize(
    "name", ["picobot-web.service", "picobot-worker.service", "picobot-qcluster.service"]
)
def test_every_unit_runs_the_project_as_an_unprivileged_user_with_the_env_file(name) -> None:
    service = unit(name)
    assert service["User"] == "picobot"
    assert service["EnvironmentFile"] == "/etc/picobot/picobot.env"
    assert service["Restart"] == "on-failure"
    command = shlex.split(service["ExecStart"])[1:]
    if name == "picobot-web.service":
        assert command[0] == "picobot_site.wsgi:application"
    else:
        assert command[0] == "manage.py" and command[1] in ("runworker", "qcluster")
