"""API keys: random secrets stored as digests, Bearer authentication, revocation."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone
from rest_framework.test import APIClient

from kernel.models import ApiKey, system_principal

pytestmark = pytest.mark.django_db


def bearer(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def test_a_valid_key_authenticates_its_user(make_user) -> None:
    user = make_user("alice", grant=["schedule:*"])
    _, secret = ApiKey.issue(user)
    response = bearer(secret).get("/api/v1/me")
    assert response.status_code == 200
    assert response.json() == {"username": "alice", "grant": ["schedule:*"]}


def test_only_the_digest_is_stored(make_user) -> None:
    key, secret = ApiKey.issue(make_user())
    key.refresh_from_db()
    assert key.digest == hashlib.sha256(secret.encode()).hexdigest()
    stored = [str(v) for v in ApiKey.objects.filter(pk=key.pk).values().get().values()]
    assert secret not in stored
    assert len(secret) >= 43  # 256 bits in url-safe base64 plus the prefix


def test_keys_are_unique(make_user) -> None:
    user = make_user()
    secrets = {ApiKey.issue(user)[1] for _ in range(20)}
    assert len(secrets) == 20


def test_a_missing_header_is_401_with_a_bearer_challenge() -> None:
    response = APIClient().get("/api/v1/me")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "header",
    [
        "Bearer",
        "Bearer ",
        "Token abc",
        "Basic dXNlcjpwYXNz",
        "Bearer not-a-key",
        "Bearer pbk_" + "x" * 300,
        "Bearer pbk_a b",
    ],
)
def test_a_malformed_header_is_401(header: str) -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    assert client.get("/api/v1/me").status_code == 401


def test_a_non_ascii_header_is_401_not_500() -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer pbk_\u00e9\u00e9")
    assert client.get("/api/v1/me").status_code == 401


def test_an_unknown_key_is_401(make_user) -> None:
    ApiKey.issue(make_user())
    assert bearer("pbk_" + "A" * 43).get("/api/v1/me").status_code == 401


def test_a_revoked_key_is_401(make_user) -> None:
    key, secret = ApiKey.issue(make_user())
    assert bearer(secret).get("/api/v1/me").status_code == 200
    key.revoke()
    assert bearer(secret).get("/api/v1/me").status_code == 401


def test_an_inactive_user_is_401(make_user) -> None:
    user = make_user()
    _, secret = ApiKey.issue(user)
    user.is_active = False
    user.save(update_fields=["is_active"])
    assert bearer(secret).get("/api/v1/me").status_code == 401


def test_last_used_is_written_at_most_once_a_minute(make_user) -> None:
    key, secret = ApiKey.issue(make_user())
    client = bearer(secret)
    client.get("/api/v1/me")
    key.refresh_from_db()
    first = key.last_used_at
    assert first is not None
    client.get("/api/v1/me")
    key.refresh_from_db()
    assert key.last_used_at == first
    ApiKey.objects.filter(pk=key.pk).update(last_used_at=timezone.now() - timedelta(minutes=2))
    client.get("/api/v1/me")
    key.refresh_from_db()
    assert key.last_used_at > first


def test_the_system_principal_cannot_hold_keys_or_log_in(client) -> None:
    system = system_principal()
    assert system.is_system and not system.has_usable_password()
    with pytest.raises(ValidationError):
        ApiKey.issue(system)
    # Even a key planted directly in the table is refused.
    ApiKey.objects.create(
        user=system, digest=hashlib.sha256(b"pbk_planted").hexdigest(), prefix="pbk_"
    )
    assert bearer("pbk_planted").get("/api/v1/me").status_code == 401
    system.set_password("a long operator password")
    system.save()
    assert client.login(username=system.username, password="a long operator password") is False


def test_the_system_principal_is_unique() -> None:
    assert system_principal().pk == system_principal().pk
