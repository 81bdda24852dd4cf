"""The soak's checker and receivers tell the project's faults from the soak's own.

Each case here was once reported by the 100,000-execution soak as a violation the project did
not commit: the checker (or the receiver) must accept exactly that case, and still report its
neighbours.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from bench.soak_check import Report, check_occurrence
from notifications.testing.webhook_receiver import (
    WebhookReceiver,
    make_certificate,
    openssl_available,
)

WHEN = datetime(2026, 11, 27, 21, 15, tzinfo=UTC)
CUTOFF = datetime(2026, 11, 27, 22, 0, tzinfo=UTC)


def _job(version: int, pending: datetime | None = None, enabled: bool = True) -> Any:
    return SimpleNamespace(
        pk=75702,
        misfire="run_once",
        schedule_version=version,
        pending_scheduled_for=pending,
        enabled=enabled,
        deleted_at=None,
    )


def _attempts(*statuses_and_versions: tuple[str, int]) -> list[tuple[Any, ...]]:
    return [
        (i, 75702, WHEN, i, status, 0, "", version)
        for i, (status, version) in enumerate(statuses_and_versions, start=1)
    ]


@pytest.mark.parametrize("first", ["failed", "timed_out", "interrupted"])
def test_a_retry_dropped_by_a_schedule_change_is_not_a_violation(first: str) -> None:
    # Attempt 1 ended without a success, attempt 2 started; a PATCH bumped the version
    # (dropping the pending retry, as documented) before attempt 2 was interrupted.
    report = Report()
    state = check_occurrence(
        report, _job(2), WHEN, _attempts((first, 1), ("interrupted", 1)), CUTOFF
    )
    assert report.violations == []
    assert state == ""
    assert report.counts["occurrences whose retry a schedule change dropped"] == 1


@pytest.mark.parametrize(
    ("job", "attempts"),
    [
        # No change of the schedule: an interrupted run must run again.
        (_job(1), _attempts(("failed", 1), ("interrupted", 1))),
        (_job(1), _attempts(("interrupted", 1))),
        # The attempt ran the current version: the change came before it, nothing dropped it.
        (_job(2), _attempts(("failed", 1), ("interrupted", 2))),
    ],
)
def test_an_interrupted_occurrence_nothing_dropped_is_still_a_violation(
    job: Any, attempts: list[tuple[Any, ...]]
) -> None:
    report = Report()
    check_occurrence(report, job, WHEN, attempts, CUTOFF)
    assert len(report.violations) == 1
    assert "not resolved" in report.violations[0]


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: Any) -> Any:
    if not openssl_available():
        pytest.skip("needs the openssl command")
    hook = WebhookReceiver(make_certificate(tmp_path_factory.mktemp("tls"))).start()
    yield hook
    hook.stop()


def _post(receiver: WebhookReceiver, body: bytes, declared: int) -> None:
    context = ssl.create_default_context(cafile=str(receiver.cert_file))
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(
                b"POST /hook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {declared}\r\n\r\n".encode()
                + body
            )
            if len(body) == declared:
                tls.recv(1024)  # the answer


def _wait_received(receiver: WebhookReceiver, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(receiver.received) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(receiver.received) == count


@pytest.mark.parametrize("sent", [0, 1, 20])
def test_a_request_cut_short_is_not_taken_as_a_delivery(receiver: Any, sent: int) -> None:
    # A qcluster killed while sending: the headers arrived, the body (some of it) did not.
    receiver.received.clear()
    receiver.accepted.clear()
    body = json.dumps({"id": 41, "text": "x" * 40}).encode()
    _post(receiver, body[:sent], declared=len(body))
    _wait_received(receiver, 1)
    assert receiver.accepted == []
    # The same delivery whole is taken, with its id.
    _post(receiver, body, declared=len(body))
    _wait_received(receiver, 2)
    assert [(payload_id, taken) for _, payload_id, taken, _ in receiver.accepted] == [(41, body)]
