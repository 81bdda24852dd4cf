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
        try:
            plan = load(dry_run=options["dry_run"])
        except HeartbeatsInvalid as exc:
            raise CommandError(
                "[heartbeats] was not loaded (nothing changed):\n  " + "\n  ".join(exc.problems)
            ) from None
        prefix = "heartbeats (dry run): " if options["dry_run"] else "heartbeats: "
        for line in plan.lines():
            self.stdout.write(prefix + line)
        if not plan.steps:
            self.stdout.write(prefix + "none configured")
