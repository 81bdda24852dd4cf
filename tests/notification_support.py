"""Real `qcluster` (and `runworker`) processes for notification tests, with a fake Twilio."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from notifications.models import Channel, Contact
from notifications.testing.fake_twilio import FakeTwilio
from schedules.dbtime import db_now
from tests.worker_support import ROOT, Workers, _toml

# Short waits so a test sees retries, leases and sweeps in seconds.
FAST_NOTIFICATIONS = {
    "retry_base_secs": 1,
    "delivery_lease_secs": 3,
    "sweep_secs": 1,
    "max_attempts": 5,
}
FROM_NUMBER = "+15550000000"
TEMPLATE_SID = "HX" + "a" * 32


class Processes(Workers):
    """Workers plus a django-q2 cluster, configured for a fake Twilio and a public URL."""

    def __init__(
        self,
        tmp_path: Path,
        model_url: str | None,
        *,
        twilio: FakeTwilio | None = None,
        public_url: str = "",
        notifications: dict[str, Any] | None = None,
        **scheduler: Any,
    ) -> None:
        super().__init__(tmp_path, model_url, **scheduler)
        self.scheduler_toml = self.config.read_text()
        self.notifications_config(**(notifications or {}))
        if twilio is not None:
            self.env.update(twilio_env(twilio))
        if public_url:
            self.env["PICOBOT_PUBLIC_URL"] = public_url
        self.clusters: list[subprocess.Popen[bytes]] = []

    def notifications_config(self, **values: Any) -> None:
        """Write [notifications] (the fast defaults with `values` over them) for new processes."""
        values = {**FAST_NOTIFICATIONS, **values}
        lines = ["", "[notifications]"] + [f"{k} = {_toml(v)}" for k, v in values.items()]
        self.config.write_text(self.scheduler_toml + "\n".join(lines) + "\n")

    def start_cluster(self) -> subprocess.Popen[bytes]:
        log = open(self.tmp_path / f"cluster-{len(self.clusters)}.log", "wb")
        process = subprocess.Popen(
            [sys.executable, "manage.py", "qcluster"],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its worker processes die with it (killpg)
        )
        self.clusters.append(process)
        return process

    def kill_cluster(self, process: subprocess.Popen[bytes]) -> None:
        """SIGKILL the cluster and every process it started (a lost host)."""
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)

    def stop_all(self) -> None:
        super().stop_all()
        for process in self.clusters:
            if process.poll() is None:
                self.kill_cluster(process)


def twilio_env(twilio: FakeTwilio) -> dict[str, str]:
    return {
        "TWILIO_ACCOUNT_SID": twilio.account_sid,
        "TWILIO_AUTH_TOKEN": twilio.auth_token,
        "TWILIO_WHATSAPP_FROM": FROM_NUMBER,
        "TWILIO_API_BASE_URL": twilio.base_url,
        "TWILIO_WHATSAPP_CONTENT_SID": TEMPLATE_SID,
    }


def point_settings_at(settings: Any, twilio: FakeTwilio, public_url: str = "") -> None:
    """This process's settings as the subprocesses see them (the callback view reads them)."""
    for name, value in twilio_env(twilio).items():
        setattr(settings, name, value)
    settings.PICOBOT_PUBLIC_URL = public_url


def verified_contact(
    owner: Any, address: str, channel: str = Channel.WHATSAPP, **extra: Any
) -> Contact:
    return Contact.objects.create(
        owner=owner, channel=channel, address=address, verified_at=db_now(), **extra
    )
