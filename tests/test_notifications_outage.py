"""Delivery through database faults and lost answers (found by the soak, `bench/soak.py`).

A delivery task's connection dropped while it waited for the provider, or while it sat idle
between tasks, no longer leaves the row `sending` until its lease runs out (and then sends it
again): the database steps reconnect. What remains of the duplicate window is what
`notifications/delivery.py` documents: a message the provider took but whose answer never
reached us is sent again, with the same payload `id`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.db import connection

from notifications import delivery
from notifications.channels import webhook
from notifications.models import Contact, Notification, Status
from notifications.testing.fake_twilio import FakeTwilio
from notifications.testing.webhook_receiver import (
    WebhookReceiver,
    make_certificate,
    openssl_available,
)
from schedules.dbtime import db_now
from tests.notification_support import point_settings_at, verified_contact
from tests.worker_support import wait_until

pytestmark = pytest.mark.django_db(transaction=True)
postgres_only = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="drops PostgreSQL server connections"
)


@pytest.fixture(autouse=True)
def reconnect_after(transactional_db: None) -> Iterator[None]:
    """A connection a test dropped is not the next test's (or the database flush's)."""
    yield
    connection.close()


@pytest.fixture
def twilio(settings: Any) -> Iterator[FakeTwilio]:
    with FakeTwilio() as fake:
        point_settings_at(settings, fake)
        yield fake


def _row(owner: Any, contact: Contact, key: str = "outage") -> Notification:
    return Notification.objects.create(
        owner=owner,
        contact=contact,
        channel=contact.channel,
        kind="result",
        body=f"report {key}",
        idempotency_key=f"test:{key}",
        next_attempt_at=db_now(),
    )


def _admin() -> psycopg.Connection[Any]:
    db = connection.settings_dict
    return psycopg.connect(
        dbname=db["NAME"],
        user=db["USER"],
        password=db["PASSWORD"] or None,
        host=db["HOST"] or None,
        port=db["PORT"] or None,
        autocommit=True,
    )


def _terminate(pids: list[int]) -> int:
    """pg_terminate_backend on these connections (as a server restart or an operator's kill
    would end them)."""
    with _admin() as admin:
        row = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM unnest(%s::int[]) AS pid", [pids]
        ).fetchone()
    return int(row[0]) if row else 0


def _others(mine: int) -> list[int]:
    """The other connections to the test database than `mine` (and the query's own)."""
    with _admin() as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND pid <> %s",
            [mine],
        ).fetchall()
    return [pid for (pid,) in rows]


@postgres_only
def test_a_task_whose_idle_connection_was_dropped_still_delivers(make_user, twilio):
    owner = make_user()
    row = _row(owner, verified_contact(owner, "+14155550401"))
    connection.ensure_connection()
    assert _terminate([connection.connection.info.backend_pid]) == 1
    assert delivery.deliver(row.pk) == Status.SENT
    row.refresh_from_db()
    assert (row.status, row.attempts) == (Status.SENT, 1)
    assert len(twilio.accepted) == 1


@postgres_only
def test_a_message_the_provider_took_is_recorded_sent_through_a_dropped_connection(
    make_user, twilio
):
    owner = make_user()
    row = _row(owner, verified_contact(owner, "+14155550402"))
    connection.ensure_connection()
    mine = connection.connection.info.backend_pid
    twilio.hold()  # the provider has the request and has not answered yet
    outcome: dict[str, Any] = {}

    def deliver() -> None:
        try:
            outcome["status"] = delivery.deliver(row.pk)
        except Exception as exc:
            outcome["error"] = exc
        finally:
            connection.close()

    sender = threading.Thread(target=deliver)
    sender.start()
    wait_until(lambda: len(twilio.requests) == 1, 30, "the request at the provider")
    assert _terminate(_others(mine)) == 1  # the sender's connection, mid-delivery
    twilio.release()
    sender.join(60)
    assert outcome == {"status": Status.SENT}
    row.refresh_from_db()
    assert (row.status, row.attempts) == (Status.SENT, 1)
    assert row.provider_message_id == twilio.accepted[0]["Sid"]
    assert len(twilio.accepted) == 1


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: Any) -> Iterator[WebhookReceiver]:
    if not openssl_available():
        pytest.skip("needs the openssl command")
    hook = WebhookReceiver(make_certificate(tmp_path)).start()
    monkeypatch.setenv("SSL_CERT_FILE", str(hook.cert_file))
    # Short enough that the receiver's late answer comes after it.
    monkeypatch.setattr(webhook, "TIMEOUT_SECS", 0.5)
    hook.slow_secs = 2.0
    yield hook
    hook.stop()


def test_a_message_taken_but_answered_too_late_is_sent_again_with_the_same_id(make_user, receiver):
    owner = make_user(grant=["notify:webhook", "net:127.0.0.1"])
    contact = Contact.objects.create(
        owner=owner,
        channel="webhook",
        address=receiver.url,
        verified_at=db_now(),
        webhook_secret="s",
    )
    row = _row(owner, contact)
    receiver.answer = "late"
    assert delivery.deliver(row.pk) == Status.PENDING  # a timeout: retried
    receiver.answer = 200
    Notification.objects.filter(pk=row.pk).update(next_attempt_at=db_now())
    assert delivery.deliver(row.pk) == Status.SENT
    row.refresh_from_db()
    assert (row.status, row.attempts) == (Status.SENT, 2)
    # The documented window: the receiver has it twice, under one id it can deduplicate on.
    assert [(payload_id, late) for _, payload_id, _, late in receiver.accepted] == [
        (row.pk, True),
        (row.pk, False),
    ]
