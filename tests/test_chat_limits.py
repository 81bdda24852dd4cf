"""The chat API's limits: strict JSON (deep nesting is a 400, not a 500), a per-key throttle, and
at most `turns.MAX_TURNS_PER_USER` turns per user at once, exact across processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from kernel import turns
from kernel.models import ChatTurn
from tests.worker_support import ROOT, database_url

URL = "/api/v1/chat"


def post(client: Any, body: Any) -> Any:
    return client.post(URL, body if isinstance(body, str) else json.dumps(body), content_type="application/json")  # fmt: skip


@pytest.mark.django_db
@pytest.mark.parametrize("depth", [1_000, 2_000, 100_000])
def test_deeply_nested_json_is_a_json_400(make_user, api_client_for, model_server, depth) -> None:
    client = api_client_for(make_user())
    for body in ("[" * depth + "]" * depth, '{"message": ' + "[" * depth + "]" * depth + "}"):
        response = post(client, body)
        assert response.status_code == 400, response.content[:200]
        assert response["Content-Type"].startswith("application/json")
        assert "nested too deeply" in response.json()["detail"]


@pytest.mark.django_db
def test_chat_requests_are_throttled_per_api_key(
    make_user, api_client_for, model_server, settings
) -> None:
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"chat": "2/minute"},
    }
    model_server.reply_always("hi")
    user = make_user()
    first, second = api_client_for(user), api_client_for(user)
    codes = [post(first, {"message": "hello"}).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    assert post(second, {"message": "hello"}).status_code == 200


@pytest.mark.django_db
def test_a_turn_beyond_the_users_cap_is_a_429_naming_it(
    make_user, api_client_for, model_server
) -> None:
    model_server.reply_always("hi")
    user, other = make_user(), make_user()
    live = timezone.now() + timedelta(minutes=5)
    for _ in range(turns.MAX_TURNS_PER_USER):  # turns running in other processes
        ChatTurn.objects.create(user=user, expires_at=live)
    response = post(api_client_for(user), {"message": "hello"})
    assert response.status_code == 429
    assert f"at most {turns.MAX_TURNS_PER_USER} at once" in response.json()["detail"]
    assert post(api_client_for(other), {"message": "hello"}).status_code == 200
    # A slot left behind by a process that died stops counting once it expires.
    ChatTurn.objects.filter(user=user).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert post(api_client_for(user), {"message": "hello"}).status_code == 200
    assert ChatTurn.objects.filter(user=user, expires_at__gt=timezone.now()).count() == 0


CONTENDER = """
import os, sys, time
import django
django.setup()
from kernel import turns
go = float(sys.argv[2])
while time.time() < go:
    pass
print("granted" if turns.begin(int(sys.argv[1])) is not None else "refused", flush=True)
"""


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_cap_holds_for_processes_starting_turns_at_the_same_instant(make_user) -> None:
    user = make_user()
    env = {
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": database_url(),
        "PATH": "/usr/bin:/bin",
    }
    for round_ in range(2):
        ChatTurn.objects.all().delete()
        go = time.time() + 4.0  # every process is imported and spinning by then
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", CONTENDER, str(user.pk), str(go)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(6)
        ]
        results = [process.communicate(timeout=120) for process in processes]
        answers = [out.strip() for out, _ in results]
        assert all(a in ("granted", "refused") for a in answers), results
        assert answers.count("granted") == turns.MAX_TURNS_PER_USER, (round_, answers)
        assert ChatTurn.objects.filter(user=user).count() == turns.MAX_TURNS_PER_USER
