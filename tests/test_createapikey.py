"""`manage.py createapikey`: prints the key alone on the last line; grants are validated."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from kernel.models import User, system_principal

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = StringIO()
    call_command("createapikey", *args, stdout=out)
    return out.getvalue()


def test_it_creates_a_user_and_prints_a_working_key_last() -> None:
    output = run(
        "alice", "--create-user", "--grant", "schedule:*", "--grant", "net:api.example.com"
    )
    key = output.strip().splitlines()[-1]
    assert key.startswith("pbk_") and " " not in key
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    response = client.get("/api/v1/me")
    assert response.status_code == 200
    assert response.json()["grant"] == ["schedule:*", "net:api.example.com"]


def test_grant_adds_to_the_existing_grant_without_duplicates(make_user) -> None:
    make_user("bob", grant=["schedule:list"])
    run("bob", "--grant", "schedule:list", "--grant", "notify:whatsapp")
    assert User.objects.get(username="bob").grant == ["schedule:list", "notify:whatsapp"]


def test_a_malformed_permission_is_refused_and_nothing_changes(make_user) -> None:
    make_user("carol", grant=["schedule:list"])
    with pytest.raises(CommandError, match="'filesystem:read:relative/path'"):
        run("carol", "--grant", "schedule:create", "--grant", "filesystem:read:relative/path")
    carol = User.objects.get(username="carol")
    assert carol.grant == ["schedule:list"]
    assert carol.api_keys.count() == 0


@pytest.mark.parametrize(
    "bad", ["schedule:explode", "net:", "shell:/bin/sh", "filesystem:read:/a/../etc", "everything"]
)
def test_each_kind_of_malformed_permission_is_refused(bad: str) -> None:
    with pytest.raises(CommandError, match="refusing --grant"):
        run("dave", "--create-user", "--grant", bad)
    assert not User.objects.filter(username="dave").exists()


def test_an_unknown_user_needs_create_user() -> None:
    with pytest.raises(CommandError, match="--create-user"):
        run("nobody")


def test_the_system_principal_gets_no_key() -> None:
    with pytest.raises(CommandError, match="system principal"):
        run(system_principal().username)
