"""A short soak (`bench/soak.py`): executions under workers killed and paused, on PostgreSQL a
restarted server and terminated connections, notifications delivered by a `qcluster` killed now
and then to receivers failing for stretches; nothing lost, nothing run twice, every message
sent (repeated only in the documented window) or dead with its reason.

It runs against a database of its own (a private PostgreSQL cluster, or a temporary SQLite
file), in the pass of the suite for that database, so CI catches a regression of any guarantee
the soak checks. `make soak` runs the long version.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.db import connection

from bench.pgcluster import ClusterUnavailable, find_bindir
from tests.worker_support import ROOT

pytestmark = pytest.mark.slow


def _soak_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE", "PICOBOT_TEST_CONFIG", "PICOBOT_CONFIG"):
        env.pop(name, None)
    return env


@pytest.mark.timeout(900)
def test_a_short_soak_under_faults_loses_nothing_and_runs_nothing_twice() -> None:
    database = "postgres" if connection.vendor == "postgresql" else "sqlite"
    if database == "postgres":
        try:
            find_bindir()
        except ClusterUnavailable as exc:
            if os.environ.get("CI") == "true":
                raise
            pytest.skip(f"no PostgreSQL server binaries for the soak's own cluster: {exc}")
    argv = ["--database", database, "--executions", "500", "--duration", "45", "--workers", "3"]
    argv += ["--qclusters", "1", "--cluster-kill-every", "15", "--channel-fault-every", "10"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.soak", *argv, "--settle", "240", "--kill-every", "4"],
        cwd=ROOT,
        env=_soak_env(),
        capture_output=True,
        text=True,
        timeout=840,
    )
    report = done.stdout[done.stdout.find("== soak results ==") :]
    assert done.returncode == 0, f"{report or done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "violations: 0" in report
    for channel in ("whatsapp", "webhook"):  # the notification checks ran on real deliveries
        assert f"notifications {channel} sent" in report, report
