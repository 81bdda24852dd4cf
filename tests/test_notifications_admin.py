"""The operator console for contacts and notifications."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from notifications.models import Contact, Notification, Status
from schedules.dbtime import db_now

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(client: Any, make_user: Any) -> Any:
    user = make_user(is_staff=True, is_superuser=True)
    client.force_login(user)
    return client


def rows(owner: Any, count: int, start: int) -> None:
    for index in range(start, start + count):
        contact = Contact.objects.create(
            owner=owner, channel="whatsapp", address=f"+1415555{index:04d}"
        )
        Notification.objects.create(
            owner=owner,
            contact=contact,
            channel="whatsapp",
            kind="result",
            body="x",
            status=Status.DEAD,
            last_error="Twilio 400 error 21211",
            idempotency_key=f"k{index}",
            next_attempt_at=db_now(),
        )


@pytest.mark.parametrize(
    "page", ["/admin/notifications/notification/", "/admin/notifications/contact/"]
)
def test_list_pages_take_a_constant_number_of_queries(operator, make_user, page):
    owners = [make_user(), make_user()]
    rows(owners[0], 2, 0)
    with CaptureQueriesContext(connection) as few:
        assert operator.get(page).status_code == 200
    for index, owner in enumerate(owners):
        rows(owner, 10, 100 + index * 10)
    with CaptureQueriesContext(connection) as many:
        assert operator.get(page).status_code == 200
    assert len(many) == len(few)


def test_retry_now_queues_dead_rows_again(operator, make_user):
    rows(make_user(), 2, 0)
    sent = Notification.objects.first()
    Notification.objects.filter(pk=sent.pk).update(status=Status.SENT)
    answer = operator.post(
        "/admin/notifications/notification/",
        {
            "action": "retry_now",
            "_selected_action": list(Notification.objects.values_list("pk", flat=True)),
        },
    )
    assert answer.status_code == 302
    statuses = sorted(Notification.objects.values_list("status", "attempts"))
    assert statuses == [(Status.PENDING, 0), (Status.SENT, 0)]


def test_an_operator_can_mark_a_contact_verified(operator, make_user):
    contact = Contact.objects.create(owner=make_user(), channel="whatsapp", address="+14155550000")
    operator.post(
        "/admin/notifications/contact/",
        {"action": "mark_verified", "_selected_action": [contact.pk]},
    )
    contact.refresh_from_db()
    assert contact.verified
