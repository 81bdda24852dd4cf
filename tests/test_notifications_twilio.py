"""WhatsApp delivery end to end: real `runworker` and `qcluster` processes, a fake Twilio over
real HTTP, and its signed status callbacks to the live site."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from notifications.models import Contact, Kind, Notification, Status
from notifications.testing.fake_twilio import FakeTwilio
from tests.notification_support import (
    TEMPLATE_SID,
    Processes,
    point_settings_at,
    verified_contact,
)
from tests.worker_support import due_job, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def twilio() -> Iterator[FakeTwilio]:
    with FakeTwilio() as fake:
        yield fake


@pytest.fixture
def procs(tmp_path: Path, model_server: Any, twilio: FakeTwilio, live_server: Any, settings: Any):
    point_settings_at(settings, twilio, live_server.url)
    group = Processes(tmp_path, model_server.base_url, twilio=twilio, public_url=live_server.url)
    yield group
    group.stop_all()


def settled(**filters: Any) -> Any:
    return lambda: (
        not Notification.objects.filter(
            status__in=[Status.PENDING, Status.SENDING], **filters
        ).exists()
    )


def test_a_result_reaches_a_verified_contact_and_its_status_reaches_delivered(
    make_user, procs, model_server, twilio
):
    model_server.reply_always("All systems nominal.")
    owner = make_user()
    verified_contact(owner, "+14155550101")
    job = due_job(owner, name="health")
    procs.start_cluster()
    assert procs.run_once() == 0
    row = wait_until(
        lambda: Notification.objects.filter(job=job, provider_status="delivered").first(),
        60,
        "the delivered status callback",
    )
    assert (row.kind, row.status, row.attempts) == (Kind.RESULT, Status.SENT, 1)
    assert twilio.bodies_to("+14155550101") == ["health: All systems nominal."]
    [request] = twilio.requests
    assert request["StatusCallback"].endswith("/api/v1/notifications/twilio-status")
    assert row.provider_message_id == twilio.accepted[0]["Sid"]
    assert [status for _, _, status in twilio.callbacks] == [204, 204]


def test_permanent_errors_die_at_once_63016_goes_through_the_template_and_unverified_get_nothing(
    make_user, procs, model_server, twilio
):
    model_server.reply_always("Report ready.")
    owner = make_user()
    good, invalid, outside, unsubscribed = (
        "+14155550111",
        "+14155550112",
        "+14155550113",
        "+14155550114",
    )
    for number in (good, invalid, outside, unsubscribed):
        verified_contact(owner, number)
    Contact.objects.create(owner=owner, channel="whatsapp", address="+14155550119")
    twilio.fail_number(invalid, 400, 21211)
    twilio.fail_number(unsubscribed, 400, 21610)
    twilio.outside_window(outside)
    job = due_job(owner, name="digest")
    procs.start_cluster()
    assert procs.run_once() == 0
    wait_until(
        lambda: Notification.objects.filter(job=job, provider_status="delivered").count() == 2,
        60,
        "delivery to the good number and, through the template, the outside-window one",
    )
    wait_until(settled(job=job), 30, "every row to settle")
    rows = {r.contact.address: r for r in Notification.objects.filter(job=job)}
    assert set(rows) == {good, invalid, outside, unsubscribed}  # nothing for the unverified one
    for number in (invalid, unsubscribed):
        assert (rows[number].status, rows[number].attempts) == (Status.DEAD, 1)
    assert "21211" in rows[invalid].last_error and "21610" in rows[unsubscribed].last_error
    assert rows[outside].via_template and rows[outside].status == Status.SENT
    to_outside = [r for r in twilio.requests if r["To"] == f"whatsapp:{outside}"]
    assert [r.get("ContentSid") for r in to_outside] == [None, TEMPLATE_SID]
    assert not [r for r in twilio.requests if r["To"] == "whatsapp:+14155550119"]
    assert sum(1 for r in twilio.requests if r["To"] == f"whatsapp:{invalid}") == 1


def test_an_outage_then_recovery_delivers_each_message_exactly_once(
    make_user, procs, model_server, twilio
):
    model_server.reply_always("tick")
    owners = [make_user() for _ in range(4)]
    numbers = [f"+1415555020{i}" for i in range(4)]
    jobs = []
    for owner, number in zip(owners, numbers, strict=True):
        verified_contact(owner, number)
        jobs.append(due_job(owner, name=f"job-{number}"))
    twilio.script(500, 503, 429, "drop", "drop", 500, 503)
    procs.notifications_config(max_attempts=10)
    procs.start_cluster()
    assert procs.run_once() == 0
    wait_until(lambda: Notification.objects.filter(status=Status.SENT).count() == 4, 90, "all sent")
    for number in numbers:
        assert len(twilio.bodies_to(number)) == 1
    assert len(twilio.requests) == 4 + 7
    assert sum(Notification.objects.values_list("attempts", flat=True)) == 4 + 7


def test_a_cluster_killed_mid_delivery_loses_nothing(make_user, procs, model_server, twilio):
    model_server.reply_always("status report")
    owner = make_user()
    numbers = [f"+1415555030{i}" for i in range(3)]
    for number in numbers:
        verified_contact(owner, number)
    job = due_job(owner, name="kill")
    twilio.hold()  # the provider takes requests but does not answer yet
    cluster = procs.start_cluster()
    assert procs.run_once() == 0
    wait_until(lambda: len(twilio.requests) >= 1, 60, "a delivery in flight")
    in_flight = {r["To"] for r in twilio.requests}
    assert Notification.objects.filter(job=job, status=Status.SENDING).exists()
    procs.kill_cluster(cluster)
    twilio.release()  # the provider accepts what was in flight: the documented window
    wait_until(lambda: len(twilio.accepted) >= len(in_flight), 10, "in-flight requests accepted")
    procs.start_cluster()
    wait_until(settled(job=job), 90, "every row sent or dead after the restart")
    rows = list(Notification.objects.filter(job=job))
    assert len(rows) == 3 and all(r.status == Status.SENT for r in rows)
    for number in numbers:
        sent = len(twilio.bodies_to(number))
        # Twice only for a message the provider accepted while its sender was being killed.
        assert sent == 1 or (sent == 2 and f"whatsapp:{number}" in in_flight), (number, sent)
