"""A client generated from the served schema (openapi-python-client) calls the live API.

This is what a user of another language does first: if the schema has vague types, shared
descriptions or odd names, the generated code shows it (and fails to type-check the answers)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from kernel.models import ApiKey

pytestmark = pytest.mark.django_db(transaction=True)

PACKAGE = "picobot_client"


@pytest.fixture
def generated(live_server, tmp_path: Path) -> Iterator[ModuleType]:
    with urllib.request.urlopen(f"{live_server.url}/api/v1/schema") as response:
        (tmp_path / "schema.yaml").write_bytes(response.read())
    (tmp_path / "config.yaml").write_text(f"post_hooks: []\npackage_name_override: {PACKAGE}\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "openapi_python_client",
            "generate",
            "--path",
            "schema.yaml",
            "--config",
            "config.yaml",
            "--meta",
            "none",
            "--output-path",
            PACKAGE,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Clean generation: no warning about a schema construct it could not read.
    assert "Warning" not in result.stdout + result.stderr, result.stdout + result.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def load(name: str) -> ModuleType:
    return importlib.import_module(f"{PACKAGE}.{name}")


def test_a_generated_client_creates_lists_reads_and_gets_typed_errors(
    generated, live_server, make_user
) -> None:
    user = make_user("alice", grant=["schedule:*"])
    _, key = ApiKey.issue(user)
    client = generated.AuthenticatedClient(base_url=live_server.url, token=key)
    models = load("models")
    create = load("api.schedules.create_schedule")
    get = load("api.schedules.get_schedule")
    listing = load("api.schedules.list_schedules")
    cancel = load("api.schedules.cancel_schedule_execution")
    executions = load("api.executions.list_executions")

    body = models.ScheduleInput(
        prompt="Summarise my inbox.",
        schedule_type=models.ScheduleTypeEnum.CRON,
        cron="0 9 * * *",
        timezone="Europe/London",
    )
    created = create.sync(client=client, body=body)
    assert isinstance(created, models.Schedule), created
    assert isinstance(created.id, int) and created.cron_description

    shown = get.sync(client=client, id=created.id)
    assert isinstance(shown, models.Schedule) and shown.name == created.name
    assert len(shown.next_runs) == 5

    page = listing.sync(client=client, enabled=True, schedule_type=models.ScheduleTypeEnum.CRON)
    assert isinstance(page, models.PaginatedScheduleList)
    assert [job.id for job in page.results] == [created.id]

    nothing = cancel.sync(client=client, id=created.id)
    assert isinstance(nothing, models.Error) and "No execution" in nothing.detail

    bad = create.sync(
        client=client,
        body=models.ScheduleInput(
            prompt="x",
            schedule_type=models.ScheduleTypeEnum.INTERVAL,
            interval_secs=3600,
            timezone="EST",
        ),
    )
    assert isinstance(bad, models.FieldErrors), bad
    assert "America/New_York" in bad.additional_properties["timezone"][0]

    runs = executions.sync(client=client, status="failed")
    assert isinstance(runs, models.PaginatedExecutionList) and runs.count == 0
