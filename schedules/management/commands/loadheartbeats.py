"""`manage.py loadheartbeats [--dry-run]`: make the heartbeat jobs match `[heartbeats]`."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from schedules.heartbeats import HeartbeatsInvalid, load


class Command(BaseCommand):
    help = (
        "Make the heartbeat jobs match [heartbeats] in the config file: create, update in place, "
        "disable what is gone. Prints one line per heartbeat (create / update with the fields "
        "that change / disable / unchanged)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run", action="store_true", help="Print the plan and change nothing."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        load_and_report(self.stdout, dry_run=options["dry_run"], say_when_empty=True)


def load_and_report(stdout: Any, *, dry_run: bool = False, say_when_empty: bool = False) -> None:
    """Load [heartbeats] (or plan it, with dry_run) and write one line per heartbeat to stdout.

    `runworker` calls this at start with say_when_empty off, so a worker without heartbeats
    prints nothing about them.
    """
    try:
        plan = load(dry_run=dry_run)
    except HeartbeatsInvalid as exc:
        raise CommandError(
            "[heartbeats] was not loaded (nothing changed):\n  " + "\n  ".join(exc.problems)
        ) from None
    prefix = "heartbeats (dry run): " if dry_run else "heartbeats: "
    for line in plan.lines():
        stdout.write(prefix + line)
    if not plan.steps and say_when_empty:
        stdout.write(prefix + "none configured")
