"""The contacts API and verification: E.164, ownership, codes only as HMACs, attempt and rate
limits, Twilio status callbacks signed or refused."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from twilio.request_validator import RequestValidator

from notifications import delivery
from notifications.models import Contact, Kind, Notification, Status
from notifications.testing.fake_twilio import FakeTwilio
from schedules.dbtime import db_now
from tests.notification_support import point_settings_at

pytestmark = pytest.mark.django_db
NUMBER = "+14155550123"


@pytest.fixture
def twilio(settings: Any):
    with FakeTwilio() as fake:
        point_settings_at(settings, fake, "https://picobot.example.com")
        yield fake


def add(client: Any, address: str = NUMBER, channel: str = "whatsapp") -> Any:
    return client.post("/api/v1/contacts", {"channel": channel, "address": address}, format="json")


def send_code(twilio: FakeTwilio, contact_id: int) -> str:
    [row] = Notification.objects.filter(contact_id=contact_id, status=Status.PENDING)
    assert delivery.deliver(row.pk) == Status.SENT
    return twilio.accepted[-1]["Body"].rsplit(" ", 1)[-1]


def verify(client: Any, contact_id: int, code: str) -> Any:
    return client.post(f"/api/v1/contacts/{contact_id}/verify", {"code": code}, format="json")


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("+14155550123", "+14155550123"),
        ("+1 (415) 555-0123", "+14155550123"),
        ("whatsapp:+44 20 7946 0958", "+442079460958"),
        ("+49.30.1234567", "+49301234567"),
    ],
)
def test_whatsapp_addresses_are_normalised_to_e164(make_user, api_client_for, given, stored):
    answer = add(api_client_for(make_user()), given)
    assert answer.status_code == 201
    assert answer.json() | {"id": 0} == answer.json() | {
        "id": 0,
        "channel": "whatsapp",
        "address": stored,
        "verified": False,
    }
    assert answer.json()["secret"] is None


@pytest.mark.parametrize(
    "address",
    ["14155550123", "+0123456789", "+1234", "+1415555012345678", "+1 415 CALL ME", "", "x" * 3000],
)
def test_anything_else_is_refused_with_the_reason(make_user, api_client_for, address):
    answer = add(api_client_for(make_user()), address)
    assert answer.status_code == 400 and "address" in answer.json()
    assert not Contact.objects.exists()


@pytest.mark.parametrize(
    "body",
    [{"channel": "sms", "address": NUMBER}, {"address": NUMBER}, {**{"channel": "whatsapp"}},
     {"channel": "whatsapp", "address": NUMBER, "verified": True}, [], "x"],
)  # fmt: skip
def test_bad_bodies_are_400_naming_the_field(make_user, api_client_for, body):
    answer = api_client_for(make_user()).post("/api/v1/contacts", body, format="json")
    assert answer.status_code == 400


def test_contacts_are_the_callers_own(make_user, api_client_for):
    alice, bob = api_client_for(make_user()), api_client_for(make_user())
    contact_id = add(alice).json()["id"]
    assert bob.get("/api/v1/contacts").json()["count"] == 0
    assert bob.delete(f"/api/v1/contacts/{contact_id}").status_code == 404
    assert verify(bob, contact_id, "123456").status_code == 404
    assert alice.get("/api/v1/contacts").json()["count"] == 1
    assert alice.delete(f"/api/v1/contacts/{contact_id}").status_code == 204
    assert not Contact.objects.exists()


def test_the_code_verifies_and_is_never_stored_in_clear(make_user, api_client_for, twilio):
    client = api_client_for(make_user())
    contact_id = add(client).json()["id"]
    code = send_code(twilio, contact_id)
    contact = Contact.objects.get(pk=contact_id)
    assert contact.code_hmac and code not in contact.code_hmac
    assert not Notification.objects.filter(body__contains=code).exists()
    assert verify(client, contact_id, code).json()["verified"] is True
    assert Contact.objects.get(pk=contact_id).code_hmac == ""


def test_wrong_codes_lock_the_contact_after_the_limit(
    make_user, api_client_for, twilio, picobot_config
):
    picobot_config("notifications", code_max_attempts=3)
    client = api_client_for(make_user())
    contact_id = add(client).json()["id"]
    code = send_code(twilio, contact_id)
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    for _ in range(3):
        answer = verify(client, contact_id, wrong)
        assert answer.status_code == 400 and answer.json()["code"] == ["wrong code"]
    locked = verify(client, contact_id, code)  # even the right code, once locked
    assert locked.status_code == 400 and "too many" in locked.json()["code"][0]
    assert Contact.objects.get(pk=contact_id).verified_at is None


def test_an_expired_code_is_refused(make_user, api_client_for, twilio):
    client = api_client_for(make_user())
    contact_id = add(client).json()["id"]
    code = send_code(twilio, contact_id)
    Contact.objects.filter(pk=contact_id).update(code_expires_at=db_now() - timedelta(seconds=1))
    answer = verify(client, contact_id, code)
    assert answer.status_code == 400 and "expired" in answer.json()["code"][0]


@pytest.mark.parametrize("code", ["12345", "1234567", "abcdef", "", " 123456"])
def test_malformed_codes_are_400(make_user, api_client_for, code):
    client = api_client_for(make_user())
    contact_id = add(client).json()["id"]
    assert verify(client, contact_id, code).status_code == 400


def test_codes_are_limited_per_user_and_per_address(make_user, api_client_for, picobot_config):
    picobot_config("notifications", max_codes_per_hour=2)
    alice, bob = api_client_for(make_user()), api_client_for(make_user())
    assert add(alice).status_code == 201
    assert add(alice).status_code == 200  # a new code for the same contact
    third = add(alice, "+14155550999")
    assert third.status_code == 429 and third.json()["quota"] == "max_codes_per_hour"
    assert add(bob, "+14155550888").status_code == 201
    assert add(bob).status_code == 429  # the address had its codes already
    assert Notification.objects.filter(kind=Kind.VERIFICATION).count() == 3


def test_an_unverified_contact_receives_nothing_but_its_code(make_user, twilio):
    owner = make_user()
    contact = Contact.objects.create(owner=owner, channel="whatsapp", address=NUMBER)
    row = Notification.objects.create(
        owner=owner,
        contact=contact,
        channel="whatsapp",
        kind=Kind.TOOL,
        body="hi",
        idempotency_key="k",
        next_attempt_at=db_now(),
    )
    assert delivery.deliver(row.pk) == Status.DEAD
    assert twilio.requests == []


# --- Twilio status callbacks -------------------------------------------------------------------

CALLBACK = "/api/v1/notifications/twilio-status"
PUBLIC = "https://picobot.example.com"


def sent_row(make_user: Any, sid: str = "SM" + "1" * 32, status: str = "") -> Notification:
    return Notification.objects.create(
        owner=make_user(),
        channel="whatsapp",
        kind="result",
        body="x",
        status=Status.SENT,
        provider_message_id=sid,
        provider_status=status,
        idempotency_key=f"k-{sid}",
        next_attempt_at=db_now(),
    )


def callback(client: Any, twilio: FakeTwilio, params: dict[str, str], signature: str | None = None):
    if signature is None:
        signature = RequestValidator(twilio.auth_token).compute_signature(PUBLIC + CALLBACK, params)
    headers = {"HTTP_X_TWILIO_SIGNATURE": signature} if signature else {}
    return client.post(CALLBACK, params, **headers)


@pytest.mark.parametrize(
    "signature",
    [
        "",
        "not-a-signature",
        RequestValidator("another-token").compute_signature(
            PUBLIC + CALLBACK, {"MessageSid": "SM" + "1" * 32, "MessageStatus": "delivered"}
        ),
        RequestValidator(FakeTwilio().auth_token).compute_signature(
            "https://elsewhere.example.com" + CALLBACK,
            {"MessageSid": "SM" + "1" * 32, "MessageStatus": "delivered"},
        ),
    ],
)
def test_an_unsigned_or_wrongly_signed_callback_is_403_and_changes_nothing(
    client, make_user, twilio, signature
):
    row = sent_row(make_user, status="sent")
    params = {"MessageSid": row.provider_message_id, "MessageStatus": "delivered"}
    assert callback(client, twilio, params, signature).status_code == 403
    row.refresh_from_db()
    assert row.provider_status == "sent"


def test_a_tampered_callback_is_403(client, make_user, twilio):
    row = sent_row(make_user, status="sent")
    params = {"MessageSid": row.provider_message_id, "MessageStatus": "delivered"}
    signature = RequestValidator(twilio.auth_token).compute_signature(PUBLIC + CALLBACK, params)
    tampered = {**params, "MessageStatus": "read"}
    assert callback(client, twilio, tampered, signature).status_code == 403


def test_statuses_only_move_forward(client, make_user, twilio):
    row = sent_row(make_user)
    sid = row.provider_message_id
    for status, expected in [
        ("queued", "queued"),
        ("delivered", "delivered"),
        ("sent", "delivered"),
        ("queued", "delivered"),
        ("read", "read"),
        ("delivered", "read"),
    ]:
        params = {"MessageSid": sid, "MessageStatus": status}
        assert callback(client, twilio, params).status_code == 204
        row.refresh_from_db()
        assert row.provider_status == expected, status
