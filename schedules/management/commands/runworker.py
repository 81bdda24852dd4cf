"""`manage.py runworker [--once] [--concurrency N] [--worker-id ID]`: run the scheduler."""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys
from collections import Counter
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import OperationalError

from schedules.dbtime import through_outage
from schedules.management.commands.loadheartbeats import load_and_report
from schedules.models import Execution, ExecutionStatus
from schedules.worker import Worker

logger = logging.getLogger("picobot.worker")
# How often a worker starting without its database tries again.
STARTUP_RETRY_SECS = 1.0

DISABLED_MESSAGE = (
    "The scheduler is disabled. To run scheduled prompts, add\n\n"
    "    [scheduler]\n    enabled = true\n\n"
    "to picobot.toml (or the file PICOBOT_CONFIG names) and start runworker again."
)


class Command(BaseCommand):
    help = "Run the scheduler: claim due schedules and run them through the agent."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--once", action="store_true", help="Run what is due now, wait for it, then exit."
        )
        parser.add_argument(
            "--concurrency",
            type=int,
            default=None,
            help="Executions run at once by this worker (default: [scheduler] max_concurrent).",
        )
        parser.add_argument(
            "--worker-id", default=None, help="Name recorded on claims (default: host:pid)."
        )
        parser.add_argument(
            "--grace-secs",
            type=float,
            default=30.0,
            help="On SIGTERM/SIGINT, how long running executions get to finish (default 30).",
        )
        parser.add_argument(
            "--metrics-port",
            type=int,
            default=None,
            help="Serve Prometheus metrics on this port (default: not served).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        config = settings.PICOBOT.scheduler
        if not config.enabled:
            raise CommandError(DISABLED_MESSAGE)
        concurrency = options["concurrency"] or config.max_concurrent
        if concurrency < 1:
            raise CommandError("--concurrency must be at least 1")
        if options["grace_secs"] < 0:
            raise CommandError("--grace-secs must be 0 or more")
        # Operators (and tests) can see what every thread is doing: kill -USR1 <pid>.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        self.load_heartbeats()
        if options["metrics_port"] is not None:
            from prometheus_client import start_http_server

            start_http_server(options["metrics_port"])
        worker = Worker(
            worker_id=options["worker_id"],
            concurrency=concurrency,
            once=options["once"],
            grace_secs=options["grace_secs"],
        )
        code = worker.run()
        if options["once"]:
            self.stdout.write(once_summary(worker.started_ids, worker.skipped_count))
        if code:
            sys.exit(code)

    def load_heartbeats(self) -> None:
        """Load the heartbeats file, waiting for the database if it is not reachable yet (a
        worker started while the server restarts, or before it is up, waits instead of
        exiting; SIGTERM still stops it)."""
        through_outage(
            lambda: load_and_report(self.stdout),
            "loading the heartbeats at start-up",
            within=None,
            every=STARTUP_RETRY_SECS,
            errors=(OperationalError,),
        )


def once_summary(execution_ids: list[int], skipped: int) -> str:
    """What `--once` did: "ran 3 executions: 2 succeeded, 1 failed", or "nothing due"."""
    if not execution_ids and not skipped:
        return "nothing due"
    ended = Counter(Execution.objects.filter(pk__in=execution_ids).values_list("status", flat=True))
    counts = ", ".join(f"{ended[s]} {s}" for s in ExecutionStatus.values if ended[s])
    count = len(execution_ids)
    summary = f"ran {count} execution{'' if count == 1 else 's'}" + (
        f": {counts}" if counts else ""
    )
    if skipped:
        summary += f"; recorded {skipped} skipped occurrence{'' if skipped == 1 else 's'}"
    return summary
