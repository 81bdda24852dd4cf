"""The OpenAPI description of the schedules API is complete and true, and lists stay O(1)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from itertools import count

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, given, settings
from rest_framework.test import APIClient
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kernel.models import ApiKey
from schedules.claims import Outcome, complete
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Job
from tests.api_schedules_support import URL, cron_body, detail, interval_body, start_run

pytestmark = pytest.mark.django_db

ROUTES = {
    "/api/v1/schedules": {"get", "post"},
    "/api/v1/schedules/{id}": {"get", "patch", "delete"},
    "/api/v1/schedules/{id}/executions": {"get"},
    "/api/v1/schedules/{id}/cancel": {"post"},
}
ERRORS = {
    ("/api/v1/schedules", "post"): {"400", "401", "403", "413", "415", "429", "503"},
    ("/api/v1/schedules", "get"): {"401", "403", "429", "503"},
    ("/api/v1/schedules/{id}", "get"): {"401", "403", "404", "429", "503"},
    ("/api/v1/schedules/{id}", "patch"): {"400", "401", "403", "404", "413", "415", "429", "503"},
    ("/api/v1/schedules/{id}", "delete"): {"401", "403", "404", "429", "503"},
    ("/api/v1/schedules/{id}/executions", "get"): {"401", "403", "404", "429", "503"},
    ("/api/v1/schedules/{id}/cancel", "post"): {"401", "403", "404", "409", "429", "503"},
}


def openapi() -> dict:
    response = APIClient().get("/api/v1/schema", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    return response.json()


def test_the_schema_is_public_and_describes_every_route_and_its_errors() -> None:
    paths = openapi()["paths"]
    for path, methods in ROUTES.items():
        assert set(paths[path]) >= methods, path
        for method in methods:
            responses = set(paths[path][method]["responses"])
            assert ERRORS[(path, method)] <= responses, (path, method)


def test_the_schema_describes_exactly_the_design_fields() -> None:
    schemas = openapi()["components"]["schemas"]
    schedule = schemas["Schedule"]["properties"]
    writable = {
        "name", "prompt", "schedule_type", "run_at", "interval_secs", "cron", "timezone",
        "capabilities", "enabled", "max_executions", "timeout_secs", "misfire", "notify_on",
        "notify_channels",
    }  # fmt: skip
    read_only = {
        "id", "next_run_at", "last_run_at", "execution_count", "consecutive_failures",
        "last_error", "created_at", "updated_at", "next_runs", "cron_description",
    }  # fmt: skip
    assert set(schedule) == writable | read_only
    request = schemas["ScheduleInput"]
    assert set(request["properties"]) == writable
    assert request["additionalProperties"] is False
    assert set(request["required"]) == {"prompt", "schedule_type"}
    assert request["properties"]["prompt"]["maxLength"] == 20_000
    assert request["properties"]["max_executions"]["minimum"] == 1
    # `schedule`: the execution's schedule id, as executions are also listed across schedules.
    assert set(schemas["Execution"]["properties"]) == {
        "id", "schedule", "scheduled_for", "attempt", "status", "started_at", "finished_at", "output",
        "error", "cancel_requested_at",
    }  # fmt: skip
    assert set(schemas["CapabilitiesDenied"]["properties"]) == {"detail", "missing"}
    assert set(schemas["QuotaError"]["properties"]) == {"detail", "quota"}


# --- a constant number of queries -----------------------------------------------------------


def make_jobs(owner, count: int) -> None:
    now = db_now()
    for i in range(count):
        job = Job.objects.create(
            owner=owner, name=f"j{i}", prompt="p", schedule_type="cron", cron="0 9 * * *",
            timezone="Europe/Paris", next_run_at=now + timedelta(hours=1),
            capabilities=["shell:ls"], pending_scheduled_for=now if i % 2 else None,
        )  # fmt: skip
        Execution.objects.create(job=job, scheduled_for=now, status="succeeded")


@pytest.mark.parametrize("rows", [2, 20])
def test_listing_schedules_runs_a_constant_number_of_queries(
    rows, make_user, api_client_for, django_assert_num_queries
) -> None:
    user = make_user(grant=["schedule:*"])
    make_jobs(user, rows)
    client = api_client_for(user)
    client.get(URL)  # the key's last-used time is written once a minute: not in the count
    # the key (its last-used time was just written, so no update), the key's request count
    # (the throttle), count, page
    with django_assert_num_queries(4):
        response = client.get(URL)
    assert len(response.json()["results"]) == rows


@pytest.mark.parametrize("rows", [2, 20])
def test_listing_executions_runs_a_constant_number_of_queries(
    rows, make_user, api_client_for, django_assert_num_queries
) -> None:
    user = make_user(grant=["schedule:*"])
    job = Job.objects.create(
        owner=user, name="j", prompt="p", schedule_type="interval", interval_secs=60
    )
    start = db_now() - timedelta(days=1)
    Execution.objects.bulk_create(
        Execution(job=job, scheduled_for=start + timedelta(minutes=i), status="failed")
        for i in range(rows)
    )
    client = api_client_for(user)
    client.get(f"{detail(job.pk)}/executions")
    # the key (its last-used time was just written, so no update), the key's request count
    # (the throttle), the job, count, page
    with django_assert_num_queries(5):
        response = client.get(f"{detail(job.pk)}/executions")
    assert response.json()["count"] == rows


# --- schemathesis -------------------------------------------------------------------------------


@contextmanager
def sharing_the_test_connection() -> Iterator[None]:
    """Let the WSGI app use the test's connection (and transaction), as Django's test client
    does: a request start or end must not close it."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def api_schema(settings_override):
    with sharing_the_test_connection():
        loaded = schemathesis.openapi.from_wsgi("/api/v1/schema", get_wsgi_application())
    return loaded.include(path_regex=r"^/api/v1/schedules")


@pytest.fixture
def settings_override(settings):
    # A high rate so the fuzzer explores the routes rather than the throttle.
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"api_key": "100000/minute"},
    }
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "localhost", "testserver"]


@pytest.fixture
def fuzz_user(make_user):
    user = make_user("fuzzer", grant=["schedule:*", "net:*.example.com", "shell:ls"])
    _, secret = ApiKey.issue(user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    running = Job.objects.get(pk=client.post(URL, interval_body(), format="json").json()["id"])
    claim = start_run(running.pk)
    finished = Job.objects.get(pk=client.post(URL, cron_body(), format="json").json()["id"])
    complete(start_run(finished.pk), Outcome(ExecutionStatus.FAILED, error="x"))
    assert claim
    return {"secret": secret, "job_ids": [running.pk, finished.pk]}


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES_PER_OPERATION = 25


def test_the_api_keeps_to_its_schema_under_generated_input(api_schema, fuzz_user) -> None:
    """Valid and invalid generated requests to every operation: no 5xx, nothing off-schema."""
    headers = {"Authorization": f"Bearer {fuzz_user['secret']}"}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) == 7
    # Deleting comes last, so the other operations still find the caller's schedules.
    operations.sort(key=lambda operation: operation.method.upper() == "DELETE")
    seen: Counter[tuple[str, str, int]] = Counter()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            with sharing_the_test_connection():
                fuzz(operation, mode, headers, fuzz_user["job_ids"], seen)
    # The run reached the success paths, not only the refusals.
    for method, path, code in [
        ("POST", "/api/v1/schedules", 201),
        ("GET", "/api/v1/schedules/{id}", 200),
        ("PATCH", "/api/v1/schedules/{id}", 200),
        ("GET", "/api/v1/schedules/{id}/executions", 200),
        ("POST", "/api/v1/schedules/{id}/cancel", 202),
    ]:
        assert seen[(method, path, code)] > 0, (method, path, code, seen)


def fuzz(operation, mode, headers, job_ids, seen) -> None:
    turn = count()

    @given(case=operation.as_strategy(generation_mode=mode))
    # No per-example deadline: one slow request on a loaded machine is not a failure (hypothesis
    # would report it as one); pytest's timeout bounds a hang.
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def check(case) -> None:
        steer(case, next(turn), job_ids, mode)
        response = case.call_and_validate(headers=headers, checks=CHECKS)
        seen[(case.method, case.path, response.status_code)] += 1

    check()


def steer(case, turn: int, job_ids: list[int], mode: GenerationMode) -> None:
    """Point two cases in three at the caller's own schedules (the rest probe unknown ids), and
    give every other valid create or PATCH a schedule that passes the rules, so the generated
    values of the other fields reach the success path too."""
    if case.path_parameters and "id" in case.path_parameters and turn % 3 != 2:
        case.path_parameters["id"] = job_ids[turn % 3]
    if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and turn % 2 == 0:
        for field in ("run_at", "cron", "schedule_type", "interval_secs", "timezone"):
            case.body.pop(field, None)
        case.body.update(schedule_type="interval", interval_secs=3600, timezone="UTC")
        case.body["capabilities"] = []
        if case.method == "POST" and "prompt" not in case.body:
            case.body["prompt"] = "generated"
