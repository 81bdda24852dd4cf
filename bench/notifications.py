"""The notification benchmark in its own process (Django configured for one database).

    python -m bench.notifications DATABASE_URL
prints one JSON line: notifications delivered per second by one `qcluster` (its default two
workers) to a local fake Twilio, and the latency from the completing transaction's commit (the
row's write) to `sent`, p50/p99, for rows written one at a time while the cluster runs.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.scenario import percentile

ROOT = Path(__file__).resolve().parent.parent
BURST = 400
STEADY = 100
STEADY_GAP_SECS = 0.1
CONFIG = "[notifications]\nmax_attempts = 5\n"


def setup(url: str, config_path: str) -> None:
    os.environ["DATABASE_URL"] = url
    os.environ["PICOBOT_CONFIG"] = config_path
    os.environ["DJANGO_SETTINGS_MODULE"] = "picobot_site.settings"
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def reset() -> Any:
    from django_q.models import OrmQ, Task

    from kernel.models import User
    from notifications.models import Contact, Notification

    Notification.objects.all().delete()
    OrmQ.objects.all().delete()
    Task.objects.all().delete()
    User.objects.filter(username="bench-notify").delete()
    user = User.objects.create(username="bench-notify")
    from schedules.dbtime import db_now

    contact = Contact.objects.create(
        owner=user, channel="whatsapp", address="+14155550100", verified_at=db_now()
    )
    return user, contact


def write(user: Any, contact: Any, count: int, tag: str) -> None:
    """Rows written and queued as a completion writes them: in a transaction, queued on commit."""
    from django.db import transaction

    from notifications.models import Notification
    from notifications.writing import write_rows

    with transaction.atomic():
        write_rows(
            [
                Notification(
                    owner=user,
                    contact=contact,
                    channel="whatsapp",
                    kind="result",
                    body=f"bench {tag} {i}",
                    idempotency_key=f"bench:{tag}:{i}",
                )
                for i in range(count)
            ]
        )


def wait_sent(count: int, timeout: float) -> None:
    from notifications.models import Notification

    deadline = time.monotonic() + timeout
    while Notification.objects.filter(status="sent").count() < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {Notification.objects.filter(status='sent').count()} sent")
        time.sleep(0.2)


def main() -> None:
    url = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "picobot.toml"
        config.write_text(CONFIG)
        setup(url, str(config))
        from notifications.models import Notification
        from notifications.testing.fake_twilio import FakeTwilio

        twilio = FakeTwilio().start()
        env = {
            **os.environ,
            "PICOBOT_LOG_LEVEL": "WARNING",
            "TWILIO_ACCOUNT_SID": twilio.account_sid,
            "TWILIO_AUTH_TOKEN": twilio.auth_token,
            "TWILIO_WHATSAPP_FROM": "+15550000000",
            "TWILIO_API_BASE_URL": twilio.base_url,
        }
        user, contact = reset()
        cluster = subprocess.Popen(
            [sys.executable, "manage.py", "qcluster"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            write(user, contact, 1, "warm-up")  # the cluster is up once this is sent
            wait_sent(1, 120)
            write(user, contact, BURST, "burst")
            wait_sent(BURST + 1, 600)
            burst = Notification.objects.filter(idempotency_key__startswith="bench:burst:")
            sent = sorted(burst.values_list("sent_at", flat=True))
            rate = (len(sent) - 1) / (sent[-1] - sent[0]).total_seconds()
            for i in range(STEADY):
                write(user, contact, 1, f"steady{i}")
                time.sleep(STEADY_GAP_SECS)
            wait_sent(BURST + 1 + STEADY, 300)
            steady = Notification.objects.filter(idempotency_key__startswith="bench:steady")
            latencies = [
                (s - w).total_seconds() for s, w in steady.values_list("sent_at", "next_attempt_at")
            ]
        finally:
            os.killpg(cluster.pid, signal.SIGTERM)
            try:
                cluster.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(cluster.pid, signal.SIGKILL)
                cluster.wait(timeout=15)
            twilio.stop()
        reset()
    print(
        json.dumps(
            {
                "burst": BURST,
                "sent_per_sec": round(rate, 1),
                "steady": len(latencies),
                "latency_p50_ms": round(statistics.median(latencies) * 1000),
                "latency_p99_ms": round(percentile(latencies, 0.99) * 1000),
            }
        )
    )


if __name__ == "__main__":
    main()
