"""`manage.py createapikey USERNAME [--create-user] [--grant PERMISSION ...]`."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from kernel.models import ApiKey, User
from kernel.permissions import InvalidPermission, parse_permission


class Command(BaseCommand):
    help = (
        "Issue an API key for USERNAME and print it alone on the last line. --grant adds a "
        "permission to the user's grant (repeatable)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument(
            "--create-user", action="store_true", help="Create the user if it does not exist."
        )
        parser.add_argument(
            "--grant",
            action="append",
            default=[],
            metavar="PERMISSION",
            help="Add PERMISSION to the user's grant (e.g. schedule:*, net:api.example.com).",
        )
        parser.add_argument("--name", default="", help="A label for the key.")

    def handle(self, *args: Any, **options: Any) -> None:
        username: str = options["username"]
        for text in options["grant"]:
            try:
                parse_permission(text)
            except InvalidPermission as exc:
                raise CommandError(f"refusing --grant: {exc}") from None
        with transaction.atomic():
            user = User.objects.select_for_update().filter(username=username).first()
            if user is None:
                if not options["create_user"]:
                    raise CommandError(f"no user {username!r}; pass --create-user to create one")
                user = User(username=username)
                user.set_unusable_password()
                user.save()
                self.stdout.write(f"created user {username}")
            if user.is_system:
                raise CommandError("the system principal cannot hold API keys")
            if not user.is_active:
                raise CommandError(f"user {username!r} is inactive")
            if options["grant"]:
                user.add_to_grant(options["grant"])
                user.save(update_fields=["grant"])
            _, secret = ApiKey.issue(user, name=options["name"])
        grant = ", ".join(user.grant) if user.grant else "(empty)"
        self.stdout.write(f"grant of {username}: {grant}")
        self.stdout.write("the key is shown once; store it now:")
        self.stdout.write(secret)
