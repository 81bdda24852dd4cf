"""The `notify` tool through the Kernel: permissions per channel, verified contacts only, caps,
idempotency per (run, call), and a taken row is delivered once."""

from __future__ import annotations

from typing import Any

import pytest

from kernel.context import ToolContext
from kernel.kernel import kernel
from kernel.models import ChatSession
from kernel.permissions import CapabilitySet
from notifications import delivery
from notifications.models import Contact, Kind, Notification, Status
from notifications.testing.fake_twilio import FakeTwilio
from schedules.dbtime import db_now
from tests.notification_support import point_settings_at, verified_contact

pytestmark = pytest.mark.django_db


def context(user: Any, grant: list[str], **extra: Any) -> ToolContext:
    session = ChatSession.objects.create(owner=user, capabilities=grant)
    return ToolContext(user=user, capabilities=CapabilitySet(grant), session_id=session.pk, **extra)


@pytest.fixture
def owner(make_user):
    user = make_user()
    verified_contact(user, "+14155550001")
    return user


def test_notify_needs_notify_of_the_channel(owner):
    result = kernel.invoke("notify", {"message": "hi"}, context(owner, ["notify:webhook"]))
    assert result.decision == "denied" and result.missing_permission == "notify:whatsapp"
    assert not Notification.objects.exists()
    result = kernel.invoke(
        "notify", {"message": "hi", "channel": "console"}, context(owner, ["notify:whatsapp"])
    )
    assert result.decision == "denied" and result.missing_permission == "notify:console"


def test_notify_sends_to_verified_contacts_only(owner):
    Contact.objects.create(owner=owner, channel="whatsapp", address="+14155550002")
    result = kernel.invoke("notify", {"message": "disk at 91%"}, context(owner, ["notify:*"]))
    assert result.decision == "allowed", result
    [row] = Notification.objects.all()
    assert (row.kind, row.contact.address, row.body) == (Kind.TOOL, "+14155550001", "disk at 91%")


def test_notify_on_a_channel_without_a_verified_contact_is_an_error(owner):
    result = kernel.invoke(
        "notify", {"message": "x", "channel": "webhook"}, context(owner, ["notify:*"])
    )
    assert result.decision == "error" and "no verified contact" in result.content
    assert not Notification.objects.exists()


def test_the_same_call_twice_in_a_run_sends_once(owner):
    ctx = context(owner, ["notify:*"])
    first = kernel.invoke("notify", {"message": "once"}, ctx)
    second = kernel.invoke("notify", {"message": "once"}, ctx)
    assert first.decision == second.decision == "allowed"
    assert "already sent" in second.content
    assert Notification.objects.count() == 1


def test_the_per_run_cap_holds(owner, picobot_config):
    picobot_config("notifications", notify_max_per_run=2)
    ctx = context(owner, ["notify:*"])
    decisions = [kernel.invoke("notify", {"message": f"m{i}"}, ctx) for i in range(4)]
    assert [d.decision for d in decisions] == ["allowed", "allowed", "error", "error"]
    assert "notify_max_per_run" in decisions[2].content
    assert Notification.objects.count() == 2


def test_the_token_never_reaches_anyone(owner):
    kernel.invoke("notify", {"message": "NOTHING_TO_REPORT but hi"}, context(owner, ["notify:*"]))
    [row] = Notification.objects.all()
    assert row.body == "but hi"


def test_a_row_is_taken_and_sent_once(owner, settings):
    with FakeTwilio() as twilio:
        point_settings_at(settings, twilio)
        row = Notification.objects.create(
            owner=owner,
            contact=owner.contacts.get(),
            channel="whatsapp",
            kind=Kind.RESULT,
            body="once",
            idempotency_key="k",
            next_attempt_at=db_now(),
        )
        assert delivery.deliver(row.pk) == Status.SENT
        assert delivery.deliver(row.pk) == "skipped"
        assert len(twilio.accepted) == 1


def test_the_sweep_requeues_expired_leases_and_unqueued_rows(owner):
    from datetime import timedelta

    now = db_now()
    common = {"owner": owner, "channel": "console", "kind": Kind.RESULT, "body": "x"}
    stuck = Notification.objects.create(
        **common,
        status=Status.SENDING,
        attempts=1,
        lease_expires_at=now - timedelta(seconds=1),
        idempotency_key="a",
        next_attempt_at=now,
    )
    last = Notification.objects.create(
        **common,
        status=Status.SENDING,
        attempts=5,
        lease_expires_at=now - timedelta(seconds=1),
        idempotency_key="b",
        next_attempt_at=now,
    )
    held = Notification.objects.create(
        **common,
        status=Status.SENDING,
        attempts=1,
        lease_expires_at=now + timedelta(seconds=60),
        idempotency_key="c",
        next_attempt_at=now,
    )
    assert delivery.sweep() == 1
    statuses = dict(Notification.objects.values_list("idempotency_key", "status"))
    assert statuses == {"a": Status.PENDING, "b": Status.DEAD, "c": Status.SENDING}
    assert stuck.pk and last.pk and held.pk
    assert delivery.sweep() == 0  # queued once; not again within a lease


def test_the_sweep_schedule_is_made_idempotently(picobot_config):
    from django_q.models import Schedule

    picobot_config("notifications", sweep_secs=120)
    delivery.ensure_sweep_schedule()
    delivery.ensure_sweep_schedule()
    [schedule] = Schedule.objects.filter(name=delivery.SWEEP_SCHEDULE_NAME)
    assert (schedule.schedule_type, schedule.minutes) == (Schedule.MINUTES, 2)


def test_a_delivery_that_outlived_its_lease_changes_nothing(owner):
    from datetime import timedelta

    row = Notification.objects.create(
        owner=owner,
        channel="console",
        kind=Kind.RESULT,
        body="slow",
        idempotency_key="slow",
        next_attempt_at=db_now(),
    )
    first = delivery._take(row.pk)
    Notification.objects.filter(pk=row.pk).update(lease_expires_at=db_now() - timedelta(seconds=1))
    delivery.sweep()
    second = delivery._take(row.pk)
    assert (first.attempts, second.attempts) == (1, 2)
    assert delivery._sent(first, "late") == "superseded"
    row.refresh_from_db()
    assert (row.status, row.attempts, row.provider_message_id) == (Status.SENDING, 2, "")
    assert delivery._sent(second, "") == Status.SENT


def test_the_sweep_does_not_lengthen_a_backlogged_queue(owner, monkeypatch, settings):
    # Found by the 100,000-execution soak: while tasks waited longer than a lease, every sweep
    # queued each waiting row again; the queue grew to 386k tasks for 32k rows.
    from datetime import timedelta

    from django_q.models import OrmQ

    monkeypatch.setattr(delivery, "SWEEP_BATCH", 3)
    now = db_now()
    lease = settings.PICOBOT.notifications.delivery_lease_secs
    common = {"owner": owner, "channel": "console", "kind": Kind.RESULT, "body": "x"}
    waiting = [
        Notification.objects.create(
            **common,
            status=Status.PENDING,
            idempotency_key=f"waiting{i}",
            next_attempt_at=now,
            enqueued_at=now - timedelta(seconds=lease + 60),
        )
        for i in range(3)
    ]
    delivery.enqueue([row.pk for row in waiting], mark=False)  # their tasks still wait
    never = Notification.objects.create(
        **common, status=Status.PENDING, idempotency_key="never", next_attempt_at=now
    )
    assert OrmQ.objects.count() == 3
    # Exactly a batch waiting: only the row that was never queued.
    assert delivery.sweep() == 1
    assert OrmQ.objects.count() == 4
    assert Notification.objects.get(pk=never.pk).enqueued_at is not None
    # One task fewer than a batch waiting (the others were lost): the rows are queued again.
    OrmQ.objects.filter(pk__in=list(OrmQ.objects.values_list("pk", flat=True)[:2])).delete()
    assert OrmQ.objects.count() == 2
    assert delivery.sweep() == 3
    assert OrmQ.objects.count() == 5
