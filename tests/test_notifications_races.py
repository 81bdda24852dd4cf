"""Limits that must hold under real concurrency: separate processes, the real database."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest

from notifications.delivery import code_hmac
from notifications.models import Contact, Kind, Notification
from schedules.dbtime import db_now
from tests.notification_support import verified_contact
from tests.worker_support import ROOT, Workers

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]
PROCESSES = 4


def race(tmp_path: Any, config: dict[str, Any], *args: str) -> Counter[str]:
    workers = Workers(tmp_path, None)
    workers.config.write_text(
        workers.config.read_text()
        + "[notifications]\n"
        + "".join(f"{k} = {v}\n" for k, v in config.items())
    )
    start = str(time.time() + 3)
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.notification_race", args[0], start, *args[1:]],
            cwd=ROOT,
            env=workers.env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    outcomes: Counter[str] = Counter()
    for process in processes:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        outcomes.update(out.split())
    return outcomes


def test_parallel_guesses_cannot_exceed_the_attempt_limit(make_user, tmp_path):
    contact = Contact.objects.create(owner=make_user(), channel="whatsapp", address="+14155550000")
    Contact.objects.filter(pk=contact.pk).update(
        code_hmac=code_hmac(contact.pk, "111111"),
        code_expires_at=db_now() + __import__("datetime").timedelta(minutes=10),
    )
    # A limit many guesses long, so the processes overlap while it is being counted.
    limit, each = 40, 20
    config = {"code_max_attempts": limit}
    outcomes = race(tmp_path, config, "guess", str(contact.pk), "222222", str(each))
    assert outcomes == {"wrong": limit, "locked": PROCESSES * each - limit}
    assert Contact.objects.get(pk=contact.pk).code_attempts == limit


def test_notify_caps_are_exact_under_concurrency(make_user, tmp_path):
    owner = make_user()
    verified_contact(owner, "+14155550000")
    execution_id = 0
    outcomes = race(
        tmp_path,
        {"notify_max_per_run": 100, "notify_max_per_user_per_day": 5},
        "notify",
        str(owner.pk),
        str(execution_id),
        "3",
        "hello",
    )
    assert outcomes == {"sent": 5, "capped": PROCESSES * 3 - 5}
    calls = Notification.objects.filter(owner=owner, kind=Kind.TOOL)
    assert calls.values("tool_call_key").distinct().count() == 5
