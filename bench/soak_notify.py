"""The soak's notification side: the receivers, the `qcluster` processes, and their faults.

Users of the soak get verified contacts: WhatsApp numbers on a local fake Twilio
(`notifications/testing/fake_twilio.py`) and https webhooks on a local receiver
(`notifications/testing/webhook_receiver.py`, a self-signed certificate the clusters trust
through SSL_CERT_FILE); one WhatsApp number has unsubscribed, so its messages die. Their jobs
notify on success, on failure, or both. `qcluster` processes
deliver; the fault loop makes the receivers fail for stretches (HTTP 500, 503, 429, dropped
connections, requests held past the client's timeout, and messages taken but answered only after
it) and SIGKILLs a random cluster with all its processes (a lost host), starting another.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_APP = "soak-qcluster"
FROM_NUMBER = "+15550000000"
WHATSAPP_USERS = range(0, 6)
WEBHOOK_USERS = range(4, 10)
CONSOLE_USERS = range(10, 12)  # no contact: their messages go to the console channel
# This user's WhatsApp number has unsubscribed (Twilio error 21610): its messages go `dead` at
# once, with the reason.
UNSUBSCRIBED_USER = 5
NOTIFY_CHOICES = [["success", "failure"], ["success"], ["failure"]]
# Failure modes of a stretch, and how often each is drawn. "late": the receiver takes the
# message and answers after the client's timeout (the documented duplicate window).
MODES = [500, 503, 429, "drop", "timeout", "late"]
MODE_WEIGHTS = [3, 2, 3, 3, 2, 1]
CONFIG = """
[notifications]
max_attempts = 6
retry_base_secs = 1
delivery_lease_secs = {lease}
sweep_secs = 10
"""
# Longer than the channels' 10 s timeout, so only a stopped process loses a lease.
DELIVERY_LEASE_SECS = 20


def whatsapp_number(user_index: int) -> str:
    return f"+1415555{1000 + user_index}"


def notify_on(user_index: int, rng: random.Random) -> list[str] | None:
    """A job's notify_on for its owner: None (the default) for console users, nothing for
    users without contacts, a random choice for users with contacts."""
    if user_index in CONSOLE_USERS:
        return None
    if user_index in WHATSAPP_USERS or user_index in WEBHOOK_USERS:
        return rng.choice(NOTIFY_CHOICES)
    return []


GRANT_EXTRA = ["notify:webhook", "net:127.0.0.1"]


def create_contacts(users: list[Any], webhook_url: str) -> None:
    import secrets

    from notifications.models import Contact
    from schedules.dbtime import db_now

    now = db_now()
    for i, user in enumerate(users):
        if i in WHATSAPP_USERS:
            Contact.objects.create(
                owner=user, channel="whatsapp", address=whatsapp_number(i), verified_at=now
            )
        if i in WEBHOOK_USERS:
            Contact.objects.create(
                owner=user,
                channel="webhook",
                address=f"{webhook_url}?user={i}",
                webhook_secret=secrets.token_hex(32),
                verified_at=now,
            )


@dataclass
class Receivers:
    twilio: Any
    webhook: Any
    cert_file: Path

    @classmethod
    def start(cls, workdir: Path) -> Receivers:
        from notifications.testing.fake_twilio import FakeTwilio
        from notifications.testing.webhook_receiver import WebhookReceiver, make_certificate

        cert, key = make_certificate(workdir)
        twilio = FakeTwilio().start()
        twilio.fail_number(whatsapp_number(UNSUBSCRIBED_USER), 400, 21610)
        webhook = WebhookReceiver((cert, key)).start()
        return cls(twilio, webhook, cert)

    def env(self) -> dict[str, str]:
        return {
            "TWILIO_ACCOUNT_SID": self.twilio.account_sid,
            "TWILIO_AUTH_TOKEN": self.twilio.auth_token,
            "TWILIO_WHATSAPP_FROM": FROM_NUMBER,
            "TWILIO_API_BASE_URL": self.twilio.base_url,
            "SSL_CERT_FILE": str(self.cert_file),
        }

    def fail(self, target: str, mode: Any) -> None:
        """Put `target` ("twilio", "webhook" or "both") into failure `mode` (None: healthy)."""
        if target in ("twilio", "both"):
            self.twilio.fail_all(_twilio_action(mode))
        if target in ("webhook", "both"):
            self.webhook.answer = 200 if mode is None else mode

    def healthy(self) -> None:
        self.fail("both", None)

    def stop(self) -> None:
        self.healthy()
        self.twilio.stop()
        self.webhook.stop()


def _twilio_action(mode: Any) -> Any:
    if mode == 429:
        return ("error", 429, 20429)
    return mode


class ClusterPool:
    """`qcluster` processes, each in its own session so a kill takes all its processes."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.live: list[subprocess.Popen[bytes]] = []
        self.started = 0
        self.crashed: list[str] = []
        self._lock = threading.Lock()

    def start_one(self) -> None:
        with self._lock:
            self.started += 1
            log = open(self.logs / f"soak-q{self.started}.log", "wb")
            process = subprocess.Popen(
                [sys.executable, "manage.py", "qcluster"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
            self.live.append(process)

    def reap(self) -> None:
        """Clusters that exited by themselves: replaced, and reported."""
        with self._lock:
            dead = [p for p in self.live if p.poll() is not None]
            self.live = [p for p in self.live if p not in dead]
        for process in dead:
            self.crashed.append(f"qcluster pid {process.pid} exited with {process.returncode}")
            self.start_one()

    def kill_random(self, rng: random.Random) -> bool:
        with self._lock:
            if not self.live:
                return False
            victim = rng.choice(self.live)
            self.live.remove(victim)
        _killpg(victim, signal.SIGKILL)
        self.start_one()
        return True

    def stop_all(self, grace_secs: float = 30) -> None:
        with self._lock:
            procs, self.live = self.live, []
        for process in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_secs
        for process in procs:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # Its worker processes too, whatever the main one did.
            _killpg(process, signal.SIGKILL)


def _killpg(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    with contextlib.suppress(Exception):
        process.wait(timeout=10)


@dataclass
class ChannelFaults:
    """What the notification fault loop did, with times (time.time()) for the checks."""

    cluster_kills: list[float] = field(default_factory=list)
    stretches: list[tuple[str, str, float, float]] = field(default_factory=list)


def inject_channel_faults(
    options: Any,
    receivers: Receivers,
    clusters: ClusterPool,
    stop: threading.Event,
    log: ChannelFaults,
) -> None:
    """Until `stop`: failure stretches at the receivers, and qcluster SIGKILLs."""
    rng = random.Random(options.seed + 3)
    started = time.monotonic()
    next_kill = started + options.cluster_kill_every_secs
    next_stretch = started + rng.uniform(0.5, 1.0) * options.channel_fault_every_secs
    stretch_end: float | None = None
    current: tuple[str, str, float] | None = None
    while not stop.wait(0.2):
        clusters.reap()
        now = time.monotonic()
        if now >= next_kill:
            next_kill = now + rng.uniform(0.5, 1.5) * options.cluster_kill_every_secs
            if clusters.kill_random(rng):
                log.cluster_kills.append(time.time())
        if current is None and now >= next_stretch:
            target = rng.choice(["twilio", "webhook", "both"])
            mode = rng.choices(MODES, MODE_WEIGHTS)[0]
            receivers.fail(target, mode)
            current = (target, str(mode), time.time())
            stretch_end = now + rng.uniform(4, 12)
        if current is not None and stretch_end is not None and now >= stretch_end:
            receivers.healthy()
            log.stretches.append((*current, time.time()))
            current = None
            next_stretch = now + rng.uniform(0.5, 1.5) * options.channel_fault_every_secs
    receivers.healthy()
    if current is not None:
        log.stretches.append((*current, time.time()))


def wait_delivered(clusters: ClusterPool, timeout: float, retrying: Any, say: Any) -> bool:
    """Wait until no notification is `pending` or `sending` (the receivers are healthy now)."""
    from notifications.models import Notification

    def open_rows() -> int:
        return Notification.objects.filter(status__in=["pending", "sending"]).count()

    deadline = time.monotonic() + timeout
    next_report = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = retrying(open_rows, "notification drain check")
        if not left:
            return True
        clusters.reap()
        if time.monotonic() >= next_report:
            next_report = time.monotonic() + 30
            say(f"delivering: {left} notifications pending or sending")
        time.sleep(1)
    return False
