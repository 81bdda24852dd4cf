"""Webhooks: signed deliveries a receiver can verify, and the Kernel's address rules at creation
and at every delivery (refused addresses are never connected to)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from notifications import delivery
from notifications.models import Contact, Notification, Status
from notifications.testing.webhook_receiver import (
    WebhookReceiver,
    make_certificate,
    openssl_available,
    signature_valid,
)
from schedules.dbtime import db_now

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(not openssl_available(), reason="needs the openssl command"),
]
GRANT = ["notify:webhook", "net:127.0.0.1"]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: Any) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def receiver(certificate: Any, monkeypatch: Any) -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver(certificate).start()
    monkeypatch.setenv("SSL_CERT_FILE", str(hook.cert_file))
    yield hook
    hook.stop()


@pytest.fixture
def other(certificate: Any) -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver(certificate).start()
    yield hook
    hook.stop()


def add(client: Any, url: str) -> Any:
    return client.post("/api/v1/contacts", {"channel": "webhook", "address": url}, format="json")


def deliver_pending() -> list[str]:
    ids = Notification.objects.filter(status=Status.PENDING).values_list("id", flat=True)
    return [delivery.deliver(pk) for pk in list(ids)]


def test_a_webhook_is_verified_by_echoing_its_signed_code(make_user, api_client_for, receiver):
    client = api_client_for(make_user(grant=GRANT))
    answer = add(client, receiver.url)
    assert answer.status_code == 201, answer.json()
    secret = answer.json()["secret"]
    assert len(secret) == 64 and not answer.json()["verified"]
    assert deliver_pending() == ["sent"]
    [(headers, body)] = receiver.received
    assert signature_valid(secret, headers, body)
    assert not signature_valid("another secret", headers, body)
    assert not signature_valid(secret, headers, body + b" ")
    code = json.loads(body)["code"]
    contact_id = answer.json()["id"]
    verified = client.post(f"/api/v1/contacts/{contact_id}/verify", {"code": code}, format="json")
    assert verified.status_code == 200 and verified.json()["verified"] is True
    listed = client.get("/api/v1/contacts").json()["results"]
    assert "secret" not in listed[0]  # shown once, at creation


@pytest.mark.parametrize(
    "url",
    [
        "https://localhost:{port}/hook",  # a name resolving to loopback: a name never unlocks
        "https://127.0.0.2:{port}/hook",  # loopback, not the granted literal
        "https://10.0.0.7/hook",
        "https://192.168.1.1/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]:{port}/hook",
        "https://[::ffff:127.0.0.1]:{port}/hook",
        "https://0.0.0.0:{port}/hook",
        "http://127.0.0.1:{port}/hook",  # not https
    ],
)
def test_refused_addresses_are_refused_at_creation_and_never_connected_to(
    make_user, api_client_for, receiver, url
):
    client = api_client_for(make_user(grant=GRANT))
    answer = add(client, url.format(port=receiver.port))
    assert answer.status_code == 400 and "address" in answer.json()
    assert receiver.connections == 0 and not Contact.objects.exists()


def test_a_webhook_needs_notify_webhook_in_the_grant(make_user, api_client_for, receiver):
    answer = add(api_client_for(make_user(grant=["net:127.0.0.1"])), receiver.url)
    assert answer.status_code == 403 and "notify:webhook" in answer.json()["detail"]
    assert receiver.connections == 0


def test_addresses_are_checked_again_at_every_delivery(make_user, receiver):
    owner = make_user(grant=["notify:webhook"])  # the exact grant for 127.0.0.1 is gone
    for url in (receiver.url, f"https://localhost:{receiver.port}/hook"):
        contact = Contact.objects.create(
            owner=owner, channel="webhook", address=url, verified_at=db_now(), webhook_secret="s"
        )
        row = _row(owner, contact)
        assert delivery.deliver(row.pk) == Status.DEAD
        row.refresh_from_db()
        assert row.last_error == "the webhook address is refused"
    assert receiver.connections == 0


def test_a_redirect_is_never_followed(make_user, receiver, other):
    owner = make_user(grant=GRANT)
    receiver.redirect_to = other.url
    contact = Contact.objects.create(
        owner=owner,
        channel="webhook",
        address=receiver.url,
        verified_at=db_now(),
        webhook_secret="s",
    )
    row = _row(owner, contact)
    assert delivery.deliver(row.pk) == Status.DEAD
    assert receiver.connections == 1 and other.connections == 0


@pytest.mark.parametrize(("answer", "outcome"), [(500, Status.PENDING), (404, Status.DEAD)])
def test_5xx_is_retried_4xx_is_permanent_and_the_answer_is_not_shown(
    make_user, receiver, answer, outcome
):
    owner = make_user(grant=GRANT)
    receiver.answer = answer
    contact = Contact.objects.create(
        owner=owner,
        channel="webhook",
        address=receiver.url,
        verified_at=db_now(),
        webhook_secret="s",
    )
    row = _row(owner, contact)
    assert delivery.deliver(row.pk) == outcome
    row.refresh_from_db()
    assert row.last_error == "the webhook did not accept the message"
    assert str(answer) not in row.last_error


def _row(owner: Any, contact: Contact) -> Notification:
    return Notification.objects.create(
        owner=owner,
        contact=contact,
        channel="webhook",
        kind="result",
        body="hello",
        idempotency_key=f"test:{contact.pk}",
        next_attempt_at=db_now(),
    )


@pytest.mark.parametrize(
    "url", ["https://169.254.169.254/latest", "https://[fd00:ec2::254]/", "https://2130706433/"]
)
def test_metadata_and_numeric_hosts_are_refused_whatever_the_grant(make_user, api_client_for, url):
    grant = [*GRANT, "net:169.254.169.254", "net:[fd00:ec2::254]"]
    answer = add(api_client_for(make_user(grant=grant)), url)
    assert answer.status_code == 400 and "address" in answer.json()


def test_a_receiver_that_trickles_its_answer_is_cut_off_at_the_limit(
    make_user, certificate, monkeypatch
):
    # Each byte comes well within the per-step timeout, so only the limit on the whole request
    # ends it: without that, the full answer (a 200) arrives after TRICKLE_SECS.
    import socket
    import ssl
    import threading
    import time

    from notifications.channels import webhook

    trickle_secs = 8.0
    monkeypatch.setattr(webhook, "TIMEOUT_SECS", 1.0)
    cert_file, key_file = certificate
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_file, key_file)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with tls.wrap_socket(conn, server_side=True) as sock:
            sock.recv(65536)
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
            pause = trickle_secs / len(answer)
            try:
                for byte in answer:
                    sock.sendall(bytes([byte]))
                    time.sleep(pause)
            except OSError:
                pass

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    owner = make_user(grant=GRANT)
    contact = Contact.objects.create(
        owner=owner,
        channel="webhook",
        address=f"https://127.0.0.1:{port}/hook",
        verified_at=db_now(),
        webhook_secret="s",
    )
    row = _row(owner, contact)
    try:
        assert delivery.deliver(row.pk) == Status.PENDING  # retried later, not sent
    finally:
        listener.close()
        server.join(timeout=trickle_secs + 2)
